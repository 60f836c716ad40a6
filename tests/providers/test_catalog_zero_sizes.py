"""A model's context window and the most it writes are at least one token: a 0 typed in the admin (or a catalog file)
is that field's error, nothing saved. Every reader took a 0 for "not known" but the chat page, which sent no history
for a window of 0 (``chat.history.history_trim``: a prompt budget of 0), and Anthropic's ``/v1/models``, which said
``max_input_tokens: 0``; an empty ``max_output_tokens`` is the way to say "not known". Until 7 December both were
saved. The numbers beside them that take a 0 mean something by it and are kept: no further attempt (``retries``), a
standby deployment (``weight``), the first under the priority strategy (``priority``)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from providers.models import CatalogModel, Deployment
from tests.audit.conftest import form_fields
from tests.factories import ModelFactory

pytestmark = pytest.mark.django_db


def change(admin_client, model: CatalogModel, **values: object):
    url = reverse("admin:providers_catalogmodel_change", args=[model.pk])
    data = form_fields(admin_client.get(url).content.decode())
    return admin_client.post(url, {**data, **values})


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("context_window", "0", "A context window of 0 tokens holds no prompt"),
        ("max_output_tokens", "0", "leave it empty when the most it writes is not known"),
        ("context_window", "-1", "greater than or equal to 0"),
        ("max_output_tokens", "-5", "greater than or equal to 0"),
        ("retries", "-1", "greater than or equal to 0"),
        ("stream_idle_timeout_seconds", "0", "greater than or equal to 0.1"),
    ],
)
def test_a_size_of_zero_or_less_is_the_fields_error_and_nothing_is_saved(admin_client, field, value, shown):
    model = ModelFactory(name="mini", context_window=64_000, max_output_tokens=8_000)

    response = change(admin_client, model, **{field: value})

    assert response.status_code == 200
    assert list(response.context["adminform"].form.errors) == [field]
    assert shown in response.content.decode()
    model.refresh_from_db()
    assert (model.context_window, model.max_output_tokens, model.retries) == (64_000, 8_000, 2)


def test_the_zeros_that_mean_something_are_saved(admin_client):
    model = ModelFactory(name="mini", max_output_tokens=8_000)
    deployment = model.deployments.get()
    prefix = "deployments-0-"

    response = change(
        admin_client, model, max_output_tokens="", retries="0", **{prefix + "weight": "0", prefix + "priority": "0"}
    )

    assert response.status_code == 302, response.context["adminform"].form.errors
    model.refresh_from_db()
    assert (model.max_output_tokens, model.retries) == (None, 0)
    assert Deployment.objects.values_list("weight", "priority").get(pk=deployment.pk) == (0, 0)


@pytest.mark.parametrize("field", ["priority_price_factor", "flex_price_factor"])
def test_a_tier_price_factor_of_zero_is_the_fields_error(admin_client, field):
    """A factor of 0 charged the tokens of every request served at that tier nothing (``billing.pricing.tier_factor``),
    whatever the deployment's prices; empty is "the standard prices", a free deployment has prices of 0."""
    model = ModelFactory(name="mini")
    deployment = model.deployments.get()
    prefix = "deployments-0-"

    refused = change(admin_client, model, **{prefix + field: "0"})

    assert refused.status_code == 200
    [inline] = refused.context["inline_admin_formsets"]
    assert list(inline.formset.errors[0]) == [field]
    assert "0 would charge this tier nothing" in refused.content.decode()
    assert getattr(Deployment.objects.get(pk=deployment.pk), field) is None

    assert change(admin_client, model, **{prefix + field: "0.5"}).status_code == 302
    assert str(getattr(Deployment.objects.get(pk=deployment.pk), field)) == "0.5000"
