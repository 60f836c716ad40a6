"""An ASGI app that writes down every scope and lifespan event a server gives it.

``bench/run.py`` serves it with each server it compares and reads the file back: the evidence for
which servers run llmhub's lifespan hook (ledger drain, spool replay), not a claim from memory.
"""

from __future__ import annotations

import os
from typing import Any


def _note(line: str) -> None:
    with open(os.environ["BENCH_PROBE_FILE"], "a", encoding="utf-8") as notes:
        notes.write(line + "\n")


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    _note(f"scope {scope['type']}")
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            _note(message["type"])
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
