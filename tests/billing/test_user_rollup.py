"""The per-user rollup (``DailyUserUsage``: per day and user) always equals the ledger's rows up to the day's mark,
however often the rollup runs, across retention, and the figures per user that are not split by key, provider,
model or operation read it instead of ``DailyUsage`` (docs/ledger.md, "The per-user rollup"). Runs on
PostgreSQL too (``scripts/with_postgres.py``)."""

from __future__ import annotations

import importlib
from datetime import date, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.apps import apps

from billing.models import DailyUsage, DailyUserUsage, UsageRecord
from billing.selectors import usage_breakdown, usage_daily
from billing.services.retention import usage_records_purge
from billing.services.rollups import daily_usage_rebuild, daily_usage_rebuild_recent
from tests.billing.rollup_ledger import OLD, TODAY, YESTERDAY, at, ledger_per, marks, rollup_rows
from tests.factories import UsageRecordFactory

pytestmark = pytest.mark.django_db


def raw(*, through: dict[date, int] | None = None) -> dict:
    """The ledger per (day, user) (``ledger_per``)."""
    return ledger_per("user_id", through=through)


def per_user() -> dict:
    return rollup_rows(DailyUserUsage, "user_id")


def test_the_user_rollup_equals_the_ledger_per_day_and_user_and_a_rerun_changes_nothing(rollup_ledger):
    for _run in range(2):
        daily_usage_rebuild_recent(days=2, today=TODAY)
        assert per_user() == raw()
    # alice and bob each day, and today's request of no user
    assert DailyUserUsage.objects.count() == 5 < DailyUsage.objects.count()


def test_across_the_mark_it_holds_the_rows_up_to_it_and_the_pages_add_the_rows_above(rollup_ledger):
    daily_usage_rebuild_recent(days=2, today=TODAY)
    alice, bob = rollup_ledger["alice"], rollup_ledger["bob"]
    for user, operation, cost in ((bob, "responses", "0.75"), (alice, "chat", "0.125"), (None, "embeddings", "0.01")):
        UsageRecordFactory(user=user, created_at=at(TODAY, 5), operation=operation, cost=Decimal(cost))
    assert per_user() == raw(through=marks()) != raw()  # today's new rows are above the mark

    def pages() -> tuple:
        with time_machine.travel(at(TODAY, 23), tick=False):
            return (
                {s.label: (s.requests, s.tokens, s.cost) for s in usage_breakdown(by="user", days=30, today=TODAY)},
                {u.username: usage_daily(days=30, today=TODAY, user_id=u.pk)[-2:] for u in (alice, bob)},
            )

    seen = pages()
    assert seen[0] == {
        "alice": (4, 57, Decimal("1.2265000004")),  # the factory's 10 and 5 tokens a row, but for alice's 7 prompt
        "bob": (5, 1069, Decimal("4.5")),
        "(deleted user)": (2, 30, Decimal("0.51")),  # the rows of no user
    }
    assert {name: [(d.day, d.requests, d.cost) for d in days] for name, days in seen[1].items()} == {
        "alice": [(YESTERDAY, 2, Decimal("1.1015000001")), (TODAY, 2, Decimal("0.1250000003"))],
        "bob": [(YESTERDAY, 2, Decimal("1.75")), (TODAY, 3, Decimal("2.75"))],
    }
    daily_usage_rebuild_recent(days=2, today=TODAY)  # the rows above the mark now rolled up: the same answers
    assert per_user() == raw()
    assert pages() == seen


def test_retention_keeps_the_user_rollup_and_a_late_row_of_a_sealed_day_is_added_once(rollup_ledger):
    alice, bob = rollup_ledger["alice"], rollup_ledger["bob"]
    for hour, operation in ((1, "chat"), (2, "responses"), (3, "messages")):
        UsageRecordFactory(user=alice, created_at=at(OLD, hour), operation=operation, cost=Decimal("0.3"))
    daily_usage_rebuild(day=OLD)
    before = per_user()
    assert before == raw(through=marks())
    assert usage_records_purge(before=OLD + timedelta(days=1)) == 3
    assert per_user() == before

    UsageRecordFactory(user=bob, created_at=at(OLD, 9), operation="responses", cost=Decimal("0.05"))
    UsageRecordFactory(user=alice, created_at=at(OLD, 10), operation="embeddings", cost=Decimal("0.05"))
    for _run in range(2):
        with time_machine.travel(at(TODAY, 12), tick=False):
            daily_usage_rebuild_recent(days=2, today=TODAY)
    assert per_user()[(OLD, alice.pk)] == [4, 40, 20, 0, 0, 0, 0, Decimal("0.95")]
    assert per_user()[(OLD, bob.pk)] == [1, 10, 5, 0, 0, 0, 0, Decimal("0.05")]
    daily_usage_rebuild(day=OLD)  # a sealed day is not rebuilt from what is left of the ledger
    assert per_user()[(OLD, alice.pk)][0] == 4


def test_the_migration_derives_every_days_user_rollup_from_daily_usage(rollup_ledger):
    # 0040 ran before the rollups counted web searches (0045): its copy of the derivation sums none.
    UsageRecord.objects.update(web_search_requests=0)
    daily_usage_rebuild_recent(days=2, today=TODAY)
    for hour in (1, 2):
        UsageRecordFactory(user=rollup_ledger["bob"], created_at=at(OLD, hour), cost=Decimal("0.3"))
    daily_usage_rebuild(day=OLD)
    expected = per_user()
    DailyUserUsage.objects.all().delete()
    migration = importlib.import_module("billing.migrations.0040_rollup3_daily_user_usage")
    migration.derive(apps, None)
    assert per_user() == expected == raw()
