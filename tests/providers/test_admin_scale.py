"""The providers' admin pages cost the same queries however many rows they show (docs/performance.md, "The
admin at scale")."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from providers.models import ModerationPolicy
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory

pytestmark = pytest.mark.django_db


def page_queries(client: Client, url: str) -> tuple[int, str]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200
    return len(captured), response.content.decode()


def test_the_moderation_policies_list_counts_each_policys_models_without_a_query_a_row(admin_client):
    url = reverse("admin:providers_moderationpolicy_changelist")
    first = ModerationPolicy.objects.create(name="policy-0")
    ModelFactory(moderation_policy=first)
    page_queries(admin_client, url)  # the first view fills Django's caches (content types): not counted
    few, _ = page_queries(admin_client, url)

    for n in range(1, 11):
        policy = ModerationPolicy.objects.create(name=f"policy-{n}")
        for _ in range(n % 3):
            ModelFactory(moderation_policy=policy)
    many, page = page_queries(admin_client, url)

    assert many == few
    shown = re.findall(r'field-name"><a [^>]*>([^<]+)</a></th>.*?<td class="field-models_using">(\d+)</td>', page)
    counts = {name: int(count) for name, count in shown}
    assert counts == {"policy-0": 1, **{f"policy-{n}": n % 3 for n in range(1, 11)}}


def test_a_models_change_page_costs_the_same_queries_however_many_deployments_it_has(admin_client):
    """Each deployment's row names itself after its model and offers every provider: read once for the page."""
    model = ModelFactory(name="busy")
    url = reverse("admin:providers_catalogmodel_change", args=[model.pk])
    page_queries(admin_client, url)  # the first view fills Django's caches (content types): not counted
    few, _ = page_queries(admin_client, url)

    providers = [ProviderFactory(name=f"east-{n}") for n in range(8)]
    for provider in providers:
        DeploymentFactory(model=model, provider=provider, name=f"on-{provider.name}")
    many, page = page_queries(admin_client, url)

    assert many == few
    # Offered in every row: unselected in the 8 others and the blank row "Add another" copies, chosen in its own.
    assert page.count(f'<option value="{providers[-1].pk}">east-7</option>') == 9
    assert page.count(f'<option value="{providers[-1].pk}" selected>east-7</option>') == 1


def test_the_delete_page_of_models_lists_their_first_health_checks_and_counts_the_rest(admin_client):
    """Deleting public models takes their deployments and each one's health checks (up to 1,000 a deployment,
    ``LLMHUB_HEALTH_CHECKS_KEPT``): the confirmation page costs the same queries for a few checks as for thousands
    (Django's read and rendered every one), lists the first 100 and counts the rest; confirming deletes them."""
    from datetime import UTC, datetime, timedelta

    from providers.models import CatalogModel, HealthCheck

    provider = ProviderFactory(name="east")
    models = [ModelFactory(name=f"doomed-{n}", provider=provider) for n in range(3)]
    deployments = [model.deployments.get() for model in models]
    changelist = reverse("admin:providers_catalogmodel_changelist")
    action = {"action": "delete_selected", "_selected_action": [model.pk for model in models]}
    start = datetime(2026, 12, 1, tzinfo=UTC)

    def checks(count: int) -> None:
        HealthCheck.objects.bulk_create(
            HealthCheck(deployment=deployment, checked_at=start + timedelta(seconds=n), ok=True)
            for deployment in deployments
            for n in range(count)
        )

    def page() -> tuple[int, str, dict]:
        with CaptureQueriesContext(connection) as captured:
            response = admin_client.post(changelist, action)
        assert response.status_code == 200 and not response.context["protected"]
        return len(captured), response.content.decode(), dict(response.context["model_count"])

    checks(2)
    page()  # the first view fills Django's caches (content types): not counted
    few, _, _ = page()
    checks(998)
    many, shown, counted = page()

    assert many == few
    assert counted == {"models": 3, "deployments": 3, "health checks": 3_000}
    assert shown.count("<li>Health check: ") == 100 and "… and 2900 more health checks" in shown
    assert admin_client.post(changelist, {**action, "post": "yes"}).status_code == 302
    assert not CatalogModel.objects.filter(pk__in=[model.pk for model in models]).exists()
    assert not HealthCheck.objects.exists()
