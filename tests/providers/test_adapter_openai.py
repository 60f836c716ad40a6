"""OpenAIAdapter against the fake upstream over HTTP, through the official openai SDK."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from llmhub.testing.openapi import validate_openai_schema
from providers.adapters.openai import OpenAIAdapter
from providers.exceptions import (
    ProviderContextLengthError,
    ProviderError,
    ProviderStreamInterruptedError,
)
from providers.fields import Secret
from providers.types import ProviderConfig, ResolvedModel
from tests.loopback_http import LoopbackHTTPServer, QuietHandler
from tests.providers.conftest import (
    assert_cancelling_the_consumer_closes_the_response,
    open_connections_once_closed,
    open_connections_to,
    two_content_chunks,
)

API_KEY = "sk-openai-adapter-test-key-0123456789abcdef"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}


def make_config(upstream, **overrides) -> ProviderConfig:
    values = {
        "id": 9101,
        "name": "fake-openai",
        "kind": "openai_compatible",
        "base_url": upstream.base_url + "/v1" if upstream is not None else "",
        "api_key": Secret(API_KEY),
        "timeout": 5.0,
    }
    values.update(overrides)
    return ProviderConfig(**values)


def user(text: str) -> dict:
    return {"model": "fake-gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
async def adapter(fake_upstream):
    adapter = OpenAIAdapter(make_config(fake_upstream))
    yield adapter
    await adapter.aclose()


async def collect(stream) -> list[dict]:
    return [chunk async for chunk in stream]


def streamed_text(chunks: list[dict]) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


# Completions and streams ---------------------------------------------------------------------------


async def test_complete_returns_the_upstream_completion(adapter, fake_upstream):
    completion = await adapter.complete(user("hello there"))

    validate_openai_schema(completion, "CreateChatCompletionResponse")
    assert completion["choices"][0]["message"]["content"] == "Echo: hello there"
    assert completion["usage"]["completion_tokens"] == 3
    # Fields the adapter does not know about come back as the upstream sent them.
    assert completion["system_fingerprint"] == "fp_fake"
    assert fake_upstream.requests[-1]["body"].get("stream") is None


async def test_stream_validates_and_ends_with_usage_even_when_the_client_did_not_ask(adapter, fake_upstream):
    body = {**user("[[words=12]]"), "stream_options": {"include_usage": False, "include_obfuscation": False}}

    chunks = await collect(adapter.stream(body))

    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(streamed_text(chunks).split()) == 12
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    sent = fake_upstream.requests[-1]["body"]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert body["stream_options"]["include_usage"] is False, "the caller's body must not be modified"


async def test_stream_yields_each_chunk_as_it_arrives(adapter):
    started = time.monotonic()
    arrivals = []
    async for chunk in adapter.stream(user("[[tps=20]] [[words=10]]")):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            arrivals.append(time.monotonic() - started)

    assert len(arrivals) == 10
    # Ten tokens at 20/s are paced over half a second: relayed one by one, they arrive spread out, where
    # a buffered stream would hand them over together.
    assert arrivals[-1] - arrivals[0] >= 0.3


async def test_unknown_and_uninterpreted_fields_pass_through_unchanged(adapter, fake_upstream):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
    body = {
        "model": "fake-gpt-4o-mini",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this"}, image]}],
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 2,
        "user": "end-user-42",
        "metadata": {"team": "blue"},
        "response_format": {"type": "json_object"},
        "service_tier": "flex",
        "x_future_option": {"nested": [1, 2, {"deep": None}]},
    }

    completion = await adapter.complete(body)

    assert fake_upstream.requests[-1]["body"] == body
    assert completion["choices"][0]["message"]["content"] == "Echo: what is this [image]"
    assert completion["choices"][0]["logprobs"]["content"][0]["top_logprobs"]


async def test_parameter_rules_rewrite_the_request(adapter, fake_upstream):
    model = ResolvedModel(
        id=1,
        name="o3-mini",
        upstream_id="fake-o3-mini",
        provider=adapter.config,
        input_per_mtok=Decimal("1.10"),
        output_per_mtok=Decimal("4.40"),
        cached_input_per_mtok=None,
        context_window=200_000,
        max_output_tokens=None,
        parameter_rules={"fixed": {"temperature": 1}, "rename": {"max_tokens": "max_completion_tokens"}},
    )
    body = {
        "model": "o3-mini",
        "messages": [{"role": "user", "content": "[[words=10]]"}],
        "temperature": 0.2,
        "max_tokens": 3,
    }

    prepared = adapter.prepare_request(body, model)
    completion = await adapter.complete(prepared)

    sent = fake_upstream.requests[-1]["body"]
    assert sent["model"] == "fake-o3-mini"
    assert sent["temperature"] == 1
    assert sent["max_completion_tokens"] == 3
    assert "max_tokens" not in sent
    assert completion["choices"][0]["finish_reason"] == "length"
    assert body["model"] == "o3-mini" and body["max_tokens"] == 3, "the client's body must be left as it was"


async def test_extra_headers_and_organization_reach_the_upstream(fake_upstream):
    config = make_config(fake_upstream, extra_headers=(("X-Team", "blue"),), organization="org-llmhub")
    adapter = OpenAIAdapter(config)
    try:
        await adapter.complete(user("hi"))
    finally:
        await adapter.aclose()

    headers = fake_upstream.requests[-1]["headers"]
    assert headers["x-team"] == "blue"
    assert headers["openai-organization"] == "org-llmhub"
    assert headers["authorization"].endswith(API_KEY[-4:])
    assert "openai-project" not in headers


async def test_an_empty_api_key_still_works_for_self_hosted_servers(fake_upstream):
    adapter = OpenAIAdapter(make_config(fake_upstream, kind="ollama", api_key=Secret("")))
    try:
        completion = await adapter.complete(user("local"))
    finally:
        await adapter.aclose()

    assert completion["choices"][0]["message"]["content"] == "Echo: local"


# Failures ------------------------------------------------------------------------------------------

# The contract suite (test_adapter_contract.py) maps every fault; these are OpenAI's own details.


def assert_clean(error: ProviderError) -> None:
    """Our error, with no SDK exception (which holds the request and its headers) chained to it."""
    assert error.provider == "fake-openai"
    assert error.__cause__ is None and error.__suppress_context__
    for text in (str(error), repr(error), error.message):
        assert API_KEY not in text


async def test_a_context_length_error_names_the_messages_parameter(adapter):
    with pytest.raises(ProviderContextLengthError) as caught:
        await adapter.complete(user("hi [[fault=context]]"))
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    assert_clean(caught.value)


async def test_an_error_event_interrupts_the_stream(adapter):
    received = []
    with pytest.raises(ProviderStreamInterruptedError) as caught:
        async for chunk in adapter.stream(user("[[words=20]] [[fault=error-event]]")):
            received.append(chunk)

    assert streamed_text(received).split() == ["lorem", "ipsum"]
    assert "The server had an error" in caught.value.message
    assert_clean(caught.value)


# Cancellation --------------------------------------------------------------------------------------


async def test_closing_a_stream_closes_the_upstream_response_at_once(private_upstream):
    adapter = OpenAIAdapter(make_config(private_upstream))
    try:
        stream = adapter.stream(user("[[tps=5]] [[words=200]]"))
        await two_content_chunks(stream)
        assert open_connections_to(private_upstream.port) == 1
        await stream.aclose()

        # A half-read response cannot go back to the pool: its connection is gone, not left streaming.
        assert await open_connections_once_closed(private_upstream.port) == 0
        assert (await adapter.complete(user("after")))["choices"][0]["message"]["content"] == "Echo: after"
    finally:
        await adapter.aclose()


async def test_cancelling_the_consuming_task_closes_the_upstream_response(private_upstream):
    adapter = OpenAIAdapter(make_config(private_upstream))
    await assert_cancelling_the_consumer_closes_the_response(
        adapter, user("[[tps=5]] [[words=200]]"), private_upstream.port
    )


class _OneChoiceFinishedThenCut(LoopbackHTTPServer):
    """Streams two choices (n=2), the first to its finish, then closes the connection: the second never ends."""

    def start(self) -> None:
        def chunk(index: int, delta: dict, finish: str | None = None) -> bytes:
            data = {
                "id": "chatcmpl-cut",
                "object": "chat.completion.chunk",
                "created": 1735689600,
                "model": "m",
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for index in (0, 1):
                    self.wfile.write(chunk(index, {"role": "assistant", "content": "Hi"}))
                self.wfile.write(chunk(0, {}, "stop"))
                self.wfile.flush()

        self.serve(Handler)


async def test_a_stream_of_several_choices_cut_before_the_last_finishes_is_interrupted():
    server = _OneChoiceFinishedThenCut()
    server.start()
    adapter = OpenAIAdapter(make_config(None, base_url=server.origin + "/v1"))
    try:
        with pytest.raises(ProviderStreamInterruptedError):
            await collect(adapter.stream({**user("hi"), "n": 2}))
    finally:
        await adapter.aclose()
        server.stop()
