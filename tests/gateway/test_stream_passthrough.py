"""Streams are relayed with the upstream's own bytes: only what llmhub must change is re-encoded.

The upstream here is a small aiohttp server that writes an exact, unusually formatted stream (spaces
after colons, ``\\u`` escapes, a vendor field, CRLF line ends, a keep-alive comment, events split across
writes), so that a relay which decoded and re-encoded every chunk would be caught."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import httpx
import pytest
from aiohttp import web

from billing.services.keys import api_key_create
from llmhub.testing.openapi import validate_openai_schema
from tests.conftest import free_port
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.loopback_http import AiohttpThreadServer
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

CHUNKS = [
    b'{"id":"chatcmpl-x", "object":"chat.completion.chunk", "created":1, "model": "up-model",'
    b' "system_fingerprint":"fp_1", "x_vendor":{"cache":"hit"},'
    b' "choices":[{"index":0, "delta":{"role":"assistant", "content":""}, "finish_reason":null}], "usage":null}',
    b'{"id":"chatcmpl-x", "object":"chat.completion.chunk", "created":1, "model": "up-model",'
    b' "choices":[{"index":0, "delta":{"content":"caf\\u00e9 \xe2\x98\x95"}, "logprobs":null, "finish_reason":null}],'
    b' "usage":null}',
    b'{"id":"chatcmpl-x", "object":"chat.completion.chunk", "created":1, "model": "up-model",'
    b' "choices":[{"index":0, "delta":{}, "finish_reason":"stop"}], "usage":null}',
    b'{"id":"chatcmpl-x", "object":"chat.completion.chunk", "created":1, "model": "up-model", "choices":[],'
    b' "usage":{"prompt_tokens":11, "completion_tokens":7, "total_tokens":18}}',
]


def expected_relay(raw: bytes) -> bytes:
    return raw.replace(b'"model": "up-model"', b'"model":"public-model"')


class ExactUpstream:
    def __init__(self, events: list[bytes] | None = None) -> None:
        self.events = events or [b"data: " + raw + b"\r\n\r\n" for raw in CHUNKS]
        self.bodies: list[dict] = []
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._server = AiohttpThreadServer(app, port=free_port(), access_log=None)

    @property
    def base_url(self) -> str:
        return self._server.origin + "/v1"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": keep-alive\r\n\r\n")
        for event in self.events:
            middle = len(event) // 2
            await response.write(event[:middle])  # one event in two writes
            await asyncio.sleep(0.005)
            await response.write(event[middle:])
        await response.write(b"data: [DONE]\r\n\r\n")
        await response.write_eof()
        return response

    def __enter__(self) -> ExactUpstream:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


@pytest.fixture
def exact_gateway(llmhub_server):
    with ExactUpstream() as upstream:
        provider = ProviderFactory(name="exact", base_url=upstream.base_url)
        ModelFactory(
            name="public-model",
            provider=provider,
            upstream_id="up-model",
            input_per_mtok=Decimal("1.00"),
            output_per_mtok=Decimal("2.00"),
        )
        created = api_key_create(user=UserFactory(username="bytes"), name="t")
        yield llmhub_server.url, created.secret, upstream


def stream_lines(url: str, key: str, body: dict) -> tuple[list[bytes], str]:
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=20
    ) as response:
        assert response.status_code == 200, response.read()
        raw = response.read()
        request_id = response.headers["x-request-id"]
    assert b"\r" not in raw
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    return [event.removeprefix(b"data: ") for event in events[:-1]], request_id


def test_chunks_arrive_byte_for_byte_with_the_public_model_name(exact_gateway):
    url, key, upstream = exact_gateway
    body = {
        "model": "public-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    relayed, request_id = stream_lines(url, key, body)

    assert relayed == [*(expected_relay(raw) for raw in CHUNKS), b"[DONE]"]
    for raw in relayed[:-1]:
        validate_openai_schema(json.loads(raw), "CreateChatCompletionStreamResponse")
    assert upstream.bodies[0]["model"] == "up-model"
    record = wait_for_record(request_id)
    assert (record.prompt_tokens, record.completion_tokens, record.usage_estimated) == (11, 7, False)
    assert record.cost == Decimal("0.000025")  # 11 × 1.00 / 1e6 + 7 × 2.00 / 1e6


def test_usage_the_client_did_not_ask_for_is_left_out(exact_gateway):
    url, key, upstream = exact_gateway
    body = {"model": "public-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    relayed, request_id = stream_lines(url, key, body)

    # The usage-only chunk is dropped; `"usage":null` in the others is valid and passes through.
    assert relayed == [*(expected_relay(raw) for raw in CHUNKS[:-1]), b"[DONE]"]
    assert upstream.bodies[0]["stream_options"] == {"include_usage": True}  # asked upstream all the same
    assert wait_for_record(request_id).completion_tokens == 7


def test_an_event_spread_over_several_data_lines_is_sent_on_one(llmhub_server):
    """SSE allows one event in several `data:` lines (joined with a line break); relayed as it came, the
    line break would cut the client's event in two."""
    first, *rest = CHUNKS
    split_at = first.index(b', "choices"')
    events = [b"data: " + first[:split_at] + b"\ndata: " + first[split_at:] + b"\n\n"]
    events += [b"data: " + raw + b"\n\n" for raw in rest]
    with ExactUpstream(events) as upstream:
        provider = ProviderFactory(name="exact", base_url=upstream.base_url)
        ModelFactory(name="public-model", provider=provider, upstream_id="up-model")
        key = api_key_create(user=UserFactory(username="lines"), name="t").secret
        body = {"model": "public-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        relayed, _ = stream_lines(llmhub_server.url, key, body)

    assert all(b"\n" not in line for line in relayed)
    assert json.loads(relayed[0]) == {
        **json.loads(first[:split_at] + b"\n" + first[split_at:]),
        "model": "public-model",
    }
    assert relayed[1:] == [*(expected_relay(raw) for raw in rest[:-1]), b"[DONE]"]


def test_a_chunk_missing_required_fields_is_filled_in_and_the_valid_ones_keep_their_bytes(llmhub_server):
    """Only the chunk that lacks what OpenAI's schema requires (here `finish_reason`, `object`, `created`) is
    encoded again; those around it still arrive as the upstream wrote them."""
    incomplete = (
        b'{"id":"chatcmpl-x", "model": "up-model", "choices":[{"index":0, "delta":{"content":" na\\u00efve"}}]}'
    )
    chunks = [CHUNKS[0], incomplete, *CHUNKS[1:]]
    with ExactUpstream([b"data: " + raw + b"\n\n" for raw in chunks]) as upstream:
        provider = ProviderFactory(name="exact", base_url=upstream.base_url)
        ModelFactory(name="public-model", provider=provider, upstream_id="up-model")
        key = api_key_create(user=UserFactory(username="fill"), name="t").secret
        body = {
            "model": "public-model",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        relayed, _ = stream_lines(llmhub_server.url, key, body)

    assert relayed[0] == expected_relay(CHUNKS[0])
    assert relayed[2:] == [*(expected_relay(raw) for raw in CHUNKS[1:]), b"[DONE]"]
    filled = json.loads(relayed[1])
    validate_openai_schema(filled, "CreateChatCompletionStreamResponse")
    assert filled == {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,  # the stream's own timestamp, from its first chunk
        "model": "public-model",
        "choices": [{"index": 0, "delta": {"content": " naïve"}, "finish_reason": None}],
    }
