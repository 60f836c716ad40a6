"""Cost rollups: the ledger summed per UTC day, user, key, provider, model and operation into ``DailyUsage``,
and, for the usage pages, per day, provider, model and operation into ``DailyStaffUsage`` and per day and user
into ``DailyUserUsage`` (derived from the day's ``DailyUsage`` whenever that is written, in the same
transaction: ``daily_rollups_derive``).

Each run recomputes whole days from the ledger (delete and insert in one transaction), so running it
twice, or again after late ledger rows arrived, gives exactly the ledger's totals.

Each run also says how far it went: the day's ``DailyUsageMark`` holds the last ledger id the rollup
may hold, written in the same transaction. The rollup sums exactly the day's rows at or below it, so
the rollup plus the day's raw rows above it is the whole day, with nothing counted twice; the dashboards
read today that way (``billing.selectors``). The mark is the ledger's high water (``ledger_high_water``),
below which no insert is still in flight; a bare ``MAX(id)`` would not do, since PostgreSQL hands out
ids before commit and a row with a smaller id may still commit after the rollup has summed.

A row written late onto a day the task no longer rebuilds (a spool replayed after an outage of days)
makes the task's next run roll that day up again (``DailyUsageScanMark``), or, on a day retention has
sealed, add the row to its rollup.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.db import connection, transaction
from django.db.models import Count, F, Max, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from ..models import (
    DailyExperimentUsage,
    DailyStaffUsage,
    DailyUsage,
    DailyUsageMark,
    DailyUsageScanMark,
    DailyUsageSeal,
    DailyUserUsage,
    ExperimentUsageMark,
    UsageRecord,
)
from ..selectors import STAFF_USAGE_GROUP, USER_USAGE_GROUP, experiment_usage_sums


def lock_day(day: date) -> None:
    # Two rebuilds of one day at once could each delete, then each insert. SQLite's IMMEDIATE
    # transactions already serialize them; PostgreSQL needs a lock, held until commit.
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [zlib.crc32(f"llmhub-rollup-{day}".encode())])


# How long the high water waits for the ledger's lock. While it waits, new inserts queue behind it, so it
# must not wait on something long (an anti-wraparound VACUUM, a long transaction): it gives up instead,
# and the rollup runs again 10 minutes later.
HIGH_WATER_LOCK_TIMEOUT = "2s"


def ledger_high_water() -> int:
    """The last ledger id at or below which every row is written for good (committed, or rolled back).

    PostgreSQL: read with the ledger closed to writes for an instant (``SHARE`` mode waits for the
    inserts in flight and holds new ones until this transaction ends, which is right after one index
    probe); raises ``django.db.OperationalError`` if the lock is not had within
    ``HIGH_WATER_LOCK_TIMEOUT``. SQLite: the transaction's write lock does the same. Inside a transaction
    that already holds the lock (the retention seal) it is simply the last id."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = %s", [HIGH_WATER_LOCK_TIMEOUT])
                cursor.execute(f"LOCK TABLE {UsageRecord._meta.db_table} IN SHARE MODE")
                cursor.execute("SET LOCAL lock_timeout TO DEFAULT")  # within a caller's transaction too
        return UsageRecord.objects.aggregate(last=Max("pk"))["last"] or 0


def daily_usage_rebuild(*, day: date, through_id: int | None = None) -> int:
    """Replace ``day``'s rollup with the ledger's figures up to ``through_id`` (default: the high water)
    and mark it so; returns how many rows it now has.

    A day sealed by retention (``DailyUsageSeal``) is not rebuilt: its raw rows are gone, and a rebuild from
    what remains would lose them. Its rows written since the seal's mark are added to it instead
    (``_sealed_day_catch_up``). Two rebuilds of a day run one after the other (``lock_day``); the last to
    commit stands with its own mark, which always agrees with its rows."""
    if through_id is None:
        through_id = ledger_high_water()
    with transaction.atomic():
        lock_day(day)
        seal = DailyUsageSeal.objects.filter(day=day).first()
        if seal is not None:
            _sealed_day_catch_up(seal, through_id=through_id)
            return DailyUsage.objects.filter(day=day).count()
        start = datetime.combine(day, time(), UTC)
        groups = (
            UsageRecord.objects.filter(
                created_at__gte=start, created_at__lt=start + timedelta(days=1), pk__lte=through_id
            )
            .values(*DAILY_USAGE_GROUP)
            .annotate(
                requests=Count("pk"),
                prompt_tokens=Sum("prompt_tokens"),
                completion_tokens=Sum("completion_tokens"),
                cached_tokens=Sum("cached_tokens"),
                cache_write_tokens=Sum("cache_write_tokens"),
                cache_write_1h_tokens=Sum("cache_write_1h_tokens"),
                web_search_requests=Sum("web_search_requests"),
                cost=Sum("cost"),
            )
            .order_by()
        )
        rows = [DailyUsage(day=day, **group) for group in groups]
        DailyUsage.objects.filter(day=day).delete()
        DailyUsage.objects.bulk_create(rows)
        daily_rollups_derive(day)
        DailyUsageMark.objects.update_or_create(day=day, defaults={"through_id": through_id})
        return len(rows)


