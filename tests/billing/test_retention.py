"""Ledger retention (``LLMHUB_LEDGER_RETENTION_DAYS``): raw rows past it are deleted once their day is rolled
up, and no figure a dashboard, a budget or the rollup shows for any day changes; unset, nothing is deleted.
On SQLite and on PostgreSQL (Makefile ``POSTGRES_TESTS``)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import BudgetMetric, BudgetPeriod, DailyUsage, DailyUsageSeal, ScopeKind, UsageRecord
from billing.selectors import usage_breakdown, usage_daily
from billing.services.budgets import CounterRef, ledger_spend, period_bounds
from billing.services.keys import api_key_create
from billing.services.retention import usage_records_purge
from billing.services.rollups import daily_usage_rebuild
from billing.tasks import ledger_retention, usage_rollup
from chat.management.commands.setupschedules import SCHEDULES
from tests.factories import UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 4, 15, 12, 0, tzinfo=UTC)
TODAY = NOW.date()
OLD = date(2026, 3, 10)  # 36 days before NOW: past a retention of 30 days
RECENT = date(2026, 3, 20)  # 26 days before: kept
THIS_MONTH = date(2026, 4, 2)


def at(day: date, hour: int = 10) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def rollup() -> dict:
    return {
        (row["day"], row["user_id"], row["api_key_id"], row["provider_name"], row["model_name"]): (
            row["requests"],
            row["prompt_tokens"],
            row["completion_tokens"],
            row["cached_tokens"],
            row["cache_write_tokens"],
            row["cache_write_1h_tokens"],
            row["web_search_requests"],
            row["cost"],
        )
        for row in DailyUsage.objects.values()
    }


def dashboards(users) -> dict:
    """Everything the usage pages draw over the last 60 days: staff's and each user's."""
    figures = {"daily": usage_daily(days=60, today=TODAY)}
    for by in ("model", "provider", "user"):
        figures[by] = usage_breakdown(by=by, days=60, today=TODAY)
    for user in users:
        figures[f"daily-{user.pk}"] = usage_daily(days=60, today=TODAY, user_id=user.pk)
        figures[f"model-{user.pk}"] = usage_breakdown(by="model", days=60, today=TODAY, user_id=user.pk)
    return figures


def rebuild_every_day() -> None:
    day = OLD - timedelta(days=3)
    while day < TODAY:
        daily_usage_rebuild(day=day)
        day += timedelta(days=1)


@pytest.fixture
def clock():
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def ledger(clock):
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    work = api_key_create(user=alice, name="work").api_key
    rows = []
    for day in (OLD - timedelta(days=1), OLD, RECENT, THIS_MONTH, TODAY):
        rows += [
            UsageRecordFactory(user=alice, api_key=work, created_at=at(day, 1), cost=Decimal("0.0015000001")),
            UsageRecordFactory(user=alice, api_key=work, created_at=at(day, 23), model_name="gpt-other"),
            UsageRecordFactory(
                user=bob,
                created_at=at(day, 12),
                provider_name="fake-anthropic",
                cost=Decimal("2"),
                cache_write_tokens=5,
                cache_write_1h_tokens=2,
                web_search_requests=4,
            ),
            UsageRecordFactory(user=bob, created_at=at(day, 13), provider_name="", model_name="typo", cost=0),
        ]
    return {"users": [alice, bob], "key": work, "rows": rows}


def test_rows_past_retention_go_and_every_figure_stays(ledger, settings):
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 30
    rebuild_every_day()
    rollup_before, dashboards_before = rollup(), dashboards(ledger["users"])
    kept_before = set(UsageRecord.objects.filter(created_at__gte=at(RECENT, 0)).values_list("request_id", flat=True))

    assert ledger_retention() == 8

    assert not UsageRecord.objects.filter(created_at__lt=at(RECENT, 0)).exists()
    assert set(UsageRecord.objects.values_list("request_id", flat=True)) == kept_before
    assert rollup() == rollup_before
    assert dashboards(ledger["users"]) == dashboards_before
    assert set(DailyUsageSeal.objects.values_list("day", flat=True)) == {OLD - timedelta(days=1), OLD}


def test_unset_keeps_every_row(ledger, settings):
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 0
    rebuild_every_day()

    assert ledger_retention() == 0

    assert UsageRecord.objects.count() == len(ledger["rows"])
    assert not DailyUsageSeal.objects.exists()


def test_a_day_never_rolled_up_is_rolled_up_before_its_rows_go(ledger, settings):
    """No rollup ran for the old days: their figures are summed before their rows are deleted."""
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 30
    assert not DailyUsage.objects.filter(day=OLD).exists()
    expected = {}
    for row in UsageRecord.objects.filter(created_at__date=OLD):
        requests, prompt, completion, cached, written, written_1h, searches, cost = expected.get(
            (row.user_id, row.api_key_id, row.provider_name, row.model_name), (0, 0, 0, 0, 0, 0, 0, Decimal(0))
        )
        expected[(row.user_id, row.api_key_id, row.provider_name, row.model_name)] = (
            requests + 1,
            prompt + row.prompt_tokens,
            completion + row.completion_tokens,
            cached + row.cached_tokens,
            written + row.cache_write_tokens,
            written_1h + row.cache_write_1h_tokens,
            searches + row.web_search_requests,
            cost + row.cost,
        )

    ledger_retention()

    assert not UsageRecord.objects.filter(created_at__date=OLD).exists()
    assert {key[1:]: value for key, value in rollup().items() if key[0] == OLD} == expected


def test_open_days_and_the_current_month_are_kept(ledger, settings):
    """A retention of one day still keeps yesterday (the rollup task rebuilds it) and the whole current month
    (monthly budgets sum its raw rows): only the rows before April go."""
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 1
    alice = ledger["users"][0]
    monthly = CounterRef(
        ScopeKind.USER, alice.pk, BudgetMetric.COST, BudgetPeriod.MONTHLY, period_bounds("monthly", NOW)[0]
    )
    spent_this_month = ledger_spend(monthly)
    yesterday = UsageRecordFactory(user=alice, created_at=at(TODAY - timedelta(days=1)))

    ledger_retention()

    assert not UsageRecord.objects.filter(created_at__lt=at(date(2026, 4, 1), 0)).exists()
    assert UsageRecord.objects.filter(created_at__gte=at(THIS_MONTH, 0)).count() == 9
    assert UsageRecord.objects.filter(pk=yesterday.pk).exists()
    assert ledger_spend(monthly) == spent_this_month + yesterday.cost


def test_rows_under_a_lifetime_budget_are_kept(ledger, settings):
    """A key's lifetime budget sums every row of the key and of the keys under it, however old."""
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 30
    alice = ledger["users"][0]
    capped = api_key_create(user=alice, name="capped", budget_usd=Decimal(50), budget_period=BudgetPeriod.TOTAL).api_key
    child = api_key_create(
        user=alice, name="child", parent=capped, budget_usd=Decimal(10), budget_period=BudgetPeriod.TOTAL
    ).api_key
    kept = [
        UsageRecordFactory(user=alice, api_key=capped, created_at=at(OLD), cost=Decimal("3")),
        UsageRecordFactory(user=alice, api_key=child, created_at=at(OLD), cost=Decimal("4")),
    ]
    lifetime = CounterRef(
        ScopeKind.KEY, capped.pk, BudgetMetric.COST, BudgetPeriod.TOTAL, period_bounds("total", NOW)[0]
    )
    assert ledger_spend(lifetime) == Decimal(7)

    ledger_retention()

    assert set(UsageRecord.objects.filter(created_at__date=OLD).values_list("pk", flat=True)) == {r.pk for r in kept}
    assert ledger_spend(lifetime) == Decimal(7)


