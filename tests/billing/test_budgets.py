"""Budgets and token quotas: reserve the most a request can cost, refuse what cannot be paid, settle to
the real cost, release what never settled, and put counters back on the ledger's figure.

Every test runs against both admission stores (database row locks, and the real Redis server)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from datetime import timezone as timezone_of
from decimal import Decimal

import pytest
import time_machine
from asgiref.sync import sync_to_async
from django.utils import timezone

from billing.exceptions import BillingUnavailableError, QuotaExceededError
from billing.models import ApiKey, BudgetPeriod, UsageRecord
from billing.selectors import UserLimits
from billing.services.admission import admission_acquire, admission_settle
from billing.services.budgets import CounterRef, api_key_limits_set, counter_specs, period_bounds, usd
from billing.services.counters import admission_store, budget_counters_reconcile, counter_state
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.selectors import resolved_model
from tests.factories import UsageRecordFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.period_instants]

TOKEN = Decimal("0.0001")  # one completion token of the flat model


@pytest.fixture
def account(plans, catalog):
    """An Enterprise user (no plan limits) with a key whose budget ($0.005) pays for 50 flat-model tokens a month."""
    user = UserFactory(username="budgeted")
    plan_assign(user=user, plan=plans["Enterprise"])
    api_key = api_key_create(user=user, name="budgeted").api_key
    api_key_limits_set(api_key=api_key, budget_usd=50 * TOKEN, budget_period=BudgetPeriod.MONTHLY)
    return {"user": user, "key": api_key, "flat": resolved_model(catalog["flat"]), "catalog": catalog}


def key_ref(api_key: ApiKey, period: str = BudgetPeriod.MONTHLY) -> CounterRef:
    return CounterRef("key", api_key.pk, "cost", period, period_bounds(period, timezone.now())[0])


async def acquire(account, request_id: str, *, max_tokens: int | None = None, prompt_upper: int = 0, **body):
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return await admission_acquire(
        user_id=account["user"].pk,
        api_key_id=account["key"].pk,
        key_allowed_model_ids=None,
        model=account["flat"],
        body={"model": "flat-model", "messages": [{"role": "user", "content": "hi"}], **body},
        request_id=request_id,
        prompt_tokens_upper=prompt_upper,
    )


async def settle(admission, completion_tokens: int, *, prompt_tokens: int = 0):
    await admission_settle(
        admission=admission,
        cost=completion_tokens * TOKEN,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        ok=True,
    )


async def test_reserves_max_tokens_and_refuses_what_the_budget_cannot_pay(store, account):
    admitted = [await acquire(account, f"r{i}", max_tokens=10) for i in range(5)]
    assert [a.reserved_cost for a in admitted] == [10 * TOKEN] * 5
    assert all(a.max_tokens is None for a in admitted)  # the client chose max_tokens

    with pytest.raises(QuotaExceededError) as refused:
        await acquire(account, "r5", max_tokens=10)
    assert refused.value.status_code == 429 and refused.value.code == "insufficient_quota"
    assert "this API key's monthly budget is $0.005" in refused.value.message
    assert "$0.005 held by requests in progress" in refused.value.message

    # Settling at the real cost (8 tokens each) frees the difference: 40 spent, 10 left.
    for admission in admitted:
        await settle(admission, 8)
    assert await sync_to_async(counter_state)(key_ref(account["key"])) == (40 * TOKEN, Decimal(0))
    await acquire(account, "r6", max_tokens=10)
    with pytest.raises(QuotaExceededError):
        await acquire(account, "r7", max_tokens=1)


async def test_without_max_tokens_the_request_is_clamped_to_what_is_left(store, account):
    first = await acquire(account, "c1", prompt_upper=100)
    # Input is free on the flat model, so the whole $0.005 buys 50 completion tokens.
    assert first.max_tokens == 50 and first.reserved_cost == 50 * TOKEN

    with pytest.raises(QuotaExceededError) as refused:
        await acquire(account, "c2")
    assert "could need up to $0.0001" in refused.value.message

    await settle(first, 20)
    second = await acquire(account, "c3")
    assert second.max_tokens == 30


async def test_the_clamp_never_exceeds_the_configured_cap(store, account, settings):
    settings.LLMHUB_BUDGET_MAX_TOKENS_CAP = 16
    assert (await acquire(account, "cap")).max_tokens == 16


async def test_n_choices_multiply_the_completion(store, account):
    admission = await acquire(account, "n1", max_tokens=10, n=3)
    assert admission.reserved_cost == 30 * TOKEN
    assert (await acquire(account, "n2", n=2)).max_tokens == 10  # (50 - 30) / 2


@pytest.fixture
def quota_user(plans):
    """A Pro user whose own daily quota (an override) is 100 tokens."""
    user = UserFactory(username="quota")
    user_plan = plan_assign(user=user, plan=plans["Pro"])
    user_plan.daily_token_quota = 100
    user_plan.save()
    return user


async def test_daily_token_quota_counts_prompt_and_completion(store, quota_user, catalog):
    user = quota_user
    flat = await sync_to_async(resolved_model)(catalog["flat"])

    async def go(request_id: str, **body):
        return await admission_acquire(
            user_id=user.pk,
            api_key_id=None,
            key_allowed_model_ids=None,
            model=flat,
            body={"model": "flat-model", "messages": [], **body},
            request_id=request_id,
            prompt_tokens_upper=30,
        )

    with pytest.raises(QuotaExceededError) as refused:
        await go("q0", max_tokens=71)
    assert "the daily token quota of your plan (Pro) is 100 tokens" in refused.value.message
    assert "0 tokens used so far, and this request could need up to 101 tokens" in refused.value.message
    admission = await go("q1")
    assert admission.max_tokens == 70
    assert admission.reserved_cost == 0  # a token quota, no USD budget
    await admission_settle(admission=admission, cost=Decimal(0), prompt_tokens=12, completion_tokens=8, ok=True)
    assert (await go("q2")).max_tokens == 50  # 100 - 20 used - 30 prompt


async def test_a_reservation_that_never_settles_expires(store, account):
    flat_store = admission_store()
    now = timezone.now()
    stuck = await acquire(account, "stuck", max_tokens=50)
    assert stuck.reserved_cost == 50 * TOKEN
    with pytest.raises(QuotaExceededError):
        await acquire(account, "blocked", max_tokens=1)

    # The process that held it died; sixteen minutes later the reservation is gone.
    from billing.services.budgets import Charge

    later = now + timedelta(minutes=16)
    charge = Charge(10 * TOKEN, Decimal(0), 10, 4096, 0, 1)
    outcome = await flat_store.acquire(
        request_id="after", counters=stuck.handle.counters, rates=(), charge=charge, now=later
    )
    assert outcome.reserved.cost == 10 * TOKEN


async def test_settling_twice_counts_once(store, account):
    admission = await acquire(account, "twice", max_tokens=10)
    await settle(admission, 7)
    await settle(admission, 7)
    assert (await sync_to_async(counter_state)(key_ref(account["key"])))[0] == 7 * TOKEN


async def test_a_counter_starts_from_the_ledger(store, account):
    """Spend recorded before the counter exists (another process, a restart, a new period) counts."""
    await sync_to_async(UsageRecordFactory)(user=account["user"], api_key=account["key"], cost=45 * TOKEN)
    with pytest.raises(QuotaExceededError):
        await acquire(account, "over", max_tokens=6)
    assert (await acquire(account, "fits")).max_tokens == 5


async def test_reconcile_puts_counters_back_on_the_ledger(store, account):
    admission = await acquire(account, "settled", max_tokens=10)
    await settle(admission, 10)  # settled, but its ledger row is never written (lost)
    # …and a request whose settle was lost, though its ledger row exists.
    await sync_to_async(UsageRecordFactory)(user=account["user"], api_key=account["key"], cost=3 * TOKEN)
    ref = key_ref(account["key"])
    assert (await sync_to_async(counter_state)(ref))[0] == 10 * TOKEN

    # Within the memory window the settled request counts as "ledger row on its way".
    await sync_to_async(budget_counters_reconcile)()
    assert (await sync_to_async(counter_state)(ref))[0] == 13 * TOKEN

    # Long after, only what the ledger shows remains.
    await sync_to_async(budget_counters_reconcile)(now=timezone.now() + timedelta(minutes=10))
    assert (await sync_to_async(counter_state)(ref))[0] == 3 * TOKEN


async def test_reconcile_ignores_requests_in_flight(store, account):
    """An open request whose ledger row is already written must not be counted twice."""
    admission = await acquire(account, "inflight", max_tokens=10)
    await sync_to_async(UsageRecordFactory)(
        request_id="inflight", user=account["user"], api_key=account["key"], cost=9 * TOKEN
    )
    await sync_to_async(budget_counters_reconcile)()
    await settle(admission, 9)
    assert await sync_to_async(counter_state)(key_ref(account["key"])) == (9 * TOKEN, Decimal(0))
    ledger = await sync_to_async(lambda: sum(UsageRecord.objects.values_list("cost", flat=True), Decimal(0)))()
    assert ledger == 9 * TOKEN


def next_month_start(moment: datetime) -> datetime:
    return datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)


def this_month_start(moment: datetime) -> datetime:
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


async def test_a_counter_starts_from_this_periods_ledger_rows_only(store, account):
    """The first second of the month belongs to it; the microsecond before belongs to the month before."""
    start = this_month_start(datetime.now(UTC))
    for created_at, tokens in ((start - timedelta(microseconds=1), 45), (start, 20)):
        await sync_to_async(UsageRecordFactory)(
            user=account["user"], api_key=account["key"], cost=tokens * TOKEN, created_at=created_at
        )
    assert (await acquire(account, "rest")).max_tokens == 30
    assert (await sync_to_async(counter_state)(key_ref(account["key"])))[0] == 20 * TOKEN


async def test_a_monthly_budget_starts_afresh_on_the_first_and_not_a_second_earlier(store, account):
    await settle(await acquire(account, "all", max_tokens=50), 50)
    new_month = next_month_start(datetime.now(UTC))

    with time_machine.travel(new_month - timedelta(microseconds=1), tick=False):
        with pytest.raises(QuotaExceededError):
            await acquire(account, "last-moment", max_tokens=1)
    with time_machine.travel(new_month, tick=False):
        assert (await acquire(account, "first-moment")).max_tokens == 50


async def test_a_daily_token_quota_starts_afresh_at_utc_midnight(store, quota_user, catalog):
    flat = await sync_to_async(resolved_model)(catalog["flat"])

    async def go(request_id: str, max_tokens: int):
        return await admission_acquire(
            user_id=quota_user.pk,
            api_key_id=None,
            key_allowed_model_ids=None,
            model=flat,
            body={"model": "flat-model", "messages": [], "max_tokens": max_tokens},
            request_id=request_id,
            prompt_tokens_upper=0,
        )

    used = await go("all", 100)
    await admission_settle(admission=used, cost=Decimal(0), prompt_tokens=0, completion_tokens=100, ok=True)
    midnight = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), time(), UTC)

    with time_machine.travel(midnight - timedelta(microseconds=1), tick=False):
        with pytest.raises(QuotaExceededError):
            await go("last-moment", 1)
    with time_machine.travel(midnight, tick=False):
        assert (await go("first-moment", 100)).reserved_cost == 0


async def test_a_request_admitted_before_the_month_ended_settles_into_that_month(store, account):
    """Admitted in the old month and settled in the new one, after reconciliation ran there: it is charged to
    the month it was admitted in, whose counter is still there to take it, and the new month starts empty."""
    admission = await acquire(account, "late", max_tokens=10)
    old_month = key_ref(account["key"])

    with time_machine.travel(next_month_start(datetime.now(UTC)) + timedelta(minutes=1), tick=False):
        await sync_to_async(budget_counters_reconcile)()
        await settle(admission, 7)
        assert await sync_to_async(counter_state)(old_month) == (7 * TOKEN, Decimal(0))
        assert (await acquire(account, "new-month")).max_tokens == 50


@pytest.mark.period_instants(only=())  # reads no clock: once, not once an instant
def test_periods_are_utc_days_months_or_forever():
    moment = datetime(2026, 2, 28, 23, 30, tzinfo=UTC)
    assert period_bounds("daily", moment) == (
        moment.replace(hour=0, minute=0),
        moment.replace(day=1, month=3, hour=0, minute=0),
    )
    start, end = period_bounds("monthly", moment)
    assert (start.day, start.month, end.day, end.month) == (1, 2, 1, 3)
    assert period_bounds("total", moment)[1] is None
    ref = CounterRef("key", 7, "cost", "monthly", start)
    assert CounterRef.from_key(ref.key) == ref


@pytest.mark.period_instants(only=())  # reads no clock: once, not once an instant
def test_a_request_names_the_counters_of_its_utc_period_to_the_microsecond():
    """The counters' period starts are cached per whole second: the last microsecond of a month and of a day, seen
    in UTC or in another zone, still name that month's and that day's counters, and the next microsecond the next."""
    limits = UserLimits("Plan", True, frozenset(), None, 100, Decimal(5), None, None)
    new_month = datetime(2026, 4, 1, tzinfo=UTC)
    east = timezone_of(timedelta(hours=2))

    def named(now: datetime) -> list[tuple[str, datetime, datetime | None]]:
        specs = counter_specs(user_id=7, api_key_id=None, user=limits, key=None, now=now)
        return [(spec.key, spec.ref.period_start, spec.ref.period_end) for spec in specs]

    for now in (new_month - timedelta(microseconds=1), (new_month - timedelta(microseconds=1)).astimezone(east)):
        assert named(now) == [
            ("llmhub:bud:user:7:cost:m202603", datetime(2026, 3, 1, tzinfo=UTC), new_month),
            ("llmhub:bud:user:7:tokens:d20260331", datetime(2026, 3, 31, tzinfo=UTC), new_month),
        ]
    for now in (new_month, new_month.astimezone(east)):
        assert named(now) == [
            ("llmhub:bud:user:7:cost:m202604", new_month, datetime(2026, 5, 1, tzinfo=UTC)),
            ("llmhub:bud:user:7:tokens:d20260401", new_month, datetime(2026, 4, 2, tzinfo=UTC)),
        ]


@pytest.mark.period_instants(only=())  # reads no clock: once, not once an instant
def test_usd_shows_small_amounts():
    assert [usd(Decimal(v)) for v in ("0", "12.5", "0.5", "0.0123", "0.00005", "0.0000000001")] == [
        "$0.00",
        "$12.50",
        "$0.50",
        "$0.0123",
        "$0.00005",
        "$0.0000000001",
    ]


def test_api_key_limits_refuse_bad_values(account):
    from django.core.exceptions import ValidationError

    for bad in (
        {"budget_usd": Decimal("-1")},
        {"budget_usd": None, "budget_period": "weekly"},
        {"budget_usd": None, "rpm": -1},
    ):
        with pytest.raises(ValidationError):
            api_key_limits_set(api_key=account["key"], **bad)
    account["key"].refresh_from_db()
    assert account["key"].budget_usd == 50 * TOKEN  # nothing half-written


async def test_an_unreachable_redis_refuses_with_503_rather_than_running_unmetered(account, settings):
    from tests.conftest import free_port

    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(BillingUnavailableError) as refused:
        await acquire(account, "down", max_tokens=1)
    assert refused.value.status_code == 503 and refused.value.code == "billing_unavailable"
    assert "cannot be checked right now (ConnectionError)" in refused.value.message


async def test_large_budgets_stay_exact(store, account):
    """$1,000,000 is 10^16 units of 1e-10 USD, past a double's exact integers: Redis must still add exactly."""
    await sync_to_async(api_key_limits_set)(api_key=account["key"], budget_usd=Decimal("1000000"))
    admission = await acquire(account, "big-spender", prompt_upper=0)
    assert admission.max_tokens == 4096
    await admission_settle(
        admission=admission, cost=Decimal("0.0000000001"), prompt_tokens=0, completion_tokens=1, ok=True
    )
    again = await acquire(account, "again", max_tokens=3)
    await settle(again, 3)
    spent, reserved = await sync_to_async(counter_state)(key_ref(account["key"]))
    assert (spent, reserved) == (Decimal("0.0003000001"), Decimal(0))


