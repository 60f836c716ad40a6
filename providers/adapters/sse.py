"""Server-sent events, read as bytes.

The OpenAI-protocol adapter relays chunks with the upstream's own bytes (``WireChunk.raw``), so it
reads the event stream itself rather than through the SDK's decoder, which hands out decoded strings
(and costs more per event). Lines end in LF or CRLF; ``data:`` lines of one event are joined with LF;
comments (``: keep-alive``, OpenRouter's ``: OPENROUTER PROCESSING``), ``id:`` and ``retry:`` are
skipped. An event left unterminated when the body ends is still delivered: a server that forgets the
last blank line should not lose its final chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str | None
    data: bytes


async def sse_events(body: AsyncIterable[bytes]) -> AsyncIterator[ServerSentEvent]:
    pending = b""
    data: list[bytes] = []
    event: str | None = None
    async for piece in body:
        if not piece:
            continue
        lines = (pending + piece).split(b"\n") if pending else piece.split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield ServerSentEvent(event, b"\n".join(data))
                data = []
                event = None
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", "replace") or None
    if pending.rstrip(b"\r").startswith(b"data:"):
        value = pending.rstrip(b"\r")[5:]
        data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield ServerSentEvent(event, b"\n".join(data))
