"""Circuit breakers per deployment, shared by every process and server through Redis.

The state machine is ``breaker_machine.Machine`` (closed → open → half-open → closed or open again, with a
cooldown that doubles after each failed probe); with ``REDIS_URL`` set, the breaker of a deployment lives in
a Redis hash and every transition is one Lua script (``providers/redis_scripts/breaker_*.lua``, the twin of
``Machine``), so every process sees one truth. Without Redis, each process runs ``Machine`` in memory.

The request path never waits for Redis, except to claim a half-open breaker's single probe:

- ``breaker_is_open`` reads this process's view (``_views``): a dict lookup and two comparisons.
- ``breaker_record`` adds the outcome to a batch; a flusher task per event loop sends failures at once and
  successes every ``SUCCESS_FLUSH_SECONDS`` (at once too when the breaker is not plainly closed). The
  scripts' answers update the view.
- A script that changes a breaker publishes it on ``CHANNEL``; a listener task per event loop applies what
  it hears (other processes learn of a change within milliseconds) and re-reads every open breaker every
  ``LLMHUB_BREAKER_RESYNC_SECONDS`` (a missed message heals). Every change carries a version from one
  Redis counter, so a late message never undoes a newer state; a new epoch (Redis lost its data) rebuilds
  the view from what Redis holds, and a message of another epoch than the one read is not applied (one sent
  before the loss would reopen a breaker Redis forgot).
- Redis unreachable: the request goes on with the view as it was; outcomes and claims are then decided by an
  in-memory ``Machine`` started from that view, until Redis answers again (its state wins).

``forced_state`` on a ``ResolvedDeployment`` (an admin's ``Deployment.breaker_override``) beats all of it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

import redis
import redis.asyncio
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver
from redis.commands.core import AsyncScript, Script

from core.loops import LoopRegistry, task_abandoned
from core.redis import redis_async_client, redis_sync_client
from core.request_context import outside_request

from ..types import ResolvedDeployment
from .breaker_machine import CLOSED, OPEN, BreakerConfig, BreakerState, BreakerView, Machine

logger = logging.getLogger("llmhub.breakers")

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "redis_scripts"
KEY_PREFIX = "llmhub:breaker:"
INDEX_KEY = "llmhub:breakers:open"
VERSION_KEY = "llmhub:breakers:version"
EPOCH_KEY = "llmhub:breakers:epoch"
# Messages carry the epoch of their data since 6 December 2026: a channel of its own, whose messages a process
# of an earlier release (which would fail to parse them) does not hear; each side's resync covers the other's
# changes during a rolling deploy.
CHANNEL = "llmhub:breakers:changes:2"
SUCCESS_FLUSH_SECONDS = 0.5
# A request claiming a probe waits at most this long for Redis before deciding in memory.
CLAIM_TIMEOUT_SECONDS = 1.0
FORCED_OPEN = "open"

# This process's view of every breaker it has heard of (absent: closed).
_views: dict[int, BreakerView] = {}
# Breakers decided in this process: all of them without Redis; with Redis, those that changed while it was
# unreachable (dropped as soon as Redis speaks for them again).
_machines: dict[int, Machine] = {}
_lock = threading.Lock()  # transitions of _machines (threads: sync views, Celery)
# The half-open probes this process claimed and has not reported yet: deployment -> the claim's probe_until.
_probes: dict[int, int] = {}
LOCAL_VERSION = -1  # a view decided in memory while Redis was away: whatever Redis says next wins


@cache
def _script_text(name: str) -> str:
    """Every script with ``breaker_epoch.lua`` in front; a transition with ``breaker_common.lua`` too."""
    parts = ["breaker_epoch", name] if name == "breaker_snapshot" else ["breaker_epoch", "breaker_common", name]
    return "\n".join((SCRIPTS_DIR / f"{part}.lua").read_text() for part in parts)


# The scripts registered on the process's sync clients (which live as long as the process). Those of an event
# loop's clients are its syncer's (``_Syncer.scripts``): a script refers to its client, and so to the loop.
_sync_scripts: dict[tuple[redis.Redis, str], Script] = {}


def _script(client: redis.Redis | redis.asyncio.Redis, name: str, *, kept: dict | None = None) -> Script | AsyncScript:
    """The script ``name`` registered on ``client``, kept in ``kept``: its loop's syncer's ``scripts`` for an
    asyncio client, the process's for a sync one (the default)."""
    scripts = _sync_scripts if kept is None else kept
    script = scripts.get((client, name))
    if script is None:
        script = scripts[(client, name)] = client.register_script(_script_text(name))
    return script


