"""A parameter rule's ``fixed`` value may raise what a deployment is sent (``max_tokens``, ``n``) above what the
client asked: admission reserves for what is sent, so the key's budget holds (``docs/ledger.md``)."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest
from django.db.models import Sum

from billing.models import BudgetPeriod, UsageRecord
from billing.services.budgets import api_key_limits_set
from providers.models import CatalogModel
from tests.gateway.test_ledger import settle_quietly
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

BUDGET = Decimal("0.0002")  # the prompt below and about 200 of the 400 output tokens it may be answered with
WORDS = " ".join(f"w{i}" for i in range(400))  # echoed back: about 400 output tokens, when max_tokens lets it


def _spend(gateway, rules: dict, **params) -> None:
    CatalogModel.objects.filter(name="gpt-test").update(parameter_rules=rules)
    api_key_limits_set(api_key=gateway.api_key, budget_usd=BUDGET, budget_period=BudgetPeriod.MONTHLY)
    try:
        raw = gateway.client().chat.completions.with_raw_response.create(
            **{"model": "gpt-test", **params}, messages=[{"role": "user", "content": WORDS}]
        )
        wait_for_record(raw.headers["x-request-id"])
    except openai.RateLimitError as refused:
        assert refused.code == "insufficient_quota"
        assert gateway.upstream.requests == []
    settle_quietly()
    spent = UsageRecord.objects.filter(api_key=gateway.api_key).aggregate(total=Sum("cost"))["total"]
    assert UsageRecord.objects.filter(api_key=gateway.api_key).count() == 1
    assert spent <= BUDGET, f"the key spent {spent} of a budget of {BUDGET}"


def test_a_fixed_max_tokens_above_the_clients_is_reserved(gateway):
    _spend(gateway, {"fixed": {"max_tokens": 2000}}, max_tokens=1)


def test_a_fixed_max_tokens_is_reserved_when_the_client_sets_none(gateway):
    # Under a budget llmhub picks max_tokens for the request, and the rule then replaces it.
    _spend(gateway, {"fixed": {"max_tokens": 2000}})


def test_a_fixed_limit_reached_by_a_rename_is_reserved(gateway):
    _spend(
        gateway,
        {"rename": {"max_tokens": "max_completion_tokens"}, "fixed": {"max_completion_tokens": 2000}},
        max_tokens=1,
    )


def test_a_fixed_n_above_the_clients_is_reserved(gateway):
    _spend(gateway, {"fixed": {"n": 8}}, max_tokens=60, n=1)


def test_a_fixed_max_tokens_of_a_fallback_is_reserved(gateway):
    # The model asked for has no rule and fails; its fallback's rule raises the limit it is sent.
    CatalogModel.objects.filter(name="broken").update(fallbacks=["gpt-test"])
    _spend(gateway, {"fixed": {"max_tokens": 2000}}, model="broken", max_tokens=1)
