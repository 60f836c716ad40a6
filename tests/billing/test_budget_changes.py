"""A budget changed mid-period holds at once: a counter its scope stopped using while the budget was elsewhere (another
period) or off is not taken up again as it was left, missing what was spent meanwhile, but put back on the ledger.

Both admission stores, the clock pinned in mid-month."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import time_machine
from asgiref.sync import sync_to_async

from billing.exceptions import QuotaExceededError
from billing.models import BudgetPeriod, Plan
from billing.services.admission import admission_settle
from billing.services.budgets import api_key_limits_set
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.selectors import resolved_model
from tests.billing.conftest import FLAT_TOKEN, flat_admitted
from tests.factories import UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

MID_MONTH = datetime(2026, 12, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock():
    with time_machine.travel(MID_MONTH, tick=False) as traveller:
        yield traveller


@pytest.fixture
def account(plans, catalog, clock):
    user = UserFactory(username="changing")
    plan_assign(user=user, plan=plans["Enterprise"])
    api_key = api_key_create(user=user, name="changing").api_key
    return {"user": user, "key": api_key, "flat": resolved_model(catalog["flat"])}


async def spend(account, request_id: str, tokens: int) -> None:
    """A request of ``tokens`` completion tokens, admitted, settled and written to the ledger."""
    admission = await flat_admitted(account, request_id, tokens)
    await admission_settle(
        admission=admission, cost=tokens * FLAT_TOKEN, prompt_tokens=0, completion_tokens=tokens, ok=True
    )
    await sync_to_async(UsageRecordFactory)(
        request_id=request_id,
        user=account["user"],
        api_key=account["key"],
        cost=tokens * FLAT_TOKEN,
        prompt_tokens=0,
        completion_tokens=tokens,
    )


async def limits(api_key, period: str | None) -> None:
    budget = None if period is None else 50 * FLAT_TOKEN
    await sync_to_async(api_key_limits_set)(api_key=api_key, budget_usd=budget, budget_period=period or "monthly")


@pytest.mark.parametrize("meanwhile", [BudgetPeriod.DAILY, None], ids=["daily", "no-budget"])
async def test_a_keys_monthly_budget_taken_up_again_counts_what_was_spent_meanwhile(store, account, meanwhile):
    """$0.005 a month (50 tokens): 10 spent under it, then 30 while the key's budget was daily (or off), then the
    monthly budget again: 40 of its 50 are spent, and a request that could need 20 is refused. Before, the monthly
    counter went on from the 10 it had been left at, and admitted it (until the next reconciliation)."""
    await limits(account["key"], BudgetPeriod.MONTHLY)
    await spend(account, "under-monthly", 10)
    await limits(account["key"], meanwhile)
    await spend(account, "meanwhile", 30)
    await limits(account["key"], BudgetPeriod.MONTHLY)

    with pytest.raises(QuotaExceededError):
        await flat_admitted(account, "past-the-budget", 20)
    await flat_admitted(account, "within-it", 10)


async def test_a_users_monthly_budget_taken_up_again_counts_what_was_spent_meanwhile(store, account):
    """The same for a user's monthly budget, their plan's: set, spent under, lifted by an admin, spent without, set
    again."""
    plan = await sync_to_async(Plan.objects.create)(
        name="Metered", allow_all_models=True, monthly_budget_usd=50 * FLAT_TOKEN
    )
    await sync_to_async(plan_assign)(user=account["user"], plan=plan)
    await spend(account, "under-the-plan", 10)
    plan.monthly_budget_usd = None
    await sync_to_async(plan.save)()
    await spend(account, "lifted", 30)
    plan.monthly_budget_usd = 50 * FLAT_TOKEN
    await sync_to_async(plan.save)()

    with pytest.raises(QuotaExceededError):
        await flat_admitted(account, "past-the-budget", 20)
    await flat_admitted(account, "within-it", 10)
