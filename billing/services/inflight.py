"""Requests in flight: the record each admitted request leaves until it settles, and who is alive to own it.

Admission writes a record of the request (id, user, key, model, the counters it holds and the amounts,
the process that admitted it, when) in the same atomic step that reserves its budget (the acquire Lua
script, or the row-lock transaction), and settlement removes it in the same step that settles. So at any
instant the records are exactly the reservations still held, and each names its process.

Each process that holds records says it is alive: a heartbeat key with a short TTL in Redis
(``llmhub:heartbeat:<instance>``), or a ``ProcessHeartbeat`` row on the database's clock. A record whose
process stopped beating belongs to a dead process (SIGKILL, OOM, a lost host): the lost-request sweep
(``counters.inflight_lost_settle``, run by the reconcile task and by every server process on its own)
writes its ledger row with status ``lost`` at the reserved amount, flagged estimated, and releases its
holds. The heartbeat runs in a daemon thread, not a task of some event loop, so it beats the same under
uvicorn, daphne, a test's live server and a worker script, and whatever loop a request ran on.

Redis can also lose the records (a restart without persistence). Every process keeps its own records in
memory too (``_held``, and ``_settled`` for those settled whose rows are not written yet); when its
heartbeat finds a new Redis epoch (``llmhub:epoch``, which a restarted Redis no longer has) it re-asserts
them, and admission does not rebuild a counter until every live
process has had the time to (docs/reliability.md, "Reservations and in-flight requests").
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.db import close_old_connections, connection

from .budgets import RESERVATION_TTL

logger = logging.getLogger("llmhub.inflight")

INFLIGHT_PREFIX = "llmhub:inflight:"  # hash per process: request id → record (JSON)
HEARTBEAT_PREFIX = "llmhub:heartbeat:"  # per process, expires unless refreshed
INSTANCES_KEY = "llmhub:instances"  # every process that ever held a record, for the sweep
EPOCH_KEY = "llmhub:epoch"  # when this Redis started being used (its clock, ms); gone after a restart
SWEEP_LOCK_KEY = "llmhub:inflight:sweeping"


def inflight_key(instance: str) -> str:
    return INFLIGHT_PREFIX + instance


def heartbeat_key(instance: str) -> str:
    return HEARTBEAT_PREFIX + instance


_instance: tuple[int, str] | None = None


def instance_id() -> str:
    """This process, uniquely and stably: host, pid and start time (a pid is reused, a start time is not)."""
    global _instance
    pid = os.getpid()
    if _instance is None or _instance[0] != pid:
        _instance = (pid, f"{socket.gethostname()}:{pid}:{int(time.time() * 1000)}")
    return _instance[1]


def heartbeat_ttl_ms() -> int:
    return int(settings.LLMHUB_INFLIGHT_HEARTBEAT_TTL * 1000)


def restart_grace_ms() -> int:
    """How long after Redis lost its data a counter may not be rebuilt: time for every live process's
    heartbeat to notice and re-assert its records (three beats, so one failed beat is not fatal)."""
    return int(3 * settings.LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL * 1000)


@dataclass(frozen=True, slots=True)
class Held:
    """A reservation this process holds in Redis, as it would re-assert it: the record (with its amounts;
    encoded only if it is ever re-asserted) and, per budget counter, the key and the amount in the
    counter's units."""

    record: dict
    counters: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Settled:
    """A request this process settled in Redis whose ledger row is not written yet, as it would re-assert it
    after Redis lost it: the settled record (JSON, with the row) and, per budget counter, the key and what
    the request spent in the counter's units (remembered on the counter as ``s:<request id>``, which a
    rebuilt counter counts until the row is in the ledger)."""

    record: str
    counters: tuple[tuple[str, int], ...]


# Longer than any request may run: what a process still holds after this was leaked by a caller that
# never settled, and its reservation has expired everywhere else already.
HELD_AT_MOST = RESERVATION_TTL.total_seconds()


# Request id → (monotonic time admitted, what this process holds for it; None for the database store,
# where only the count matters: a process with nothing in flight need not beat).
_held: dict[str, tuple[float, Held | None]] = {}
# Request id → (monotonic time settled, what to re-assert in Redis; None for the database store), for
# requests settled whose ledger rows are not written yet.
_settled: dict[str, tuple[float, Settled | None]] = {}
_held_lock = threading.Lock()