def test_a_late_row_of_a_sealed_day_is_added_once_and_a_rebuild_loses_nothing(ledger, settings):
    """A spool replayed after a long outage writes a row on a day already emptied: a rebuild of that day (the
    admin's action, or the rollup task's) keeps the sealed figures and adds the row to them, and the next pass
    deletes the row without adding it again."""
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 30
    rebuild_every_day()
    ledger_retention()
    sealed = rollup()
    dashboards_sealed = dashboards(ledger["users"])
    alice, work = ledger["users"][0], ledger["key"]
    late = UsageRecordFactory(
        user=alice,
        api_key=work,
        created_at=at(OLD, 5),
        cost=Decimal("0.25"),
        prompt_tokens=7,
        cache_write_tokens=3,
        cache_write_1h_tokens=1,
        web_search_requests=2,
    )

    daily_usage_rebuild(day=OLD)
    rebuilt = rollup()
    daily_usage_rebuild(day=OLD)
    assert rollup() == rebuilt

    assert ledger_retention() == 1
    assert ledger_retention() == 0

    assert not UsageRecord.objects.filter(pk=late.pk).exists()
    assert rollup() == rebuilt
    changed = {key: value for key, value in rollup().items() if sealed.get(key) != value}
    group = (OLD, alice.pk, work.pk, late.provider_name, late.model_name)
    requests, prompt, completion, cached, written, written_1h, searches, cost = sealed[group]
    assert changed == {
        group: (
            requests + 1,
            prompt + 7,
            completion + late.completion_tokens,
            cached,
            written + 3,
            written_1h + 1,
            searches + 2,
            cost + Decimal("0.25"),
        )
    }
    old_day = {entry.day: entry for entry in dashboards(ledger["users"])["daily"]}[OLD]
    before = {entry.day: entry for entry in dashboards_sealed["daily"]}[OLD]
    assert (old_day.cost, old_day.requests) == (before.cost + Decimal("0.25"), before.requests + 1)


