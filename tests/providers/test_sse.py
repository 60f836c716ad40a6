"""The byte-level SSE reader and the chunk type that carries the upstream's own bytes."""

from __future__ import annotations

import asyncio
import json

import pytest

from providers.adapters.base import WireChunk, chunk_json
from providers.adapters.sse import ServerSentEvent, sse_events

STREAM = (
    b": OPENROUTER PROCESSING\r\n\r\n"
    b'data: {"id":"a","choices":[{"delta":{"content":"caf\\u00e9 \xc3\xa9"}}]}\r\n\r\n'
    b"event: thread.message\n"
    b"id: 7\n"
    b"retry: 100\n"
    b'data: {"x":\n'
    b"data: 1}\n\n"
    b"data:[DONE]\n\n"
)
EXPECTED = [
    ServerSentEvent(None, b'{"id":"a","choices":[{"delta":{"content":"caf\\u00e9 \xc3\xa9"}}]}'),
    ServerSentEvent("thread.message", b'{"x":\n1}'),
    ServerSentEvent(None, b"[DONE]"),
]


def read(pieces: list[bytes]) -> list[ServerSentEvent]:
    async def body():
        for piece in pieces:
            yield piece

    async def collect():
        return [event async for event in sse_events(body())]

    return asyncio.run(collect())


def test_events_whole():
    assert read([STREAM]) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16])
def test_events_split_anywhere(size):
    """TCP splits the body anywhere, also inside a CRLF or a multi-byte character."""
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert read([b"", *pieces, b""]) == EXPECTED


def test_every_split_point():
    for at in range(len(STREAM) + 1):
        assert read([STREAM[:at], STREAM[at:]]) == EXPECTED, at


def test_unterminated_last_event_is_delivered():
    assert read([b'data: {"a":1}\n\ndata: {"b":2}']) == [
        ServerSentEvent(None, b'{"a":1}'),
        ServerSentEvent(None, b'{"b":2}'),
    ]
    assert read([b'data: {"b":2}\r']) == [ServerSentEvent(None, b'{"b":2}')]
    assert read([b": only a comment"]) == []


def test_wire_chunk_relays_its_own_bytes_until_changed():
    raw = b'{"id":"c","model": "up-1","choices":[],"usage":null}'
    chunk = WireChunk(json.loads(raw), raw)
    assert chunk_json(chunk) is raw

    chunk.set_model("up-1")  # the same name: nothing to rewrite
    assert chunk_json(chunk) is raw

    chunk.set_model("public/é")
    assert chunk_json(chunk) == '{"id":"c","model":"public/é","choices":[],"usage":null}'.encode()
    assert json.loads(chunk_json(chunk)) == chunk

    chunk.drop_usage()  # `"usage": null` is valid in a chunk and stays
    assert chunk.raw is not None


def test_wire_chunk_encodes_again_what_it_cannot_rewrite_in_place():
    # The upstream escaped its model name differently from us: the dict is encoded instead.
    raw = b'{"model":"caf\\u00e9","choices":[{"index":0,"delta":{}}],"usage":{"total_tokens":3}}'
    chunk = WireChunk(json.loads(raw), raw)
    chunk.set_model("public")
    assert chunk.raw is None
    assert json.loads(chunk_json(chunk))["model"] == "public"

    chunk = WireChunk(json.loads(raw), raw)
    chunk.drop_usage()
    assert "usage" not in json.loads(chunk_json(chunk))


def test_a_model_key_inside_a_string_is_not_rewritten():
    raw = b'{"choices":[{"delta":{"content":"\\"model\\":\\"up\\""}}],"model":"up"}'
    chunk = WireChunk(json.loads(raw), raw)
    chunk.set_model("pub")
    assert chunk_json(chunk) == b'{"choices":[{"delta":{"content":"\\"model\\":\\"up\\""}}],"model":"pub"}'


def test_parser_fed_directly_matches_the_generator():
    from providers.adapters.sse import SSEParser

    parser = SSEParser()
    events = []
    for at in range(0, len(STREAM), 5):
        events += parser.feed(STREAM[at : at + 5])
    events += parser.end()
    assert events == EXPECTED
    assert parser.end() == []  # nothing left twice


def test_response_body_reads_the_transport_unless_there_is_something_to_decode():
    """With no Content-Encoding the transport's stream is read directly (no httpx2 decoder generators);
    a compressed body still goes through ``aiter_bytes`` and comes out decoded."""
    import gzip

    import httpx2

    from providers.adapters.sse import response_body

    class Body(httpx2.AsyncByteStream):
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def __aiter__(self):
            yield self.data[:7]
            yield self.data[7:]

    async def read(response: httpx2.Response) -> bytes:
        return b"".join([piece async for piece in response_body(response)])

    plain = httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=Body(STREAM))
    assert response_body(plain) is plain.stream
    assert asyncio.run(read(plain)) == STREAM

    packed = httpx2.Response(200, headers={"content-encoding": "gzip"}, stream=Body(gzip.compress(STREAM)))
    assert response_body(packed) is not packed.stream
    assert asyncio.run(read(packed)) == STREAM


def test_response_body_reads_beneath_the_clients_timing_wrapper_and_closing_still_times_the_response():
    """A client's response stream is httpx2's ``BoundAsyncStream`` around the transport's: the body is read
    from the transport's stream (one frame fewer a piece), and closing the response still goes through the
    wrapper, which closes the transport's stream and sets ``elapsed``."""
    import httpx2

    from providers.adapters.sse import response_body

    closed = []

    class Body(httpx2.AsyncByteStream):
        async def __aiter__(self):
            yield STREAM[:9]
            yield STREAM[9:]

        async def aclose(self) -> None:
            closed.append(True)

    transport = httpx2.MockTransport(
        lambda request: httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=Body())
    )

    async def scenario() -> None:
        async with httpx2.AsyncClient(transport=transport) as client:
            async with client.stream("POST", "http://upstream.test/v1/chat/completions") as response:
                body = response_body(response)
                assert type(body) is Body  # beneath the wrapper
                assert b"".join([piece async for piece in body]) == STREAM
                assert not closed
            assert closed == [True]
            assert response.elapsed is not None

    asyncio.run(scenario())