@pytest.mark.parametrize(
    ("cache_write", "reserved", "clamped"),
    [
        # A prompt the provider may write to its cache whole: 10 tokens at $50/M, not at the input's $40/M.
        (Decimal(50), 15 * TOKEN, 45),
        # A cache-write price below input (a provider that bills writes at a discount): the input price holds.
        (Decimal(30), 14 * TOKEN, 46),
    ],
)
async def test_the_prompt_is_reserved_at_the_dearer_of_the_input_and_cache_write_prices(
    store, account, cache_write, reserved, clamped
):
    """Before, the prompt was reserved at the input price, though a request that writes the cache is charged
    more for it: a key could then spend past its budget."""
    from providers.models import Deployment

    flat = account["catalog"]["flat"]
    await Deployment.objects.filter(model=flat).aupdate(input_per_mtok=Decimal(40), cache_write_per_mtok=cache_write)
    account["flat"] = await sync_to_async(resolved_model)(flat)

    admission = await acquire(account, "written", max_tokens=10, prompt_upper=10)
    assert admission.reserved_cost == reserved  # the prompt, and 10 completion tokens at TOKEN

    await admission_settle(admission=admission, cost=Decimal(0), prompt_tokens=0, completion_tokens=0, ok=False)
    # Without max_tokens, what is left after the prompt buys the completion.
    assert (await acquire(account, "clamped", prompt_upper=10)).max_tokens == clamped


