"""The ledger writer's queue has a bound (``LLMHUB_LEDGER_QUEUE_MAX``): a database that writes slower than
requests come, for longer than a moment, sends the newest rows to the spool instead of growing the
process's memory, and the spool's replay writes them, each once. On SQLite and on PostgreSQL (Makefile
``POSTGRES_TESTS``).

The slow database is the real one behind a gate: every ledger write (the writer's and the replay's) waits
until the test opens it, as a database would that takes minutes over a transaction."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from billing.models import UsageRecord
from billing.services import ledger
from billing.services.ledger import ledger_flush, usage_record_submit
from billing.services.ledger_rows import UsageData
from billing.services.spool import spool_pending, spool_rows
from tests.waiting import wait_for_ledger_rows_async, wait_until_async

pytestmark = pytest.mark.django_db(transaction=True)

_ids = itertools.count()
BOUND = 100


def row() -> UsageData:
    return UsageData(request_id=f"bound-{next(_ids)}", endpoint="rest", stream=False, status="ok")


@pytest.fixture
def slow_database(settings, tmp_path, monkeypatch):
    """The database takes every ledger write only once ``.set()``; the queue's bound is ``BOUND``."""
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    settings.LLMHUB_LEDGER_QUEUE_MAX = BOUND
    settings.LLMHUB_LEDGER_LINGER_MS = 0
    settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS = 0.05
    gate = threading.Event()
    write_rows = ledger._write_rows

    def gated(rows, settled=()):
        if not gate.wait(timeout=60):
            raise AssertionError("the gate was never opened")
        return write_rows(rows, settled)

    monkeypatch.setattr(ledger, "_write_rows", gated)
    yield gate
    gate.set()


def spooled_ids() -> list[str]:
    """The ids in the spool and in a file the spool watcher has claimed to replay (it is waiting at the gate)."""
    return [row["request_id"] for row in spool_rows()]


async def rows_written(prefix: str, count: int) -> int:
    return await wait_for_ledger_rows_async(count, timeout=10, interval=0.01, request_id__startswith=prefix)


async def written_ids(rows: list[UsageData]) -> list[str]:
    """The request ids of ``rows`` in the ledger, once each time a row has it."""
    found = UsageRecord.objects.filter(request_id__in=[data.request_id for data in rows])
    return [request_id async for request_id in found.values_list("request_id", flat=True)]


async def test_a_slow_database_spools_what_passes_the_bound_and_every_row_is_written_once(settings, slow_database):
    submitted = [row() for _ in range(1000)]
    longest = 0
    for data in submitted:
        usage_record_submit(data)
        writer = ledger._writers[asyncio.get_running_loop()]
        if writer.spill is not None:
            await writer.spill  # the append, in its thread; at most one runs at a time
        longest = max(longest, len(writer.queue))
    assert longest <= BOUND + 1  # a spill starts once the queue has passed the bound by one row

    # Every row is still somewhere: in memory (queued, or in the batch being written, at most a batch), or on
    # disk in the spool; none of them is written yet.
    spooled = spooled_ids()
    held = [data.request_id for data, _ in [*writer.in_flight, *writer.queue]]
    assert 0 < len(writer.in_flight) <= ledger.BATCH_SIZE and len(writer.queue) <= BOUND
    assert len(ledger._unwritten) == len(held)
    assert sorted(spooled + held) == sorted(data.request_id for data in submitted)
    assert await UsageRecord.objects.filter(request_id__startswith="bound-").acount() == 0

    slow_database.set()  # the database catches up: the writer writes its rows, the spool watcher the rest
    await asyncio.wait_for(ledger_flush(), timeout=30)
    assert await rows_written("bound-", 1000) == 1000
    assert sorted(await written_ids(submitted)) == sorted(data.request_id for data in submitted)
    await wait_until_async(lambda: not spool_pending(), "the spool replayed", timeout=5, interval=0.01)
    assert not spool_pending()
    assert not ledger._unwritten


