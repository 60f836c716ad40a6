"""The ledger writer's linger (``LLMHUB_LEDGER_LINGER_MS``): at low load a batch waits a moment for more rows
to share its transaction, its reservations settled before it waits, and a flush or a shutdown never waits
for it. On SQLite and on PostgreSQL (Makefile ``POSTGRES_TESTS``)."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from billing.models import UsageRecord
from billing.services import ledger
from billing.services.ledger import ledger_flush, usage_record_submit
from billing.services.ledger_rows import UsageData
from tests.waiting import wait_for_ledger_rows_async

pytestmark = pytest.mark.django_db(transaction=True)

_ids = itertools.count()


def row() -> UsageData:
    return UsageData(request_id=f"linger-{next(_ids)}", endpoint="rest", stream=False, status="ok")


@pytest.fixture
def batches(monkeypatch):
    """The writer's steps as they happen: ("settle", n) and ("write", n), the real ones still run."""
    steps: list[tuple[str, int]] = []
    write_rows, settle_batch = ledger._write_rows, ledger._settle_batch

    def write_spy(rows, settled=()):
        steps.append(("write", len(rows)))
        return write_rows(rows, settled)

    async def settle_spy(batch):
        steps.append(("settle", len(batch)))
        return await settle_batch(batch)

    monkeypatch.setattr(ledger, "_write_rows", write_spy)
    monkeypatch.setattr(ledger, "_settle_batch", settle_spy)
    return steps


async def written(count: int) -> int:
    return await wait_for_ledger_rows_async(count, timeout=5, interval=0.01, request_id__startswith="linger-")


async def test_rows_submitted_apart_share_one_transaction_and_are_settled_as_they_come(settings, batches):
    settings.LLMHUB_LEDGER_LINGER_MS = 1500
    for _ in range(4):
        usage_record_submit(row())
        await asyncio.sleep(0.02)  # each row a wake-up of its own, as at concurrency 1
    assert batches == [("settle", 1)] * 4  # every hold released already, none written yet
    assert await written(4) == 4
    assert batches == [("settle", 1)] * 4 + [("write", 4)]


async def test_rows_that_come_as_the_batchs_timer_runs_are_written_with_it(settings, batches):
    """asyncio runs a timer up to its clock's resolution early. When the batch's timer ran, and more rows came in
    the same pass of the loop, the writer took the rows (clearing the timer's wake-up), found the loop's clock short
    of the batch's time, and waited for a wake-up that had come and gone: the batch stayed unwritten until another
    row came. The timer's run is simulated here ahead of its time, with a row, in one callback."""
    settings.LLMHUB_LEDGER_LINGER_MS = 1500
    usage_record_submit(row())
    await asyncio.sleep(0.02)  # settled, lingering
    writer = ledger._writers.get(asyncio.get_running_loop())
    due, arguments = writer.due._callback, writer.due._args
    writer.due.cancel()

    def fires_early_as_a_row_comes() -> None:
        due(*arguments)
        usage_record_submit(row())

    asyncio.get_running_loop().call_soon(fires_early_as_a_row_comes)
    assert await written(2) == 2
    assert batches == [("settle", 1), ("settle", 1), ("write", 2)]


async def test_without_a_linger_each_wake_up_writes_at_once(settings, batches):
    settings.LLMHUB_LEDGER_LINGER_MS = 0
    for n in range(1, 4):
        usage_record_submit(row())
        assert await written(n) == n
    assert batches == [("settle", 1), ("write", 1)] * 3


async def test_a_flush_writes_a_lingering_batch_at_once(settings, batches):
    settings.LLMHUB_LEDGER_LINGER_MS = 600_000  # ten minutes: only the flush can write it in time
    for _ in range(3):
        usage_record_submit(row())
        await asyncio.sleep(0.01)
    await asyncio.wait_for(ledger_flush(), timeout=20)
    assert await UsageRecord.objects.filter(request_id__startswith="linger-").acount() == 3
    assert batches[-1] == ("write", 3)


async def test_a_flush_from_another_loop_leaves_no_hurry_for_the_rows_after_it(settings, batches):
    """A flush from another event loop (a live server's lifespan shutdown, a synchronous caller's
    ``async_to_sync``) that finds this loop's writer idle reaches it only when this loop runs again: after
    the flush has returned, as between two tests. The rows submitted then still linger together."""
    settings.LLMHUB_LEDGER_LINGER_MS = 1500
    usage_record_submit(row())
    await asyncio.wait_for(ledger_flush(), timeout=20)  # this loop's writer exists, and is idle
    batches.clear()
    elsewhere = threading.Thread(target=asyncio.run, args=(ledger_flush(),))
    elsewhere.start()
    elsewhere.join()  # this loop does not run meanwhile
    await asyncio.sleep(0)  # it runs again: what the other loop's flush sent it comes first
    for _ in range(2):
        usage_record_submit(row())
        await asyncio.sleep(0.02)
    assert batches == [("settle", 1)] * 2
    assert await written(3) == 3
    assert batches == [("settle", 1)] * 2 + [("write", 2)]


async def test_a_flush_from_another_loop_hurries_none_of_the_rows_submitted_after_it(settings, batches):
    """As above, but the next rows are submitted before this loop runs again (a test's first statement, after
    an earlier test's server flushed from its own thread): the hurry, run after them, is for the rows
    submitted before it was sent, all written already, so these still linger together."""
    settings.LLMHUB_LEDGER_LINGER_MS = 1500
    usage_record_submit(row())
    await asyncio.wait_for(ledger_flush(), timeout=20)
    batches.clear()
    elsewhere = threading.Thread(target=asyncio.run, args=(ledger_flush(),))
    elsewhere.start()
    elsewhere.join()
    for _ in range(3):
        usage_record_submit(row())  # the first before the hurry runs, the others after it
        await asyncio.sleep(0.02)
    assert batches == [("settle", 1)] * 3
    assert await written(4) == 4
    assert batches == [("settle", 1)] * 3 + [("write", 3)]


async def test_a_flush_from_another_loop_hurries_the_rows_submitted_before_it(settings, batches):
    settings.LLMHUB_LEDGER_LINGER_MS = 600_000
    usage_record_submit(row())
    await asyncio.sleep(0.02)
    assert batches == [("settle", 1)]  # lingering
    elsewhere = threading.Thread(target=asyncio.run, args=(ledger_flush(wait_seconds=0),))
    elsewhere.start()
    elsewhere.join()
    assert await written(1) == 1
    assert batches == [("settle", 1), ("write", 1)]


async def test_a_shutdown_writes_a_lingering_batch_at_once(settings, batches):
    settings.LLMHUB_LEDGER_LINGER_MS = 600_000
    usage_record_submit(row())
    await asyncio.sleep(0.02)
    loop = asyncio.get_running_loop()
    ledger.ledger_begin_shutdown()
    try:
        assert await written(1) == 1
    finally:
        ledger._closing_loops.discard(loop)
    assert batches == [("settle", 1), ("write", 1)]


async def test_a_full_batch_does_not_linger(settings, batches):
    settings.LLMHUB_LEDGER_LINGER_MS = 600_000
    for _ in range(ledger.BATCH_SIZE + 1):
        usage_record_submit(row())
    assert await written(ledger.BATCH_SIZE) == ledger.BATCH_SIZE  # the first 500 at once, the last one waits
    assert batches[:2] == [("settle", ledger.BATCH_SIZE), ("write", ledger.BATCH_SIZE)]
    await asyncio.wait_for(ledger_flush(), timeout=20)
    assert batches[2:] == [("settle", 1), ("write", 1)]
