"""Per-deployment statistics the router reads: requests in flight, latency and time-to-first-token averages,
and this minute's requests and tokens (the deployments' rpm/tpm caps).

The request path never waits for Redis. ``stats_call_started`` / ``stats_call_finished`` only touch this
process's figures (a dict lookup and a few attribute updates under a lock: the same process may run
several event loops in threads). When ``settings.REDIS_URL`` is set, a background task per event loop
(started by the first call made on that loop) exchanges them with Redis every ``FLUSH_INTERVAL`` seconds
in one script call (``providers/redis_scripts/routing_stats_flush.lua``): it sends this process's
requests in flight (absolute, under a key that expires ``BUSY_TTL`` after its last refresh, so a process
that dies stops counting), the minute's requests and tokens and the latency samples since the previous
exchange, and reads back every process's view. What the router sees of other processes is therefore up
to about two intervals old (theirs and ours, ~0.5 s); its own process's figures are always current.

Redis down or slow: the exchange fails, what it carried is kept for the next one (requests and tokens of
the current minute; latency samples are dropped, the local averages have them), other processes' requests
in flight are forgotten (``STALE_AFTER``) and the router works from this process's view. Nothing here
raises into the request path.

Averages are exponentially weighted (EWMA, weight ``ALPHA`` on each new sample; Roberts 1959, "Control
chart tests based on geometric moving averages"). Redis applies a batch of n samples with mean m as
``avg + (1 - (1 - ALPHA)**n) * (m - avg)``, the sequential update with the samples taken as equal.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from django.conf import settings

from core.loops import LoopRegistry
from core.redis import redis_async_client
from core.request_context import outside_request

logger = logging.getLogger("llmhub.routing")

ALPHA = 0.25  # weight of a new latency sample in the averages
FLUSH_INTERVAL = 0.25  # seconds between two exchanges with Redis
BUSY_TTL_MS = 3_000  # a process's requests in flight vanish from Redis this long after its last exchange
STALE_AFTER = 2.0  # seconds after which other processes' requests in flight are no longer believed
IDLE_EXIT = 30.0  # a flusher with nothing to send for this long stops (the next call starts it again)
KEY_PREFIX = "llmhub:route:"
MINUTE_TTL_MS = 120_000
LATENCY_TTL_MS = 86_400_000

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "redis_scripts"


@dataclass(slots=True)
class CallTicket:
    deployment_id: int
    started: float = field(default_factory=time.perf_counter)
    # Whether the attempt counts toward the deployment's rpm/tpm caps: not on a user's own key (their account).
    capped: bool = True


class DeploymentStats:
    """What this process knows of one deployment. ``requests``/``tokens`` are this process's counts of
    ``minute`` not yet sent to Redis, ``sent_*`` those on their way, ``shared_*`` every process's counts of
    ``shared_minute`` as Redis last answered (this process's sent counts included)."""

    __slots__ = (
        "in_flight",
        "latency",
        "latency_n",
        "latency_sum",
        "minute",
        "others_in_flight",
        "requests",
        "sent_minute",
        "sent_requests",
        "sent_tokens",
        "shared_minute",
        "shared_requests",
        "shared_tokens",
        "tokens",
        "ttft",
        "ttft_n",
        "ttft_sum",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.others_in_flight = 0
        self.minute = self.sent_minute = self.shared_minute = -1
        self.requests = self.tokens = 0
        self.sent_requests = self.sent_tokens = 0
        self.shared_requests = self.shared_tokens = 0
        self.latency: float | None = None
        self.ttft: float | None = None
        self.latency_n = self.ttft_n = 0
        self.latency_sum = self.ttft_sum = 0.0

    def requests_in(self, minute: int) -> int:
        count = self.shared_requests if self.shared_minute == minute else 0
        if self.sent_minute == minute:
            count += self.sent_requests
        if self.minute == minute:
            count += self.requests
        return count

    def tokens_in(self, minute: int) -> int:
        count = self.shared_tokens if self.shared_minute == minute else 0
        if self.sent_minute == minute:
            count += self.sent_tokens
        if self.minute == minute:
            count += self.tokens
        return count


_stats: dict[int, DeploymentStats] = {}
_lock = threading.Lock()
_view_at = 0.0  # time.monotonic() of the last view read from Redis
_last_activity = 0.0


def stats_forget_local() -> None:
    """This process forgets every deployment's figures (Redis keeps its own): for tests, whose deployments
    reuse the ids of an emptied database's rows, and must not inherit an earlier test's latencies or counts."""
    with _lock:
        _stats.clear()


def current_minute() -> int:
    """The calendar minute (UTC, since the epoch) the caps count in."""
    return int(time.time() // 60)


def _entry(deployment_id: int) -> DeploymentStats:
    entry = _stats.get(deployment_id)
    if entry is None:
        entry = _stats[deployment_id] = DeploymentStats()
    return entry


def stats_call_started(deployment_id: int, *, capped: bool = True) -> CallTicket:
    """An attempt begins: one more in flight, and one more request this minute unless it is not ``capped``
    (on a user's own key: the caps stand for the platform's account with the provider)."""
    global _last_activity
    now = time.time()
    minute = int(now // 60)
    try:
        with _lock:
            entry = _stats.get(deployment_id) or _entry(deployment_id)
            entry.in_flight += 1
            if entry.minute != minute:
                entry.minute, entry.requests, entry.tokens = minute, 0, 0
            if capped:
                entry.requests += 1
        if settings.REDIS_URL:
            _last_activity = now
            _ensure_flusher()
    except Exception:  # pragma: no cover - bookkeeping must never fail a request
        logger.exception("routing statistics: could not count a call's start")
    return CallTicket(deployment_id, capped=capped)


def stats_call_finished(ticket: CallTicket, *, ok: bool, ttft_s: float | None, tokens: int) -> None:
    """An attempt ended after ``time.perf_counter() - ticket.started`` seconds.

    A successful attempt's duration feeds the latency average; a failed one's only when it was slower than
    the average (a timeout makes a deployment look slower, a refused connection never makes it look faster).
    A time to first token feeds its average whatever the outcome: the first chunk did arrive then."""
    elapsed = time.perf_counter() - ticket.started
    try:
        with _lock:
            entry = _stats.get(ticket.deployment_id) or _entry(ticket.deployment_id)
            if entry.in_flight > 0:
                entry.in_flight -= 1
            if tokens > 0 and ticket.capped:
                minute = int(time.time() // 60)
                if entry.minute != minute:
                    entry.minute, entry.requests, entry.tokens = minute, 0, 0
                entry.tokens += tokens
            if ok or (entry.latency is not None and elapsed > entry.latency):
                entry.latency = elapsed if entry.latency is None else entry.latency + ALPHA * (elapsed - entry.latency)
                entry.latency_n += 1
                entry.latency_sum += elapsed
            if ttft_s is not None and ttft_s >= 0:
                entry.ttft = ttft_s if entry.ttft is None else entry.ttft + ALPHA * (ttft_s - entry.ttft)
                entry.ttft_n += 1
                entry.ttft_sum += ttft_s
    except Exception:  # pragma: no cover - bookkeeping must never fail a request
        logger.exception("routing statistics: could not count a call's end")


# WHAT THE ROUTER READS: plain attribute reads, no lock (a figure a moment old is as good).


def stats_of(deployment_id: int) -> DeploymentStats | None:
    return _stats.get(deployment_id)


def in_flight(deployment_id: int) -> int:
    """Requests in flight on the deployment: this process's, plus other processes' as Redis last said (if
    that was less than ``STALE_AFTER`` ago)."""
    entry = _stats.get(deployment_id)
    if entry is None:
        return 0
    if entry.others_in_flight and time.monotonic() - _view_at < STALE_AFTER:
        return entry.in_flight + entry.others_in_flight
    return entry.in_flight


def latency_score(deployment_id: int) -> float | None:
    """Seconds: the time-to-first-token average when the deployment has one (it is what a streaming client
    waits for, and does not grow with the answer's length), else the whole-call latency average; None
    before the first measurement."""
    entry = _stats.get(deployment_id)
    if entry is None:
        return None
    return entry.ttft if entry.ttft is not None else entry.latency


def stats_clear() -> None:
    """Forget every figure this process holds (a test's start; Redis keeps what it was sent)."""
    global _view_at
    with _lock:
        _stats.clear()
        _view_at = 0.0


# SHARING THROUGH REDIS


_instance: tuple[int, str] = (0, "")


def instance_id() -> str:
    """This process's name in Redis (a forked child gets its own)."""
    global _instance
    pid = os.getpid()
    if _instance[0] != pid:
        _instance = (pid, f"{pid}-{uuid.uuid4().hex[:12]}")
    return _instance[1]


@cache
def _script_source() -> str:
    return (SCRIPTS_DIR / "routing_stats_flush.lua").read_text()


class _Exchange:
    """One event loop's Redis client for ``url`` (``core.redis``: health checks, retries on a dead
    connection) and the flush script registered on it. A retried flush is applied once: the script
    remembers each batch's id."""

    def __init__(self, url: str) -> None:
        self.url = url
        # A short timeout: a flush that cannot get through is simply sent with the next one.
        self.client = redis_async_client(url, socket_timeout=1)
        self.script = self.client.register_script(_script_source())


# A loop's flusher and exchange refer to it: both are forgotten when the flusher ends (``_flusher_ended``), and those
# of a loop closed since when the next loop starts its flusher.
_exchanges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Exchange] = weakref.WeakKeyDictionary()
_flushers: LoopRegistry[asyncio.Task[None]] = LoopRegistry(on_drop=lambda task: _exchanges.pop(task.get_loop(), None))
_batches = itertools.count()
_failing = False  # the last exchange failed: said once in the log, not every FLUSH_INTERVAL
_flushing = False  # one exchange at a time per process, whichever loop runs it
_known: tuple[Any, Any] = (None, None)  # (loop, task) last seen running: the request path's fast check


def _ensure_flusher() -> None:
    global _known
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # called outside an event loop: counted locally, sent by a loop's flusher if there is one
    known_loop, known_task = _known
    if known_loop is loop and not known_task.done():
        return
    task = _flushers.get(loop)
    if task is None or task.done():
        task = loop.create_task(_flush_forever(), name="llmhub-routing-stats", context=outside_request())
        _flushers.start(loop, task)
        task.add_done_callback(_flusher_ended)
    _known = (loop, task)


def _flusher_ended(task: asyncio.Task[None]) -> None:
    """A flusher that ended (idle, or its loop cancelled it as ``asyncio.run`` and ``async_to_sync`` do when
    their call returns) is forgotten with its loop's exchange: both refer to the loop, which would otherwise
    never be collected."""
    global _known
    loop = task.get_loop()
    if _flushers.forget(loop, task):
        _exchanges.pop(loop, None)
    if _known[1] is task:  # the request path's fast check would keep the loop until another loop counts a call
        _known = (None, None)


async def _flush_forever() -> None:
    try:
        while settings.REDIS_URL:
            await asyncio.sleep(FLUSH_INTERVAL)
            await stats_flush()
            if time.time() - _last_activity > IDLE_EXIT and not any(e.in_flight for e in list(_stats.values())):
                return
    except asyncio.CancelledError:
        raise
    except Exception:  # pragma: no cover - stats_flush catches what it expects; anything else ends this task
        logger.exception("routing statistics: the flusher stopped")


def _take_batch(minute: int) -> tuple[list[Any], list[Any], list[Any]]:
    """Under the lock: this process's requests in flight, and the counts and samples not sent yet (moved to
    ``sent_*``, so that the router keeps counting them while they are on their way)."""
    busy: list[Any] = []
    counts: list[Any] = []
    samples: list[Any] = []
    for deployment_id, entry in _stats.items():
        if entry.in_flight:
            busy += [deployment_id, entry.in_flight]
        if entry.minute == minute and (entry.requests or entry.tokens):
            counts += [deployment_id, entry.requests, entry.tokens]
            entry.sent_minute, entry.sent_requests, entry.sent_tokens = minute, entry.requests, entry.tokens
            entry.requests = entry.tokens = 0
        if entry.latency_n:
            samples += [deployment_id, "l", entry.latency_n, repr(entry.latency_sum / entry.latency_n)]
            entry.latency_n, entry.latency_sum = 0, 0.0
        if entry.ttft_n:
            samples += [deployment_id, "f", entry.ttft_n, repr(entry.ttft_sum / entry.ttft_n)]
            entry.ttft_n, entry.ttft_sum = 0, 0.0
    return busy, counts, samples


def _give_back() -> None:
    """Under the lock: the exchange failed; what was on its way is counted as not sent yet."""
    for entry in _stats.values():
        if entry.sent_requests or entry.sent_tokens:
            if entry.sent_minute == entry.minute:
                entry.requests += entry.sent_requests
                entry.tokens += entry.sent_tokens
            entry.sent_requests = entry.sent_tokens = 0
        entry.others_in_flight = 0


def _merge(reply: list[Any], minute: int) -> None:
    """Under the lock: every process's view, as the script returned it."""
    global _view_at
    busy, counts, averages = reply
    others: dict[int, int] = {}
    for i in range(0, len(busy), 2):
        others[int(busy[i])] = int(busy[i + 1])
    for deployment_id in others:
        _entry(deployment_id)
    for deployment_id, entry in _stats.items():
        entry.others_in_flight = others.get(deployment_id, 0)
        entry.sent_requests = entry.sent_tokens = 0
    for i in range(0, len(counts), 2):
        kind, _, deployment = counts[i].partition(":")
        entry = _entry(int(deployment))
        if entry.shared_minute != minute:
            entry.shared_minute, entry.shared_requests, entry.shared_tokens = minute, 0, 0
        if kind == "r":
            entry.shared_requests = int(counts[i + 1])
        else:
            entry.shared_tokens = int(counts[i + 1])
    for i in range(0, len(averages), 2):
        kind, _, deployment = averages[i].partition(":")
        entry = _entry(int(deployment))
        if kind == "l":
            entry.latency = float(averages[i + 1])
        else:
            entry.ttft = float(averages[i + 1])
    _view_at = time.monotonic()


async def stats_flush() -> bool:
    """Exchange this process's figures with Redis now (the background task's step; tests call it to skip
    the wait). Returns whether the exchange went through; never raises."""
    global _flushing, _failing
    url = settings.REDIS_URL
    if not url:
        return False
    minute = current_minute()
    with _lock:
        if _flushing:
            return False
        _flushing = True
        busy, counts, samples = _take_batch(minute)
    try:
        loop = asyncio.get_running_loop()
        exchange = _exchanges.get(loop)
        if exchange is None or exchange.url != url:
            exchange = _exchanges[loop] = _Exchange(url)
        instance = instance_id()
        reply = await exchange.script(
            keys=[
                KEY_PREFIX + "instances",
                f"{KEY_PREFIX}busy:{instance}",
                f"{KEY_PREFIX}minute:{minute}",
                KEY_PREFIX + "latency",
                f"{KEY_PREFIX}batch:{instance}",
            ],
            args=[
                instance,
                KEY_PREFIX + "busy:",
                BUSY_TTL_MS,
                MINUTE_TTL_MS,
                LATENCY_TTL_MS,
                repr(ALPHA),
                next(_batches),
                len(busy) // 2,
                *busy,
                len(counts) // 3,
                *counts,
                len(samples) // 4,
                *samples,
            ],
        )
    except Exception as exc:
        with _lock:
            _give_back()
            _flushing = False
        if not _failing:
            logger.warning("routing statistics: Redis exchange failed (%r); routing on this process's view", exc)
        _failing = True
        return False
    with _lock:
        try:
            _merge(reply, minute)
        except Exception:  # pragma: no cover - a reply of another shape (a script from another version)
            logger.exception("routing statistics: unexpected reply from Redis")
            return False
        finally:
            _flushing = False
    if _failing:
        logger.warning("routing statistics: Redis exchanges work again")
    _failing = False
    return True
