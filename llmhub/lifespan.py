"""ASGI lifespan: replay a spooled ledger at start-up, drain the ledger and close pooled provider
clients at shutdown. uvicorn sends these events; daphne does not (see docs/performance.md).

Graceful shutdown under uvicorn. uvicorn's own, on SIGTERM or SIGINT, closes its listening sockets,
closes every WebSocket at once (code 1012), waits up to ``--timeout-graceful-shutdown`` for HTTP
responses to end, cancels what is left and only then sends ``lifespan.shutdown``: the app is not told
that a shutdown began until it is over, and a cut stream just stops. So at start-up the lifespan puts
``ShutdownSignals`` in front of uvicorn's signal handler. On the first signal the pipeline drains
(``chat.pipeline.runs_drain``): new requests are refused with 503 ``server_shutting_down``, requests in
flight get ``LLMHUB_SHUTDOWN_GRACE_SECONDS`` to finish, the streams still running are then ended with an
in-band ``server_shutting_down`` error and settled as ``server_shutdown``, and sockets close with 1012
once their replies have ended. Then uvicorn's handler runs and its shutdown goes on as before (a second
signal cuts the grace short). The stop takes at most the grace, 5 s for the cut replies to be told, and
uvicorn's ``--timeout-graceful-shutdown``, plus the ledger drain (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from types import FrameType
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from core.diagnostics import diagnostics_install
from core.gc_tuning import RequestCounter, gc_freeze_startup

logger = logging.getLogger("llmhub.lifespan")


class LifespanMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests = RequestCounter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            self.requests.count()
            await self.app(scope, receive, send)
            return
        from billing.services.ledger import (
            ledger_begin_shutdown,
            ledger_flush,
            ledger_replay_spool,
            ledger_spool_watch,
        )
        from chat.pipeline import runs_cancel_all
        from core.metrics import metrics_flush
        from core.tracing import tracing_configure, tracing_shutdown
        from providers.adapters.registry import adapters_close_all

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    replayed = await sync_to_async(ledger_replay_spool, thread_sensitive=False)()
                    if replayed:
                        logger.warning("replayed %d spooled ledger records", replayed)
                except Exception:
                    logger.exception("could not replay the ledger spool; it stays on disk")
                # What is still spooled (the database is not up yet) is replayed as soon as it answers.
                ledger_spool_watch()
                # The tracer and its exporter, when OTEL_* asks for them, built now rather than when the
                # first request ends (importing the SDK takes a while).
                tracing_configure()
                await _warm_up()
                # What start-up loaded is never garbage: full collections stop walking it (core/gc_tuning.py).
                gc_freeze_startup()
                ShutdownSignals(grace_seconds=settings.LLMHUB_SHUTDOWN_GRACE_SECONDS).install()
                # kill -USR1 <pid>: every thread's and task's stack, and the ledger's writers, to the log.
                diagnostics_install(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Requests still talking to a provider now are ones the server has given up on (uvicorn's
                # graceful period is over, and Django leaves their tasks orphaned; or the server stopped
                # without a signal we saw): cut them so each settles, then drain the ledger, before uvicorn
                # re-raises the signal and the process dies.
                await runs_cancel_all()
                await ledger_flush()
                # Streams the server cuts after this point settle while the loop winds down: their rows
                # go straight to the spool rather than to tasks that might never run.
                ledger_begin_shutdown()
                await adapters_close_all()
                # The spans still queued for the OTLP exporter go out before the process ends (a no-op
                # when tracing is off).
                await sync_to_async(tracing_shutdown, thread_sensitive=False)()
                # What this process counted since its metrics flusher's last round (up to a second: the requests it
                # answered last, those cut above) goes to its files, which the workers that go on read: uvicorn ends
                # the process by raising the signal again, so core.metrics' atexit flush never runs.
                metrics_flush()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _warm_up() -> None:
    """Load the catalog into the lookup cache and build the pooled SDK client of every deployment's provider
    before the first request: otherwise that request pays for importing the SDKs and filling the caches
    (~0.7 s). Import the URLconf too: Django imports it on the first request, and with it every view
    module (the experiments' statistics import SciPy): 1.4 s that a burst of first requests queued behind
    (docs/streams.md). Build the block-list's character tables (0.2 s, which the first text that is not ASCII
    under a block-list waited for). Import every configured provider kind's adapter, and its SDK, whether the
    catalog serves one yet or not: a provider of a new kind added in the admin later would import its SDK on the
    loop at its first request, seconds in which the process served nothing (no stream relayed, no heartbeat
    stamped). Then read the breakers shared through Redis."""
    from django.conf import settings
    from django.urls import Resolver404, get_resolver

    from providers.adapters.registry import adapter_class_for_kind, adapter_for
    from providers.moderation import plain_form
    from providers.selectors import models_enabled

    resolver = get_resolver()
    with contextlib.suppress(Resolver404):
        resolver.resolve("/v1/chat/completions")  # imports every view module and fills the resolver's tables
    plain_form("é")
    for kind in settings.LLMHUB_ADAPTERS:
        try:
            adapter_class_for_kind(kind)
        except Exception:
            logger.exception("could not import the adapter of provider kind %s", kind)

    try:
        models = await models_enabled()
    except Exception:
        logger.exception("could not read the catalog at start-up; the first requests will")
        return
    providers = {d.provider.id: d.provider for model in models for d in model.deployments}
    for config in providers.values():
        try:
            adapter_for(config)
        except Exception:
            logger.exception("could not prepare a client for provider %s", config.name)
    # The circuit breakers other servers hold open, so that this one avoids those deployments from its
    # first request; with Redis down or slow, it starts on its own view and catches up in the background.
    from providers.routing.breakers import breakers_synced

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await breakers_synced()


class ShutdownSignals:
    """Runs the pipeline's drain between a SIGTERM/SIGINT and uvicorn's own handling of it.

    Installed only in front of a uvicorn ``Server``'s handler (the one the Dockerfile runs): other servers
    keep their own signal handling, and their runs are cut at ``lifespan.shutdown`` as before."""

    def __init__(self, *, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.loop = asyncio.get_running_loop()
        self.server_handlers: dict[int, Any] = {}
        self.drain: asyncio.Task[None] | None = None
        self.hurry = asyncio.Event()
        self.handed_over = False

    def install(self) -> bool:
        # Signal handlers belong to the main thread (a server run in a thread, as in tests, has none).
        if threading.current_thread() is not threading.main_thread():
            return False
        from uvicorn.server import HANDLED_SIGNALS, Server

        for sig in HANDLED_SIGNALS:
            handler = signal.getsignal(sig)
            if isinstance(getattr(handler, "__self__", None), Server):
                self.server_handlers[sig] = handler
                signal.signal(sig, self._on_signal)
        return bool(self.server_handlers)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        # This runs between two bytecodes of whatever the loop was doing: do the work on the loop.
        try:
            self.loop.call_soon_threadsafe(self._signalled, sig)
        except RuntimeError:  # the loop is closed: nothing left to drain
            self.server_handlers[sig](sig, frame)

    def _signalled(self, sig: int) -> None:
        if self.handed_over:
            self.server_handlers[sig](sig, None)  # uvicorn's: a second SIGINT there forces the exit
        elif self.drain is None:
            self.drain = self.loop.create_task(self._drain_then_hand_over(sig))
        else:
            logger.warning("second stop signal: cutting the replies still streaming now")
            self.hurry.set()

    async def _drain_then_hand_over(self, sig: int) -> None:
        from chat.pipeline import runs_drain

        logger.warning(
            "shutdown began: refusing new requests, giving those in flight %gs to finish", self.grace_seconds
        )
        try:
            cut = await runs_drain(grace_seconds=self.grace_seconds, hurry=self.hurry)
            if cut:
                logger.warning("cut %d replies still running at the end of the grace period", cut)
        except Exception:
            logger.exception("the pipeline's drain failed; handing over to the server's shutdown")
        finally:
            self.handed_over = True
            self.server_handlers[sig](sig, None)