def held_add(request_id: str, held: Held | None) -> None:
    with _held_lock:
        _held[request_id] = (time.monotonic(), held)
    _beat_start()


def held_remove(request_id: str) -> None:
    """Before the settle is sent: a re-assert (which holds the lock while it writes) either ran before,
    and the settle then removes what it wrote, or runs after and no longer sees this request."""
    with _held_lock:
        _held.pop(request_id, None)


def held_settled(request_id: str, settled: Settled | None = None) -> None:
    """As ``held_remove``, but the request's record stays, settled, until its ledger row is written
    (``held_written``): the process keeps beating for it meanwhile, so that the sweep does not write a row
    that is on its way, and re-asserts ``settled`` if Redis loses it."""
    with _held_lock:
        _held.pop(request_id, None)
        _settled[request_id] = (time.monotonic(), settled)
    _beat_start()


def held_written(request_ids: Iterable[str]) -> None:
    with _held_lock:
        for request_id in request_ids:
            _settled.pop(request_id, None)


def held_count() -> int:
    """How many requests this process holds, or has settled without their rows written yet, after
    forgetting those held for longer than any may run."""
    oldest = time.monotonic() - HELD_AT_MOST
    with _held_lock:
        for request_id in [rid for rid, (since, _) in _held.items() if since < oldest]:
            del _held[request_id]
        for request_id in [rid for rid, (since, _) in _settled.items() if since < oldest]:
            del _settled[request_id]
        return len(_held) + len(_settled)


def held_clear() -> None:
    """Forget everything this process holds: for tests, whose admissions may never settle and whose Redis
    and database are emptied between them."""
    with _held_lock:
        _held.clear()
        _settled.clear()


class _Beat(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="llmhub-inflight-heartbeat", daemon=True)
        self.epoch: str | None = None
        self.last_sweep = time.monotonic()
        self.last_error = float("-inf")
        self.redis_client = None
        self.redis_url = ""
        self.interval = settings.LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL

    def run(self) -> None:
        while True:
            time.sleep(self.step())

    def step(self) -> float:
        """One beat, and the seconds to the next. Nothing in it ends the thread: not the database or Redis
        down, nor a read of the settings that fails (Django's ``override_settings`` in another thread leaves
        the settings empty for an instant, which killed this thread in a test run of 4 December)."""
        try:
            self.tick()
            self.interval = settings.LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL
        except Exception as exc:
            # Once a minute at most: the database or Redis being down is reported where requests fail.
            if time.monotonic() - self.last_error >= 60:
                self.last_error = time.monotonic()
                logger.warning("in-flight heartbeat failed (%s: %s); trying again", type(exc).__name__, exc)
        return self.interval

    def tick(self) -> None:
        from . import counters

        url = settings.REDIS_URL
        if url:
            if url != self.redis_url:
                self.redis_client, self.redis_url, self.epoch = counters.redis_sync_client(url), url, None
            if held_count():
                self.epoch = counters.redis_heartbeat(self.redis_client, instance_id(), known_epoch=self.epoch)
        elif held_count():
            close_old_connections()
            counters.database_heartbeat(instance_id())
        every = settings.LLMHUB_INFLIGHT_SWEEP_INTERVAL
        if every and time.monotonic() - self.last_sweep >= every:
            self.last_sweep = time.monotonic()
            close_old_connections()
            settled = counters.inflight_lost_settle(sweeper=True)
            if settled:
                logger.warning("settled %d requests of dead processes as lost", settled)
        if not held_count():
            # Nothing to beat for until the next admission: hold no database connection meanwhile.
            connection.close()


_beat: _Beat | None = None
_beat_lock = threading.Lock()


def _beat_start() -> None:
    global _beat
    if _beat is not None and _beat.is_alive():
        return
    with _beat_lock:
        if _beat is None or not _beat.is_alive():
            _beat = _Beat()
            _beat.start()


def held_snapshot_locked() -> list[tuple[str, Held]]:
    """The Redis reservations held; call with ``_held_lock`` held (``held_lock``)."""
    return [(rid, held) for rid, (_, held) in _held.items() if held is not None]


def settled_snapshot_locked() -> list[tuple[str, Settled]]:
    """The Redis records settled whose rows are not written yet; call with ``_held_lock`` held."""
    return [(rid, settled) for rid, (_, settled) in _settled.items() if settled is not None]


def held_lock() -> threading.Lock:
    return _held_lock
