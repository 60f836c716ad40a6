"""Where admission keeps its counters: Redis when ``REDIS_URL`` is set, else the database.

Redis: one Lua script per admission and one per settlement, so every process of every host sees one
truth and the check-then-reserve cannot interleave. One ``redis.asyncio`` client (and its connection
pool) per process and event loop.

Database: a ``BudgetCounter`` row per scope and period, locked with ``select_for_update`` inside a
transaction (on SQLite, where that is a no-op, the IMMEDIATE transaction mode takes the write lock
at BEGIN, which serializes admissions just the same). Rate limits then live in this process
(``LocalRateLimiter``): exact for one process, which is what a deployment without Redis is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache
from operator import attrgetter
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, transaction
from django.db.models import DateTimeField, DurationField, ExpressionWrapper, Value
from django.db.models.functions import Now
from django.utils import timezone
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript, Script
from redis.exceptions import NoScriptError

from core.loops import LoopRegistry, task_abandoned
from core.redis import redis_async_client
from core.time_limits import time_limit_reraise
from providers.models import CatalogModel, Provider

from ..exceptions import BillingUnavailableError
from ..models import (
    ApiKey,
    BudgetCounter,
    BudgetMetric,
    BudgetPeriod,
    BudgetReservation,
    ProcessHeartbeat,
    RequestReservation,
    UsageRecord,
    UsageStatus,
)
from ..pricing import COST_QUANTUM
from .alerts import budget_correction_alerts_raise
from .budgets import (
    KEY_PREFIX,
    RESERVATION_TTL,
    SETTLED_MEMORY,
    Charge,
    CounterRef,
    CounterSpec,
    Reserved,
    charge_check,
    charge_clamp,
    expected_spend,
    lost_tokens,
    period_bounds,
    quota_error,
    window_tokens,
    window_tokens_likely,
)
from .inflight import (
    EPOCH_KEY,
    INSTANCES_KEY,
    SWEEP_LOCK_KEY,
    Held,
    Settled,
    heartbeat_key,
    heartbeat_ttl_ms,
    held_add,
    held_lock,
    held_remove,
    held_settled,
    held_snapshot_locked,
    held_written,
    inflight_key,
    instance_id,
    restart_grace_ms,
    settled_snapshot_locked,
)
from .ledger_rows import usage_data_from_spool, usage_rows_write
from .ratelimits import WINDOW_MS, RateSpec, RateState, WindowState, local_rate_limiter, rate_limit_error
from .spool import SpoolIndex

logger = logging.getLogger("llmhub.counters")

# In a settled in-flight record: the request's ledger row, kept until it is committed or spooled.
SETTLED_ROW = "settled_row"
SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "redis_scripts"
INDEX_KEY = KEY_PREFIX + "index"  # every counter key, for reconciliation


@cache
def _script(name: str) -> str:
    return (SCRIPTS_DIR / f"{name}.lua").read_text()


# How long the database keeps a counter after its period ended: as long as Redis does.
KEPT_AFTER_PERIOD = timedelta(days=1)


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _ms_of(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1000)


@dataclass(frozen=True, slots=True)
class AcquireOutcome:
    reserved: Reserved
    rate_states: list[RateState]


# A counter moved by a settlement: (counter, spent before, spent after), for alerts.
Moved = tuple[CounterSpec, Decimal, Decimal]


def _counter_keys(key: str) -> list[str]:
    return [key, key + ":exp", key + ":set"]


def _bare_record(request_id: str, now: datetime) -> dict:
    """The record of a request acquired without one (a caller of the store itself, not of admission)."""
    return {"request_id": request_id, "admitted_at": now}


class RedisCounterStore:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(_script("admission_acquire"))
        self._settle = client.register_script(_script("admission_settle"))
        self._seed_read = client.register_script(_script("budget_seed_read"))
        self._seed_write = client.register_script(_script("budget_seed_write"))

    async def acquire(
        self,
        *,
        request_id: str,
        counters: Sequence[CounterSpec],
        rates: Sequence[RateSpec],
        charge: Charge,
        now: datetime,
        record: dict | None = None,
    ) -> AcquireOutcome:
        keys: list[str] = []
        price_units = charge.token_price / COST_QUANTUM
        args: list[str | int] = [
            _ms(now),
            request_id,
            _ms_of(RESERVATION_TTL),
            len(counters),
            len(rates),
            int(charge.fixed_cost / COST_QUANTUM),
            format(price_units.normalize(), "f"),
            -1 if charge.requested_max_tokens is None else charge.requested_max_tokens,
            charge.cap,
            charge.prompt_tokens,
            charge.choices,
            WINDOW_MS,
            -1 if charge.likely_prompt_tokens is None else charge.likely_prompt_tokens,
            -1 if charge.window_max_tokens is None else charge.window_max_tokens,
            1 + charge.resumes,
        ]
        for spec in counters:
            keys += _counter_keys(spec.key)
            args += [spec.metric, spec.ref.to_units(spec.limit), _ms_of(spec.ref.retention(now))]
        for rate in rates:
            keys += list(rate.keys)
            args += [-1 if rate.rpm is None else rate.rpm, -1 if rate.tpm is None else rate.tpm]
        marker = f"{KEY_PREFIX}admitted:{request_id}"
        instance = instance_id()
        record = record or _bare_record(request_id, now)
        record = {
            **record,
            "admitted_at": record["admitted_at"].isoformat(),
            "instance": instance,
            "counters": [spec.key for spec in counters],
        }
        keys += [inflight_key(instance), EPOCH_KEY, heartbeat_key(instance), INSTANCES_KEY]
        args += [json.dumps(record), restart_grace_ms(), heartbeat_ttl_ms(), instance]
        reply = await self._admit(keys=[*keys, marker], args=args, counters=counters, rates=rates, now=now)
        values = [int(v) for v in reply[1:]]
        reserved = Reserved(max_tokens=values[0], cost=Decimal(values[1]) * COST_QUANTUM, tokens=values[2])
        record.update(cost=str(values[1]), tokens=str(values[2]), max_tokens=str(values[0]))
        held_add(
            request_id,
            Held(
                record=record,
                counters=tuple(
                    (spec.key, values[1] if spec.metric == BudgetMetric.COST else values[2]) for spec in counters
                ),
            ),
        )
        return AcquireOutcome(reserved, _rate_states(values[3:], len(rates)))

    async def requests_acquire(self, *, request_id: str, rates: Sequence[RateSpec], now: datetime) -> list[RateState]:
        """Count a request in the requests-per-minute windows of ``rates`` alone (their tokens limits are not
        passed): nothing reserved, no in-flight record, as nothing settles it. Raises ``RateLimitExceededError``."""
        keys: list[str] = []
        args: list[str | int] = [_ms(now), request_id, 0, 0, len(rates), 0, "0", 0, 0, 0, 1, WINDOW_MS, -1, -1, 1]
        for rate in rates:
            keys += list(rate.keys)
            args += [-1 if rate.rpm is None else rate.rpm, -1]
        instance = instance_id()
        keys += [inflight_key(instance), EPOCH_KEY, heartbeat_key(instance), INSTANCES_KEY]
        args += ["", restart_grace_ms(), heartbeat_ttl_ms(), instance]
        marker = f"{KEY_PREFIX}admitted:{request_id}"
        reply = await self._admit(keys=[*keys, marker], args=args, counters=(), rates=rates, now=now)
        return _rate_states([int(v) for v in reply[4:]], len(rates))

    async def _admit(
        self,
        *,
        keys: list[str],
        args: list[str | int],
        counters: Sequence[CounterSpec],
        rates: Sequence[RateSpec],
        now: datetime,
    ) -> list:
        """Run ``admission_acquire.lua``, seeding counters it finds missing; its answer when it admits, else
        the refusal raised."""
        try:
            # A second round trip only at a counter's first use in a period (or after Redis lost it).
            seeds = 0
            waited_until = time.monotonic() + restart_grace_ms() / 1000 + 5
            while True:
                reply = _script_reply(await self._acquire(keys=keys, args=args))
                if reply[0] == "wait" and time.monotonic() < waited_until:
                    # Redis lost its data a moment ago: live processes are re-asserting what they hold.
                    await asyncio.sleep(int(reply[1]) / 1000)
                    continue
                if reply[0] == "wait":
                    raise BillingUnavailableError("Budget counters are being rebuilt after a Redis restart; try again.")
                if reply[0] != "seed":
                    break
                seeds += 1
                if seeds > 3:
                    raise BillingUnavailableError("Budget counters vanished from Redis while being set up; try again.")
                await self._seed([counters[int(i) - 1] for i in reply[1]], now)
        except redis.RedisError as exc:
            raise BillingUnavailableError(
                f"Budgets and rate limits cannot be checked right now ({type(exc).__name__}); try again shortly."
            ) from exc
        if reply[0] == "quota":
            spec = counters[int(reply[1]) - 1]
            raise quota_error(
                spec,
                spent=spec.ref.from_units(reply[2]),
                reserved=spec.ref.from_units(reply[3]),
                needed=spec.ref.from_units(reply[4]),
            )
        if reply[0] == "rate":
            raise rate_limit_error(
                rates[int(reply[1]) - 1],
                dimension=reply[2],
                limit=int(reply[3]),
                used=int(reply[4]),
                requested=int(reply[5]),
                retry_after_ms=int(reply[6]),
                now_ms=_ms(now),
                states=_rate_states([int(v) for v in reply[7:]], len(rates)),
            )
        return reply

    async def _seed(self, specs: Sequence[CounterSpec], now: datetime) -> None:
        """Start a counter from the ledger's figure for its period; the first seeder wins.

        The ledger does not show requests in flight, nor those settled whose rows are still on their way:
        the first hold reservations live processes re-asserted (kept in ``reserved``, and taken off the
        ledger's figure should their rows be written already), the second are the settles the counter
        remembers (``expected_spend``). A settle landing between the read and the write makes the write
        refuse, and the rebuild reads again.

        A counter that starts mid-period above a threshold (its key was lost: a Redis flush, a failover
        without persistence) may hide a crossing nobody alerted for: the seeder raises the alerts from
        zero to the ledger's figure, which fire only for thresholds not alerted yet this period."""
        for spec in specs:
            keys = _counter_keys(spec.key)
            for _ in range(5):
                reply = await self._seed_read(keys=keys)
                if reply[0] == "exists":
                    break
                _, open_ids, settled_ids, amounts = reply
                settled = {rid: spec.ref.from_units(amount) for rid, amount in zip(settled_ids, amounts, strict=True)}
                spent = await sync_to_async(expected_spend)(ref=spec.ref, at=None, open_ids=open_ids, settled=settled)
                outcome = await self._seed_write(
                    keys=[spec.key, keys[2], INDEX_KEY],
                    args=[spec.ref.to_units(spent), _ms_of(spec.ref.retention(now)), *settled_ids],
                )
                if outcome == "changed":
                    continue
                if outcome == "ok" and spent > 0:
                    await sync_to_async(budget_correction_alerts_raise)(ref=spec.ref, before=Decimal(0), after=spent)
                break

    async def settle(self, settle: SettleRequest) -> list[Moved]:
        keys, args = _settle_prepared(settle)
        return _settle_moved(settle.counters, _script_reply(await self._settle(keys=keys, args=args)))

    async def settle_many(self, settles: Sequence[SettleRequest]) -> list[list[Moved] | Exception]:
        """``settle`` for each of ``settles`` (the ledger writer's batch), in one pipeline: one connection, one
        write and one read for them all instead of a round trip each, each settle still its own script call,
        answered (or refused) alone. Returns, in order, each one's counters moved, or the error it met; a
        pipeline that fails as a whole (Redis down) gives every settle its error. Once sent, a settle may be
        sent again (the client's retry, a retry of the batch): each is idempotent, as ``settle`` is."""
        if len(settles) == 1:
            try:
                return [await self.settle(settles[0])]
            except Exception as exc:
                return [exc]
        calls = [_settle_prepared(s) for s in settles]
        try:
            replies = await self._scripts_run(self._settle, calls)
        except redis.RedisError as exc:
            return [exc] * len(settles)
        return [
            reply if isinstance(reply, Exception) else _settle_moved(s.counters, _script_reply(reply))
            for s, reply in zip(settles, replies, strict=True)
        ]

    async def _scripts_run(self, script: AsyncScript, calls: Sequence[tuple[list[str], list[str | int]]]) -> list:
        """Run ``script`` once per call in one pipeline (no transaction); each reply, or the error it met. A
        script Redis does not know (it restarted) is loaded, and the calls it refused are sent again: a refused
        call did not run. (redis-py's own scripts in a pipeline ask ``SCRIPT EXISTS`` first: a round trip more
        on every pipeline.)"""
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        replies = await pipe.execute(raise_on_error=False)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            script.sha = await self.client.script_load(script.script)
            pipe = self.client.pipeline(transaction=False)
            for i in missing:
                keys, args = calls[i]
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            for i, reply in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return replies

    def keeps_record(self, held: Any) -> bool:
        return True  # the acquire script records every request it admits

    async def records_forget(self, by_instance: Mapping[str, Sequence[str]]) -> None:
        """Remove the settled records of requests whose rows are committed or spooled. This process stops
        holding them first: a re-assert after a Redis restart (which holds the same lock) then either ran
        before, and the HDEL removes what it wrote, or runs after and no longer sees them."""
        held_written(rid for request_ids in by_instance.values() for rid in request_ids)
        for instance, request_ids in by_instance.items():
            await self.client.hdel(inflight_key(instance), *request_ids)


@dataclass(frozen=True, slots=True)
class SettleRequest:
    """One request's settle, as the counters' stores take it (``settle``, and a batch of them ``settle_many``): the
    counters and rate windows its admission holds, what it cost and the tokens it used (prompt and completion), when
    it settles, and its ledger row (``usage_data_dump``), kept with its settled in-flight record until the row is
    written (None: the record goes)."""

    request_id: str
    counters: Sequence[CounterSpec]
    rates: Sequence[RateSpec]
    cost: Decimal
    tokens: int
    now: datetime
    row: dict | None = None


def _settle_call(settle: SettleRequest, instance: str) -> tuple[list[str], list[str | int]]:
    """The keys and arguments of ``admission_settle.lua`` for a request admitted by the process ``instance``."""
    now, counters, rates = settle.now, settle.counters, settle.rates
    keys: list[str] = []
    args: list[str | int] = [
        settle.request_id,
        _ms(now),
        len(counters),
        len(rates),
        int(settle.cost / COST_QUANTUM),
        settle.tokens,
        _ms_of(SETTLED_MEMORY),
    ]
    for spec in counters:
        keys += _counter_keys(spec.key)
        args += [spec.metric, _ms_of(spec.ref.retention(now))]
    for rate in rates:
        keys += list(rate.keys[1:])
    keys.append(inflight_key(instance))
    return keys, args


def _settle_prepared(settle: SettleRequest) -> tuple[list[str], list[str | int]]:
    """The settle script's keys and arguments for a request of this process, with the settled record when
    ``settle.row`` is given; this process holds the request as settled with that record from here, or no longer."""
    keys, args = _settle_call(settle, instance_id())
    if settle.row is not None:
        record = json.dumps({SETTLED_ROW: settle.row})
        args.append(record)
        cost, tokens = int(settle.cost / COST_QUANTUM), settle.tokens
        spent = tuple((spec.key, cost if spec.metric == BudgetMetric.COST else tokens) for spec in settle.counters)
        held_settled(settle.request_id, Settled(record=record, counters=spent))
    else:
        held_remove(settle.request_id)
    return keys, args


def _rate_states(values: Sequence[int], scopes: int) -> list[RateState]:
    """The rate scopes' windows in an admission's answer: six values a scope (``admission_acquire.lua``)."""
    states = []
    for j in range(scopes):
        rpm, rpm_left, rpm_reset, tpm, tpm_left, tpm_reset = values[6 * j : 6 * j + 6]
        states.append(
            RateState(
                requests=WindowState(rpm, rpm_left, rpm_reset) if rpm >= 0 else None,
                tokens=WindowState(tpm, tpm_left, tpm_reset) if tpm >= 0 else None,
            )
        )
    return states


def _script_reply(reply: str | list) -> list:
    """An admission's or a settle's answer as a list: the usual one comes as one space-separated string, which
    redis-py reads much faster than an array of the same values (``admission_acquire.lua``)."""
    return reply.split(" ") if isinstance(reply, str) else reply


def _settle_moved(counters: Sequence[CounterSpec], reply: list) -> list[Moved]:
    if reply[0] == "duplicate":
        return []
    moved = []
    for i, spec in enumerate(counters):
        before, after = int(reply[1 + 2 * i]), int(reply[2 + 2 * i])
        if before >= 0:
            moved.append((spec, spec.ref.from_units(before), spec.ref.from_units(after)))
    return moved


class _LoopStores(dict[str, RedisCounterStore]):
    """One loop's stores, by URL, and the task that forgets them when the loop ends (held here: the loop keeps
    only a weak reference to its tasks)."""

    keeper: asyncio.Task[None] | None = None


# A store refers to its loop (through its client), so an entry goes when its loop ends (its keeper), or, for a
# loop closed without cancelling its tasks, when the next loop builds its first store; else the loops of Celery
# tasks and ``asyncio.run`` calls would never be collected. Their clients are closed with their loops (core.redis).
_redis_stores: LoopRegistry[_LoopStores] = LoopRegistry(on_drop=lambda per_loop: task_abandoned(per_loop.keeper))


def redis_store(url: str) -> RedisCounterStore:
    """This event loop's store for ``url``: a client (with its pool) cannot be shared between loops.

    After a Redis restart every pooled connection is dead. One idle longer than the health-check interval
    is pinged (and replaced) before use; a command that fails on a dead connection anyway is sent again on
    a fresh one. That is safe because every command sent through this client is idempotent: a seed writes
    only a counter that is missing, a settle is a no-op once its request is marked settled, and an
    admission remembers its answer under a marker keyed by its request id (``admission_acquire.lua``), so
    a retried one reserves nothing twice."""
    loop = asyncio.get_running_loop()
    per_loop = _redis_stores.get(loop)
    if per_loop is None:
        per_loop = _stores_start(loop)
    store = per_loop.get(url)
    if store is None:
        # The loop's shared client (core.redis): its blocking pool makes a burst of admissions and settles
        # wait for a connection rather than fail.
        store = per_loop[url] = RedisCounterStore(redis_async_client(url))
    return store


def _stores_start(loop: asyncio.AbstractEventLoop) -> _LoopStores:
    per_loop = _redis_stores.start(loop, _LoopStores())
    per_loop.keeper = _redis_stores.keep(loop, per_loop)
    return per_loop


def redis_reconcile(
    url: str,
    now: datetime,
    *,
    spooled: SpoolIndex | None = None,
    failed: list[str] | None = None,
    only: tuple[str, ...] | None = None,
) -> int:
    """Bring every Redis counter back to the ledger's figure, alerting for the thresholds a correction up
    crosses; returns how many were off. ``spooled``: the run's ``SpoolIndex`` (the spool is read once). A counter
    that cannot be reconciled (a malformed key, a value that does not parse) does not stop the others: it is
    logged, its key appended to ``failed``, and tried again at the next run. Redis not answering ends the run.
    ``only``: the starts of the keys of the counters to reconcile (``budget_scope_counters_reconcile``); None: all."""
    spooled = spooled or SpoolIndex()
    failed = [] if failed is None else failed
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        snapshot = client.register_script(_script("budget_snapshot"))
        adjust = client.register_script(_script("budget_adjust"))
        adjusted = 0
        keys = client.smembers(INDEX_KEY)
        for key in sorted(keys if only is None else (key for key in keys if key.startswith(only))):
            try:
                adjusted += _redis_reconcile_one(client, snapshot, adjust, key, now, spooled)
            except (redis.ConnectionError, redis.TimeoutError):
                raise  # the store, not this counter: every other would fail alike
            except Exception as exc:
                time_limit_reraise(exc)
                failed.append(key)
                logger.exception("could not reconcile the budget counter %s", key)
        return adjusted
    finally:
        client.close()


def _redis_reconcile_one(
    client: redis.Redis, snapshot: Script, adjust: Script, key: str, now: datetime, spooled: SpoolIndex
) -> int:
    """Reconcile the Redis counter ``key`` (``redis_reconcile``): 1 if it was off, else 0."""
    reply = snapshot(keys=_counter_keys(key), args=[_ms(now), _ms_of(SETTLED_MEMORY)])
    if reply[0] == "missing":
        client.srem(INDEX_KEY, key)
        return 0
    ref = CounterRef.from_key(key)
    _, spent, _reserved, open_ids, settled_ids, amounts = reply
    settled = {rid: ref.from_units(amount) for rid, amount in zip(settled_ids, amounts, strict=True)}
    expected = expected_spend(ref=ref, at=now, open_ids=open_ids, settled=settled, spooled=spooled)
    delta = ref.to_units(expected) - int(spent)
    if not delta:
        return 0
    spent_now = adjust(keys=[key], args=[delta])
    if spent_now is not None:
        # From what the adjustment itself moved: a settle since the snapshot alerted for its own part.
        budget_correction_alerts_raise(
            ref=ref, before=ref.from_units(spent_now - delta), after=ref.from_units(spent_now)
        )
    return 1


def redis_counter_state(url: str, ref: CounterRef) -> tuple[Decimal, Decimal] | None:
    """(spent, reserved) of a counter as Redis holds it; None if it is not there."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        spent, reserved = client.hmget(ref.key, "spent", "reserved")
    finally:
        client.close()
    if spent is None:
        return None
    return ref.from_units(spent), ref.from_units(reserved or 0)


def _counters_write(counters: Sequence[BudgetCounter], now: datetime) -> None:
    """Write the locked ``counters``' spent and reserved: one prepared UPDATE run for them all, each value
    prepared by its model field as ``save`` would. Twice per budgeted request, where ``save`` cost more
    to build than to run (docs/performance.md)."""
    if not counters:
        return
    meta = BudgetCounter._meta
    spent, reserved, updated_at = (meta.get_field(name) for name in ("spent", "reserved", "updated_at"))
    sql = (
        f"UPDATE {meta.db_table} SET {spent.column} = %s, {reserved.column} = %s, {updated_at.column} = %s "  # noqa: S608
        f"WHERE {meta.pk.column} = %s"
    )
    at = updated_at.get_db_prep_save(now, connection)
    params = [
        (spent.get_db_prep_save(c.spent, connection), reserved.get_db_prep_save(c.reserved, connection), at, c.pk)
        for c in counters
    ]
    for counter in counters:
        counter.updated_at = now
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


# THE DATABASE STORE'S STATEMENTS: those of every budgeted request's admission and settle, built once (per database
# vendor, and per number of counters) from the models' metadata, as ``_counters_write`` is. The ORM built and
# compiled each of them again at every request, which cost more CPU than the statements took to run
# (docs/performance.md, "What budgets and rate limits cost"). Values go in as their model fields prepare them to
# be saved, and amounts come out through the backend's converters, as the ORM's would. The statements of rarer
# moments (a counter's first use in a period, a hold that expired, the old settles forgotten) stay the ORM's.


def _columns(model: Any, names: Sequence[str]) -> str:
    return ", ".join(model._meta.get_field(name).column for name in names)


def _marks(count: int) -> str:
    return ", ".join(["%s"] * count)


@cache
def _counters_lock_sql(vendor: str, count: int) -> str:
    """The counters of ``count`` keys (id, key, spent, reserved), in key order, row-locked where the database has
    row locks (on SQLite the transaction's write lock, taken at BEGIN, serializes them)."""
    meta = BudgetCounter._meta
    key = meta.get_field("key").column
    lock = f" {connection.ops.for_update_sql()}" if connection.features.has_select_for_update else ""
    return (
        f"SELECT {_columns(BudgetCounter, _COUNTER_READ)} FROM {meta.db_table} "  # noqa: S608
        f"WHERE {key} IN ({_marks(count)}) ORDER BY {key}{lock}"
    )


_COUNTER_READ = ("id", "key", "spent", "reserved")  # in the model's order of fields, for ``from_db``


@cache
def _decimal_read(vendor: str, model: Any, name: str) -> tuple[Any, list]:
    """The column of ``model.name`` as a query reads it, and the converters the ORM runs on its values."""
    column = model._meta.get_field(name).get_col(model._meta.db_table)
    return column, connection.ops.get_db_converters(column) + column.get_db_converters(connection)


def _decimal(value: Any, read: tuple[Any, list]) -> Decimal:
    column, converters = read
    for converter in converters:
        value = converter(value, column, connection)
    return value


def _counters_locked(keys: Collection[str]) -> dict[str, BudgetCounter]:
    """The counters of ``keys`` that exist, by key, locked in key order (one statement)."""
    keys = sorted(set(keys))
    spent_read = _decimal_read(connection.vendor, BudgetCounter, "spent")
    reserved_read = _decimal_read(connection.vendor, BudgetCounter, "reserved")
    with connection.cursor() as cursor:
        cursor.execute(_counters_lock_sql(connection.vendor, len(keys)), keys)
        rows = cursor.fetchall()
    return {
        key: BudgetCounter.from_db(
            connection.alias,
            _COUNTER_READ,
            (pk, key, _decimal(spent, spent_read), _decimal(reserved, reserved_read)),
        )
        for pk, key, spent, reserved in rows
    }


@cache
def _holds_expired_sql(vendor: str, count: int) -> str:
    meta = BudgetReservation._meta
    counter, settled_at, expires_at = (meta.get_field(name).column for name in ("counter", "settled_at", "expires_at"))
    return (
        f"SELECT {_columns(BudgetReservation, ('id', 'counter', 'amount'))} FROM {meta.db_table} "  # noqa: S608
        f"WHERE {counter} IN ({_marks(count)}) AND {settled_at} IS NULL AND {expires_at} <= %s"
    )


@cache
def _holds_of_request_sql(vendor: str, count: int) -> str:
    meta = BudgetReservation._meta
    counter, request_id = (meta.get_field(name).column for name in ("counter", "request_id"))
    return (
        f"SELECT {_columns(BudgetReservation, ('id', 'counter', 'amount', 'settled_at'))} "  # noqa: S608
        f"FROM {meta.db_table} WHERE {request_id} = %s AND {counter} IN ({_marks(count)})"
    )


def _holds_read(sql: str, params: list) -> list[tuple[int, int, Decimal, Any]]:
    """(id, counter id, amount, and what else ``sql`` selects as it comes: settled or not) of each hold found."""
    amount_read = _decimal_read(connection.vendor, BudgetReservation, "amount")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [(pk, counter_id, _decimal(amount, amount_read), *rest) for pk, counter_id, amount, *rest in cursor]


_HOLD_INSERTED = ("counter", "request_id", "amount", "expires_at")


@cache
def _holds_insert_sql() -> str:
    columns = _columns(BudgetReservation, _HOLD_INSERTED)
    return f"INSERT INTO {BudgetReservation._meta.db_table} ({columns}) VALUES ({_marks(len(_HOLD_INSERTED))})"  # noqa: S608


def _holds_insert(holds: Sequence[tuple[int, Decimal]], request_id: str, expires_at: datetime) -> None:
    """Insert the request's hold of ``amount`` on each counter (by id): no instance built, no id read back."""
    counter, request, amount, expires = (BudgetReservation._meta.get_field(name) for name in _HOLD_INSERTED)
    request_value = request.get_db_prep_save(request_id, connection)
    expires_value = expires.get_db_prep_save(expires_at, connection)
    params = [
        (
            counter.get_db_prep_save(counter_id, connection),
            request_value,
            amount.get_db_prep_save(held, connection),
            expires_value,
        )
        for counter_id, held in holds
    ]
    with connection.cursor() as cursor:
        cursor.executemany(_holds_insert_sql(), params)


@cache
def _record_fields() -> tuple:
    """The in-flight record's columns an admission writes: all but its id and ``recorded_at``, which the database
    dates itself (its ``db_default``, on the database's clock)."""
    return tuple(field for field in RequestReservation._meta.concrete_fields if field.name not in ("id", "recorded_at"))


@cache
def _record_insert_sql() -> str:
    fields = _record_fields()
    columns = ", ".join(field.column for field in fields)
    return f"INSERT INTO {RequestReservation._meta.db_table} ({columns}) VALUES ({_marks(len(fields))})"  # noqa: S608


def _record_insert(record: RequestReservation) -> None:
    """Insert the request's in-flight record, each value as its field prepares it for ``create``."""
    values = [field.get_db_prep_save(getattr(record, field.attname), connection) for field in _record_fields()]
    with connection.cursor() as cursor:
        cursor.execute(_record_insert_sql(), values)


def _record_settle(request_id: str, row: dict | None) -> None:
    """Keep the request's in-flight record, settled, with its ledger row ``row``; or, without one, delete it."""
    meta = RequestReservation._meta
    request = meta.get_field("request_id")
    if row is None:
        sql, params = f"DELETE FROM {meta.db_table} WHERE {request.column} = %s", []  # noqa: S608
    else:
        settled_row = meta.get_field("settled_row")
        sql = f"UPDATE {meta.db_table} SET {settled_row.column} = %s WHERE {request.column} = %s"  # noqa: S608
        params = [settled_row.get_db_prep_save(row, connection)]
    params.append(request.get_db_prep_save(request_id, connection))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


@cache
def _holds_settle_sql() -> str:
    meta = BudgetReservation._meta
    expires, settled_at, settled_amount = (
        meta.get_field(name).column for name in ("expires_at", "settled_at", "settled_amount")
    )
    return (
        f"UPDATE {meta.db_table} SET {expires} = %s, {settled_at} = %s, {settled_amount} = %s "  # noqa: S608
        f"WHERE {meta.pk.column} = %s"
    )


def _holds_settle(settled: Sequence[tuple[int, Decimal]], now: datetime) -> None:
    """Mark each hold (by id) settled now at its amount: kept a while so that reconciliation can tell it from a
    request that never ran. One prepared UPDATE run for them all (``bulk_update``'s CASE statement cost more to
    build than the rest of the settle)."""
    settled_at, settled_amount = (BudgetReservation._meta.get_field(name) for name in ("settled_at", "settled_amount"))
    at = settled_at.get_db_prep_save(now, connection)
    params = [(at, at, settled_amount.get_db_prep_save(amount, connection), pk) for pk, amount in settled]
    with connection.cursor() as cursor:
        cursor.executemany(_holds_settle_sql(), params)


FORGET_EVERY = timedelta(minutes=1)
FORGET_REMEMBERED = 10_000


class DatabaseCounterStore:
    def __init__(self) -> None:
        self._forgotten_at: dict[int, datetime] = {}  # counter pk → when its old settled reservations went

    async def acquire(
        self,
        *,
        request_id: str,
        counters: Sequence[CounterSpec],
        rates: Sequence[RateSpec],
        charge: Charge,
        now: datetime,
        record: dict | None = None,
    ) -> AcquireOutcome:
        if not counters:
            # Only this process's rate windows: nothing held that another process would have to release.
            reserved = charge_clamp(charge, ())
            states = local_rate_limiter.acquire(
                request_id=request_id,
                specs=rates,
                tokens=window_tokens(charge, reserved),
                likely_tokens=window_tokens_likely(charge, reserved),
                now_ms=_ms(now),
            )
            return AcquireOutcome(reserved, states)
        outcome = await sync_to_async(self._acquire)(
            request_id=request_id,
            counters=counters,
            rates=rates,
            charge=charge,
            now=now,
            record=record or _bare_record(request_id, now),
        )
        held_add(request_id, None)
        return outcome

    async def requests_acquire(self, *, request_id: str, rates: Sequence[RateSpec], now: datetime) -> list[RateState]:
        """``RedisCounterStore.requests_acquire``, in this process's windows."""
        specs = [replace(rate, tpm=None) for rate in rates]
        return local_rate_limiter.acquire(request_id=request_id, specs=specs, tokens=0, now_ms=_ms(now))

    def _acquire(
        self,
        *,
        request_id: str,
        counters: Sequence[CounterSpec],
        rates: Sequence[RateSpec],
        charge: Charge,
        now: datetime,
        record: dict | None = None,
    ) -> AcquireOutcome:
        recorded = False
        try:
            with transaction.atomic():
                rows = self._lock(counters, now)
                states = [(spec, row.spent, row.reserved) for spec, row in zip(counters, rows, strict=True)]
                reserved = charge_clamp(charge, states)
                rate_states = local_rate_limiter.acquire(
                    request_id=request_id,
                    specs=rates,
                    tokens=window_tokens(charge, reserved),
                    likely_tokens=window_tokens_likely(charge, reserved),
                    now_ms=_ms(now),
                )
                recorded = True
                charge_check(reserved, states)
                holds = []
                for spec, row in zip(counters, rows, strict=True):
                    amount = reserved.amount_for(spec)
                    holds.append((row.pk, amount))
                    row.reserved += amount
                _holds_insert(holds, request_id, now + RESERVATION_TTL)
                _counters_write(rows, now)
                _record_insert(
                    RequestReservation(
                        **record,
                        instance=instance_id(),
                        counters=[spec.key for spec in counters],
                        reserved_cost=reserved.cost,
                        reserved_tokens=reserved.tokens,
                    )
                )
        except BaseException:
            if recorded:
                local_rate_limiter.release(request_id=request_id, specs=rates)
            raise
        return AcquireOutcome(reserved, rate_states)

    def _lock(self, counters: Sequence[CounterSpec], now: datetime) -> list[BudgetCounter]:
        # Always in key order, so two admissions sharing counters cannot deadlock: one statement locks
        # them all (ORDER BY before FOR UPDATE); at a counter's first use in a period, one at a time.
        keys = sorted({spec.key for spec in counters})
        rows = _counters_locked(keys)
        if len(rows) < len(keys):
            rows = {spec.key: self._counter_for_update(spec.ref) for spec in sorted(counters, key=attrgetter("key"))}
        if any(row.reserved for row in rows.values()):  # with nothing held, nothing can have expired
            self._expire(list(rows.values()), now)
        return [rows[spec.key] for spec in counters]

    def _counter_for_update(self, ref: CounterRef) -> BudgetCounter:
        row = BudgetCounter.objects.select_for_update().filter(key=ref.key).first()
        if row is not None:
            return row
        try:
            with transaction.atomic():
                # With the spool's rows: a counter started while the database was down must not forget
                # what requests spent meanwhile.
                row = ref.row(spent=expected_spend(ref=ref, at=None, open_ids=(), settled={}))
                row.save(force_insert=True)
                return row
        except IntegrityError:
            return BudgetCounter.objects.select_for_update().get(key=ref.key)

    def _expire(self, rows: Sequence[BudgetCounter], now: datetime) -> None:
        """Give back what requests that never settled (a dead process) still hold on ``rows`` (locked by
        the caller): one query for them all, and writes only when something expired."""
        expires_at = BudgetReservation._meta.get_field("expires_at").get_db_prep_value(now, connection)
        sql = _holds_expired_sql(connection.vendor, len(rows))
        found = _holds_read(sql, [*(row.pk for row in rows), expires_at])
        if not found:
            return
        by_id = {row.pk: row for row in rows}
        for _pk, counter_id, amount in found:
            by_id[counter_id].reserved -= amount
        BudgetReservation.objects.filter(pk__in=[pk for pk, _counter_id, _amount in found]).delete()
        for counter_id in sorted({counter_id for _pk, counter_id, _amount in found}):
            by_id[counter_id].save(update_fields=["reserved", "updated_at"])

    async def settle(self, settle: SettleRequest) -> list[Moved]:
        local_rate_limiter.settle(request_id=settle.request_id, specs=settle.rates, tokens=settle.tokens)
        if not settle.counters:
            return []
        if settle.row is not None:
            held_settled(settle.request_id)
        else:
            held_remove(settle.request_id)
        return await sync_to_async(self._settle)(settle)

    async def settle_many(self, settles: Sequence[SettleRequest]) -> list[list[Moved] | Exception]:
        """``settle`` for each of ``settles`` in turn (each its own transaction); each one's counters moved, or
        the error it met."""
        outcomes: list[list[Moved] | Exception] = []
        for one in settles:
            try:
                outcomes.append(await self.settle(one))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def keeps_record(self, held: Any) -> bool:
        return bool(held.counters)  # a request under rate limits alone holds nothing here

    async def records_forget(self, by_instance: Mapping[str, Sequence[str]]) -> None:
        """Nothing to remove: a settled record is deleted in the transaction that inserts its row
        (``ledger_rows.usage_rows_write``)."""
        held_written(rid for request_ids in by_instance.values() for rid in request_ids)

    @transaction.atomic
    def _settle(self, settle: SettleRequest) -> list[Moved]:
        """``settle.row``: keep the request's record, settled with its ledger row, until the row is written. (The
        rate windows are this process's, settled by ``settle``.)"""
        request_id, now = settle.request_id, settle.now
        cost, tokens = settle.cost, Decimal(settle.tokens)
        moved: list[Moved] = []
        _record_settle(request_id, settle.row)
        ordered = sorted(settle.counters, key=attrgetter("key"))
        # One statement locks them all, in key order as admission does (ORDER BY before FOR UPDATE).
        locked = _counters_locked({spec.key for spec in ordered})
        if not locked:
            return moved
        held = {
            counter_id: (pk, amount, settled_at)
            for pk, counter_id, amount, settled_at in _holds_read(
                _holds_of_request_sql(connection.vendor, len(locked)),
                [request_id, *(counter.pk for counter in locked.values())],
            )
        }
        settled_now: list[tuple[int, Decimal]] = []  # holds settled now (id), at the amount they settle at
        expired_meanwhile, changed = [], []
        for spec in ordered:
            counter = locked.get(spec.key)
            if counter is None:
                continue
            reservation = held.get(counter.pk)
            if reservation is not None and reservation[2] is not None:
                continue  # settled already
            actual = cost if spec.metric == BudgetMetric.COST else tokens
            if reservation is None:
                # Expired and given back before the request finished: it still spent what it spent.
                expired_meanwhile.append(
                    BudgetReservation(
                        counter=counter,
                        request_id=request_id,
                        amount=Decimal(0),
                        expires_at=now,
                        settled_at=now,
                        settled_amount=actual,
                    )
                )
            else:
                pk, amount, _settled_at = reservation
                counter.reserved -= amount
                settled_now.append((pk, actual))
            before = counter.spent
            counter.spent += actual
            changed.append(counter)
            moved.append((spec, before, counter.spent))
        if settled_now:
            _holds_settle(settled_now, now)
        if expired_meanwhile:
            BudgetReservation.objects.bulk_create(expired_meanwhile)
        _counters_write(changed, now)
        self._forget_settled(changed, now)
        return moved

    def _forget_settled(self, counters: Sequence[BudgetCounter], now: datetime) -> None:
        """Delete the counters' reservations settled longer than ``SETTLED_MEMORY`` ago: at most once a
        minute per counter in this process (reconciliation deletes them too before it reads them, and
        nothing else reads settled reservations that old)."""
        due = [
            c for c in counters if not (now - FORGET_EVERY < self._forgotten_at.get(c.pk, now - FORGET_EVERY) <= now)
        ]
        if not due:
            return
        BudgetReservation.objects.filter(counter__in=due, settled_at__lt=now - SETTLED_MEMORY).delete()
        if len(self._forgotten_at) > FORGET_REMEMBERED:  # counters of past periods: start afresh
            self._forgotten_at.clear()
        for counter in due:
            self._forgotten_at[counter.pk] = now

    def reconcile(self, now: datetime, *, spooled: SpoolIndex | None = None, failed: list[str] | None = None) -> int:
        """Bring every counter back to the ledger's figure, each under its row lock and in one transaction
        with the alerts for the thresholds a correction up crosses; returns how many were off. Counters of
        periods that ended more than a day ago are dropped (they are rebuilt from the ledger if needed):
        a request admitted in a period's last seconds settles into its counter after the period ended, and
        Redis keeps a counter as long (``CounterRef.retention``). A counter that cannot be reconciled (its
        transaction fails) does not stop the others: it is logged, its key appended to ``failed``, and tried
        again at the next run."""
        failed = [] if failed is None else failed
        daily_start, _ = period_bounds(BudgetPeriod.DAILY, now - KEPT_AFTER_PERIOD)
        monthly_start, _ = period_bounds(BudgetPeriod.MONTHLY, now - KEPT_AFTER_PERIOD)
        BudgetCounter.objects.filter(period=BudgetPeriod.DAILY, period_start__lt=daily_start).delete()
        BudgetCounter.objects.filter(period=BudgetPeriod.MONTHLY, period_start__lt=monthly_start).delete()
        return self.counters_reconcile(BudgetCounter.objects.all(), now, spooled=spooled, failed=failed)

    def counters_reconcile(
        self, counters: Any, now: datetime, *, spooled: SpoolIndex | None = None, failed: list[str] | None = None
    ) -> int:
        """``reconcile`` for the counters of the queryset ``counters``, without dropping the old periods' ones."""
        failed = [] if failed is None else failed
        adjusted = 0
        spooled = spooled or SpoolIndex()  # read once for every counter (and again only if the spool changed)
        for pk, key in counters.values_list("pk", "key"):
            try:
                adjusted += self._reconcile_one(pk, now, spooled)
            except Exception as exc:
                time_limit_reraise(exc)
                failed.append(key)
                logger.exception("could not reconcile the budget counter %s", key)
        return adjusted

    def _reconcile_one(self, pk: int, now: datetime, spooled: SpoolIndex) -> int:
        """Reconcile the counter ``pk`` in a transaction of its own (``reconcile``): 1 if it was off, else 0."""
        with transaction.atomic():
            row = BudgetCounter.objects.select_for_update().filter(pk=pk).first()
            if row is None:
                return 0
            self._expire([row], now)
            reservations = BudgetReservation.objects.filter(counter=row)
            reservations.filter(settled_at__lt=now - SETTLED_MEMORY).delete()
            open_ids = list(reservations.filter(settled_at__isnull=True).values_list("request_id", flat=True))
            settled = dict(reservations.filter(settled_at__isnull=False).values_list("request_id", "settled_amount"))
            ref = CounterRef(row.scope_kind, row.scope_id, row.metric, row.period, row.period_start)
            expected = expected_spend(ref=ref, at=now, open_ids=open_ids, settled=settled, spooled=spooled)
            if expected == row.spent:
                return 0
            before, row.spent = row.spent, expected
            row.save(update_fields=["spent", "updated_at"])
            budget_correction_alerts_raise(ref=ref, before=before, after=expected)
            return 1

    def counter_state(self, ref: CounterRef) -> tuple[Decimal, Decimal] | None:
        row = BudgetCounter.objects.filter(key=ref.key).values_list("spent", "reserved").first()
        return None if row is None else (row[0], row[1])


database_store = DatabaseCounterStore()


def reservation_settle_if_held(
    *,
    request_id: str,
    instance: str,
    counters: Sequence[CounterSpec],
    rates: Sequence[RateSpec],
    cost: Decimal,
    tokens: int,
    now: datetime,
) -> list[Moved] | None:
    """Settle a reservation from outside the request that holds it, if it is still held: for a ledger row
    replayed from the spool, perhaps by another process than ``instance``, the one that admitted it.
    Returns the counters moved, or None when there was nothing to settle.

    The request's in-flight record says whether it is held: every settle removes it in the same step (its
    own, or the lost-request sweep's), so a replay run twice, or after a sweep, settles nothing twice however
    long after. A reservation that expired meanwhile keeps its record: the settle then adds the spend alone.
    In Redis the record is read before the settle script runs; a settle landing in between is one the
    script remembers (``s:<rid>``, ``SETTLED_MEMORY``) and refuses as a duplicate. In the database the
    record's row lock holds off the sweep until this transaction ends."""
    held_remove(request_id)
    settle = SettleRequest(request_id=request_id, counters=counters, rates=rates, cost=cost, tokens=tokens, now=now)
    url = settings.REDIS_URL
    if not url:
        with transaction.atomic():
            held = RequestReservation.objects.select_for_update().filter(
                request_id=request_id, settled_row__isnull=True
            )
            if held.first() is None:
                return None
            return database_store._settle(settle)
    client = _replay_client(url, os.getpid())
    record = client.hget(inflight_key(instance), request_id)
    if record is None or SETTLED_ROW in json.loads(record):
        return None
    keys, args = _settle_call(settle, instance)
    reply = _script_reply(client.register_script(_script("admission_settle"))(keys=keys, args=args))
    return None if reply[0] == "duplicate" else _settle_moved(counters, reply)


@cache
def _replay_client(url: str, pid: int) -> redis.Redis:
    """One client (and pool) per process for the replays, which settle a spool's rows one by one: not a
    connection per row. Keyed by pid too, since a forked worker cannot share its parent's sockets."""
    return redis_sync_client(url)


def admission_store() -> RedisCounterStore | DatabaseCounterStore:
    url = settings.REDIS_URL
    return redis_store(url) if url else database_store


def counter_state(ref: CounterRef) -> tuple[Decimal, Decimal] | None:
    """(spent, reserved) of a counter in the store in use; None if it holds nothing for it yet."""
    if settings.REDIS_URL:
        return redis_counter_state(settings.REDIS_URL, ref)
    return database_store.counter_state(ref)


def budget_counters_reconcile(
    *, now: datetime | None = None, failed: list[str] | None = None, counters_failed: list[str] | None = None
) -> int:
    """Put every counter of the store in use back on the ledger's figure; returns how many were off.

    Spend a counter missed (a settle lost in a crash) may have crossed a budget threshold without an
    alert: a correction up raises the alerts for the thresholds it crosses that have not fired in the
    period yet. Running it again finds nothing off and fires nothing. The lost requests are settled first
    (``inflight_lost_settle``): one that could not be is logged, its request id appended to ``failed``, and the
    counters are reconciled all the same. Each counter is reconciled on its own: one that could not be is
    logged, its key appended to ``counters_failed``, and the others are reconciled all the same."""
    now = now or timezone.now()
    spooled = SpoolIndex()  # one read of the spool for the sweep and every counter
    inflight_lost_settle(now=now, spooled=spooled, failed=failed)
    if settings.REDIS_URL:
        return redis_reconcile(settings.REDIS_URL, now, spooled=spooled, failed=counters_failed)
    return database_store.reconcile(now, spooled=spooled, failed=counters_failed)


def budget_scope_counters_reconcile(*, scope_kind: str, scope_ids: Collection[int], now: datetime | None = None) -> int:
    """Put the counters of these scopes (``ScopeKind``: users, or keys) back on the ledger's figure now, as the
    reconcile task does every counter; returns how many were off. For a budget changed (``signals``): a counter
    its scope stopped using (the budget lifted, or moved to another period) stayed where it was left while the
    scope spent elsewhere, and a budget set back onto it would take it up short of what the period had spent,
    admitting requests past the budget until the next reconcile."""
    ids = sorted({int(pk) for pk in scope_ids})
    if not ids:
        return 0
    now = now or timezone.now()
    if settings.REDIS_URL:
        starts = tuple(f"{KEY_PREFIX}{scope_kind}:{pk}:" for pk in ids)
        return redis_reconcile(settings.REDIS_URL, now, only=starts)
    wanted = set(ids)
    pks = [
        pk
        for pk, scope_id in BudgetCounter.objects.filter(scope_kind=scope_kind).values_list("pk", "scope_id")
        if scope_id in wanted
    ]
    return database_store.counters_reconcile(BudgetCounter.objects.filter(pk__in=pks), now)


# IN-FLIGHT RECORDS: heartbeats, re-assertion after Redis lost them, and the requests of dead processes.


def redis_sync_client(url: str) -> redis.Redis:
    """For the heartbeat thread and the sweep: a dead pooled connection (Redis restarted) is found by a
    ping before use and the command is tried again on a new one."""
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=1,
        socket_keepalive=True,
        socket_connect_timeout=5,
        socket_timeout=5,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def redis_heartbeat(client: redis.Redis, instance: str, *, known_epoch: str | None) -> str:
    """Refresh this process's heartbeat; if Redis is in an epoch this process has not seen (it lost its
    data, or this is the first beat), re-assert every reservation the process holds. Returns the epoch."""
    beat = client.register_script(_script("inflight_heartbeat"))
    epoch = beat(keys=[heartbeat_key(instance), INSTANCES_KEY, EPOCH_KEY], args=[instance, heartbeat_ttl_ms()])
    if epoch != known_epoch:
        reasserted = redis_reassert(client, instance)
        if reasserted and known_epoch is not None:
            logger.warning("Redis lost its data: re-asserted %d requests in flight", reasserted)
    return epoch


def redis_reassert(client: redis.Redis, instance: str) -> int:
    reassert = client.register_script(_script("inflight_reassert"))
    reassert_settled = client.register_script(_script("inflight_reassert_settled"))
    now = timezone.now()
    count = 0
    # Under the lock, so that a settle cannot slip between reading what is held and writing it back.
    with held_lock():
        for request_id, held in held_snapshot_locked():
            keys = [inflight_key(instance)]
            args: list[str | int] = [request_id, json.dumps(held.record), _ms(now), _ms_of(RESERVATION_TTL)]
            args.append(len(held.counters))
            for key, amount in held.counters:
                keys += _counter_keys(key)[:2]
                args += [amount, _ms_of(CounterRef.from_key(key).retention(now))]
            count += reassert(keys=keys, args=args)
        # Settled, their rows on the way to the ledger: the settled record, and the spend on each counter
        # that Redis lost with it, which the counter's rebuild then counts (as the settle had remembered it).
        for request_id, settled in settled_snapshot_locked():
            keys = [inflight_key(instance)]
            args = [request_id, settled.record, _ms(now), len(settled.counters)]
            for key, spent in settled.counters:
                keys += _counter_keys(key)[::2]  # its hash and its settled zset
                args += [spent, _ms_of(CounterRef.from_key(key).retention(now))]
            count += reassert_settled(keys=keys, args=args)
    return count


def database_heartbeat(instance: str) -> None:
    expires = ExpressionWrapper(
        Now() + Value(timedelta(seconds=settings.LLMHUB_INFLIGHT_HEARTBEAT_TTL), output_field=DurationField()),
        output_field=DateTimeField(),
    )
    if not ProcessHeartbeat.objects.filter(instance=instance).update(expires_at=expires):
        try:
            ProcessHeartbeat.objects.create(instance=instance, expires_at=expires)
        except IntegrityError:
            ProcessHeartbeat.objects.filter(instance=instance).update(expires_at=expires)


def inflight_lost_settle(
    *,
    now: datetime | None = None,
    sweeper: bool = False,
    spooled: SpoolIndex | None = None,
    failed: list[str] | None = None,
) -> int:
    """Requests whose process died before settling them: each gets one ledger row (status ``lost``, at the
    amount reserved, flagged estimated; or the row it has already, if its process wrote or spooled one),
    and its holds are swapped for that amount. Safe to run in several processes at once, and again.
    ``sweeper``: a server process's own periodic run, skipped when another process is at it. The spool is
    read once for the run (``spooled``, or a ``SpoolIndex`` of its own), and only if a request needs it. A
    request that could not be settled does not stop the others: it is logged, its request id appended to
    ``failed``, and tried again at the next run."""
    now = now or timezone.now()
    spooled = spooled or SpoolIndex()
    failed = [] if failed is None else failed
    if settings.REDIS_URL:
        return _redis_lost_settle(settings.REDIS_URL, now, sweeper=sweeper, spooled=spooled, failed=failed)
    return _database_lost_settle(now, spooled, failed)


def _lost_row(record: dict, *, cost: Decimal, tokens: int, spooled: SpoolIndex) -> tuple[Decimal, int]:
    """The request's ledger row: the one it has (in the ledger, or waiting in the spool: its process spooled
    it, e.g. a stream cut at shutdown, and died before settling, and the replay writes it), or a ``lost``
    one now. Returns its (cost, tokens)."""
    existing = UsageRecord.objects.filter(request_id=record["request_id"])
    row = existing.values_list("cost", "prompt_tokens", "completion_tokens").first()
    if row is None and (waiting := spooled.row(record["request_id"])) is not None:
        row = waiting.cost, waiting.prompt_tokens, waiting.completion_tokens
    if row is None:
        # Each attempt's prompt the reservation holds (a stream resumed on failure reserves several), so that its
        # tokens priced are what it is charged, as a resumed row's are (a record an older release wrote has none).
        one_prompt = int(record.get("prompt_tokens") or 0)
        prefill = record.get("prefill_tokens")
        prompt, completion = lost_tokens(
            prompt_tokens=one_prompt,
            resumes=int(record.get("resumes") or 0),
            prefill_tokens=None if prefill is None else int(prefill),
            tokens=tokens,
        )
        # Its user, key, provider or model may have been deleted since: the row keeps the names and the cost.
        references = {
            "user_id": get_user_model(),
            "api_key_id": ApiKey,
            "provider_id": Provider,
            "model_id": CatalogModel,
        }
        kept = {
            name: record.get(name)
            if record.get(name) is not None and target.objects.filter(pk=record[name]).exists()
            else None
            for name, target in references.items()
        }
        UsageRecord.objects.bulk_create(
            [
                UsageRecord(
                    request_id=record["request_id"],
                    **kept,
                    provider_name=record.get("provider_name") or "",
                    model_name=record.get("model_name") or "",
                    endpoint=record.get("endpoint") or "",
                    stream=bool(record.get("stream")),
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    # Charged in ``cost``, as its tokens are: it may have run them all (a record an older
                    # release wrote has none).
                    web_search_requests=int(record.get("web_search_requests") or 0),
                    cost=cost,
                    usage_estimated=True,
                    status=UsageStatus.LOST,
                    error_type="process_lost",
                    created_at=record["admitted_at"],
                )
            ],
            ignore_conflicts=True,
        )
        row = existing.values_list("cost", "prompt_tokens", "completion_tokens").first()
    return row[0], row[1] + row[2]


def _redis_lost_settle(url: str, now: datetime, *, sweeper: bool, spooled: SpoolIndex, failed: list[str]) -> int:
    client = redis_sync_client(url)
    try:
        if sweeper and not client.set(SWEEP_LOCK_KEY, instance_id(), nx=True, px=heartbeat_ttl_ms()):
            return 0
        settle = client.register_script(_script("admission_settle"))
        settled = 0
        for instance in sorted(client.smembers(INSTANCES_KEY)):
            if client.exists(heartbeat_key(instance)):
                continue
            records = client.hgetall(inflight_key(instance))
            if not records:
                # Its process beats again (and comes back here) if it admits anything.
                client.srem(INSTANCES_KEY, instance)
                continue
            for request_id, raw in sorted(records.items()):
                try:
                    settled += _redis_lost_settle_one(client, settle, instance, request_id, raw, now, spooled)
                except Exception as exc:
                    time_limit_reraise(exc)
                    # The others still get theirs; this one is tried again at the next sweep.
                    failed.append(request_id)
                    logger.exception("could not settle the lost request %s", request_id)
        return settled
    finally:
        client.close()


def _redis_lost_settle_one(
    client: redis.Redis, settle: Script, instance: str, request_id: str, raw: str, now: datetime, spooled: SpoolIndex
) -> int:
    record = json.loads(raw)
    if SETTLED_ROW in record:
        # Settled by its process, which died before committing the row: the row is written from the record,
        # and the counters, moved by that settle already, stay as they are.
        usage_rows_write([usage_data_from_spool(record[SETTLED_ROW])])
        client.hdel(inflight_key(instance), request_id)
        return 1
    record["admitted_at"] = datetime.fromisoformat(record["admitted_at"])
    reserved = Decimal(int(record["cost"])) * COST_QUANTUM
    cost, tokens = _lost_row(record, cost=reserved, tokens=int(record["tokens"]), spooled=spooled)
    counter_keys = record.get("counters") or []  # an empty list comes back from Lua as {}
    keys: list[str] = []
    args: list[str | int] = [request_id, _ms(now), len(counter_keys), 0, int(cost / COST_QUANTUM), tokens]
    args.append(_ms_of(SETTLED_MEMORY))
    for key in counter_keys:
        ref = CounterRef.from_key(key)
        keys += _counter_keys(key)
        args += [ref.metric, _ms_of(ref.retention(now))]
    keys.append(inflight_key(instance))
    settle(keys=keys, args=args)
    return 1


def _database_lost_settle(now: datetime, spooled: SpoolIndex, failed: list[str]) -> int:
    ttl = Value(timedelta(seconds=settings.LLMHUB_INFLIGHT_HEARTBEAT_TTL), output_field=DurationField())
    alive = ProcessHeartbeat.objects.filter(expires_at__gt=Now()).values("instance")
    # A record younger than a heartbeat's TTL is never judged: its process may not have beaten yet.
    dead = (
        RequestReservation.objects.exclude(instance__in=alive)
        .filter(recorded_at__lt=ExpressionWrapper(Now() - ttl, output_field=DateTimeField()))
        .values_list("pk", "request_id")
    )
    # Heartbeats of processes that are gone and hold nothing: one row per process ever started otherwise.
    ProcessHeartbeat.objects.filter(expires_at__lt=Now()).exclude(
        instance__in=RequestReservation.objects.values("instance")
    ).delete()
    settled = 0
    for pk, request_id in list(dead):
        try:
            settled += _database_lost_settle_one(pk, now, spooled)
        except Exception as exc:
            time_limit_reraise(exc)
            # The others still get theirs; this one is tried again at the next sweep.
            failed.append(request_id)
            logger.exception("could not settle the lost request %s (reservation %s)", request_id, pk)
    return settled


def _database_lost_settle_one(pk: int, now: datetime, spooled: SpoolIndex) -> int:
    fields = ("request_id", "user_id", "api_key_id", "provider_id", "model_id", "provider_name", "model_name")
    fields += ("endpoint", "stream", "prompt_tokens", "resumes", "prefill_tokens", "web_search_requests", "admitted_at")
    settled = RequestReservation.objects.filter(pk=pk).values_list("request_id", "settled_row").first()
    if settled is not None and settled[1] is not None:
        # Settled by its process, which died before committing the row: the row is written from the record,
        # which goes in the same transaction; the counters, moved by that settle already, stay as they are.
        usage_rows_write([usage_data_from_spool(settled[1])], settled=[settled[0]])
        return 1
    with transaction.atomic():
        reservation = RequestReservation.objects.select_for_update().filter(pk=pk, settled_row__isnull=True).first()
        if reservation is None:
            return 0  # settled meanwhile, by its process or another sweep
        record = {field: getattr(reservation, field) for field in fields}
        cost, tokens = _lost_row(
            record, cost=reservation.reserved_cost, tokens=reservation.reserved_tokens, spooled=spooled
        )
        specs = [CounterSpec(CounterRef.from_key(key), Decimal(0), "") for key in reservation.counters]
        database_store._settle(
            SettleRequest(
                request_id=reservation.request_id, counters=specs, rates=(), cost=cost, tokens=tokens, now=now
            )
        )
    return 1
