"""Writing the ledger off the response's critical path without ever dropping a row.

The pipeline hands over a finished request's ``UsageData`` with ``usage_record_submit``. A writer
task per event loop settles the budget reservations and inserts the rows in batches after the
responses have gone (one transaction per batch, so the cost per row falls as load rises). A batch
lingers a moment for company (``LLMHUB_LEDGER_LINGER_MS``) once its reservations are settled, so that at
low load too a transaction carries several rows rather than one each. Until its batch commits, every
row is tracked: ``ledger_flush`` waits for them all (the ASGI lifespan shutdown calls it, so a graceful
stop drains the ledger first); rows a failing database, a cancelled writer or a process exit leave behind
go to a spool file (``spool.py``) that ``ledger_replay_spool`` writes back: at start-up, from a Celery
task, and above all from the process that spooled them, which probes the database from then on and
replays as soon as it answers (``ledger_spool_watch``), so neither a worker nor a restart is needed.
``request_id`` is unique and inserts skip ids already present, so a row can never be counted twice.

A spooled row carries its request's admission (``admission_dump``), settled or not: the replay settles
the reservation before it writes the row, if it is still held (``admission_settle_spooled``), so a stream
cut at shutdown releases its hold when its row is replayed, and a row settled already settles nothing.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Coroutine, Iterable
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

from core.diagnostics import diagnostics_describer_register
from core.loops import LoopRegistry, task_abandoned
from core.metrics import ledger_spilled_add
from core.request_context import outside_request
from core.time_limits import time_limit_reraise

from .admission import (
    Admission,
    admission_dump,
    admission_keeps_record,
    admission_load,
    admission_records_forget,
    admission_records_held,
    admission_records_unmark,
    admission_settle,
    admission_settle_many,
    admission_settle_spooled,
)
from .ledger_rows import UsageData, usage_data_dump, usage_data_from_spool, usage_rows_write
from .spool import spool_append, spool_claim, spool_line_row, spool_pending, spool_set_aside

logger = logging.getLogger("llmhub.ledger")

# Rows submitted and not yet committed, with their admissions, by request id, from every loop of this process.
_unwritten: dict[str, tuple[UsageData, Admission | None]] = {}
_unwritten_lock = threading.Lock()
# Who made the rows this process spooled (request id: (user id, key id)), the newest ``LLMHUB_LEDGER_QUEUE_MAX``
# of them, until this process's replay writes them: a client that rates its request while the row waits in the
# spool (the queue passed its bound, or the database refused the batch) still made it (``usage_unwritten_maker``).
# An id and its makers, not the row: the point of spilling is that the rows' memory has a bound.
_spooled_makers: OrderedDict[str, tuple[int | None, int | None]] = OrderedDict()
BATCH_SIZE = 500
# Loops of servers that have begun to shut down: rows settled on them from then on (streams cut by the
# shutdown) are spooled at once, since such a loop may not live long enough to run another task.
_closing_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_WRITE_ATTEMPTS = 5


def usage_record_submit(data: UsageData, *, admission: Admission | None = None) -> None:
    """Settle and record ``data`` in the background. Safe to call from a ``finally`` under cancellation.

    Rows queue up for one writer task per event loop, which settles their reservations and inserts
    them in batches: one transaction per batch rather than per row, so the cost per row falls as the
    load rises. A row is tracked in ``_unwritten`` from here until its batch is committed."""
    loop = asyncio.get_running_loop()
    if loop in _closing_loops:
        _spool_entries([(data, admission)])
        return
    with _unwritten_lock:
        _unwritten[data.request_id] = (data, admission)
    writer = _writers.get(loop)
    if writer is None:
        writer = _writer_start(loop)
    writer.queue.append((data, admission))
    writer.submitted += 1
    if len(writer.queue) > settings.LLMHUB_LEDGER_QUEUE_MAX and writer.spill is None:
        _spill_start(writer)
    _writer_wake(writer)


def _writer_start(loop: asyncio.AbstractEventLoop) -> _Writer:
    """The writer of ``loop``, new (its first row, or its last writer ended). Writers of loops closed since are
    released first: their rows go to the spool, and the loops (with their writers) can be collected."""
    return _writers.start(loop, _Writer(loop))


def _writer_wake(writer: _Writer) -> None:
    writer.wakeup.set()
    if writer.task is None or writer.task.done():
        writer.task = writer.loop.create_task(_writer_run(writer), context=outside_request())
        writer.task.add_done_callback(functools.partial(_writer_ended, writer=writer))


def _spill_start(writer: _Writer) -> None:
    """The queue has passed ``LLMHUB_LEDGER_QUEUE_MAX`` rows: the database writes slower than requests
    come, for longer than a moment. The newest rows beyond half the bound go to the spool (in a thread:
    one append and one fsync for them all), unsettled, with their admissions, as a shutdown spools the
    rows of the streams it cuts: the replay settles and writes them, from this process as soon as its
    spool watcher sees the database answer (it does: it is only slow), or from any other. So the memory
    the ledger holds has a bound, no row is lost, and ``/readyz`` reports the spool growing, which takes
    the worker out of rotation until it has caught up. Until the append has returned, the rows stay in
    ``_unwritten`` (a flush waits for them, and an exit spools them)."""
    keep = settings.LLMHUB_LEDGER_QUEUE_MAX // 2
    entries = writer.queue[keep:]
    del writer.queue[keep:]
    # The rows that stay go through the writer in order: a hurry counts in those (``_hurry``).
    writer.submitted -= len(entries)
    writer.spill = writer.loop.create_task(_spill(writer, entries), context=outside_request())


async def _spill(writer: _Writer, entries: list[tuple[UsageData, Admission | None]]) -> None:
    try:
        await asyncio.to_thread(_spill_write, entries)
    except Exception:
        # The disk refused them too: they wait in memory, for the writer, rather than be lost.
        logger.exception("spilling %d ledger rows to the spool failed; they stay queued", len(entries))
        # To the loop's writer now: this one may have ended (and been released) meanwhile.
        writer = _writers.get(writer.loop) or _writer_start(writer.loop)
        writer.queue += entries
        writer.submitted += len(entries)
        _writer_wake(writer)
    else:
        logger.warning(
            "the ledger queue passed %d rows (the database writes slower than requests come): %d rows spooled",
            settings.LLMHUB_LEDGER_QUEUE_MAX,
            len(entries),
        )
        ledger_spool_watch()
    finally:
        writer.spill = None


def _spill_write(entries: list[tuple[UsageData, Admission | None]]) -> None:
    """In a thread: spool, then forget (so that however the loop ends meanwhile, no row is only in memory)."""
    _spool_entries(entries)
    _forget(data for data, _ in entries)
    ledger_spilled_add(len(entries))


def usage_unwritten(request_id: str) -> UsageData | None:
    """The row of ``request_id`` if this process submitted it and its batch has not committed yet."""
    with _unwritten_lock:
        entry = _unwritten.get(request_id)
    return None if entry is None else entry[0]


def usage_unwritten_maker(request_id: str) -> tuple[int, int | None] | None:
    """The user and the gateway key (None: a person's request) of ``request_id``'s row if this process made the
    row and it is not in the ledger yet: queued for the writer, or spooled by this process and not replayed by
    it (``_spooled_makers``). None when it is neither, or its row names no user yet (kept under its key's hash:
    attributed when it is written). A client may ask about its request (to rate it) the moment its reply ends,
    before the row is in the ledger."""
    with _unwritten_lock:
        entry = _unwritten.get(request_id)
        maker = _spooled_makers.get(request_id) if entry is None else (entry[0].user_id, entry[0].api_key_id)
    if maker is None or maker[0] is None:
        return None
    return maker[0], maker[1]


class _Writer:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: list[tuple[UsageData, Admission | None]] = []  # submitted, not settled yet
        self.in_flight: list[tuple[UsageData, Admission | None]] = []  # settled, the batch being written
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.write_by = 0.0  # the loop's time by which the lingering batch is written
        self.due: asyncio.TimerHandle | None = None  # wakes the writer then (``_writer_due``)
        self.due_fired = False  # the lingering batch's timer has run: it is due, whatever the loop's clock says
        self.hurried = False  # a flush or a shutdown waits: no lingering until the writer is idle
        # Rows submitted to this writer, and of them those whose batch is written or spooled: rows go in order,
        # so a hurry sent when ``submitted`` was n is for rows still held only while ``finished`` < n.
        self.submitted = 0
        self.finished = 0
        self.spill: asyncio.Task[None] | None = None  # rows past the queue's bound on their way to the spool


def _writer_dropped(writer: _Writer) -> None:
    """``writer``'s loop was closed without cancelling its tasks: they will never run."""
    task_abandoned(writer.task)
    task_abandoned(writer.spill)
    _writer_release(writer)


# A writer is released (``_writer_release``) when its task ends or its loop is found closed: an entry's writer
# refers to its loop, so the entries of ended loops must go for those loops to be collected.
_writers: LoopRegistry[_Writer] = LoopRegistry(on_drop=_writer_dropped)
_writers_release_lock = threading.Lock()


async def _writer_run(writer: _Writer) -> None:
    while True:
        await writer.wakeup.wait()
        writer.wakeup.clear()
        while writer.queue or writer.in_flight:
            if writer.queue:
                writer.wakeup.clear()  # from here, set by a row submitted, a hurry or the batch's timer
                if not writer.in_flight:
                    linger = settings.LLMHUB_LEDGER_LINGER_MS / 1000
                    writer.write_by = writer.loop.time() + linger
                    writer.due_fired = False
                    writer.due = writer.loop.call_at(writer.write_by, _writer_due, writer) if linger > 0 else None
                fresh = writer.queue[: BATCH_SIZE - len(writer.in_flight)]
                del writer.queue[: len(fresh)]
                writer.in_flight += fresh
                # Settled at once, lingering or not: a reservation's hold is released as soon as it can be.
                await _settle_batch(fresh)
            if await _more_rows_came(writer):
                continue
            if writer.due is not None:
                writer.due.cancel()  # when hurried or full before it was due
            await _write_batch(writer.in_flight)
            writer.finished += len(writer.in_flight)
            writer.in_flight = []
        writer.hurried = False


def _writer_due(writer: _Writer) -> None:
    """The lingering batch's timer. It marks the batch due, not only wakes the writer: asyncio runs a timer up to its
    clock's resolution early, and when rows came in the same pass the writer clears the wake-up as it takes them,
    then found the loop's clock short of ``write_by`` and waited for a wake-up that had come and gone, its batch
    unwritten until the next row, a flush or a shutdown (a server of the concurrency tests, idle after its burst,
    held 6 rows for 60 s)."""
    writer.due_fired = True
    writer.wakeup.set()


async def _more_rows_came(writer: _Writer) -> bool:
    """Linger until the batch's time to be written: True as soon as more rows are submitted (to be settled
    and join it), False when it is due, full, or hurried by a flush or a shutdown."""
    if len(writer.in_flight) >= BATCH_SIZE or writer.hurried or writer.loop in _closing_loops:
        return False
    if not writer.queue:
        if writer.wakeup.is_set() or writer.due_fired or writer.loop.time() >= writer.write_by:
            return False  # the batch's timer fired (maybe a clock tick early), or a hurry came
        await writer.wakeup.wait()  # a row submitted, a hurry, or the batch's timer (``due``)
    return bool(writer.queue) and not writer.hurried


def _hurry_writers(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Every writer of this process (or ``loop``'s) writes what it holds now, without lingering. Thread-safe:
    a flush may run on another loop than the writer's, while the writers' loops add to ``_writers``."""
    for writer in _writers_now():
        if loop is not None and writer.loop is not loop:
            continue
        try:
            writer.loop.call_soon_threadsafe(_hurry, writer, writer.submitted)
        except RuntimeError:  # its loop is closed: its rows were spooled when its writer ended
            continue


def _writers_now() -> list[_Writer]:
    """The writers of this process, from any thread (another thread's loop may be adding its own)."""
    return [writer for _, writer in _writers.snapshot()]


def _hurry(writer: _Writer, upto: int) -> None:
    """On the writer's loop. A hurry is for the rows submitted before it was sent (the first ``upto``): if
    they are all written it says nothing, not even to rows submitted since. A flush from another loop
    reaches a loop that is not running (a test's, between two tests) only once that loop runs again, maybe
    after new rows were submitted on it; were those hurried, they would skip their linger long after the
    flush that sent it has returned."""
    if writer.finished >= upto:
        return
    writer.hurried = True
    writer.wakeup.set()


def _writer_ended(task: asyncio.Task[None], *, writer: _Writer) -> None:
    """However the writer ended (its loop cancelled it, even before it ran, as ``asyncio.run`` and
    ``async_to_sync`` do to the tasks left when their call returns; or it failed), the rows it held go to the
    spool with their admissions, and it is released (``_writer_release``). A row both written and spooled is
    harmless: the replay skips known ids, and settles only a reservation still held."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("the ledger writer failed; its rows are spooled", exc_info=task.exception())
    _writer_release(writer)


def _writer_release(writer: _Writer) -> None:
    """Spool the rows ``writer`` holds and forget it: its entry in ``_writers`` holds its loop (the writer, its
    task and its event refer to the loop), so a loop that ever wrote a row would never be collected. The next
    row submitted on a loop still running starts a new writer. A closed loop's writer may be released from two
    threads at once (each starting a writer of its own loop): its rows are taken once."""
    with _writers_release_lock:
        _writers.forget(writer.loop, writer)
        entries = [*writer.in_flight, *writer.queue]
        writer.in_flight, writer.queue = [], []
        writer.finished = writer.submitted
    _spool_entries(entries)
    _forget(data for data, _ in entries)
    admission_records_unmark(entries)


def _forget(rows: Iterable[UsageData]) -> None:
    with _unwritten_lock:
        for data in rows:
            _unwritten.pop(data.request_id, None)


def _settle(data: UsageData, admission: Admission, *, row: bool = True) -> Coroutine[Any, Any, None]:
    """Swap the reservation for the row's cost. ``row``: the in-flight record stays, settled, with the row,
    until the row is committed or spooled (``_records_forget``): a process killed in between has its row
    written by the lost-request sweep from that record, instead of leaving spend with no row."""
    return admission_settle(**_settle_arguments(data, admission, row=row))


def _settle_arguments(data: UsageData, admission: Admission, *, row: bool = True) -> dict[str, Any]:
    return {
        "admission": admission,
        "cost": data.cost,
        "prompt_tokens": data.prompt_tokens,
        "completion_tokens": data.completion_tokens,
        "ok": data.status == "ok",
        "row": usage_data_dump(data) if row and admission_keeps_record(admission) else None,
    }


async def _settle_batch(batch: list[tuple[UsageData, Admission | None]]) -> None:
    settled = [(data, admission) for data, admission in batch if admission is not None]
    if not settled:
        return
    outcomes: list[BaseException | None]
    if len(settled) == 1:
        try:
            outcomes = [await _settle(*settled[0])]
        except Exception as exc:
            outcomes = [exc]
    else:
        # The batch's settles in one go (Redis: one pipeline), each settled alone all the same.
        outcomes = await admission_settle_many([_settle_arguments(data, admission) for data, admission in settled])
    for (data, admission), outcome in zip(settled, outcomes, strict=True):
        if isinstance(outcome, redis.RedisError | DatabaseError):
            # The counters' store is down longer than its client retries: the row is written now and the
            # settle keeps being retried apart from it (settles are idempotent per request id).
            logger.warning("settling %s failed (%s); retrying until it lands", data.request_id, outcome)
            task = asyncio.get_running_loop().create_task(_settle_until_landed(data, admission))
            _settles_retrying.add(task)
            task.add_done_callback(_settles_retrying.discard)
        elif isinstance(outcome, Exception):
            # Not a store that is down: retrying would fail the same way. The hold is released when its
            # reservation expires, and reconciliation puts the counters back on the ledger's figure.
            logger.error("settling a reservation failed", exc_info=outcome)


# Settles retried in the background, kept referenced until they land.
_settles_retrying: set[asyncio.Task[None]] = set()
SETTLE_RETRY_MAX_DELAY = 5.0  # seconds between attempts, at most


async def _settle_until_landed(data: UsageData, admission: Admission) -> None:
    """Retry a settle for as long as this process lives. If it dies first, its reservation is one of a
    dead process, which reconciliation releases, and the counters are rebuilt from the ledger, which has
    the row (or its spool does)."""
    delay = 0.1
    while True:
        await asyncio.sleep(delay)
        try:
            # Once the row is committed or spooled, its record has nothing left to keep: the settle removes it.
            kept = usage_unwritten(data.request_id) is not None
            await _settle(data, admission, row=kept)
            logger.warning("the settle of %s landed", data.request_id)
            if kept and usage_unwritten(data.request_id) is None:
                # Its batch was written while the settle was on its way, and the batch's forget may have come
                # before the settled record did: it goes now (twice is harmless).
                await _records_forget([(data, admission)], [data.request_id])
            return
        except (redis.RedisError, DatabaseError):
            delay = min(delay * 2, SETTLE_RETRY_MAX_DELAY)


async def _write_batch(batch: list[tuple[UsageData, Admission | None]]) -> None:
    """Write a settled batch; rows the database keeps refusing are spooled, with their admissions: a settle
    that failed too (the database is the counters' store) is then made by the replay, if its retry has not
    landed first."""
    rows = [data for data, _ in batch]
    settled = admission_records_held(batch)
    delay = 0.05
    for attempt in range(1, _WRITE_ATTEMPTS + 1):
        try:
            await sync_to_async(_write_rows, thread_sensitive=False)(rows, settled)
            break
        except DatabaseError:
            if attempt == _WRITE_ATTEMPTS:
                logger.exception("ledger write of %d rows failed %d times; spooled", len(rows), attempt)
                _spool_entries(batch)
                ledger_spool_watch()
                break
            await asyncio.sleep(delay)
            delay *= 2
    # No longer unwritten before the records go: a settle retried meanwhile (``_settle_until_landed``) that
    # lands after the records' forget then sees its row written, and forgets its record itself.
    _forget(rows)
    await _records_forget(batch, settled)


async def _records_forget(batch: list[tuple[UsageData, Admission | None]], settled: list[str]) -> None:
    """The rows are committed (or spooled): their settled in-flight records have nothing left to keep. The
    database store deleted them with the rows; Redis's go now. If Redis does not answer, they stay until
    this process is gone, and the sweep then finds their rows written (or spooled) and only removes them."""
    if not settled:
        return
    try:
        await admission_records_forget(batch)
    except redis.RedisError as exc:
        logger.warning("forgetting %d settled in-flight records failed (%s); the sweep will", len(settled), exc)


def ledger_begin_shutdown() -> None:
    """From now on, rows settled on the running loop are spooled synchronously (lifespan shutdown); its
    writer writes what it holds at once."""
    loop = asyncio.get_running_loop()
    _closing_loops.add(loop)
    _hurry_writers(loop)


@atexit.register
def _spool_unfinished() -> None:
    """At interpreter exit, rows not committed yet (their loop was torn down under the writer, as
    servers without a lifespan shutdown do) go to the spool; the next start replays them."""
    with _unwritten_lock:
        entries = list(_unwritten.values())
        _unwritten.clear()
    _spool_entries(entries)


async def ledger_flush(wait_seconds: float = 30.0) -> None:
    """Wait until every submitted row (from any event loop of this process) is committed or spooled, and the
    writers are done with their batches; the writers write at once what they hold, without lingering.

    A batch's rows leave ``_unwritten`` when they are committed, before the batch's settled in-flight
    records are forgotten (``_write_batch``): the flush waits for that too, so that a drain at shutdown
    leaves no record for the sweep, and a writer is idle again, no longer hurried, when the flush returns."""
    _hurry_writers()
    deadline = time.monotonic() + wait_seconds
    while True:
        with _unwritten_lock:
            unwritten = bool(_unwritten)
        if not unwritten and not any(_writer_busy(writer) for writer in _writers_now()):
            return
        if time.monotonic() > deadline:
            busy = sum(_writer_busy(writer) for writer in _writers_now())
            logger.error("ledger flush timed out with %d rows unwritten, %d writers busy", len(_unwritten), busy)
            return
        await asyncio.sleep(0.005)


def ledger_describe() -> str:
    """This process's ledger writers, for a diagnostics dump (``core.diagnostics``): rows unwritten, and per
    writer its queue, the batch in flight, and how far its loop's clock is from the batch's time to be written."""
    with _unwritten_lock:
        unwritten = len(_unwritten)
    lines = [f"ledger: {unwritten} rows submitted and not committed or spooled"]
    for writer in _writers_now():
        task = writer.task
        state = "none" if task is None else "ended" if task.done() else "running"
        lines.append(
            f"ledger writer: {len(writer.queue)} queued, {len(writer.in_flight)} in flight, "
            f"{writer.finished} of {writer.submitted} written or spooled, task {state}, "
            f"hurried {writer.hurried}, woken {writer.wakeup.is_set()}, spill {writer.spill is not None}, "
            f"due in {writer.write_by - writer.loop.time():.3f} s, its loop running {writer.loop.is_running()}"
        )
    return "\n".join(lines)


diagnostics_describer_register(ledger_describe)


def _writer_busy(writer: _Writer) -> bool:
    """Whether ``writer`` holds rows or is finishing a batch (its rows committed, its records being forgotten).
    Only a writer whose loop runs can finish: one whose loop is stopped (a test's, between two tests) or
    closed is not waited for, and rows it holds that are not committed are still in ``_unwritten``."""
    return bool(writer.queue or writer.in_flight) and writer.loop.is_running()


def _write_rows(rows: list[UsageData], settled: Collection[str] = ()) -> None:
    """In a worker thread: ``usage_rows_write`` on a usable connection."""
    close_old_connections()
    usage_rows_write(rows, settled=settled)


def _spool(*rows: UsageData) -> None:
    """Spool rows that hold no reservation."""
    _spool_entries([(data, None) for data in rows])


def _spool_entries(entries: Collection[tuple[UsageData, Admission | None]]) -> None:
    """One JSON line a row: its fields, and under ``admission`` what settling its reservation needs. The
    lines are made as they are written, not all first (``spool_append``). Once they are on disk, their users
    and keys are remembered (``usage_unwritten_maker``), before the rows leave ``_unwritten``."""
    spool_append(_spool_line(data, admission) for data, admission in entries)
    bound = settings.LLMHUB_LEDGER_QUEUE_MAX
    with _unwritten_lock:
        for data, _ in entries:
            _spooled_makers[data.request_id] = (data.user_id, data.api_key_id)
        while len(_spooled_makers) > bound:
            _spooled_makers.popitem(last=False)


def _spool_line(data: UsageData, admission: Admission | None) -> str:
    raw = usage_data_dump(data)
    held = admission_dump(admission)
    if held is not None:
        raw["admission"] = held
    return json.dumps(raw, default=str)  # a value JSON cannot hold must not lose the row


def ledger_replay_spool() -> int:
    """Settle the reservation each spooled row still holds, then write every row that is not in the ledger
    yet; return how many spooled rows were processed (rows already in the ledger count, and are skipped).
    Rows the database refuses again, and rows whose counters' store is down, go back to the spool (with
    their admissions). Safe to run in several processes at once: each claims what it replays
    (``spool.py``), and a reservation is settled once however often its row is replayed."""
    if not spool_pending():
        return 0
    replayed = 0
    with spool_claim() as files:
        for claimed in files:
            leftovers: list[str] = []
            # A batch at a time from the file, not the whole file first: a spool can hold an outage's rows.
            unread = (line.rstrip("\n") for line in claimed if line.strip())
            while lines := list(itertools.islice(unread, BATCH_SIZE)):
                chunk, refused = _settled_spooled(lines, leftovers)
                try:
                    # A row's record may have been left settled by its process (the database store: it was
                    # down when the row was spooled): it goes with the row.
                    if chunk:
                        _write_rows([data for _, data in chunk], [data.request_id for _, data in chunk])
                        _spooled_forget(data.request_id for _, data in chunk)
                    replayed += len(chunk)
                except DatabaseError:
                    logger.exception("replaying %d spooled ledger rows failed; they stay spooled", len(chunk))
                    leftovers.extend(line for line, _ in chunk)
                    refused = True
                if refused:
                    # The database or the counters' store refused: the rest waits for the next replay, not
                    # tried batch after batch now (each attempt on a locked SQLite waits its busy timeout).
                    break
            spool_append(itertools.chain(leftovers, unread))
    return replayed


def _spooled_forget(request_ids: Iterable[str]) -> None:
    with _unwritten_lock:
        for request_id in request_ids:
            _spooled_makers.pop(request_id, None)


def _settled_spooled(lines: list[str], leftovers: list[str]) -> tuple[list[tuple[str, UsageData]], bool]:
    """Settle what the spooled rows' admissions still hold; return the rows to write now, and whether the
    counters' store refused. From a row whose settle finds the store down, that row and the ones after it
    go to ``leftovers``, to be settled and written together later."""
    ready = []
    for index, line in enumerate(lines):
        raw = spool_line_row(line)
        try:
            data = usage_data_from_spool(raw) if raw is not None else None
        except (KeyError, TypeError, ValueError, ArithmeticError):
            data = None
        if data is None:
            # A write torn by a crash (which the next append ran on from), or a line this release cannot
            # read: it would stop every replay here, and every row spooled after it, for good.
            logger.error(
                "a spooled ledger line holds no row this release can write; set aside in %s for a person to look at",
                spool_set_aside(line),
            )
            continue
        if raw.get("admission"):
            try:
                admission_settle_spooled(
                    admission=admission_load(raw["admission"]),
                    cost=data.cost,
                    prompt_tokens=data.prompt_tokens,
                    completion_tokens=data.completion_tokens,
                )
            except (redis.RedisError, DatabaseError) as exc:
                logger.warning(
                    "settling spooled %s failed (%s); it and %d more stay spooled",
                    data.request_id,
                    exc,
                    len(lines) - index - 1,
                )
                leftovers.extend(lines[index:])
                return ready, True
            except Exception as exc:
                time_limit_reraise(exc)
                # Not a store that is down: the row is written all the same; its hold is released when it
                # expires, and reconciliation puts the counters back on the ledger's figure.
                logger.exception("settling the reservation of spooled %s failed", data.request_id)
        ready.append((line, data))
    return ready, False


# Each loop's watcher, and the event that wakes it.
# A watcher is forgotten when it ends (the spool is empty, or its loop cancelled it), and one left pending on a loop
# closed since when the next loop starts one: its entry holds its loop (the task refers to it).
_spool_watchers: LoopRegistry[tuple[asyncio.Task[None], asyncio.Event]] = LoopRegistry()


def ledger_spool_watch() -> None:
    """Replay the spool from this event loop as soon as the database answers again: called when this
    process spools rows, and at start-up when a replay could not empty the spool. One watcher per loop;
    it ends when the spool is empty. A watcher already running is woken: it probes within the pace the
    settings give now, if that is sooner than its back-off (which may have begun long before) had it due."""
    loop = asyncio.get_running_loop()
    if loop in _closing_loops:
        return
    watcher = _spool_watchers.get(loop)
    if watcher is not None and not watcher[0].done():
        watcher[1].set()
        return
    wake = asyncio.Event()
    task = loop.create_task(_spool_watch(wake))
    _spool_watchers.forget_when_done(task, _spool_watchers.start(loop, (task, wake)))


async def _spool_watch(wake: asyncio.Event) -> None:
    """Probe the database every ``LLMHUB_LEDGER_SPOOL_PROBE_SECONDS`` (backing off to four times that while
    it stays down) and replay once it answers. Woken (rows spooled since), it probes within that many seconds
    as the settings give them now, never later than it was due. A cheap ``SELECT 1`` first, so that a
    database still down costs one failed connection per probe, not a rewrite of the spool."""
    loop = asyncio.get_running_loop()
    delay = settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS
    while await sync_to_async(spool_pending, thread_sensitive=False)():
        due = loop.time() + delay
        while (left := due - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), left)
            if wake.is_set():
                wake.clear()
                due = min(due, loop.time() + settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS)
        base = settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS
        delay = min(delay * 2, base * 4)
        try:
            if not await sync_to_async(_database_answers, thread_sensitive=False)():
                continue
            replayed = await sync_to_async(ledger_replay_spool, thread_sensitive=False)()
        except Exception:
            logger.exception("replaying the ledger spool failed; trying again")
            continue
        if replayed:
            logger.warning("the database answers again: replayed %d spooled ledger rows", replayed)
        delay = base


def _database_answers() -> bool:
    close_old_connections()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        connection.close()
        return False
