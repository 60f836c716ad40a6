"""Reconciliation alerts for the thresholds that spend a counter missed (a settle lost in a crash, its
ledger row written) crossed: once per threshold and period, never for a correction down.

Every test runs against both admission stores (database row locks, and the real Redis server)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
import redis
from asgiref.sync import sync_to_async
from django.core import mail
from django.utils import timezone

from billing.models import BudgetAlert, BudgetPeriod, TaskRun
from billing.services.admission import admission_acquire, admission_settle
from billing.services.budgets import CounterRef, api_key_limits_set, period_bounds
from billing.services.counters import budget_counters_reconcile, counter_state
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.selectors import resolved_model
from tests.billing.conftest import FLAT_TOKEN, counter_unreconcilable, spend_settled
from tests.factories import UsageRecordFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.period_instants]

TOKEN = FLAT_TOKEN
LATER = timedelta(minutes=10)  # past the memory of settles: only what the ledger shows counts


@pytest.fixture(autouse=True)
def _no_webhook(settings):
    settings.LLMHUB_ALERT_WEBHOOK_URL = ""


@pytest.fixture
def account(plans, catalog):
    """Alice's key has a total budget of $0.01 (100 flat-model tokens): a period that never ends, so a
    reconcile ten minutes on still sees the same counter."""
    user = UserFactory(username="alice", email="alice@example.com")
    plan_assign(user=user, plan=plans["Enterprise"])
    api_key = api_key_create(user=user, name="ci").api_key
    api_key_limits_set(api_key=api_key, budget_usd=100 * TOKEN, budget_period=BudgetPeriod.TOTAL)
    return {"user": user, "key": api_key, "flat": resolved_model(catalog["flat"])}


def key_ref(account) -> CounterRef:
    return CounterRef("key", account["key"].pk, "cost", BudgetPeriod.TOTAL, period_bounds("total", timezone.now())[0])


async def spend(account, request_id: str, tokens: int, *, ledger: bool = True) -> None:
    """A request admitted and settled; ``ledger``: its ledger row is written too (else it is on its way)."""
    await spend_settled(account, request_id, tokens)
    if ledger:
        await write_ledger(account, request_id, tokens)


async def write_ledger(account, request_id: str, tokens: int) -> None:
    """A ledger row only: the request's settle was lost (its process crashed), or its row comes late."""
    await sync_to_async(UsageRecordFactory)(
        request_id=request_id,
        user=account["user"],
        api_key=account["key"],
        prompt_tokens=0,
        completion_tokens=tokens,
        cost=tokens * TOKEN,
    )


async def reconcile(**kwargs) -> int:
    return await sync_to_async(budget_counters_reconcile)(**kwargs)


def alerts() -> list[tuple[int, Decimal, list[str]]]:
    return list(BudgetAlert.objects.order_by("threshold").values_list("threshold", "spent", "channels"))


async def test_reconcile_alerts_for_thresholds_the_missed_spend_crossed(store, account):
    await spend(account, "seen", 40)
    await write_ledger(account, "lost", 45)  # 85 %, but the counter still says 40 %
    assert mail.outbox == []

    assert await reconcile() == 1
    assert (await sync_to_async(counter_state)(key_ref(account)))[0] == 85 * TOKEN
    assert await sync_to_async(alerts)() == [(50, 85 * TOKEN, ["email"]), (80, 85 * TOKEN, ["email"])]
    assert [m.to for m in mail.outbox] == [["alice@example.com"]] * 2
    prefix = account["key"].prefix
    assert [m.subject for m in mail.outbox] == [
        f"[llmhub] the total budget of API key {prefix}… (ci) of alice is at 50%",
        f"[llmhub] the total budget of API key {prefix}… (ci) of alice is at 80%",
    ]
    assert "has reached 80%: $0.0085 of $0.01 used." in mail.outbox[1].body


async def test_reconciling_again_fires_nothing_new(store, account):
    await spend(account, "seen", 40)
    await write_ledger(account, "lost", 45)
    assert await reconcile() == 1
    assert len(mail.outbox) == 2

    assert await reconcile() == 0
    assert await reconcile(now=timezone.now() + LATER) == 0
    assert len(mail.outbox) == 2
    assert [threshold for threshold, _, _ in await sync_to_async(alerts)()] == [50, 80]


async def test_a_threshold_that_fired_does_not_fire_again(store, account):
    # 60 % settled and alerted at 50 %, but its ledger row is late (spooled while the database failed):
    # once the settle is forgotten the counter goes back to what the ledger shows.
    await spend(account, "late", 60, ledger=False)
    assert await sync_to_async(alerts)() == [(50, 60 * TOKEN, ["email"])]
    assert await reconcile(now=timezone.now() + LATER) == 1
    assert (await sync_to_async(counter_state)(key_ref(account)))[0] == 0

    # The row arrives, with one whose settle was lost: 0 → 85 % crosses 50 % again, which fired already.
    await write_ledger(account, "late", 60)
    await write_ledger(account, "lost", 25)
    assert await reconcile(now=timezone.now() + LATER) == 1
    assert await sync_to_async(alerts)() == [(50, 60 * TOKEN, ["email"]), (80, 85 * TOKEN, ["email"])]
    assert [m.subject.rsplit(" ", 1)[1] for m in mail.outbox] == ["50%", "80%"]