def test_a_big_day_goes_in_several_short_deletes(ledger):
    """Each batch is its own statement (and transaction): writers wait for one batch, not for the day."""
    with CaptureQueriesContext(connection) as queries:
        deleted = usage_records_purge(before=RECENT, batch_size=3)

    deletes = [q["sql"] for q in queries if q["sql"].startswith('DELETE FROM "billing_usagerecord"')]
    assert deleted == 8
    assert len(deletes) == 4  # two days of four rows, three at a time


def test_the_pass_is_scheduled_daily():
    assert [entry for entry in SCHEDULES if entry[1] == "billing.tasks.ledger_retention"]


def late_row_steps(steps: str, *, key, user) -> UsageRecord:
    """Run ``steps`` in order ("late": the late row of OLD written, "rollup": the rollup task's run, "retention":
    the retention pass). The rollup of the past days (those the task does not rebuild every run) never holds the
    late row twice, and holds it once from the first rollup run after it was written on."""

    def past() -> dict:
        return {key: value for key, value in rollup().items() if key[0] < TODAY - timedelta(days=1)}

    base = past()
    late = expected = None
    rolled_up = False
    for step in steps.split():
        if step == "late":
            late = UsageRecordFactory(
                user=user,
                api_key=key,
                created_at=at(OLD, 5),
                cost=Decimal("0.0000000007"),
                prompt_tokens=7,
                cache_write_tokens=2,
                cache_write_1h_tokens=2,
                web_search_requests=1,
            )
            group = (OLD, user.pk, key.pk, late.provider_name, late.model_name)
            requests, prompt, completion, cached, written, written_1h, searches, cost = base.get(
                group, (0, 0, 0, 0, 0, 0, 0, Decimal(0))
            )
            expected = dict(base)
            expected[group] = (
                requests + 1,
                prompt + 7,
                completion + late.completion_tokens,
                cached,
                written + 2,
                written_1h + 2,
                searches + 1,
                cost + late.cost,
            )
            continue
        {"rollup": usage_rollup, "retention": ledger_retention}[step].delay()
        if late is None:
            continue
        rolled_up = rolled_up or step == "rollup"
        assert past() in ([expected] if rolled_up else [base, expected]), f"after {step} in {steps!r}"
    assert past() == expected
    return late


ORDERS = [
    "retention late rollup retention rollup",
    "retention late retention rollup retention",
    "late retention rollup retention",
    "rollup late rollup retention rollup",
]


@pytest.mark.parametrize("steps", ORDERS)
def test_a_late_row_of_a_sealed_day_counts_once_from_the_next_rollup_run_in_any_order(ledger, settings, steps):
    """A spool replayed after a long outage writes a row on a day retention sealed: the rollup task's next run (10
    minutes) counts it, not the next retention pass (a day later), and neither counts it again."""
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 30
    rebuild_every_day()

    late = late_row_steps(steps, key=ledger["key"], user=ledger["users"][0])

    old_day = {entry.day: entry for entry in usage_daily(days=60, today=TODAY)}[OLD]
    assert old_day.requests == 5
    assert not UsageRecord.objects.filter(pk=late.pk).exists()


@pytest.mark.parametrize("steps", ORDERS)
def test_a_late_row_under_a_lifetime_budget_on_a_sealed_day_counts_once(ledger, settings, steps):
    """Retention never deletes a row a lifetime budget sums, so it never added such a row written late on a day
    it had sealed: the usage pages left it out for good. The rollup task counts it, once."""
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 30
    alice = ledger["users"][0]
    capped = api_key_create(user=alice, name="capped", budget_usd=Decimal(50), budget_period=BudgetPeriod.TOTAL).api_key
    rebuild_every_day()

    late = late_row_steps(steps, key=capped, user=alice)

    assert UsageRecord.objects.filter(pk=late.pk).exists()
    old_day = {entry.day: entry for entry in usage_daily(days=60, today=TODAY)}[OLD]
    assert (old_day.requests, old_day.cost) == (5, Decimal("2.0015045001") + late.cost)


