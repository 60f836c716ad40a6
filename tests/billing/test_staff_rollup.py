"""The staff rollup (``DailyStaffUsage``: per day, provider, model and operation) always equals the ledger's
rows up to the day's mark, however often the rollup runs, across retention, and the staff pages' figures
that are not per user read it instead of ``DailyUsage`` (docs/ledger.md, "The staff rollup"). Runs on
PostgreSQL too (``scripts/with_postgres.py``)."""

from __future__ import annotations

import importlib
from datetime import date, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.apps import apps
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import DailyStaffUsage, DailyUsage, UsageRecord
from billing.selectors import usage_breakdown, usage_daily
from billing.services.retention import usage_records_purge
from billing.services.rollups import daily_usage_rebuild, daily_usage_rebuild_recent
from tests.billing.rollup_ledger import OLD, TODAY, YESTERDAY, at, ledger_per, marks, rollup_rows
from tests.factories import UsageRecordFactory

pytestmark = pytest.mark.django_db

GROUP = ("provider_name", "model_name", "operation")


def raw(*, through: dict[date, int] | None = None) -> dict:
    """The ledger per (day, provider, model, operation) (``ledger_per``)."""
    return ledger_per(*GROUP, through=through)


def staff() -> dict:
    return rollup_rows(DailyStaffUsage, *GROUP)


def test_the_staff_rollup_equals_the_ledger_per_day_provider_model_and_operation_and_a_rerun_changes_nothing(
    rollup_ledger,
):
    for _run in range(2):
        daily_usage_rebuild_recent(days=2, today=TODAY)
        assert staff() == raw()
    assert DailyStaffUsage.objects.count() == 6
    assert DailyStaffUsage.objects.count() < DailyUsage.objects.count()


def test_across_the_mark_it_holds_the_rows_up_to_it_and_the_pages_add_the_rows_above(rollup_ledger):
    daily_usage_rebuild_recent(days=2, today=TODAY)
    for operation, cost in (("responses", "0.75"), ("chat", "0.125"), ("embeddings", "0.01")):
        UsageRecordFactory(user=rollup_ledger["bob"], created_at=at(TODAY, 5), operation=operation, cost=Decimal(cost))
    assert staff() == raw(through=marks()) != raw()  # today's new rows are above the mark

    def everyone() -> tuple:
        with time_machine.travel(at(TODAY, 23), tick=False):
            return (
                usage_daily(days=30, today=TODAY)[-2:],
                {by: usage_breakdown(by=by, days=30, today=TODAY) for by in ("model", "provider", "operation", "user")},
            )

    seen = everyone()
    days = {spend.day: (spend.requests, spend.cost) for spend in seen[0]}
    assert days == {YESTERDAY: (4, Decimal("2.8515000001")), TODAY: (7, Decimal("3.3850000003"))}
    by_operation = {share.label: (share.requests, share.cost) for share in seen[1]["operation"]}
    assert by_operation == {
        "Chat completion": (6, Decimal("2.8765000001")),  # the request that named no model too
        "OpenAI responses": (2, Decimal("2.25")),
        "Anthropic messages": (1, Decimal("1.1")),
        "Embeddings": (2, Decimal("0.0100000003")),
    }
    daily_usage_rebuild_recent(days=2, today=TODAY)  # the rows above the mark now rolled up: the same answers
    assert staff() == raw()
    assert everyone() == seen


def test_the_pages_read_the_smallest_rollup_that_has_what_they_group_by(rollup_ledger):
    daily_usage_rebuild_recent(days=2, today=TODAY)

    def tables(read) -> set[str]:
        with CaptureQueriesContext(connection) as queries:
            read()
        sql = " ".join(query["sql"] for query in queries)
        return {
            table
            for table in ("billing_dailystaffusage", "billing_dailyuserusage", 'billing_dailyusage"')
            if table in sql
        }

    with time_machine.travel(at(TODAY, 23), tick=False):
        for by in ("model", "provider", "operation"):
            assert tables(lambda by=by: usage_breakdown(by=by, days=30, today=TODAY)) == {"billing_dailystaffusage"}
        assert tables(lambda: usage_daily(days=30, today=TODAY)) == {"billing_dailystaffusage"}
        # per user, not by key, provider, model or operation: the per-user rollup (DailyUserUsage)
        assert tables(lambda: usage_breakdown(by="user", days=30, today=TODAY)) == {"billing_dailyuserusage"}
        alice = rollup_ledger["alice"].pk
        assert tables(lambda: usage_daily(days=30, today=TODAY, user_id=alice)) == {"billing_dailyuserusage"}
        for by in ("model", "provider", "operation"):  # a user's page by model or operation: DailyUsage
            assert tables(lambda by=by: usage_breakdown(by=by, days=30, today=TODAY, user_id=alice)) == {
                'billing_dailyusage"'
            }


def test_retention_keeps_the_staff_rollup_and_a_late_row_of_a_sealed_day_is_added_once(rollup_ledger, settings):
    for hour, operation in ((1, "chat"), (2, "responses"), (3, "responses")):
        UsageRecordFactory(
            user=rollup_ledger["alice"], created_at=at(OLD, hour), operation=operation, cost=Decimal("0.3")
        )
    daily_usage_rebuild(day=OLD)
    before = staff()
    assert before == raw(through=marks())
    assert usage_records_purge(before=OLD + timedelta(days=1)) == 3
    assert not UsageRecord.objects.filter(created_at__lt=at(OLD + timedelta(1), 0)).exists()
    assert staff() == before

    late = UsageRecordFactory(
        user=rollup_ledger["bob"], created_at=at(OLD, 9), operation="responses", cost=Decimal("0.05")
    )
    for _run in range(2):
        with time_machine.travel(at(TODAY, 12), tick=False):
            daily_usage_rebuild_recent(days=2, today=TODAY)
    key = (OLD, late.provider_name, late.model_name, "responses")
    assert staff()[key] == [3, 30, 15, 0, 0, 0, 0, Decimal("0.65")]  # the factory's 10 and 5 tokens a row
    daily_usage_rebuild(day=OLD)  # a sealed day is not rebuilt from what is left of the ledger
    assert staff()[key][0] == 3


def test_the_migration_derives_every_days_staff_rollup_from_daily_usage(rollup_ledger):
    # 0038 ran before the rollups counted web searches (0045): its copy of the derivation sums none.
    UsageRecord.objects.update(web_search_requests=0)
    daily_usage_rebuild_recent(days=2, today=TODAY)
    expected = staff()
    DailyStaffUsage.objects.all().delete()
    migration = importlib.import_module("billing.migrations.0038_rollup2_daily_staff_usage")
    migration.derive(apps, None)
    assert staff() == expected == raw()
