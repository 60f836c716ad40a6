"""What the rollup tests share (tests/billing/test_rollups.py, test_staff_rollup.py, test_user_rollup.py): their
days, the ledger's figures per group, computed from its rows, and a rollup's, read from its table, to compare them.
Their ledger is the ``rollup_ledger`` fixture (tests/billing/conftest.py)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.db.models import Model

from billing.models import DailyUsageMark, UsageRecord

TODAY = date(2026, 3, 10)
YESTERDAY = TODAY - timedelta(days=1)
OLD = date(2026, 1, 20)  # past retention, in a month closed

# What a rollup row adds up, in the order ``ledger_per`` and ``rollup_rows`` give them.
FIGURES = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "web_search_requests",
    "cost",
)


def at(day: date, hour: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def marks() -> dict[date, int]:
    return dict(DailyUsageMark.objects.values_list("day", "through_id"))


def ledger_per(*group: str, through: dict[date, int] | None = None) -> dict:
    """The ledger per (day, *group) (fields of ``UsageRecord``): [requests, prompt, completion, cached, cache
    writes, of them to the 1-hour cache, web searches, cost]; with ``through``, a day's rows at or below its mark
    only."""
    out: dict = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0, Decimal(0)])
    for r in UsageRecord.objects.all():
        day = r.created_at.astimezone(UTC).date()
        if through is not None and (day not in through or r.pk > through[day]):
            continue
        entry = out[(day, *(getattr(r, field) for field in group))]
        figures = (
            1,
            r.prompt_tokens,
            r.completion_tokens,
            r.cached_tokens,
            r.cache_write_tokens,
            r.cache_write_1h_tokens,
            r.web_search_requests,
            r.cost,
        )
        for index, value in enumerate(figures):
            entry[index] += value
    return dict(out)


def rollup_rows(model: type[Model], *group: str) -> dict:
    """A rollup table's rows as ``ledger_per`` gives the ledger's, checking that it holds one row per group."""
    out = {}
    for day, *values in model.objects.values_list("day", *group, *FIGURES):
        key = (day, *values[: len(group)])
        assert key not in out  # one row per group
        out[key] = values[len(group) :]
    return out
