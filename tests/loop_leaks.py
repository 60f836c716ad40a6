"""What the tests of per-loop state (``core.loops.LoopRegistry`` and its users) share: run the real path from fresh
event loops, then find those loops collected and nothing reported unclosed or destroyed.

A process that runs a fresh loop per call (a Celery task, a command, a sync caller through ``asyncio.run`` or
``async_to_sync``) must not keep those loops alive; ``LOOPS`` of them are run, and ``collected`` counts how many are
gone. The test session's own loop is alive and rightly keeps its state, so these tests look only at closed loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync

LOOPS = 5


def collected(refs: list[weakref.ref]) -> int:
    """How many of the loops ``refs`` names are gone, after a full collection; collected again (3 times at most, a
    moment apart) while some are not: a loop only a thread's last frame or a finalizer's turn still names is let go
    a moment later (a CI run on a loaded machine found one such), where a loop kept for good stays kept."""
    for attempt in range(3):
        gc.collect()
        gone = sum(ref() is None for ref in refs)
        if gone == len(refs):
            break
        time.sleep(0.2 * (attempt + 1))
    return gone


async def awaited(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return await coroutine


# Each of the two ways a sync caller runs a coroutine on a loop of its own.
FRESH_LOOPS = pytest.mark.parametrize(
    "run", [asyncio.run, async_to_sync(awaited)], ids=["asyncio_run", "async_to_sync"]
)


def closed_without_cancelling(call: Callable[[], Coroutine[Any, Any, Any]], times: int = LOOPS) -> None:
    """``run_until_complete`` then ``close``, ``times`` times: nothing tells the state of each loop that it ended."""
    for _ in range(times):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(call())
        loop.close()
        del loop


class LeakReports:
    def __init__(self, caught: list[warnings.WarningMessage], caplog: pytest.LogCaptureFixture) -> None:
        self._caught = caught
        self._caplog = caplog

    def unclosed(self) -> list[str]:
        """Every "Unclosed …" or "unclosed …" warning or log line."""
        return [str(warning.message) for warning in self._caught if "nclosed" in str(warning.message)] + [
            record.getMessage() for record in self._caplog.records if "nclosed" in record.getMessage()
        ]

    def destroyed(self) -> list[str]:
        return destroyed_reports(self._caplog)


def destroyed_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every "Task was destroyed but it is pending!" log line."""
    return [record.getMessage() for record in caplog.records if "destroyed" in record.getMessage()]


@contextlib.contextmanager
def leak_reports(caplog: pytest.LogCaptureFixture) -> Iterator[LeakReports]:
    """Record warnings (each one, however often) and log lines at WARNING while the block runs. An earlier test's
    garbage on the same worker (its unclosed sockets) is collected first, so that it is not counted here."""
    gc.collect()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        yield LeakReports(caught, caplog)
