"""Liveness and readiness probes for the orchestrator: ``/healthz`` and ``/readyz``.

Both are served by the lean handler (``LLMHUB_MIDDLEWARE_FREE_PREFIXES``, ``llmhub/handlers.py``): no session,
no authentication, no Host check (an orchestrator probes the container's own address, whatever
``ALLOWED_HOSTS`` says), and over plain HTTP where production wants HTTPS (``SECURE_REDIRECT_EXEMPT``). Their
bodies say nothing an anonymous caller should not know: check names, timings, and errors in our own words
(the exception's class, never its message, which may name hosts; the full error goes to the log).

``/healthz`` answers as long as the process does. ``/readyz`` answers 200 when every check passes and 503
naming the failing ones otherwise, never 500 (an exception in a check is that check failing):

- ``database``: a new connection and ``SELECT 1``.
- ``migrations``: no migration left to apply. Once true it is remembered: migrations do not un-apply under
  a running process, and loading the migration graph costs more than every other check.
- ``redis``: a PING, only when ``REDIS_URL`` is set.
- ``ledger_spool``: the spool (``billing.services.spool``: the spool file and the files being replayed) is
  not growing. Its size in bytes is compared with its size at this process's previous probe: empty, or
  pending but the same size or smaller (being replayed), is ready; larger means the database is refusing
  ledger rows faster than they are replayed. The first probe of a process has nothing to compare with and
  passes. Bytes, not rows: sizes are read with ``stat`` alone, without the spool's lock or reading a file that
  can grow large during an outage.

The database and migration checks run in one thread of their own, one probe at a time: a probe that comes
while the previous one still waits for a hung database waits for that one's answer (or gives up after
``TIMEOUT_SECONDS``) instead of starting another, so a hung database never ties up more than one thread, nor
the thread that the /v1 requests' ORM calls share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe

from billing.services.spool import spool_path, spool_size_bytes
from core.redis import redis_async_client

logger = logging.getLogger("llmhub.probes")

# Seconds a check may take before it counts as failed: below the health check's own timeout
# (docker-compose.yml: 5 s), so the probe answers 503 in words rather than being cut off.
TIMEOUT_SECONDS = 2.0

_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmhub-readyz")
_lock = threading.Lock()


@dataclass
class _State:
    migrations_applied: bool = False
    database_check: concurrent.futures.Future | None = None
    # The spool's path and size at the previous probe (the path too: settings may point it elsewhere).
    spool_seen: tuple[Path, int] | None = None


_state = _State()


def readiness_forget() -> None:
    """Forget what earlier probes learnt (migrations applied, the spool's size), as a new process would."""
    global _state
    _state = _State()


@require_safe
async def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_safe
async def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, dict[str, Any]] = {}
    try:
        checks.update(await _database_and_migrations())
    except Exception as exc:  # the probe itself must not fail
        logger.exception("readiness: database check failed unexpectedly")
        checks["database"] = _failed(0.0, f"the check failed ({type(exc).__name__})")
    if settings.REDIS_URL:
        checks["redis"] = await _redis()
    checks["ledger_spool"] = _ledger_spool()
    failing = [name for name, result in checks.items() if not result["ok"]]
    body = {"status": "unavailable" if failing else "ready", "failing": failing, "checks": checks}
    return JsonResponse(body, status=503 if failing else 200, headers={"Cache-Control": "no-store"})


def _failed(started: float, error: str) -> dict[str, Any]:
    return {"ok": False, "ms": _elapsed_ms(started) if started else 0.0, "error": error}


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


async def _database_and_migrations() -> dict[str, dict[str, Any]]:
    with _lock:
        pending = _state.database_check
        if pending is None or pending.done():
            pending = _state.database_check = _executor.submit(_database_and_migrations_sync)
    started = time.perf_counter()
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pending)), TIMEOUT_SECONDS)
    except TimeoutError:
        error = f"the database did not answer within {TIMEOUT_SECONDS:g} s"
        return {"database": _failed(started, error), "migrations": _migrations_unknown()}


def _migrations_unknown() -> dict[str, Any]:
    if _state.migrations_applied:
        return {"ok": True, "ms": 0.0}
    return {"ok": False, "ms": 0.0, "error": "not checked: the database did not answer"}


def _database_and_migrations_sync() -> dict[str, dict[str, Any]]:
    """In the probe's own thread, on a connection of its own that is closed again: every probe proves that a
    new connection can be made, and none is left open between probes."""
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        started = time.perf_counter()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        except Exception as exc:
            logger.warning("readiness: the database is unavailable: %s: %s", type(exc).__name__, exc)
            error = f"the database refused the connection or the query ({type(exc).__name__})"
            return {"database": _failed(started, error), "migrations": _migrations_unknown()}
        results = {"database": {"ok": True, "ms": _elapsed_ms(started)}}
        started = time.perf_counter()
        if _state.migrations_applied:
            results["migrations"] = {"ok": True, "ms": 0.0}
            return results
        try:
            executor = MigrationExecutor(connection)
            plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        except Exception as exc:
            logger.warning("readiness: could not read the migrations: %s: %s", type(exc).__name__, exc)
            results["migrations"] = _failed(started, f"could not read the migrations ({type(exc).__name__})")
            return results
        if plan:
            names = [f"{migration.app_label}.{migration.name}" for migration, _ in plan]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            results["migrations"] = _failed(started, f"{len(names)} migration(s) not applied: {shown}")
        else:
            _state.migrations_applied = True
            results["migrations"] = {"ok": True, "ms": _elapsed_ms(started)}
        return results
    finally:
        connection.close()


async def _redis() -> dict[str, Any]:
    started = time.perf_counter()
    try:
        client = redis_async_client(settings.REDIS_URL, socket_timeout=TIMEOUT_SECONDS)
        await asyncio.wait_for(client.ping(), TIMEOUT_SECONDS)
    except TimeoutError:
        return _failed(started, f"Redis did not answer PING within {TIMEOUT_SECONDS:g} s")
    except Exception as exc:
        logger.warning("readiness: Redis is unavailable: %s: %s", type(exc).__name__, exc)
        return _failed(started, f"Redis did not answer PING ({type(exc).__name__})")
    return {"ok": True, "ms": _elapsed_ms(started)}


def _ledger_spool() -> dict[str, Any]:
    started = time.perf_counter()
    try:
        path = spool_path()
        size = spool_size_bytes()
    except Exception as exc:
        logger.warning("readiness: could not read the ledger spool: %s: %s", type(exc).__name__, exc)
        return _failed(started, f"could not read the ledger spool ({type(exc).__name__})")
    with _lock:
        seen, _state.spool_seen = _state.spool_seen, (path, size)
    before = seen[1] if seen is not None and seen[0] == path else None
    result: dict[str, Any] = {"ok": True, "ms": _elapsed_ms(started), "pending_bytes": size}
    if before is not None and size > before:
        result["ok"] = False
        result["error"] = (
            f"the ledger spool grew from {before} to {size} bytes since the previous probe: "
            "ledger rows are not reaching the database"
        )
    return result