def _sealed_day_catch_up(seal: DailyUsageSeal, *, through_id: int) -> None:
    """Add to a sealed day's rollup the day's rows above the seal's mark and at or below ``through_id`` (a spool
    replayed after an outage, the lost-request sweep: rows written with the time they were made), and move
    the mark there. In the caller's transaction, under ``lock_day``.

    The seal's ``through_id`` says how far the sealed rollup goes: it holds every row of the day at or below
    it, and none above. Retention's batches read it under the same lock and add only the rows above it that
    they delete, so a row is added once whichever comes first; a row retention never deletes (a lifetime
    budget's) is added here, by the rollup task's next run."""
    if through_id <= seal.through_id:
        return
    start = datetime.combine(seal.day, time(), UTC)
    rows = UsageRecord.objects.filter(
        created_at__gte=start,
        created_at__lt=start + timedelta(days=1),
        pk__gt=seal.through_id,
        pk__lte=through_id,
    )
    daily_usage_fold(seal.day, list(rows.values(*DAILY_USAGE_GROUP, *DAILY_USAGE_FIGURES)))
    DailyUsageSeal.objects.filter(pk=seal.pk).update(through_id=through_id)
    DailyUsageMark.objects.update_or_create(day=seal.day, defaults={"through_id": through_id})


DAILY_USAGE_GROUP = ("user_id", "api_key_id", "provider_name", "model_name", "operation")
DAILY_USAGE_FIGURES = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "web_search_requests",
    "cost",
)


def rollup_derive(source: Any, target: Any, group: tuple[str, ...], *, day: date | None = None) -> int:
    """Replace ``target``'s rows of ``day`` (every day when None) with ``source``'s (``DailyUsage``) summed per day
    and ``group``; returns how many rows it wrote. The one way the derived rollups are written: by
    ``daily_rollups_derive`` (the migrations that created and filled them, 0038 and 0040, hold their own copy, as
    a migration must outlive the code of its day)."""
    rows = source.objects.all() if day is None else source.objects.filter(day=day)
    groups = (
        rows.values("day", *group)
        .annotate(requests=Sum("requests"), **{name: Sum(name) for name in DAILY_USAGE_FIGURES})
        .order_by()
    )
    (target.objects.all() if day is None else target.objects.filter(day=day)).delete()
    return len(target.objects.bulk_create((target(**row) for row in groups.iterator()), batch_size=1000))


def daily_rollups_derive(day: date) -> None:
    """Replace ``day``'s derived rollups (``DailyStaffUsage``, ``DailyUserUsage``) with its ``DailyUsage`` summed
    over what each leaves out. Called in the transaction (and under the lock) of every write of the day's
    ``DailyUsage`` (``daily_usage_rebuild``, ``daily_usage_fold``), so that they hold the same rows, up to the
    same mark."""
    for target, group in ((DailyStaffUsage, STAFF_USAGE_GROUP), (DailyUserUsage, USER_USAGE_GROUP)):
        rollup_derive(DailyUsage, target, group, day=day)


def daily_usage_fold(day: date, rows: list[dict]) -> None:
    """Add ledger rows (``DAILY_USAGE_GROUP`` and ``DAILY_USAGE_FIGURES`` of each) that ``day``'s rollup does
    not hold to it: a sealed day's, whose rollup can no longer be rebuilt from the ledger."""
    sums: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0, Decimal(0)])
    for row in rows:
        entry = sums[tuple(row[name] for name in DAILY_USAGE_GROUP)]
        entry[0] += 1
        for index, name in enumerate(DAILY_USAGE_FIGURES, start=1):
            entry[index] += row[name]
    for group, (requests, prompt, completion, cached, written, written_1h, searches, cost) in sums.items():
        # One row of the group, not each: deleting users (or keys) sets their rollup rows' user (key) to NULL,
        # so a day can hold several rows of one (day, no user, provider, model) group.
        found = (
            DailyUsage.objects.filter(day=day, **dict(zip(DAILY_USAGE_GROUP, group, strict=True)))
            .order_by("pk")
            .values_list("pk", flat=True)
            .first()
        )
        if found is not None:
            DailyUsage.objects.filter(pk=found).update(
                requests=F("requests") + requests,
                prompt_tokens=F("prompt_tokens") + prompt,
                completion_tokens=F("completion_tokens") + completion,
                cached_tokens=F("cached_tokens") + cached,
                cache_write_tokens=F("cache_write_tokens") + written,
                cache_write_1h_tokens=F("cache_write_1h_tokens") + written_1h,
                web_search_requests=F("web_search_requests") + searches,
                cost=F("cost") + cost,
            )
        else:
            DailyUsage.objects.create(
                day=day,
                **dict(zip(DAILY_USAGE_GROUP, group, strict=True)),
                requests=requests,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                cache_write_tokens=written,
                cache_write_1h_tokens=written_1h,
                web_search_requests=searches,
                cost=cost,
            )
    if rows:
        daily_rollups_derive(day)