async def test_the_makers_of_spilled_rows_are_known_until_the_replay_writes_them(settings, slow_database):
    """A client may rate its request while its row waits in the spool: who made the row, the user and the key
    (a key rates only its own subtree's requests), is still known (``usage_unwritten_maker``), for the newest
    ``LLMHUB_LEDGER_QUEUE_MAX`` rows spooled, and forgotten once the replay has written them."""
    from asgiref.sync import sync_to_async

    from billing.services.keys import api_key_create
    from tests.factories import UserFactory

    user = await sync_to_async(UserFactory)()
    key = (await sync_to_async(api_key_create)(user=user, name="app")).api_key
    submitted = [
        UsageData(
            request_id=f"bound-{next(_ids)}",
            endpoint="rest",
            stream=False,
            status="ok",
            user_id=user.pk,
            api_key_id=key.pk,
        )
        for _ in range(2 * BOUND)
    ]
    writer = None
    for data in submitted:
        usage_record_submit(data)
        writer = ledger._writers[asyncio.get_running_loop()]
        if writer.spill is not None:
            await writer.spill
    spooled = set(spooled_ids())
    newest = [data.request_id for data in submitted if data.request_id in spooled][-BOUND:]
    assert newest and not any(ledger.usage_unwritten(request_id) for request_id in newest)
    assert all(ledger.usage_unwritten_maker(request_id) == (user.pk, key.pk) for request_id in newest)
    held = [data.request_id for data, _ in [*writer.in_flight, *writer.queue]]
    assert all(ledger.usage_unwritten_maker(request_id) == (user.pk, key.pk) for request_id in held)
    assert len(ledger._spooled_makers) <= BOUND

    slow_database.set()
    await asyncio.wait_for(ledger_flush(), timeout=30)
    assert await rows_written("bound-", len(submitted)) >= len(submitted)
    await wait_until_async(lambda: not spool_pending(), "the spool replayed", timeout=5, interval=0.01)
    assert not spool_pending()
    assert not any(ledger.usage_unwritten_maker(data.request_id) for data in submitted)


async def test_a_flush_waits_for_a_spill_on_its_way_to_the_spool(settings, slow_database, monkeypatch):
    """Rows on their way to the spool are in no queue, but not on disk yet: a flush (a graceful stop) waits
    for them as it waits for a batch being written."""
    appended = threading.Event()
    spool_entries = ledger._spool_entries

    def slow_append(entries):
        appended.wait(timeout=30)
        spool_entries(entries)

    monkeypatch.setattr(ledger, "_spool_entries", slow_append)
    for _ in range(BOUND + 1):
        usage_record_submit(row())
    writer = ledger._writers[asyncio.get_running_loop()]
    assert writer.spill is not None and len(writer.queue) <= BOUND // 2
    slow_database.set()
    flush = asyncio.create_task(ledger_flush(wait_seconds=30))
    await asyncio.sleep(0.3)
    assert not flush.done()  # the writer's rows are written by now; the spilled ones are not on disk yet
    appended.set()
    await asyncio.wait_for(flush, timeout=30)
    assert not ledger._unwritten
    assert len(spooled_ids()) + await UsageRecord.objects.filter(request_id__startswith="bound-").acount() >= BOUND + 1


async def test_rows_the_spool_refuses_stay_queued(settings, slow_database, monkeypatch, caplog):
    """A disk that refuses the spill too loses nothing: the rows go back to the writer's queue."""

    def full_disk(entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ledger, "_spool_entries", full_disk)
    submitted = [row() for _ in range(BOUND + 1)]
    for data in submitted:
        usage_record_submit(data)
    writer = ledger._writers[asyncio.get_running_loop()]
    await writer.spill
    assert "stay queued" in caplog.text
    slow_database.set()
    await asyncio.wait_for(ledger_flush(), timeout=30)
    assert await rows_written("bound-", len(submitted)) >= len(submitted)
    assert sorted(await written_ids(submitted)) == sorted(data.request_id for data in submitted)


def test_a_replay_the_database_refuses_stops_at_the_first_batch_and_keeps_every_row(settings, tmp_path, monkeypatch):
    """A replay during a stall: each attempt on a locked SQLite waits the busy timeout (20 s), so the replay
    tries one batch, and the rest of the file goes back to the spool untried, every line of it."""
    from django.db import OperationalError

    from billing.services.ledger import _spool, ledger_replay_spool

    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    rows = [row() for _ in range(3 * ledger.BATCH_SIZE + 7)]
    _spool(*rows)
    attempts = []

    def locked(rows, settled=()):
        attempts.append(len(rows))
        raise OperationalError("database is locked")

    monkeypatch.setattr(ledger, "_write_rows", locked)
    assert ledger_replay_spool() == 0
    assert attempts == [ledger.BATCH_SIZE]
    assert sorted(spooled_ids()) == sorted(data.request_id for data in rows)

    monkeypatch.undo()  # the database takes writes again
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    assert ledger_replay_spool() == len(rows)
    assert not spool_pending()
    assert sorted(
        UsageRecord.objects.filter(request_id__in=[d.request_id for d in rows]).values_list("request_id", flat=True)
    ) == sorted(d.request_id for d in rows)


async def test_rows_spooled_while_the_watcher_backs_off_wake_it(settings, tmp_path):
    """A watcher started long ago may be asleep for its longest back-off (here an hour, as a test that replays
    by hand sets it, on the event loop tests share): rows spooled since wake it, and it replays them now."""
    from billing.services.ledger import _spool, ledger_spool_watch

    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS = 3600
    _spool(row())
    ledger_spool_watch()  # its first probe in an hour
    await asyncio.sleep(0.1)
    settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS = 0.05
    _spool(row())
    ledger_spool_watch()  # as a spill, or a batch the database refused, calls it
    assert await rows_written("bound-", 2) == 2
    await wait_until_async(lambda: not spool_pending(), "the spool replayed", timeout=5, interval=0.01)
    assert not spool_pending()