def _keys(deployment_id: int) -> list[str]:
    return [f"{KEY_PREFIX}{deployment_id}", INDEX_KEY, VERSION_KEY, EPOCH_KEY]


def _args(deployment_id: int, cfg: BreakerConfig, now: int, *extra: int) -> list[str | int]:
    return [deployment_id, now, *cfg.lua_args(), CHANNEL, *extra]


def _now_ms() -> int:
    return int(time.time() * 1000)


_settings: tuple[str, BreakerConfig] | None = None


def _conf() -> tuple[str, BreakerConfig]:
    """(``REDIS_URL``, the breaker settings), read once: reading settings costs microseconds per call."""
    global _settings
    if _settings is None:
        _settings = (settings.REDIS_URL, BreakerConfig.from_settings())
    return _settings


@receiver(setting_changed)
def _settings_changed(*, setting: str, **kwargs: object) -> None:
    global _settings
    if setting == "REDIS_URL" or setting.startswith("LLMHUB_BREAKER_"):
        _settings = None


# THIS PROCESS'S VIEW


def _apply(deployment_id: int, view: BreakerView) -> None:
    """What Redis answered or announced; older than what this process knows already: ignored."""
    current = _views.get(deployment_id)
    if current is None or view.version >= current.version:
        _views[deployment_id] = view
        _machines.pop(deployment_id, None)


def _apply_message(data: str, epoch: str | None) -> bool:
    """A change message (``breaker_common.lua``), unless it is of the data of another epoch than ``epoch``, the
    one this process has read: its version is of a counter that started again since (Redis lost its data) and
    would beat the views rebuilt from what Redis holds now. False when it is not applied for that."""
    deployment_id, *fields, message_epoch = data.split()
    if message_epoch != epoch:
        return False
    _apply(int(deployment_id), BreakerView.parse(fields))
    return True


def _apply_snapshot(reply: list, *, redis_lost_data: bool) -> None:
    """Every open breaker as Redis holds it (``breaker_snapshot.lua``); any other this process thinks open is
    closed. ``redis_lost_data``: versions started again from 0, so those this process knows mean nothing."""
    top = int(reply[1])
    seen = {int(reply[i]): BreakerView.parse(reply[i + 1 : i + 7]) for i in range(2, len(reply), 7)}
    closed = BreakerView(CLOSED, 0, 0, _conf()[1].cooldown_ms, 0, top)
    for deployment_id, view in list(_views.items()):
        if deployment_id not in seen and (view.version <= top or redis_lost_data):
            _views[deployment_id] = closed
            _machines.pop(deployment_id, None)
    for deployment_id, view in seen.items():
        if redis_lost_data:
            _views[deployment_id] = view
            _machines.pop(deployment_id, None)
        else:
            _apply(deployment_id, view)


def _local(deployment_id: int, transition: Callable[[Machine], tuple[bool, bool]]) -> bool:
    """A transition decided in this process (no Redis, or Redis unreachable); returns ``won``."""
    url, cfg = _conf()
    version = LOCAL_VERSION if url else 0
    with _lock:
        machine = _machines.get(deployment_id)
        if machine is None:
            machine = _machines[deployment_id] = Machine(cfg, _views.get(deployment_id))
        _changed, won = transition(machine)
        _views[deployment_id] = machine.view(version)
    return won


