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

import httpx2
from httpx2._client import BoundAsyncStream


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str | None
    data: bytes


class SSEParser:
    """The events in a body fed to it piece by piece, as TCP split it (anywhere: inside a line, a CRLF or
    a multi-byte character). A plain object rather than an async generator, so that an adapter reading
    the body runs one frame per piece, not two (each frame between the socket and the client is resumed
    for every chunk of every stream)."""

    __slots__ = ("_data", "_event", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []
        self._event: str | None = None

    def feed(self, piece: bytes) -> list[ServerSentEvent]:
        """The events that ``piece`` completes (often none, or one)."""
        events: list[ServerSentEvent] = []
        if not piece:
            return events
        pending = self._pending
        lines = (pending + piece).split(b"\n") if pending else piece.split(b"\n")
        self._pending = lines.pop()
        data = self._data
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    events.append(ServerSentEvent(self._event, b"\n".join(data) if len(data) > 1 else data[0]))
                    data = self._data = []
                self._event = None
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip().decode("utf-8", "replace") or None
        return events

    def end(self) -> list[ServerSentEvent]:
        """An event the body left unterminated: a server that forgets the last blank line should not lose
        its final chunk."""
        pending = self._pending.rstrip(b"\r")
        self._pending = b""
        if pending.startswith(b"data:"):
            value = pending[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        data, self._data = self._data, []
        return [ServerSentEvent(self._event, b"\n".join(data))] if data else []


async def sse_events(body: AsyncIterable[bytes]) -> AsyncIterator[ServerSentEvent]:
    parser = SSEParser()
    async for piece in body:
        for event in parser.feed(piece):
            yield event
    for event in parser.end():
        yield event


def response_body(response: httpx2.Response) -> AsyncIterable[bytes]:
    """A streamed response's body as the transport reads it. httpx2's ``aiter_bytes`` puts two generators
    of its own (the content decoder's and the raw chunker's) between the transport and the reader; with
    nothing to decode (no ``Content-Encoding``: an event stream is not compressed in practice) the
    transport's stream is read directly. Closing is the response's ``aclose``, as before."""
    encoding = response.headers.get("content-encoding")
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        stream = response.stream
        # httpx2's client wraps the transport's stream in one that only passes each piece on (and times the
        # response when it is closed, which ``aclose`` still does): read beneath it, one frame fewer a piece.
        if type(stream) is BoundAsyncStream:
            return stream._stream  # type: ignore[return-value]
        return stream  # type: ignore[return-value]
    return response.aiter_bytes()
