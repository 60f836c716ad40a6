"""Today on the dashboards is the rollup plus the raw rows above its mark (``DailyUsageMark``).

At millions of requests a day, summing today's raw rows was most of the staff pages' time
(docs/ledger.md). The rollup task rebuilds today every 10 minutes and marks how far it went; the pages
read the rollup and only the rows above the mark. These tests pin that the figures stay exactly the
ledger's: nothing counted twice, nothing left out, whatever the order of rollups, new rows and reads.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.db import OperationalError, connection

from billing import selectors
from billing.models import DailyUsage, DailyUsageMark, UsageRecord
from billing.selectors import usage_breakdown, usage_daily
from billing.services.rollups import daily_usage_rebuild, daily_usage_rebuild_recent, ledger_high_water
from tests.factories import UsageRecordFactory, UserFactory
from tests.transactions import transaction_held_open

NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)
TODAY = NOW.date()


@pytest.fixture
def clock():
    with time_machine.travel(NOW, tick=False):
        yield NOW


def spend(user, cost: str, *, hours_ago: float = 1, model: str = "gpt-test", provider: str = "fake-openai"):
    return UsageRecordFactory(
        user=user,
        created_at=NOW - timedelta(hours=hours_ago),
        cost=Decimal(cost),
        model_name=model,
        provider_name=provider,
        prompt_tokens=10,
        completion_tokens=5,
    )


def figures(user_id=None):
    """Today's total, and every breakdown over 30 days (yesterday's $7 included), as the pages show them."""
    today = usage_daily(days=30, today=TODAY, user_id=user_id)[-1]
    shares = {
        by: sorted(
            (s.label, s.requests, s.tokens, s.cost)
            for s in usage_breakdown(by=by, days=30, today=TODAY, user_id=user_id)
        )
        for by in ("model", "provider", "user")
    }
    return (today.cost, today.requests), shares


@pytest.fixture
def ada_and_bob(clock, db):
    ada, bob = UserFactory(username="ada"), UserFactory(username="bob")
    spend(ada, "1.0000000001", hours_ago=5)
    spend(ada, "2", hours_ago=4, model="claude-test", provider="fake-anthropic")
    spend(bob, "0.5", hours_ago=3)
    spend(ada, "7", hours_ago=30)  # yesterday
    return ada, bob


def test_today_is_the_rollup_plus_the_rows_above_its_mark(ada_and_bob):
    _, bob = ada_and_bob
    daily_usage_rebuild_recent(days=2, today=TODAY)
    mark = DailyUsageMark.objects.get(day=TODAY).through_id
    assert mark == UsageRecord.objects.latest("pk").pk

    after = spend(bob, "0.25", hours_ago=0.5)
    assert after.pk > mark

    assert figures() == (
        (Decimal("3.7500000001"), 4),
        {
            "model": [("claude-test", 1, 15, Decimal("2")), ("gpt-test", 4, 60, Decimal("8.7500000001"))],
            "provider": [("fake-anthropic", 1, 15, Decimal("2")), ("fake-openai", 4, 60, Decimal("8.7500000001"))],
            "user": [("ada", 3, 45, Decimal("10.0000000001")), ("bob", 2, 30, Decimal("0.75"))],
        },
    )
    assert figures(user_id=bob.pk)[0] == (Decimal("0.75"), 2)


def test_rows_at_or_below_the_mark_are_read_from_the_rollup_not_the_ledger(ada_and_bob):
    ada, _ = ada_and_bob
    daily_usage_rebuild(day=TODAY)
    # A row the rollup holds, gone from the raw ledger (as retention would do for an old day): the pages
    # still count it, so they read it from the rollup.
    UsageRecord.objects.filter(user=ada, model_name="claude-test").delete()

    assert figures()[0] == (Decimal("3.5000000001"), 3)


def test_a_rollup_of_today_without_a_mark_is_not_counted(ada_and_bob):
    # Rollups written before marks existed, or a mark lost: today is read raw, whole, and only once.
    daily_usage_rebuild(day=TODAY)
    DailyUsageMark.objects.filter(day=TODAY).delete()
    assert DailyUsage.objects.filter(day=TODAY).exists()

    assert figures()[0] == (Decimal("3.5000000001"), 3)


def test_a_rollup_committing_between_the_reads_is_not_counted_twice(ada_and_bob, monkeypatch):
    _, bob = ada_and_bob
    daily_usage_rebuild(day=TODAY)
    spend(bob, "0.25", hours_ago=0.5)
    real = selectors._recent_marks
    calls = []

    def mark_then_rollup(today):
        mark = real(today)
        calls.append(mark)
        if len(calls) == 1:  # the rollup task commits right after the page read the mark
            daily_usage_rebuild(day=TODAY)
        return mark

    monkeypatch.setattr(selectors, "_recent_marks", mark_then_rollup)

    assert usage_daily(days=30, today=TODAY)[-1].cost == Decimal("3.7500000001")
    assert calls[0] != calls[1]  # it saw the mark move and read again


def test_a_mark_that_keeps_moving_falls_back_to_todays_raw_rows(ada_and_bob, monkeypatch):
    daily_usage_rebuild(day=TODAY)
    marks = iter(range(10**6, 10**6 + 10))
    monkeypatch.setattr(selectors, "_recent_marks", lambda today: (None, next(marks)))

    assert usage_daily(days=30, today=TODAY)[-1].cost == Decimal("3.5000000001")


def test_a_rollup_of_a_day_holds_exactly_the_rows_up_to_its_mark(ada_and_bob):
    ada, _ = ada_and_bob
    through = UsageRecord.objects.latest("pk").pk
    later = spend(ada, "100", hours_ago=0.1)

    daily_usage_rebuild(day=TODAY, through_id=through)

    assert DailyUsageMark.objects.get(day=TODAY).through_id == through
    assert sum(DailyUsage.objects.filter(day=TODAY).values_list("cost", flat=True)) == Decimal("3.5000000001")
    assert later.pk > through
    assert usage_daily(days=1, today=TODAY)[-1].cost == Decimal("103.5000000001")


@pytest.mark.django_db(transaction=True)
def test_the_high_water_waits_for_an_insert_in_flight(clock):
    """A row whose id was taken before the high water was read, but which commits after, must be at or
    below it only if it is visible by then: the high water waits for inserts in flight. (On PostgreSQL ids
    are handed out before commit; a bare MAX(id) would return a smaller id and the rollup would skip the
    row for good.)"""
    user = UserFactory(username="ada")
    spend(user, "1")
    got = []
    with transaction_held_open(lambda: spend(user, "2").pk) as row_id:
        reader = threading.Thread(target=lambda: (got.append(ledger_high_water()), connection.close()))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive(), "the high water did not wait for the insert in flight"
    reader.join(10)
    assert got == [row_id]


@pytest.mark.django_db(transaction=True)
def test_the_high_water_gives_up_rather_than_hold_the_writers_behind_a_long_lock(clock, monkeypatch):
    """While the high water waits for the ledger's lock, new inserts queue behind it: it must not wait on a
    long transaction (or an anti-wraparound VACUUM). It gives up after its timeout; the rollup runs again
    10 minutes later."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite has no lock timeout: its busy timeout bounds every writer alike")
    from billing.services import rollups

    monkeypatch.setattr(rollups, "HIGH_WATER_LOCK_TIMEOUT", "200ms")
    user = UserFactory(username="ada")
    with transaction_held_open(lambda: spend(user, "2")), pytest.raises(OperationalError):
        ledger_high_water()
    assert ledger_high_water() == UsageRecord.objects.latest("pk").pk  # and works again once it is over


