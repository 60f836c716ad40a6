"""Prompt-cache writes (Anthropic's ``cache_creation_input_tokens``) priced as providers bill them: at the
catalog's cache-write price, part of the prompt like cached reads, the input price when the catalog has none."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.pricing import cost_breakdown, cost_for
from providers.models import CatalogModel
from providers.selectors import resolved_model
from tests.factories import DeploymentFactory, ModelFactory

pytestmark = pytest.mark.django_db


def _sonnet(**prices: str) -> CatalogModel:
    defaults = {"input_per_mtok": "3", "output_per_mtok": "15", "cached_input_per_mtok": "0.30"}
    return ModelFactory(
        name="claude-sonnet", **{name: Decimal(value) for name, value in {**defaults, **prices}.items()}
    )


def test_cache_writes_are_priced_at_the_cache_write_price_and_the_rest_of_the_prompt_as_before():
    model = resolved_model(_sonnet(cache_write_per_mtok="3.75"))
    assert model is not None
    # 1,000 prompt tokens: 300 read from the cache, 600 written to it, 100 neither; 50 output.
    cost = cost_for(model=model, prompt_tokens=1000, completion_tokens=50, cached_tokens=300, cache_write_tokens=600)
    expected = (100 * Decimal("3") + 300 * Decimal("0.30") + 600 * Decimal("3.75") + 50 * Decimal("15")) / 10**6
    assert cost == expected == Decimal("0.00339")

    parts = cost_breakdown(
        model=model, prompt_tokens=1000, completion_tokens=50, cached_tokens=300, cache_write_tokens=600
    )
    assert (parts.input_tokens, parts.cached_input_tokens, parts.cache_write_tokens) == (1000, 300, 600)
    assert (parts.input_cost, parts.cached_input_cost, parts.cache_write_cost, parts.output_cost) == (
        Decimal("0.0003000000"),
        Decimal("0.0000900000"),
        Decimal("0.0022500000"),
        Decimal("0.0007500000"),
    )
    assert parts.total_cost == cost


def test_without_a_cache_write_price_writes_cost_the_input_price_as_they_did():
    model = resolved_model(_sonnet())
    assert model is not None and model.cache_write_per_mtok is None
    written = cost_for(model=model, prompt_tokens=1000, completion_tokens=0, cache_write_tokens=600)
    assert written == cost_for(model=model, prompt_tokens=1000, completion_tokens=0) == Decimal("0.003")


def test_more_writes_than_the_prompt_holds_beyond_its_cached_part_are_no_more_than_that():
    """Counts that cannot both be right (a provider's odd usage) never charge a token twice."""
    model = resolved_model(_sonnet(cache_write_per_mtok="6"))
    assert model is not None
    cost = cost_for(model=model, prompt_tokens=100, completion_tokens=0, cached_tokens=40, cache_write_tokens=500)
    assert cost == (40 * Decimal("0.30") + 60 * Decimal("6")) / 10**6


def test_an_unbound_model_holds_the_dearest_cache_write_price_of_its_deployments():
    """What a reservation prices before routing picks one: the dearest, a deployment without its own counted at
    its input price."""
    catalog = _sonnet(cache_write_per_mtok="3.75")
    DeploymentFactory(model=catalog, name="bedrock", input_per_mtok=Decimal("4"), output_per_mtok=Decimal("15"))
    model = resolved_model(catalog)
    assert model is not None
    assert model.cache_write_per_mtok == Decimal("4")
    assert sorted(d.cache_write_per_mtok or 0 for d in model.deployments) == [0, Decimal("3.75")]
    bound = model.on(next(d for d in model.deployments if d.cache_write_per_mtok is not None))
    assert bound.cache_write_per_mtok == Decimal("3.75")


def test_the_ledger_admin_breaks_a_rows_cost_down_with_its_cache_writes():
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse

    from tests.factories import UsageRecordFactory

    catalog = _sonnet(cache_write_per_mtok="3.75")
    record = UsageRecordFactory(
        model=catalog,
        model_name="claude-sonnet",
        prompt_tokens=1000,
        cached_tokens=300,
        cache_write_tokens=600,
        completion_tokens=50,
        cost=Decimal("0.0033900000"),
    )
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-for-tests-123"))

    text = client.get(reverse("admin:billing_usagerecord_change", args=[record.pk])).content.decode()

    assert "input $0.0003000000 (100 tokens at $3.000000/M)" in text
    assert "cached input $0.0000900000 (300 tokens at $0.300000/M)" in text
    assert "cache write $0.0022500000 (600 tokens at $3.750000/M)" in text
    assert "output $0.0007500000 (50 tokens at $15.000000/M) = $0.0033900000" in text


def test_writes_to_the_1_hour_cache_are_priced_at_its_price_and_the_5_minute_ones_as_before():
    """Anthropic bills a write to its 1-hour cache at 2× input, to the 5-minute cache at 1.25×: 600 written, 200
    of them to the 1-hour cache."""
    model = resolved_model(_sonnet(cache_write_per_mtok="3.75", cache_write_1h_per_mtok="6"))
    assert model is not None
    counts = {"prompt_tokens": 1000, "completion_tokens": 50, "cached_tokens": 300, "cache_write_tokens": 600}
    cost = cost_for(model=model, **counts, cache_write_1h_tokens=200)
    expected = (
        100 * Decimal("3") + 300 * Decimal("0.30") + 400 * Decimal("3.75") + 200 * Decimal("6") + 50 * Decimal("15")
    ) / 10**6
    assert cost == expected == Decimal("0.00384")

    parts = cost_breakdown(model=model, **counts, cache_write_1h_tokens=200)
    assert (parts.cache_write_tokens, parts.cache_write_1h_tokens) == (600, 200)
    assert (parts.cache_write_cost, parts.cache_write_1h_cost) == (Decimal("0.0027000000"), Decimal("0.0012000000"))
    assert parts.total_cost == cost


def test_without_a_1_hour_price_those_writes_cost_the_cache_write_price_then_the_input_price():
    """Existing deployments keep their prices: no 1-hour price, the cache-write price; neither, the input."""
    counts = {"prompt_tokens": 1000, "completion_tokens": 0, "cache_write_tokens": 600}
    written = resolved_model(_sonnet(cache_write_per_mtok="3.75"))
    assert written is not None and written.cache_write_1h_per_mtok is None
    assert cost_for(model=written, **counts, cache_write_1h_tokens=600) == cost_for(model=written, **counts)
    CatalogModel.objects.all().delete()
    plain = resolved_model(_sonnet())
    assert plain is not None
    assert cost_for(model=plain, **counts, cache_write_1h_tokens=600) == Decimal("0.003")


def test_more_1_hour_writes_than_writes_are_no_more_than_the_writes():
    model = resolved_model(_sonnet(cache_write_per_mtok="3.75", cache_write_1h_per_mtok="6"))
    assert model is not None
    cost = cost_for(
        model=model, prompt_tokens=100, completion_tokens=0, cache_write_tokens=10, cache_write_1h_tokens=50
    )
    assert cost == (90 * Decimal("3") + 10 * Decimal("6")) / 10**6


def test_an_unbound_model_and_the_reservation_hold_the_dearest_1_hour_price():
    """Before routing picks a deployment, the dearest 1-hour price of them all (a deployment without one counted at
    its cache-write price); a prompt is reserved at the dearest of input, cache-write and 1-hour prices."""
    from billing.pricing import prompt_cost_ceiling

    catalog = _sonnet(cache_write_per_mtok="3.75", cache_write_1h_per_mtok="6")
    DeploymentFactory(
        model=catalog,
        name="bedrock",
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("15"),
        cache_write_per_mtok=Decimal("7"),
    )
    model = resolved_model(catalog)
    assert model is not None
    assert (model.cache_write_per_mtok, model.cache_write_1h_per_mtok) == (Decimal("7"), Decimal("7"))
    anthropic = model.on(next(d for d in model.deployments if d.name != "bedrock"))
    assert anthropic.cache_write_1h_per_mtok == Decimal("6")
    assert prompt_cost_ceiling(model=anthropic, prompt_tokens=1000, completion_tokens=10) == Decimal("0.00615")


def test_the_ledger_admin_breaks_a_rows_cost_down_with_its_1_hour_cache_writes():
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse

    from tests.factories import UsageRecordFactory

    catalog = _sonnet(cache_write_per_mtok="3.75", cache_write_1h_per_mtok="6")
    record = UsageRecordFactory(
        model=catalog,
        model_name="claude-sonnet",
        prompt_tokens=1000,
        cache_write_tokens=600,
        cache_write_1h_tokens=200,
        completion_tokens=0,
        cost=Decimal("0.0039000000"),
    )
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-for-tests-123"))

    text = client.get(reverse("admin:billing_usagerecord_change", args=[record.pk])).content.decode()

    assert "cache write $0.0027000000 (400 tokens at $3.750000/M and 200 to the 1-hour cache at $6.000000/M)" in text
    assert "= $0.0039000000" in text
