"""Ledger retention: raw ``UsageRecord`` rows older than ``LLMHUB_LEDGER_RETENTION_DAYS`` are deleted once
their day's ``DailyUsage`` holds them, so the table stops growing while every figure the dashboards draw
for those days stays what it was (they read past days from the rollup: ``billing.selectors``).

Which days: whole UTC days older than the setting, and never

- yesterday or today: the rollup task still rebuilds them (late rows land on yesterday around midnight);
- the current UTC month: monthly budgets and their reconciliation sum its raw rows (``services.budgets``);
- rows charged to a key with a lifetime budget (``BudgetPeriod.TOTAL``), or to a key under one: such a
  budget sums every row of the key since it was created, and keeps needing them.

How: a day is first **sealed** (``DailyUsageSeal``): with the ledger closed to writes for the length of one
day's aggregate (PostgreSQL ``LOCK TABLE ... IN SHARE MODE`` waits for inserts in flight and holds new ones;
SQLite's write lock does the same), its rollup is rebuilt one last time and the last row id it holds is
kept. No rollup written earlier is trusted: on PostgreSQL ids are taken before commit, so a past rebuild
cannot say which rows it saw; the seal can, because nothing was being written while it summed. Then the
day's rows are deleted in batches of ``batch_size``, each in its own short transaction, so that writers
wait at most one batch. A row of a sealed day above its ``through_id`` arrived later (a spool replayed
after a long outage): the rollup task's next run adds it to the rollup and moves ``through_id`` past it
(``rollups._sealed_day_catch_up``), or, if this pass comes first, the batch that deletes it adds it in the
same transaction; both read ``through_id`` under the day's lock.
Rows are never deleted before their figures are in the rollup, and never counted twice. The same holds for
the experiments' rollup (``DailyExperimentUsage``): a row in an experiment is deleted only once it is folded
in (at or below ``ExperimentUsageMark.through_id``), so an experiment's results outlive its raw rows.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Min
from django.utils import timezone

from ..models import ApiKey, BudgetPeriod, DailyUsageSeal, ExperimentUsageMark, UsageRecord
from ..selectors import api_key_subtree_ids
from .rollups import (
    DAILY_USAGE_FIGURES,
    DAILY_USAGE_GROUP,
    daily_usage_fold,
    daily_usage_rebuild,
    experiment_usage_fold,
    ledger_high_water,
    lock_day,
)

BATCH_SIZE = 5000


def retention_cutoff(*, today: date, days: int) -> date:
    """The first day whose rows are kept when keeping ``days`` days (see the module's docstring)."""
    return min(today - timedelta(days=days), today - timedelta(days=1), today.replace(day=1))


def ledger_retention_apply(*, now: datetime | None = None, batch_size: int = BATCH_SIZE) -> int:
    """Delete the raw rows past ``LLMHUB_LEDGER_RETENTION_DAYS`` (0: none); returns how many went."""
    days = settings.LLMHUB_LEDGER_RETENTION_DAYS
    if not days or days <= 0:
        return 0
    today = (now or timezone.now()).astimezone(UTC).date()
    return usage_records_purge(before=retention_cutoff(today=today, days=days), batch_size=batch_size)


def usage_records_purge(*, before: date, batch_size: int = BATCH_SIZE) -> int:
    """Seal and empty every day before ``before`` that still has raw rows; returns the rows deleted.

    ``before`` is taken as given, unclamped: ``ledger_retention_apply`` chooses it (the benchmark too).
    The experiments' rollup is brought up to date first: an experiment's row is deleted only once that
    rollup holds it (``_day_purge``)."""
    experiment_usage_fold()
    end = _midnight(before)
    rows = _purgeable(UsageRecord.objects.filter(created_at__lt=end))
    deleted = 0
    first = rows.aggregate(first=Min("created_at"))["first"]
    day = first.astimezone(UTC).date() if first is not None else before
    while day < before:
        deleted += _day_purge(day, batch_size=batch_size)
        day += timedelta(days=1)
    return deleted


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def _purgeable(rows):
    """Rows that no lifetime budget needs."""
    lifetime = ApiKey.objects.filter(budget_period=BudgetPeriod.TOTAL, budget_usd__isnull=False).values_list(
        "pk", flat=True
    )
    kept: set[int] = set()
    for key_id in lifetime:
        kept.update(api_key_subtree_ids(key_id))
    return rows.exclude(api_key_id__in=kept) if kept else rows


def _day_rows(day: date):
    return UsageRecord.objects.filter(created_at__gte=_midnight(day), created_at__lt=_midnight(day + timedelta(1)))


def _day_purge(day: date, *, batch_size: int) -> int:
    rows = _purgeable(_day_rows(day))
    if not rows.exists():
        return 0
    _seal(day)
    deleted = 0
    while True:
        with transaction.atomic():
            lock_day(day)
            # Read under the day's lock at each batch: the rollup task moves it when it adds the day's late
            # rows itself (``rollups._sealed_day_catch_up``), and each row is added by one or the other.
            through_id = DailyUsageSeal.objects.filter(day=day).values_list("through_id", flat=True).get()
            # An experiment's row the experiments' rollup does not hold yet (written after the last fold)
            # stays until a later pass: the mark's row lock keeps a fold from moving it meanwhile.
            folded = ExperimentUsageMark.objects.select_for_update().filter(pk=1).values_list("through_id", flat=True)
            batch = list(
                rows.exclude(experiment_id__isnull=False, pk__gt=folded.first() or 0)
                .order_by("pk")
                .values_list("pk", flat=True)[:batch_size]
            )
            if not batch:
                return deleted
            late = [pk for pk in batch if pk > through_id]
            if late:
                rows_late = UsageRecord.objects.filter(pk__in=late).values(*DAILY_USAGE_GROUP, *DAILY_USAGE_FIGURES)
                daily_usage_fold(day, list(rows_late))
            UsageRecord.objects.filter(pk__in=batch).delete()
            deleted += len(batch)


@transaction.atomic
def _seal(day: date) -> int:
    """Seal ``day`` if it is not sealed yet; returns the last row id its rollup holds."""
    lock_day(day)
    seal = DailyUsageSeal.objects.filter(day=day).first()
    if seal is not None:
        return seal.through_id
    # The ledger's high water (its lock held to the end of this transaction): every row of the day at or
    # below it is in the rebuilt rollup, and no row below it can still commit.
    through_id = ledger_high_water()
    daily_usage_rebuild(day=day, through_id=through_id)
    DailyUsageSeal.objects.create(day=day, through_id=through_id)
    return through_id
