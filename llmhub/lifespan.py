"""ASGI lifespan: replay a spooled ledger at start-up, drain the ledger and close pooled provider
clients at shutdown. uvicorn sends these events; daphne does not (see docs/performance.md)."""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import sync_to_async

logger = logging.getLogger("llmhub.lifespan")


class LifespanMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        from billing.services.ledger import ledger_begin_shutdown, ledger_flush, ledger_replay_spool
        from chat.pipeline import runs_cancel_all
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
                await _warm_up()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Requests still talking to a provider now are ones the server has given up on (uvicorn's
                # graceful period is over, and Django leaves their tasks orphaned): cancel them so each
                # settles, then drain the ledger, before uvicorn re-raises the signal and the process dies.
                await runs_cancel_all()
                await ledger_flush()
                # Streams the server cuts after this point settle while the loop winds down: their rows
                # go straight to the spool rather than to tasks that might never run.
                ledger_begin_shutdown()
                await adapters_close_all()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _warm_up() -> None:
    """Load the catalog into the lookup cache and build each provider's pooled SDK client before the
    first request: otherwise that request pays for importing the SDKs and filling the caches (~0.7 s)."""
    from providers.adapters.registry import adapter_for
    from providers.selectors import models_enabled

    try:
        models = await models_enabled()
    except Exception:
        logger.exception("could not read the catalog at start-up; the first requests will")
        return
    for config in {model.provider.id: model.provider for model in models}.values():
        try:
            adapter_for(config)
        except Exception:
            logger.exception("could not prepare a client for provider %s", config.name)