async def test_a_correction_down_fires_nothing(store, account):
    await sync_to_async(api_key_limits_set)(
        api_key=account["key"], budget_usd=200 * TOKEN, budget_period=BudgetPeriod.TOTAL
    )
    await spend(account, "seen", 60)
    await spend(account, "never-written", 30, ledger=False)  # 45 % of $0.02: nothing fires
    # The budget is cut to $0.01: the counter's 90 % is past 50 % and 80 % of it, which never fired.
    await sync_to_async(api_key_limits_set)(
        api_key=account["key"], budget_usd=100 * TOKEN, budget_period=BudgetPeriod.TOTAL
    )

    assert await reconcile(now=timezone.now() + LATER) == 1  # 90 → 60 %, what the ledger shows
    assert (await sync_to_async(counter_state)(key_ref(account)))[0] == 60 * TOKEN
    assert await sync_to_async(alerts)() == []
    assert mail.outbox == []


@pytest.fixture
def quota_user(plans, catalog):
    """A Pro user whose own daily token quota (an override) is 100 tokens, calling without a key."""
    user = UserFactory(username="bob", email="bob@example.com")
    user_plan = plan_assign(user=user, plan=plans["Pro"])
    user_plan.daily_token_quota = 100
    user_plan.save()
    return {"user": user, "flat": resolved_model(catalog["flat"])}


async def test_a_users_token_quota_alerts_after_reconcile(store, quota_user):
    user = quota_user["user"]
    admission = await admission_acquire(
        user_id=user.pk,
        api_key_id=None,
        key_allowed_model_ids=None,
        model=quota_user["flat"],
        body={"model": "flat-model", "messages": [], "max_tokens": 10},
        request_id="seen",
        prompt_tokens_upper=10,
    )
    await admission_settle(admission=admission, cost=Decimal(0), prompt_tokens=10, completion_tokens=10, ok=True)
    ledger_row = sync_to_async(UsageRecordFactory)
    await ledger_row(request_id="seen", user=user, api_key=None, prompt_tokens=10, completion_tokens=10, cost=0)
    await ledger_row(request_id="lost", user=user, api_key=None, prompt_tokens=20, completion_tokens=40, cost=0)

    assert await reconcile() == 1  # 20 → 80 tokens
    assert await sync_to_async(alerts)() == [(50, Decimal(80), ["email"]), (80, Decimal(80), ["email"])]
    assert [m.subject for m in mail.outbox] == [
        "[llmhub] bob's daily token quota is at 50%",
        "[llmhub] bob's daily token quota is at 80%",
    ]
    assert "has reached 80%: 80 tokens of 100 tokens used in the period that began" in mail.outbox[1].body


async def test_a_counter_started_from_the_ledger_alerts_for_what_it_starts_above(use_redis, account, redis_url):
    """Redis lost the counter (a flush, a failover without persistence) after spend that was never
    alerted: the counter starts again from the ledger's figure, and the thresholds below it fire then."""
    await write_ledger(account, "before-the-flush", 85)  # settled into a counter that is gone now
    assert mail.outbox == []

    await spend(account, "first-after", 1)  # admission seeds the counter from the ledger: 85 %
    assert await sync_to_async(alerts)() == [(50, 85 * TOKEN, ["email"]), (80, 85 * TOKEN, ["email"])]
    assert len(mail.outbox) == 2

    redis.Redis.from_url(redis_url).flushdb()  # lost again: seeding again fires nothing new
    await spend(account, "second-after", 1)
    assert [threshold for threshold, _, _ in await sync_to_async(alerts)()] == [50, 80]
    assert len(mail.outbox) == 2


def reconcile_task_run(*, refused_for: int | None = None) -> tuple[str | None, object]:
    """The beat task's run (``reservations_reconcile``), as a worker runs it; ``refused_for``: with a counter of
    that user's it cannot reconcile (``counter_unreconcilable``), whose key it returns with the run's result."""
    from billing.tasks import reservations_reconcile

    if refused_for is None:
        return None, reservations_reconcile.apply()
    with counter_unreconcilable(refused_for) as refused:
        return refused, reservations_reconcile.apply()


async def test_a_counter_that_cannot_be_reconciled_fails_the_run_and_the_others_are_reconciled(store, account, caplog):
    """A counter whose reconcile raised (a malformed key in Redis, a row the database refuses) ended the 5-minute
    run there: every counter after it was skipped, every run, for good, with missed spend never alerted. Each
    counter is reconciled on its own: that one is logged, the others are put back on the ledger's figure (and
    alert), and the run ends failed (``CountersNotReconciledError``, naming it); the next run reconciles it."""
    from billing.tasks import CountersNotReconciledError, reservations_reconcile

    await spend(account, "seen", 40)
    await write_ledger(account, "lost", 45)  # 85 %, but the counter still says 40 %

    refused, result = await sync_to_async(reconcile_task_run)(refused_for=account["user"].pk)

    assert result.failed() and isinstance(result.result, CountersNotReconciledError)
    assert f"budget counters not reconciled: {refused} " in str(result.result)
    run = await TaskRun.objects.aget(task=reservations_reconcile.name)  # what /ops/ shows
    assert not run.succeeded and run.error_class == "CountersNotReconciledError"
    assert (await sync_to_async(counter_state)(key_ref(account)))[0] == 85 * TOKEN  # reconciled all the same
    assert [threshold for threshold, _, _ in await sync_to_async(alerts)()] == [50, 80]
    failures = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "llmhub.counters"]
    assert [refused in r.getMessage() and r.exc_info is not None for r in failures] == [True]

    _, result = await sync_to_async(reconcile_task_run)()  # the next run, the counter fixed
    assert result.successful()
