"""The ledger writer on short-lived event loops: a Celery task, a management command or a synchronous view
(``async_to_sync``, ``asyncio.run``) makes a loop per call and writes its rows from it. The writer and the
spool watcher such a loop started must not keep it alive once it is gone, and no row it submitted is lost:
rows still queued when the loop ends go to the spool, which the replay writes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref

import pytest

from billing.models import UsageRecord
from billing.services import ledger
from billing.services.ledger import ledger_flush, ledger_replay_spool, ledger_spool_watch, usage_record_submit
from billing.services.ledger_rows import UsageData
from billing.services.spool import spool_pending
from tests.loop_leaks import FRESH_LOOPS, LOOPS, closed_without_cancelling, collected, destroyed_reports

pytestmark = pytest.mark.django_db(transaction=True)

_ids = itertools.count()


def row() -> UsageData:
    return UsageData(request_id=f"loops-{next(_ids)}", endpoint="rest", stream=False, status="ok")


@FRESH_LOOPS
def test_loops_that_wrote_rows_are_collected_and_every_row_is_written(settings, run):
    """Half the loops wait for their rows (``ledger_flush``); the others end with their rows still queued, as
    a caller that returns at once does: those rows are spooled when ``asyncio.run`` (under ``async_to_sync``
    too) cancels the writer."""
    settings.LLMHUB_LEDGER_LINGER_MS = 20
    refs: list[weakref.ref] = []

    async def call(flush: bool) -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        usage_record_submit(row())
        usage_record_submit(row())
        if flush:
            await ledger_flush(wait_seconds=10)

    for index in range(LOOPS * 2):
        run(call(flush=index % 2 == 0))

    assert collected(refs) == len(refs)
    assert not any(loop() for loop in refs)
    # No writer of a closed loop is left (a long-lived loop of an earlier test in this process, such as the
    # session's, keeps its own writer, rightly).
    assert not [loop for loop in list(ledger._writers) if loop.is_closed()]
    # The rows of the loops that ended with rows queued wait in the spool; the replay writes them.
    assert spool_pending()
    assert ledger_replay_spool() == LOOPS * 2
    assert not ledger._unwritten
    assert UsageRecord.objects.filter(request_id__startswith="loops-").count() == LOOPS * 4


def test_a_loop_closed_without_cancelling_its_writer_is_collected_and_its_rows_spooled(settings, caplog):
    """``run_until_complete`` then ``close``, without cancelling the loop's tasks: the writer task stays pending
    on a closed loop. The next loop that writes releases it, and its rows go to the spool; the writer's task,
    which will never run, is not reported "destroyed but pending"."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    settings.LLMHUB_LEDGER_LINGER_MS = 600_000  # the batch lingers: its rows are queued when the loop closes
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        usage_record_submit(row())
        await asyncio.sleep(0)

    closed_without_cancelling(call)

    async def flushed() -> None:
        usage_record_submit(row())
        await ledger_flush(wait_seconds=10)

    settings.LLMHUB_LEDGER_LINGER_MS = 0
    asyncio.run(flushed())

    assert collected(refs) == LOOPS
    assert not destroyed_reports(caplog)
    assert ledger_replay_spool() == LOOPS
    assert UsageRecord.objects.filter(request_id__startswith="loops-").count() == LOOPS + 1


def test_a_loop_that_watched_the_spool_is_collected(settings):
    settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS = 0.01
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        ledger._spool(row())
        ledger_spool_watch()
        task, _ = ledger._spool_watchers[asyncio.get_running_loop()]
        await asyncio.wait_for(task, timeout=10)  # replays the row, then ends: the spool is empty

    for _ in range(LOOPS):
        asyncio.run(call())

    assert collected(refs) == LOOPS
    assert UsageRecord.objects.filter(request_id__startswith="loops-").count() == LOOPS