async def test_the_database_stores_admission_and_settle_compile_no_orm_query(account, settings, monkeypatch):
    """Without Redis a budgeted request's admission and settle ran their statements through the ORM, which built
    and compiled each again at every request: most of the CPU of both (docs/performance.md, "What budgets and rate
    limits cost"). Once its counter exists and has had its old settles forgotten, a request compiles no ORM query:
    its statements are built once from the models' metadata. What they hold and write is the same: the counter,
    the request's hold and in-flight record, a second request held alongside the first, and the settle."""
    from django.db.models.sql.query import Query

    from billing.models import BudgetCounter, BudgetReservation, RequestReservation

    settings.REDIS_URL = ""
    await settle(await acquire(account, "first", max_tokens=5), 5)  # the counter exists, its old settles forgotten
    compiled: list[str] = []
    get_compiler = Query.get_compiler

    def noted(query, *args, **kwargs):
        if query.model in (BudgetCounter, BudgetReservation, RequestReservation):  # not the heartbeat's thread
            compiled.append(query.model.__name__)
        return get_compiler(query, *args, **kwargs)

    monkeypatch.setattr(Query, "get_compiler", noted)
    held = await acquire(account, "held", max_tokens=10)
    other = await acquire(account, "other", max_tokens=20)
    assert (held.reserved_cost, other.reserved_cost) == (10 * TOKEN, 20 * TOKEN)
    await settle(held, 7)
    monkeypatch.undo()
    assert compiled == []

    assert await sync_to_async(counter_state)(key_ref(account["key"])) == (12 * TOKEN, 20 * TOKEN)
    holds = BudgetReservation.objects.filter(request_id__in=["held", "other"]).order_by("request_id")
    assert [
        (hold.request_id, hold.amount, hold.settled_amount, hold.settled_at is not None) async for hold in holds
    ] == [("held", 10 * TOKEN, 7 * TOKEN, True), ("other", 20 * TOKEN, None, False)]
    record = await RequestReservation.objects.aget(request_id="other")
    assert (record.user_id, record.api_key_id, record.model_name, record.endpoint, record.stream) == (
        account["user"].pk,
        account["key"].pk,
        "flat-model",
        "",
        False,
    )
    assert (record.reserved_cost, record.reserved_tokens, record.settled_row, record.recorded_at is not None) == (
        20 * TOKEN,
        20,
        None,
        True,
    )
    assert not await RequestReservation.objects.filter(request_id="held").aexists()