def _local_record(deployment_id: int, ok: int, failed: int, tail: int, now: int) -> None:
    cfg = _conf()[1]
    _local(deployment_id, lambda machine: machine.record(cfg, now, ok=ok, failed=failed, tail=tail))


# THE BACKGROUND OF EACH EVENT LOOP: FLUSHER AND LISTENER


class _Syncer:
    """Sends this event loop's outcomes to Redis and keeps the process's view in step with it."""

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.url = url
        self.loop = loop
        self.pending: dict[int, list[int]] = {}  # deployment -> [succeeded, failed, failed after last success]
        self.releases: dict[int, int] = {}  # deployment -> the probe_until of a probe this loop gives back
        self.wake = asyncio.Event()
        self.synced = asyncio.Event()  # the first snapshot is in
        self.redis_ok = True
        self.epoch: str | None = None  # of the Redis data this syncer has read (breaker_snapshot.lua)
        self.stopped = False  # REDIS_URL changed (tests) or a task ended: the next caller starts another syncer
        # The scripts registered on this loop's clients, gone with the syncer (a weak-keyed cache by client would
        # keep every client, and its loop, alive: a script refers to its client).
        self.scripts: dict[tuple[redis.asyncio.Redis, str], AsyncScript] = {}
        self.tasks = [
            loop.create_task(self._flush_forever(), context=outside_request()),
            loop.create_task(self._listen_forever(), context=outside_request()),
        ]
        for task in self.tasks:
            task.add_done_callback(self._stop)

    def _stop(self, _task: asyncio.Task | None = None) -> None:
        """A task ended (its loop cancelled it, as ``asyncio.run`` and ``async_to_sync`` do when their call
        returns; or it failed): this syncer is forgotten, or its entry would keep its loop alive."""
        global _last_syncer
        self.stopped = True
        _syncers.forget(self.loop, self)
        if _last_syncer is self:
            _last_syncer = None

    @property
    def active(self) -> bool:
        if _conf()[0] != self.url:
            self.stopped = True
        return not self.stopped

    def add(self, deployment_id: int, ok: bool) -> None:
        counts = self.pending.get(deployment_id)
        if counts is None:
            counts = self.pending[deployment_id] = [0, 0, 0]
        if ok:
            counts[0] += 1
            counts[2] = 0
            view = _views.get(deployment_id)
            if view is not None and (view.state != CLOSED or view.failures):
                self.wake.set()  # a probe's success, or a run of failures this success ends: tell everyone now
        else:
            counts[1] += 1
            counts[2] += 1
            self.wake.set()

    def release(self, deployment_id: int, token: int) -> None:
        self.releases[deployment_id] = token
        self.wake.set()

    def _unreachable(self, exc: Exception) -> None:
        if self.redis_ok:
            logger.warning("Redis unreachable for the circuit breakers (%s); deciding in this process", exc)
        self.redis_ok = False

    async def _flush_forever(self) -> None:
        while self.active:
            try:
                # Not ``wait_for``: its inner task would be reported "destroyed but pending" with a loop closed
                # without cancelling this one.
                async with asyncio.timeout(SUCCESS_FLUSH_SECONDS):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()
            if self.pending or self.releases:
                batch, self.pending = self.pending, {}
                releases, self.releases = self.releases, {}
                try:
                    await self.flush(batch, releases)
                except Exception:
                    logger.exception("circuit breaker outcomes lost")

    async def flush(self, batch: dict[int, list[int]], releases: dict[int, int]) -> None:
        """Outcomes, then probes given back: one pipelined round trip."""
        cfg = _conf()[1]
        now = _now_ms()
        client = redis_async_client(self.url, socket_timeout=CLAIM_TIMEOUT_SECONDS)
        record = _script(client, "breaker_record", kept=self.scripts)
        release = _script(client, "breaker_release", kept=self.scripts)
        sent = [*batch, *releases]
        try:
            async with client.pipeline(transaction=False) as pipe:
                for deployment_id, counts in batch.items():
                    await record(keys=_keys(deployment_id), args=_args(deployment_id, cfg, now, *counts), client=pipe)
                for deployment_id, token in releases.items():
                    await release(keys=_keys(deployment_id), args=_args(deployment_id, cfg, now, token), client=pipe)
                replies = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._unreachable(exc)
            for deployment_id, (ok, failed, tail) in batch.items():
                _local_record(deployment_id, ok, failed, tail, now)
            for deployment_id, token in releases.items():
                _local(deployment_id, lambda machine, token=token: machine.release(token))
            return
        self.redis_ok = True
        if not self.active:
            return
        for deployment_id, reply in zip(sent, replies, strict=True):
            _apply(deployment_id, BreakerView.parse(reply[2:]))

    async def _listen_forever(self) -> None:
        backoff = 0.1
        while self.active:
            client = redis_async_client(self.url)
            pubsub: redis.asyncio.client.PubSub | None = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                await self.resync(client)  # after subscribing: nothing published since is missed
                backoff = 0.1
                resync_at = time.monotonic() + settings.LLMHUB_BREAKER_RESYNC_SECONDS
                while self.active:
                    message = await pubsub.get_message(timeout=max(0.0, min(resync_at - time.monotonic(), 1.0)))
                    if not self.active:  # what a Redis no longer ours says is not news
                        break
                    if message is not None and message["type"] == "message":
                        if not _apply_message(message["data"], self.epoch):
                            # Of the data Redis lost, or of data newer than this process has read: the snapshot
                            # tells which, now rather than at the next resync.
                            resync_at = time.monotonic()
                    if time.monotonic() >= resync_at:
                        await self.resync(client)
                        resync_at = time.monotonic() + settings.LLMHUB_BREAKER_RESYNC_SECONDS
            except GeneratorExit:
                # Destroyed pending with a loop closed without cancelling it: nothing can be awaited any more.
                pubsub = None
                raise
            except (redis.RedisError, OSError) as exc:
                self._unreachable(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                logger.exception("circuit breaker listener failed; starting again")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    try:
                        await pubsub.aclose()
                    except (redis.RedisError, OSError):
                        pass

    async def resync(self, client: redis.asyncio.Redis) -> None:
        script = _script(client, "breaker_snapshot", kept=self.scripts)
        reply = await script(keys=[INDEX_KEY, VERSION_KEY, EPOCH_KEY], args=[KEY_PREFIX])
        if not self.active:
            return
        _apply_snapshot(reply, redis_lost_data=self.epoch is not None and reply[0] != self.epoch)
        self.epoch = reply[0]
        self.redis_ok = True
        self.synced.set()


def _syncer_dropped(syncer: _Syncer) -> None:
    for task in syncer.tasks:
        task_abandoned(task)


# A syncer refers to its loop (its tasks, its clients' scripts): forgotten when one of its tasks ends (``_stop``),
# or, for a loop closed without cancelling them, when the next loop starts its syncer.
_syncers: LoopRegistry[_Syncer] = LoopRegistry(on_drop=_syncer_dropped)
_last_syncer: _Syncer | None = None


def _syncer() -> _Syncer | None:
    """This event loop's syncer (started at first use), or None without Redis or outside an event loop."""
    global _last_syncer
    url = _conf()[0]
    if not url:
        return None
    loop = asyncio._get_running_loop()
    if loop is None:
        return None
    syncer = _last_syncer
    if syncer is not None and syncer.loop is loop and syncer.url == url and not syncer.stopped:
        return syncer
    syncer = _syncers.get(loop)
    if syncer is None or not syncer.active:
        syncer = _syncers.start(loop, _Syncer(url, loop))
    _last_syncer = syncer
    return syncer


async def breakers_synced() -> None:
    """Wait until this event loop's view holds what Redis held (its first snapshot): at a server's start, so
    that its first requests already avoid open breakers (bound the wait with ``asyncio.timeout``: with Redis
    down it lasts until Redis answers), and in tests. Returns at once without Redis."""
    syncer = _syncer()
    if syncer is not None:
        await syncer.synced.wait()


def breakers_forget_local() -> None:
    """This process forgets every breaker it knows (Redis keeps its own): for tests, whose deployments reuse
    the ids of an emptied database's rows, and must not inherit the breaker an earlier test opened."""
    with _lock:
        _views.clear()
        _machines.clear()
        _probes.clear()


# THE INTERFACE


def breaker_is_open(deployment: ResolvedDeployment) -> bool:
    """Sync, no I/O: whether the router should leave ``deployment`` out (open and cooling down, or half-open
    with its one probe out). A half-open breaker whose probe is free is a candidate: ``breaker_allows``
    decides who probes."""
    forced = deployment.forced_state
    if forced:
        return forced == FORCED_OPEN
    view = _views.get(deployment.id)
    return view is not None and view.leaves_out(time.time() * 1000)


def breaker_reopens_in(deployment: ResolvedDeployment) -> float | None:
    """Sync, no I/O: seconds until the breaker of ``deployment`` lets a call through again, as this process sees it
    (its cooldown's end, or the end of the lease of the half-open probe out); 0 when it does now; None when an admin
    holds it open (``Deployment.breaker_override``), which has no end llmhub knows of."""
    forced = deployment.forced_state
    if forced:
        return None if forced == FORCED_OPEN else 0.0
    view = _views.get(deployment.id)
    if view is None:
        return 0.0
    return max(0.0, (max(view.opened_until, view.probe_until) - time.time() * 1000) / 1000)


async def breaker_allows(deployment: ResolvedDeployment) -> bool:
    """Just before an attempt: False when the breaker is open (another process may have opened it since the
    candidates were listed); True when closed, or when this caller won the half-open probe (claimed
    atomically across every process: one Redis round trip, the only one on the request path)."""
    forced = deployment.forced_state
    if forced:
        return forced != FORCED_OPEN
    syncer = _syncer()  # this event loop keeps the process's view in step with Redis from its first request on
    view = _views.get(deployment.id)
    if view is None or view.state != OPEN:
        return True
    now = _now_ms()
    if view.leaves_out(now):
        return False
    cfg = _conf()[1]
    if syncer is not None:  # Redis is set
        try:
            client = redis_async_client(syncer.url, socket_timeout=CLAIM_TIMEOUT_SECONDS)
            script = _script(client, "breaker_claim", kept=syncer.scripts)
            reply = await script(keys=_keys(deployment.id), args=_args(deployment.id, cfg, now))
        except (redis.RedisError, OSError) as exc:
            logger.warning("Redis unreachable to claim the probe of deployment %s (%s)", deployment.id, exc)
        else:
            view = BreakerView.parse(reply[2:])
            _apply(deployment.id, view)
            if reply[1] and view.state == OPEN:
                _probes[deployment.id] = view.probe_until
            return bool(reply[1])
    won = _local(deployment.id, lambda machine: machine.claim(cfg, now))
    if won and _views[deployment.id].state == OPEN:
        _probes[deployment.id] = _views[deployment.id].probe_until
    return won


def breaker_record(deployment_id: int, *, ok: bool) -> None:
    """An attempt on ``deployment_id`` succeeded or failed. Sync, never raises; in an event loop it never
    waits either (the outcome is sent in the background). Outside one (a Celery task, a command), it is
    sent to Redis at once."""
    try:
        _probes.pop(deployment_id, None)
        succeeded, failed = (1, 0) if ok else (0, 1)
        if not _conf()[0]:
            _local_record(deployment_id, succeeded, failed, failed, _now_ms())
            return
        syncer = _syncer()
        if syncer is not None:
            syncer.add(deployment_id, ok)
            return
        _sync_transition(deployment_id, "breaker_record", succeeded, failed, failed)
    except Exception:
        logger.exception("the outcome of a call to deployment %s did not reach its breaker", deployment_id)


def breaker_release_probe(deployment_id: int) -> None:
    """An attempt on ``deployment_id`` ended saying nothing about it (``Outcome.NEUTRAL``: the client left, its
    own input was refused). If it was the half-open probe this process claimed, the probe is free again at
    once, rather than when its lease ends: the next caller probes. Sync, never raises, never waits."""
    token = _probes.pop(deployment_id, None)
    if token is None:
        return
    try:
        if _conf()[0]:
            syncer = _syncer()
            if syncer is not None:
                syncer.release(deployment_id, token)
                return
            _sync_transition(deployment_id, "breaker_release", token)
            return
        _local(deployment_id, lambda machine: machine.release(token))
    except Exception:
        logger.exception("the probe of deployment %s was not given back; its lease will end it", deployment_id)


def breaker_force(deployment_id: int, state: str) -> None:
    """Open (``"open"``: as if it had just failed; after a failed probe, for twice the cooldown) or close
    (``"closed"``: as ``breaker_reset``) the breaker now, for every process. An admin's lasting override is
    ``Deployment.breaker_override``; this makes it felt at once, before the catalog caches expire. Sync (an
    admin action, a health check task): with Redis, one round trip."""
    if state == OPEN:
        _sync_transition(deployment_id, "breaker_trip")
    elif state == CLOSED:
        _sync_transition(deployment_id, "breaker_reset")
    else:
        raise ValueError(f"a breaker is forced 'open' or 'closed', not {state!r}")


def breaker_reset(deployment_id: int) -> None:
    """Closed, no failures counted, the cooldown back to its base: for every process."""
    _sync_transition(deployment_id, "breaker_reset")


def _sync_transition(deployment_id: int, name: str, *extra: int) -> None:
    url, cfg = _conf()
    now = _now_ms()
    if url:
        try:
            client = redis_sync_client(url, socket_timeout=CLAIM_TIMEOUT_SECONDS)
            reply = _script(client, name)(keys=_keys(deployment_id), args=_args(deployment_id, cfg, now, *extra))
        except (redis.RedisError, OSError) as exc:
            logger.warning("Redis unreachable for the breaker of deployment %s (%s)", deployment_id, exc)
        else:
            _apply(deployment_id, BreakerView.parse(reply[2:]))
            return
    transitions: dict[str, Callable[[Machine], tuple[bool, bool]]] = {
        "breaker_record": lambda m: m.record(cfg, now, ok=extra[0], failed=extra[1], tail=extra[2]),
        "breaker_trip": lambda m: m.trip(cfg, now),
        "breaker_release": lambda m: m.release(extra[0]),
        "breaker_reset": lambda m: m.reset(cfg),
    }
    _local(deployment_id, transitions[name])


def breaker_state(deployment_id: int) -> BreakerState:
    """The breaker of ``deployment_id`` as it stands (in Redis when it is set and answers), for admins."""
    return breaker_states([deployment_id])[deployment_id]


def breaker_states(deployment_ids: Iterable[int]) -> dict[int, BreakerState]:
    """``breaker_state`` of several deployments in one round trip (an admin changelist's page)."""
    ids = list(deployment_ids)
    url, cfg = _conf()
    now = _now_ms()
    if url and ids:
        try:
            client = redis_sync_client(url, socket_timeout=CLAIM_TIMEOUT_SECONDS)
            with client.pipeline(transaction=False) as pipe:
                for deployment_id in ids:
                    pipe.hgetall(f"{KEY_PREFIX}{deployment_id}")
                hashes = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            logger.warning("Redis unreachable to read the circuit breakers (%s); showing this process's", exc)
        else:
            return {
                deployment_id: Machine.from_hash(cfg, fields).state_for_admin(deployment_id, cfg, now, shared=True)
                for deployment_id, fields in zip(ids, hashes, strict=True)
            }
    states = {}
    with _lock:
        for deployment_id in ids:
            machine = _machines.get(deployment_id) or Machine(cfg, _views.get(deployment_id))
            states[deployment_id] = machine.state_for_admin(deployment_id, cfg, now, shared=False)
    return states
