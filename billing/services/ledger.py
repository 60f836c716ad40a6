"""Writing the ledger off the response's critical path without ever dropping a row.

The pipeline hands over a finished request's ``UsageData`` with ``usage_record_submit``; a task on
the running loop settles the budget reservation and writes the row after the response has gone.
Every such task is tracked until it ends: ``ledger_flush`` waits for all of them (the ASGI lifespan
shutdown calls it, so a graceful stop drains the ledger first). A write that keeps failing (the
database is down) is appended to a spool file and replayed by ``ledger_replay_spool`` (a Celery
task and server start-up), and ``request_id`` is unique, so a replay can never count a request twice.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, IntegrityError, close_old_connections, transaction
from django.utils import timezone

from ..models import ApiKey, UsageRecord
from .admission import Admission, admission_settle

logger = logging.getLogger("llmhub.ledger")

# Each write task with the row it carries, so that a row whose task never finished can still be saved.
_pending: dict[asyncio.Task[None], UsageData] = {}
_pending_lock = threading.Lock()
# Loops of servers that have begun to shut down: rows settled on them from then on (streams cut by the
# shutdown) are spooled at once, since such a loop may not live long enough to run another task.
_closing_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_last_used_written: dict[int, float] = {}
LAST_USED_RESOLUTION = 60.0  # seconds: a key's last_used_at is written at most this often per process
_WRITE_ATTEMPTS = 5


@dataclass
class UsageData:
    request_id: str
    endpoint: str
    stream: bool
    status: str
    user_id: int | None = None
    api_key_id: int | None = None
    provider_id: int | None = None
    model_id: int | None = None
    provider_name: str = ""
    model_name: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: Decimal = Decimal("0")
    usage_estimated: bool = False
    upstream_latency_ms: int | None = None
    ttft_ms: int | None = None
    duration_ms: int = 0
    error_type: str = ""
    created_at: datetime = field(default_factory=timezone.now)


def _spool_path() -> Path:
    return Path(settings.LLMHUB_LEDGER_SPOOL)


def usage_record_submit(data: UsageData, *, admission: Admission | None = None) -> None:
    """Settle and record ``data`` in the background. Safe to call from a ``finally`` under cancellation."""
    loop = asyncio.get_running_loop()
    if loop in _closing_loops:
        _spool(data)
        return
    task = loop.create_task(_settle_and_record(data, admission))
    with _pending_lock:
        _pending[task] = data
    task.add_done_callback(functools.partial(_forget, data=data))


def _forget(task: asyncio.Task[None], *, data: UsageData) -> None:
    """Whatever ended the task, a row it did not write goes to the spool: a task cancelled by a loop
    shutting down (even before it started, when no ``except`` inside it could run) or one that failed.
    A row written as well as spooled is harmless: the replay skips request ids already in the ledger."""
    with _pending_lock:
        _pending.pop(task, None)
    if task.cancelled():
        _spool(data)
    elif task.exception() is not None:
        logger.error("ledger task for %s failed; spooled", data.request_id, exc_info=task.exception())
        _spool(data)


def ledger_begin_shutdown() -> None:
    """From now on, rows settled on the running loop are spooled synchronously (lifespan shutdown)."""
    _closing_loops.add(asyncio.get_running_loop())


@atexit.register
def _spool_unfinished() -> None:
    """At interpreter exit, rows whose write task never ran to the end (the event loop was torn down
    under it, as servers without a lifespan shutdown do) go to the spool; the next start replays them."""
    with _pending_lock:
        unfinished = [data for task, data in _pending.items() if not task.done()]
        _pending.clear()
    for data in unfinished:
        _spool(data)


async def ledger_flush(wait_seconds: float = 30.0) -> None:
    """Wait until every submitted record (from any event loop of this process) is written."""
    deadline = time.monotonic() + wait_seconds
    while True:
        with _pending_lock:
            if not _pending:
                return
        if time.monotonic() > deadline:
            logger.error("ledger flush timed out with %d writes pending", len(_pending))
            return
        await asyncio.sleep(0.005)


async def _settle_and_record(data: UsageData, admission: Admission | None) -> None:
    if admission is not None:
        try:
            await admission_settle(
                admission=admission,
                cost=data.cost,
                prompt_tokens=data.prompt_tokens,
                completion_tokens=data.completion_tokens,
                ok=data.status == "ok",
            )
        except Exception:
            # The reservation expires and the reconcile task corrects the counters from the ledger,
            # so the row below must be written whatever happened here.
            logger.exception("settling request %s failed", data.request_id)
    await usage_record_write(data)


async def usage_record_write(data: UsageData) -> None:
    delay = 0.05
    for attempt in range(1, _WRITE_ATTEMPTS + 1):
        try:
            await sync_to_async(_write_sync, thread_sensitive=False)(data)
            return
        except DatabaseError:
            if attempt == _WRITE_ATTEMPTS:
                logger.exception("ledger write for %s failed %d times; spooled", data.request_id, attempt)
                _spool(data)
                return
            await asyncio.sleep(delay)
            delay *= 2


def _write_sync(data: UsageData) -> None:
    close_old_connections()
    fields = asdict(data)
    request_id = fields.pop("request_id")
    try:
        with transaction.atomic():
            UsageRecord.objects.get_or_create(request_id=request_id, defaults=fields)
    except IntegrityError:
        # Another writer (a replay) got there first: the row exists, which is all we need.
        if not UsageRecord.objects.filter(request_id=request_id).exists():
            raise
    _touch_key(data.api_key_id)


def _touch_key(api_key_id: int | None) -> None:
    if api_key_id is None:
        return
    now = time.monotonic()
    if now - _last_used_written.get(api_key_id, 0.0) < LAST_USED_RESOLUTION:
        return
    _last_used_written[api_key_id] = now
    ApiKey.objects.filter(pk=api_key_id).update(last_used_at=timezone.now())


def _spool(data: UsageData) -> None:
    path = _spool_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(asdict(data), default=str)
    with open(path, "a", encoding="utf-8") as spool:
        spool.write(line + "\n")
        spool.flush()
        os.fsync(spool.fileno())


def ledger_replay_spool() -> int:
    """Write every spooled record that is not in the ledger yet; return how many were replayed."""
    path = _spool_path()
    if not path.exists():
        return 0
    claimed = path.with_suffix(f".replaying-{os.getpid()}")
    try:
        path.rename(claimed)
    except FileNotFoundError:
        return 0
    replayed = 0
    leftovers: list[str] = []
    for line in claimed.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        raw: dict[str, Any] = json.loads(line)
        raw["cost"] = Decimal(raw["cost"])
        raw["created_at"] = datetime.fromisoformat(raw["created_at"])
        try:
            _write_sync(UsageData(**raw))
            replayed += 1
        except DatabaseError:
            leftovers.append(line)
    if leftovers:
        with open(path, "a", encoding="utf-8") as spool:
            spool.write("\n".join(leftovers) + "\n")
    claimed.unlink()
    return replayed