def daily_usage_rebuild_recent(*, days: int = 2, today: date | None = None) -> int:
    """Today and the ``days - 1`` days before it (late rows land on yesterday around midnight), any older
    day that got ledger rows since the last run (``_late_days_rebuild``), and the experiments' rollup, all
    up to the same mark."""
    today = today or timezone.now().astimezone(UTC).date()
    through_id = ledger_high_water()  # one instant with the ledger closed, for every day
    since = _late_scan_start(through_id=through_id)  # before the rebuilds below move the days' marks
    rebuilt = sum(
        daily_usage_rebuild(day=today - timedelta(days=offset), through_id=through_id) for offset in range(days)
    )
    rebuilt += _late_days_rebuild(before=today - timedelta(days=days - 1), since=since, through_id=through_id)
    experiment_usage_fold(through_id=through_id)
    return rebuilt


def _late_scan_start(*, through_id: int) -> int:
    """``DailyUsageScanMark.through_id``, created at the first run from the newest day's mark (the last run's
    high water, read before this run rebuilds any day: after, it would be this run's own, and the rows written
    late since the last run would go unseen)."""
    since = DailyUsageScanMark.objects.filter(pk=1).values_list("through_id", flat=True).first()
    if since is None:
        newest = DailyUsageMark.objects.order_by("-day").values_list("through_id", flat=True).first()
        since = min(newest, through_id) if newest is not None else through_id
        DailyUsageScanMark.objects.get_or_create(pk=1, defaults={"through_id": since})
    return since


def _late_days_rebuild(*, before: date, since: int, through_id: int) -> int:
    """Roll up again each day before ``before`` that has ledger rows above ``DailyUsageScanMark`` (written
    since the last run looked) and at or below ``through_id``, then move the mark there.

    Such rows were written late, with the time they were made: a spool replayed after an outage of days,
    the lost-request sweep. The days they land on are no longer rebuilt by the task, and the usage pages read
    past days from the rollup only, so without this they would never count. A day sealed by retention gets
    them added to its rollup (``_sealed_day_catch_up``). Only the rows written since the
    last run are read (by id, a few minutes of the ledger), not the old days. The mark moves after the
    days are rebuilt: a run that dies between the two leaves them to the next run, which rebuilds them
    again to the same figures. ``since`` is the mark (``_late_scan_start``)."""
    start = datetime.combine(before, time(), UTC)
    late_days = sorted(
        UsageRecord.objects.filter(pk__gt=since, pk__lte=through_id, created_at__lt=start)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values_list("day", flat=True)
        .order_by()
        .distinct()
    )
    rebuilt = sum(daily_usage_rebuild(day=day, through_id=through_id) for day in late_days)
    DailyUsageScanMark.objects.filter(pk=1, through_id__lt=through_id).update(through_id=through_id)
    return rebuilt


_EXPERIMENT_GROUP = ("experiment_id", "experiment_variant_id", "day", "status")
_EXPERIMENT_SUMS = tuple(experiment_usage_sums())


def experiment_usage_fold(*, through_id: int | None = None) -> int:
    """Add the experiments' ledger rows written since the last fold to ``DailyExperimentUsage``: those above
    ``ExperimentUsageMark.through_id`` and up to ``through_id`` (default: the high water), and move the mark
    there, in one transaction. Returns how many ledger rows it added.

    Incremental rather than rebuilt: the ledger is insert-only, and every row at or below a high water is
    written for good, so the ranges folded one after another hold each row exactly once. The first fold
    reads every experiment row there is (the partial index over them). Two folds at once run one after
    the other (the mark's row lock); the second finds the mark already past it, or folds what is left."""
    if through_id is None:
        through_id = ledger_high_water()
    with transaction.atomic():
        ExperimentUsageMark.objects.get_or_create(pk=1)
        mark = ExperimentUsageMark.objects.select_for_update().get(pk=1)
        if through_id <= mark.through_id:
            return 0
        groups = list(
            UsageRecord.objects.filter(pk__gt=mark.through_id, pk__lte=through_id, experiment_id__isnull=False)
            .values("experiment_id", "experiment_variant_id", "status", day=TruncDate("created_at", tzinfo=UTC))
            .annotate(**experiment_usage_sums())
            .order_by()
        )
        folded = 0
        if groups:
            existing = {
                tuple(getattr(row, name) for name in _EXPERIMENT_GROUP): row
                for row in DailyExperimentUsage.objects.filter(
                    experiment_id__in={group["experiment_id"] for group in groups},
                    day__in={group["day"] for group in groups},
                )
            }
            changed, created = [], []
            for group in groups:
                folded += group["requests"]
                row = existing.get(tuple(group[name] for name in _EXPERIMENT_GROUP))
                if row is None:
                    created.append(DailyExperimentUsage(**group))
                    continue
                for name in _EXPERIMENT_SUMS:
                    setattr(row, name, getattr(row, name) + group[name])
                changed.append(row)
            DailyExperimentUsage.objects.bulk_update(changed, _EXPERIMENT_SUMS, batch_size=500)
            DailyExperimentUsage.objects.bulk_create(created, batch_size=500)
        mark.through_id = through_id
        mark.save(update_fields=["through_id", "folded_at"])
        return folded
