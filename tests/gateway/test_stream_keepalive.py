"""An upstream's keep-alives are not progress: a Claude stream that sends only ``ping`` events after it began is
stalled, and the relay's idle timeout ends it, on ``/v1/messages`` (whose events are relayed as they come, pings
too) as on chat completions (whose translation drops them). Tested against a real Anthropic-protocol upstream on
a local port that pings for longer than the model's idle timeout, then finishes its message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal

import pytest
from aiohttp import web

from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.chat_streams import sse_events
from tests.loopback_http import AiohttpThreadServer
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

PINGS = 20  # one every 0.2 s: 4 s of pings, past the model's 1 s idle timeout four times over
MESSAGE = {
    "id": "msg_keepalive",
    "type": "message",
    "role": "assistant",
    "model": "claude-keepalive",
    "content": [],
    "stop_reason": None,
    "stop_sequence": None,
    "usage": {"input_tokens": 5, "output_tokens": 1},
}


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


@pytest.fixture
def pinging_upstream() -> Iterator[str]:
    """Anthropic's Messages API that writes "Hello", then only pings for 4 s, then " world" and the message's end."""

    async def messages(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await reply.prepare(request)
        await reply.write(_event("message_start", {"message": MESSAGE}))
        await reply.write(_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
        await reply.write(_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hello"}}))
        for _ in range(PINGS):
            await asyncio.sleep(0.2)
            await reply.write(_event("ping", {}))
        await reply.write(
            _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": " world"}})
        )
        await reply.write(_event("content_block_stop", {"index": 0}))
        await reply.write(
            _event(
                "message_delta",
                {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 2}},
            )
        )
        await reply.write(_event("message_stop", {}))
        return reply

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    with AiohttpThreadServer(app) as server:
        yield server.origin


@pytest.fixture
def pinging_model(gateway, pinging_upstream):
    provider = ProviderFactory(name="pinging", kind="anthropic", base_url=pinging_upstream)
    return ModelFactory(
        name="pinging-claude",
        provider=provider,
        upstream_id="claude-keepalive",
        stream_idle_timeout_seconds=Decimal("1"),
    )


def events_of(gateway, path: str, body: dict, headers: dict) -> tuple[str, list[tuple[str | None, str]]]:
    """The request id and the SSE events as they came over the wire (event name, data)."""
    reply, events = sse_events(gateway, path, body, headers)
    assert reply.status_code == 200
    return reply.headers["x-request-id"], events


def test_messages_pings_alone_do_not_keep_a_stalled_stream_open(gateway, pinging_model):
    """Each upstream ``ping`` reset the idle timeout of a ``/v1/messages`` stream, which relays it: a Claude
    stream wedged after it began, pinging, was held open for as long as it pinged (for ever, by the client's
    account, its reservation and a connection to the provider). The pings are still relayed, but the idle timeout
    counts only the events that carry the message: past it the stream ends with an error event, as a silent one
    does."""
    headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    body = {"model": "pinging-claude", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}

    request_id, events = events_of(gateway, "/v1/messages", body, headers)

    names = [name for name, _ in events]
    assert "ping" in names  # relayed to the client as they came
    assert names[-1] == "error" and "message_stop" not in names
    error = json.loads(events[-1][1])["error"]
    assert "nothing arrived for 1 seconds" in error["message"], error
    texts = [json.loads(data)["delta"].get("text") for name, data in events if name == "content_block_delta"]
    assert texts == ["Hello"]
    assert wait_for_record(request_id).status != "ok"


def test_chat_completions_on_the_same_upstream_end_the_same_way(gateway, pinging_model):
    """The translation to chat completions drops the pings, so they never counted there: the same stream ends
    with the in-band error of a stall (and no ``[DONE]``), as on ``/v1/messages`` now."""
    headers = {"authorization": f"Bearer {gateway.key}"}
    body = {"model": "pinging-claude", "messages": [{"role": "user", "content": "hi"}]}

    request_id, events = events_of(gateway, "/v1/chat/completions", body, headers)

    datas = [data for _, data in events]
    assert "[DONE]" not in datas
    assert "nothing arrived for 1 seconds" in json.loads(datas[-1])["error"]["message"]
    assert wait_for_record(request_id).status != "ok"
