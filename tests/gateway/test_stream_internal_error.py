"""A stream that fails after its headers for a reason of ours ends with an in-band error, never silently.

Only ``ProviderError`` used to become an in-band error; anything else raised mid-stream dropped the
connection with no error event and no end (``[DONE]``, ``message_stop``, ``response.completed``), which a
client cannot tell from a network cut. What first raised so (a delta whose ``content`` was a list) is now read or
refused as malformed (``test_odd_upstream_shapes.py``), and no input known makes our code raise; so the relay's
shape check is made to raise here, as a bug of ours would, on a chunk a real upstream sends mid-stream. Each
entry point ends the stream with ``internal_error`` in its protocol's shape, logs it with the request id, and the
request's ledger row is written once."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from aiohttp import web

from billing.models import UsageRecord
from providers.adapters.openai_shape import StreamShape
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.chat_streams import sse_events
from tests.loopback_http import AiohttpThreadServer
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

BOOM = "a chunk our code fails on"
BASE = {"id": "chatcmpl-odd", "object": "chat.completion.chunk", "created": 1, "model": "odd"}
CHUNKS = [
    {**BASE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}}]},
    {**BASE, "choices": [{"index": 0, "delta": {"content": BOOM}}]},  # the chunk our code fails on
    {**BASE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
]


@pytest.fixture
def odd_upstream() -> Iterator[str]:
    """An OpenAI-compatible upstream whose stream sends one chunk of the wrong shape after a good one."""

    async def completions(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await reply.prepare(request)
        for chunk in CHUNKS:
            await reply.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await reply.write(b"data: [DONE]\n\n")
        return reply

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    with AiohttpThreadServer(app) as server:
        yield server.origin + "/v1"


@pytest.fixture
def bug_of_ours(monkeypatch) -> None:
    """The relay's shape check raising, as a bug of ours would, on the ``BOOM`` chunk (the server runs in-process)."""
    conform = StreamShape.conform

    def failing(self: StreamShape, chunk: dict) -> bool:
        if any(choice.get("delta", {}).get("content") == BOOM for choice in chunk.get("choices") or ()):
            raise RuntimeError("a bug of ours")
        return conform(self, chunk)

    monkeypatch.setattr(StreamShape, "conform", failing)


@pytest.fixture
def odd_model(gateway, odd_upstream, bug_of_ours):
    provider = ProviderFactory(name="odd", base_url=odd_upstream)
    return ModelFactory(name="odd-model", provider=provider, upstream_id="odd")


def assert_logged_once(caplog, reply: httpx.Response, gateway) -> None:
    request_id = reply.headers["x-request-id"]
    failures = [r for r in caplog.records if "internal_error" in r.getMessage() and request_id in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert gateway.key not in caplog.text
    record = wait_for_record(request_id)
    assert record.model_name == "odd-model"
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1


def test_chat_completions_ends_with_an_in_band_internal_error(gateway, odd_model, caplog):
    caplog.set_level(logging.ERROR)
    headers = {"authorization": f"Bearer {gateway.key}"}
    body = {"model": "odd-model", "messages": [{"role": "user", "content": "hi"}]}
    reply, events = sse_events(gateway, "/v1/chat/completions", body, headers)
    assert reply.status_code == 200
    assert json.loads(events[0][1])["choices"][0]["delta"]["content"] == "Hello"
    error = json.loads(events[-1][1])["error"]
    assert (error["type"], error["code"]) == ("api_error", "internal_error")
    assert "[DONE]" not in [data for _, data in events]
    assert_logged_once(caplog, reply, gateway)


def test_messages_ends_with_an_error_event(gateway, odd_model, caplog):
    caplog.set_level(logging.ERROR)
    headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    body = {"model": "odd-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    reply, events = sse_events(gateway, "/v1/messages", body, headers)
    assert reply.status_code == 200
    name, data = events[-1]
    assert name == "error" and json.loads(data) == {
        "type": "error",
        "error": {"type": "api_error", "message": "The server had an error while processing your request."},
    }
    assert "message_stop" not in [name for name, _ in events]
    assert_logged_once(caplog, reply, gateway)


def test_responses_ends_with_response_failed(gateway, odd_model, caplog):
    caplog.set_level(logging.ERROR)
    headers = {"authorization": f"Bearer {gateway.key}"}
    reply, events = sse_events(gateway, "/v1/responses", {"model": "odd-model", "input": "hi"}, headers)
    assert reply.status_code == 200
    name, data = events[-1]
    assert name == "response.failed"
    assert json.loads(data)["response"]["error"]["code"] == "server_error"
    assert "response.completed" not in [name for name, _ in events]
    assert_logged_once(caplog, reply, gateway)