@pytest.mark.parametrize("adds", ["retention", "rollup"])
def test_a_late_row_folded_after_users_were_deleted_is_added_once(ledger, settings, adds):
    """Deleting users sets their rollup rows' user to NULL, so a sealed day can hold several rows of one
    (day, no user, no key, provider, model) group: a late row of that group is added to one of them, once. The
    staff's totals do not move when the users go."""
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 30
    bob = ledger["users"][1]
    carol = UserFactory(username="carol")
    UsageRecordFactory(user=carol, created_at=at(OLD, 14), provider_name="fake-anthropic", cost=Decimal("0.5"))
    rebuild_every_day()
    ledger_retention()
    before = usage_daily(days=60, today=TODAY)
    by_user_before = {share.label: share for share in usage_breakdown(by="user", days=60, today=TODAY)}

    bob.delete()
    carol.delete()

    assert usage_daily(days=60, today=TODAY) == before
    by_user = {share.label: share for share in usage_breakdown(by="user", days=60, today=TODAY)}
    assert sum(share.cost for share in by_user.values()) == sum(share.cost for share in by_user_before.values())
    assert DailyUsage.objects.filter(day=OLD, user=None, api_key=None, provider_name="fake-anthropic").count() == 2
    UsageRecordFactory(user=None, created_at=at(OLD, 15), provider_name="fake-anthropic", cost=Decimal("0.125"))

    {"rollup": usage_rollup, "retention": ledger_retention}[adds].delay()

    after = {entry.day: entry for entry in usage_daily(days=60, today=TODAY)}
    old_before = {entry.day: entry for entry in before}[OLD]
    assert (after[OLD].requests, after[OLD].cost) == (old_before.requests + 1, old_before.cost + Decimal("0.125"))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("first", ["retention", "rollup"])
def test_a_late_row_added_by_retention_and_the_rollup_at_once_counts_once(ledger, settings, monkeypatch, first):
    """The retention batch that deletes a late row of a sealed day and the rollup run that adds it to the sealed
    rollup run one after the other (the day's lock): the second finds it added (the row gone, or the seal's mark
    past it) and adds nothing."""
    import threading

    from django.db import connection

    from billing.services import retention, rollups
    from billing.services.rollups import ledger_high_water

    settings.LLMHUB_LEDGER_RETENTION_DAYS = 30
    rebuild_every_day()
    usage_records_purge(before=RECENT)
    sealed = rollup()
    alice, work = ledger["users"][0], ledger["key"]
    UsageRecordFactory(user=alice, api_key=work, created_at=at(OLD, 5), cost=Decimal("0.25"))
    high_water = ledger_high_water()
    added, release = threading.Event(), threading.Event()
    module = {"retention": retention, "rollup": rollups}[first]
    fold = module.daily_usage_fold

    def fold_then_wait(day, rows):
        fold(day, rows)
        added.set()
        release.wait(10)

    monkeypatch.setattr(module, "daily_usage_fold", fold_then_wait)

    def run(which):
        try:
            if which == "retention":
                usage_records_purge(before=RECENT)
            else:
                daily_usage_rebuild(day=OLD, through_id=high_water)
        finally:
            connection.close()

    one = threading.Thread(target=run, args=[first])
    one.start()
    assert added.wait(10)
    monkeypatch.undo()
    two = threading.Thread(target=run, args=[{"retention": "rollup", "rollup": "retention"}[first]])
    two.start()
    two.join(0.5)
    if connection.vendor == "postgresql":  # SQLite: the second waits on the database's write lock instead
        assert two.is_alive(), "the second did not wait for the first"
    release.set()
    one.join(10)
    two.join(10)

    group = (OLD, alice.pk, work.pk, "fake-openai", "gpt-test")
    changed = {key: value for key, value in rollup().items() if sealed.get(key) != value}
    assert list(changed) == [group]
    assert changed[group][0] == sealed[group][0] + 1
    assert changed[group][-1] == sealed[group][-1] + Decimal("0.25")
    assert not UsageRecord.objects.filter(created_at__lt=at(RECENT, 0)).exists()