def test_just_after_midnight_yesterday_still_counts_the_rows_its_last_rollup_missed(db):
    """At 23:55 the task rolled up the day; a row came at 23:58; at 00:05 the next run has not come yet.
    A minute before midnight the pages showed that row under today; after it, yesterday must still have it
    (and if the task is down for hours, all of yesterday's rows after its last run)."""
    ada = UserFactory(username="ada")
    yesterday = TODAY
    with time_machine.travel(NOW.replace(hour=12), tick=False):
        spend(ada, "1", hours_ago=0)
    with time_machine.travel(NOW.replace(hour=23, minute=55), tick=False):
        daily_usage_rebuild_recent(days=2)
    with time_machine.travel(NOW.replace(hour=23, minute=58), tick=False):
        spend(ada, "0.0000000002", hours_ago=0)
    with time_machine.travel(NOW.replace(hour=23, minute=59), tick=False):
        before_midnight = usage_daily(days=2, today=yesterday)[-1]
    assert (before_midnight.cost, before_midnight.requests) == (Decimal("1.0000000002"), 2)

    with time_machine.travel(NOW.replace(hour=0, minute=5) + timedelta(days=1), tick=False):
        today = yesterday + timedelta(days=1)
        days = usage_daily(days=30, today=today)
        shares = usage_breakdown(by="user", days=30, today=today)
        mine = usage_daily(days=30, today=today, user_id=ada.pk)

    assert (days[-2].day, days[-2].cost, days[-2].requests) == (yesterday, Decimal("1.0000000002"), 2)
    assert [(s.label, s.requests, s.cost) for s in shares] == [("ada", 2, Decimal("1.0000000002"))]
    assert mine[-2].cost == Decimal("1.0000000002")


def test_yesterday_without_any_rollup_is_read_from_the_ledger(db):
    """The task did not run at all yesterday (beat down): the pages show yesterday's spend, not $0."""
    ada = UserFactory(username="ada")
    with time_machine.travel(NOW, tick=False):
        spend(ada, "3")
    with time_machine.travel(NOW + timedelta(days=1), tick=False):
        days = usage_daily(days=30, today=TODAY + timedelta(days=1))

    assert (days[-2].day, days[-2].cost, days[-2].requests) == (TODAY, Decimal("3"), 1)
