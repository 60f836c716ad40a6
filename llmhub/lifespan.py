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
        from billing.services.ledger import ledger_flush, ledger_replay_spool
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
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await ledger_flush()
                await adapters_close_all()
                await send({"type": "lifespan.shutdown.complete"})
                return
