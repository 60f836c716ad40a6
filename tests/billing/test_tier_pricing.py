"""OpenAI's service tiers priced apart from the standard one (``billing.pricing``): a deployment's priority and flex
factors multiply every token price of a request charged at that tier, exactly; the web searches (a tool's price per
call, the same at every tier) are not; a deployment without a factor charges the tier at its standard prices; and a
reservation holds the dearest tier a request may be charged at (``reserved_tier``)."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace

import pytest

from billing.pricing import (
    billed_tier,
    cost_breakdown,
    cost_for,
    message_tier,
    prompt_cost_ceiling,
    reserved_tier,
    tier_factor,
)

MODEL = SimpleNamespace(
    input_per_mtok=Decimal("1.25"),
    output_per_mtok=Decimal(10),
    cached_input_per_mtok=Decimal("0.125"),
    cache_write_per_mtok=None,
    cache_write_1h_per_mtok=None,
    web_search_per_1k=Decimal(10),
    priority_price_factor=Decimal(2),
    flex_price_factor=Decimal("0.5"),
)
STANDARD = SimpleNamespace(**{**vars(MODEL), "priority_price_factor": None, "flex_price_factor": None})
# 1,000 prompt tokens (400 cached) and 200 output: 600 × $1.25/M + 400 × $0.125/M + 200 × $10/M.
TOKENS = {"prompt_tokens": 1_000, "completion_tokens": 200, "cached_tokens": 400}


@pytest.mark.parametrize(
    ("tier", "cost"),
    [
        ("", Decimal("0.0028000000")),
        ("default", Decimal("0.0028000000")),
        ("auto", Decimal("0.0028000000")),
        ("scale", Decimal("0.0028000000")),
        ("priority", Decimal("0.0056000000")),
        ("flex", Decimal("0.0014000000")),
    ],
)
def test_a_tier_multiplies_every_token_price(tier, cost):
    assert cost_for(model=MODEL, service_tier=tier, **TOKENS) == cost
    parts = cost_breakdown(model=MODEL, service_tier=tier, **TOKENS)
    assert parts.total_cost == cost and parts.service_tier == (tier if tier in ("priority", "flex") else "")


def test_the_breakdown_prices_each_part_at_the_tier():
    parts = cost_breakdown(model=MODEL, service_tier="priority", **TOKENS)
    assert (parts.input_cost, parts.cached_input_cost, parts.output_cost) == (
        Decimal("0.0015000000"),
        Decimal("0.0001000000"),
        Decimal("0.0040000000"),
    )
    assert parts.price_factor == Decimal(2)


def test_web_searches_cost_the_same_at_every_tier():
    standard = cost_for(model=MODEL, web_search_requests=3, **TOKENS)
    priority = cost_for(model=MODEL, web_search_requests=3, service_tier="priority", **TOKENS)
    assert priority - standard == Decimal("0.0028000000")  # the tokens' share doubled, the searches' $0.03 not


def test_a_deployment_without_a_factor_charges_every_tier_its_standard_prices():
    for tier in ("priority", "flex"):
        assert tier_factor(STANDARD, tier) == 1
        assert cost_for(model=STANDARD, service_tier=tier, **TOKENS) == Decimal("0.0028000000")


def test_an_odd_factor_stays_exact():
    odd = SimpleNamespace(**{**vars(MODEL), "priority_price_factor": Decimal("1.75")})
    # (600 × 1.25 + 400 × 0.125 + 200 × 10) × 1.75 / 1,000,000
    assert cost_for(model=odd, service_tier="priority", **TOKENS) == Decimal("0.0049000000")


@pytest.mark.parametrize(
    ("asked", "reserved"),
    [
        ("priority", "priority"),  # or default, when OpenAI serves it at standard: the dearer of the two
        ("fast", "priority"),  # OpenAI's Fast mode: its Priority processing by another name
        ("default", ""),
        ("flex", ""),  # flex or default: default is the dearer
        ("auto", "priority"),  # the project's default tier may be priority
        (None, "priority"),
        ("standard_only", ""),  # Anthropic's: its standard processing
    ],
)
def test_a_reservation_holds_the_dearest_tier_a_request_may_be_charged_at(asked, reserved):
    assert reserved_tier(MODEL, asked) == reserved
    assert reserved_tier(STANDARD, asked) == ""


@pytest.mark.parametrize(
    ("asked", "served", "billed"),
    [
        ("priority", "priority", "priority"),
        ("priority", "default", ""),
        ("auto", "priority", "priority"),  # the project's default: reserved at priority
        (None, "priority", "priority"),
        ("flex", "flex", "flex"),
        ("default", "flex", "flex"),  # cheaper than asked: charged what was served
        # Dearer than any tier the request asked may be served at, so dearer than its reservation: capped at the
        # dearest it may be (a compatible server, or a project setting, answering default at priority).
        ("default", "priority", ""),
        ("flex", "priority", ""),
        ("standard_only", "priority", ""),
        # Fast mode is Priority processing, whose reply says priority: charged so, and so when no reply said a tier
        # (a compatible server's), charged as asked; before, fast alone was charged the standard prices.
        ("fast", "priority", "priority"),
        ("fast", "fast", "priority"),
    ],
)
def test_a_request_is_billed_no_dearer_than_the_tier_it_was_reserved_at(asked, served, billed):
    assert billed_tier(MODEL, served, asked) == billed
    assert cost_for(model=MODEL, service_tier=billed, **TOKENS) <= cost_for(
        model=MODEL, service_tier=reserved_tier(MODEL, asked), **TOKENS
    )


def test_a_flex_factor_above_standard_is_reserved_for_flex():
    dear_flex = SimpleNamespace(**{**vars(MODEL), "priority_price_factor": None, "flex_price_factor": Decimal(3)})
    assert reserved_tier(dear_flex, "flex") == "flex"
    assert reserved_tier(dear_flex, None) == "flex"


def test_the_ceiling_is_priced_at_the_tier():
    standard = prompt_cost_ceiling(model=MODEL, prompt_tokens=1_000, completion_tokens=100)
    assert prompt_cost_ceiling(model=MODEL, prompt_tokens=1_000, completion_tokens=100, service_tier="priority") == (
        2 * standard
    )


@pytest.mark.django_db
def test_admission_reserves_the_dearest_tier_the_request_may_be_charged_at():
    """The fixed part (the prompt, and the output limit when the client set one) and the price per output token of a
    request without one (by which llmhub picks the limit a budget still pays for) are at the tier's prices."""
    from billing.services.budgets import charge_for
    from providers.models import CatalogModel, Deployment
    from providers.selectors import resolved_model
    from tests.factories import ModelFactory

    ModelFactory(name="tiered", input_per_mtok=Decimal(1), output_per_mtok=Decimal(2))
    Deployment.objects.filter(model__name="tiered").update(priority_price_factor=Decimal(2))
    model = resolved_model(CatalogModel.objects.get(name="tiered"))

    def charge(tier: str | None, **body: object):
        asked = {} if tier is None else {"service_tier": tier}
        return charge_for(model=model, body={**body, **asked}, prompt_tokens_upper=10, cap=1_000, budgeted=True)

    assert (charge("default").fixed_cost, charge("default").token_price) == (Decimal("0.0000100000"), Decimal("2E-6"))
    for tier in ("priority", "auto", None):
        assert (charge(tier).fixed_cost, charge(tier).token_price) == (Decimal("0.0000200000"), Decimal("4E-6"))
        assert charge(tier, max_tokens=100).fixed_cost == 2 * charge("default", max_tokens=100).fixed_cost
    assert charge("flex").token_price == Decimal("2E-6")  # no flex factor: flex at the standard prices


@pytest.mark.parametrize(
    ("said", "tier"),
    [
        ("standard", "default"),
        ("priority", "priority"),
        ("batch", "flex"),  # a translated OpenAI reply served at flex, priced as OpenAI's Batch API
        ("flex", ""),  # OpenAI's word, not Anthropic's
        ("default", ""),  # not Anthropic's word
        (None, ""),
        (3, ""),
    ],
)
def test_a_messages_usage_says_the_tier_it_was_served_at(said, tier):
    assert message_tier(said) == tier
