"""Waiting in a test for something another thread or process does: one helper, with a monotonic deadline (the
wall clock may be pinned), and a failure that says what never happened; its twin for a coroutine, which lets the
event loop run while it waits; and the waits for the ledger's rows that many tests share, built on them."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from billing.models import UsageRecord

T = TypeVar("T")

# What never happened, if it does not: a string, or a function that says it at the deadline (with the figures
# of that moment, such as the rows still missing).
What = str | Callable[[], str]


def _said(what: What) -> str:
    return what() if callable(what) else what


def wait_until(condition: Callable[[], T], what: What, *, timeout: float = 30.0, interval: float = 0.02) -> T:
    """Return ``condition()``'s value once it is true; fail the test with ``what`` if it is not within
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"never happened: {_said(what)}"
        time.sleep(interval)
    return value


async def wait_until_async(
    condition: Callable[[], T | Awaitable[T]], what: What, *, timeout: float = 30.0, interval: float = 0.02
) -> T:
    """``wait_until`` in a coroutine: the event loop runs while it waits (``asyncio.sleep``), and ``condition``
    may be a coroutine function (an async ORM query, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"never happened: {_said(what)}"
        await asyncio.sleep(interval)


def wait_for_record(request_id: str, timeout: float = 10.0) -> UsageRecord:
    """The ledger row of ``request_id``, once the background writer has written it."""
    from billing.models import UsageRecord

    return wait_until(
        lambda: UsageRecord.objects.filter(request_id=request_id).first(),
        f"a ledger row for {request_id}",
        timeout=timeout,
    )


def _rows_where(count: int, filters: dict) -> str:
    where = ", ".join(f"{name}={value!r}" for name, value in filters.items())
    if len(where) > 200:
        where = where[:200] + "…"
    return f"the ledger holds {count} rows" + (f" where {where}" if where else "")


def wait_for_ledger_rows(count: int, *, timeout: float = 30.0, interval: float = 0.02, **filters) -> int:
    """Until the ledger holds at least ``count`` rows matching ``filters`` (``UsageRecord.objects.filter``'s
    arguments), which the servers write after their replies have gone; how many it holds then."""
    from billing.models import UsageRecord

    rows = UsageRecord.objects.filter(**filters)
    wait_until(
        lambda: rows.count() >= count,
        lambda: f"{_rows_where(count, filters)} (it holds {rows.count()})",
        timeout=timeout,
        interval=interval,
    )
    return rows.count()


async def wait_for_ledger_rows_async(count: int, *, timeout: float = 30.0, interval: float = 0.02, **filters) -> int:
    """``wait_for_ledger_rows`` in a coroutine, through the async ORM."""
    from billing.models import UsageRecord

    rows = UsageRecord.objects.filter(**filters)

    async def enough() -> bool:
        return await rows.acount() >= count

    await wait_until_async(enough, lambda: _rows_where(count, filters), timeout=timeout, interval=interval)
    return await rows.acount()
