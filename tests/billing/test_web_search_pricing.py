"""Web searches priced per 1,000 beside the tokens (``billing.pricing``): the ledger's cost and the admin's
breakdown add them, exactly, and a model without a search price charges nothing for them."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace

from billing.pricing import cost_breakdown, cost_for

MODEL = SimpleNamespace(
    input_per_mtok=Decimal(3),
    output_per_mtok=Decimal(15),
    cached_input_per_mtok=None,
    cache_write_per_mtok=None,
    cache_write_1h_per_mtok=None,
    web_search_per_1k=Decimal(10),
)


def test_searches_are_charged_per_1000_beside_the_tokens():
    # 1,000 × $3/M + 200 × $15/M + 7 × $10/1,000
    assert cost_for(model=MODEL, prompt_tokens=1_000, completion_tokens=200, web_search_requests=7) == Decimal(
        "0.0760000000"
    )
    assert cost_for(model=MODEL, prompt_tokens=1_000, completion_tokens=200) == Decimal("0.0060000000")


def test_the_breakdown_shows_the_searches_and_totals_what_the_ledger_charges():
    parts = cost_breakdown(model=MODEL, prompt_tokens=1_000, completion_tokens=200, web_search_requests=7)
    assert (parts.web_search_requests, parts.web_search_cost) == (7, Decimal("0.0700000000"))
    assert parts.total_cost == cost_for(model=MODEL, prompt_tokens=1_000, completion_tokens=200, web_search_requests=7)


def test_without_a_search_price_searches_cost_nothing():
    free = SimpleNamespace(**{**vars(MODEL), "web_search_per_1k": Decimal(0)})
    assert cost_for(model=free, prompt_tokens=1_000, completion_tokens=200, web_search_requests=7) == Decimal(
        "0.0060000000"
    )
