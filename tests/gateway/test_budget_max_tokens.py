"""A request that names both max_tokens and max_completion_tokens is reserved for the larger: whichever of
the two the deployment ends up honouring, the key's budget pays for it."""

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

BUDGET = Decimal("0.0002")  # the prompt below and about 200 of the 400 output tokens it asks for


def test_both_token_limits_are_reserved_at_the_larger_so_the_budget_holds(gateway):
    # A deployment that knows only max_tokens: the client's max_tokens reaches it, max_completion_tokens does not.
    CatalogModel.objects.filter(name="gpt-test").update(
        parameter_rules={"rename": {"max_completion_tokens": "max_tokens"}}
    )
    api_key_limits_set(api_key=gateway.api_key, budget_usd=BUDGET, budget_period=BudgetPeriod.MONTHLY)
    words = " ".join(f"w{i}" for i in range(400))  # echoed back: about 400 output tokens, when max_tokens lets it

    try:
        raw = gateway.client().chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=[{"role": "user", "content": words}],
            max_completion_tokens=1,
            max_tokens=2000,
        )
        wait_for_record(raw.headers["x-request-id"])
    except openai.RateLimitError as refused:
        assert refused.code == "insufficient_quota"
        assert gateway.upstream.requests == []
    settle_quietly()

    spent = UsageRecord.objects.filter(api_key=gateway.api_key).aggregate(total=Sum("cost"))["total"]
    assert spent <= BUDGET, f"the key spent {spent} of a budget of {BUDGET}"
