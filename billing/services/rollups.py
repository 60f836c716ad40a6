"""Cost rollups: the ledger summed per UTC day, user, key, provider and model into ``DailyUsage``.

Each run recomputes whole days from the ledger (delete and insert in one transaction), so running it
twice, or again after late ledger rows arrived, gives exactly the ledger's totals.
"""

from __future__ import annotations

import zlib
from datetime import UTC, date, datetime, time, timedelta

from django.db import connection, transaction
from django.db.models import Count, Sum
from django.utils import timezone

from ..models import DailyUsage, DailyUsageSeal, UsageRecord


def lock_day(day: date) -> None:
    # Two rebuilds of one day at once could each delete, then each insert. SQLite's IMMEDIATE
    # transactions already serialize them; PostgreSQL needs a lock, held until commit.
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [zlib.crc32(f"llmhub-rollup-{day}".encode())])


@transaction.atomic
def daily_usage_rebuild(*, day: date) -> int:
    """Replace ``day``'s rollup with the ledger's figures; returns how many rows it now has.

    A day sealed by retention (``DailyUsageSeal``) is left as it is: its raw rows are gone, and a rebuild
    from what remains would lose them."""
    lock_day(day)
    if DailyUsageSeal.objects.filter(day=day).exists():
        return DailyUsage.objects.filter(day=day).count()
    start = datetime.combine(day, time(), UTC)
    groups = (
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=start + timedelta(days=1))
        .values("user_id", "api_key_id", "provider_name", "model_name")
        .annotate(
            requests=Count("pk"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cached_tokens=Sum("cached_tokens"),
            cost=Sum("cost"),
        )
        .order_by()
    )
    rows = [DailyUsage(day=day, **group) for group in groups]
    DailyUsage.objects.filter(day=day).delete()
    DailyUsage.objects.bulk_create(rows)
    return len(rows)


def daily_usage_rebuild_recent(*, days: int = 2, today: date | None = None) -> int:
    """Today and the ``days - 1`` days before it (late rows land on yesterday around midnight)."""
    today = today or timezone.now().astimezone(UTC).date()
    return sum(daily_usage_rebuild(day=today - timedelta(days=offset)) for offset in range(days))
