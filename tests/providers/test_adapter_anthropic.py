"""AnthropicAdapter against the fake upstream over HTTP, through the official anthropic SDK."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from llmhub.testing.openapi import validate_openai_schema
from providers.adapters.anthropic import AnthropicAdapter
from providers.adapters.translate_anthropic import DEFAULT_MAX_TOKENS
from providers.exceptions import (
    ProviderBadRequestError,
    ProviderContextLengthError,
    ProviderError,
    ProviderStreamInterruptedError,
)
from providers.fields import Secret
from providers.types import ProviderConfig, ResolvedModel
from tests.providers.conftest import (
    assert_cancelling_the_consumer_closes_the_response,
    open_connections_once_closed,
    open_connections_to,
    two_content_chunks,
)

API_KEY = "sk-ant-adapter-test-key-0123456789abcdef"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="


def make_config(upstream, **overrides) -> ProviderConfig:
    values = {
        "id": 9201,
        "name": "fake-anthropic",
        "kind": "anthropic",
        "base_url": upstream.base_url,  # no /v1: the SDK adds it
        "api_key": Secret(API_KEY),
        "timeout": 5.0,
    }
    values.update(overrides)
    return ProviderConfig(**values)


def user(text: str, **extra) -> dict:
    return {"model": "fake-claude-haiku", "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
async def adapter(fake_upstream):
    adapter = AnthropicAdapter(make_config(fake_upstream))
    yield adapter
    await adapter.aclose()


async def collect(stream) -> list[dict]:
    return [chunk async for chunk in stream]


def streamed_text(chunks: list[dict]) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


def sent(upstream) -> dict:
    request = upstream.requests[-1]
    assert request["path"] == "/v1/messages"
    return request["body"]


# Completions and streams ---------------------------------------------------------------------------


async def test_complete_translates_request_and_response(adapter, fake_upstream):
    body = {
        "model": "fake-claude-haiku",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
            {"role": "user", "content": "hello there [[cache=3]]"},
        ],
        "temperature": 0.5,
        "top_p": 0.9,
        "user": "end-user-7",
        "seed": 11,
        "frequency_penalty": 0.1,
        "logprobs": False,  # true is refused (Claude returns none: the contract suite)
        "stream_options": {"include_usage": True},
    }

    completion = await adapter.complete(body)

    validate_openai_schema(completion, "CreateChatCompletionResponse")
    message = completion["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Echo: hello there", "refusal": None}
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["model"] == "fake-claude-haiku"
    # The fake counts the system prompt as a message (3 + 6 words) and the user turn (3 + 3 words);
    # three of those tokens were read from the cache, which OpenAI counts inside prompt_tokens.
    assert completion["usage"]["prompt_tokens"] == 15
    assert completion["usage"]["prompt_tokens_details"]["cached_tokens"] == 3
    assert completion["usage"]["completion_tokens"] == 3
    assert completion["usage"]["total_tokens"] == 18

    request = sent(fake_upstream)
    assert request == {
        "model": "fake-claude-haiku",
        "system": "You are terse.\n\nAnswer in English.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there [[cache=3]]"}]}],
        "max_tokens": DEFAULT_MAX_TOKENS,
        "temperature": 0.5,
        "top_p": 0.9,
        "metadata": {"user_id": "end-user-7"},
    }


async def test_stream_validates_and_ends_with_usage(adapter):
    chunks = await collect(adapter.stream(user("[[words=12]]")))

    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(streamed_text(chunks).split()) == 12
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert chunks[-1]["usage"]["prompt_tokens"] == 4
    assert len({chunk["id"] for chunk in chunks}) == 1


async def test_stream_yields_each_chunk_as_it_arrives(adapter):
    started = time.monotonic()
    arrivals = []
    async for chunk in adapter.stream(user("[[tps=20]] [[words=10]]")):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            arrivals.append(time.monotonic() - started)

    assert len(arrivals) == 10
    # Paced tokens relayed one by one arrive spread out, where a buffered stream would hand them over
    # together.
    assert arrivals[-1] - arrivals[0] >= 0.3


@pytest.mark.parametrize(
    ("extra", "finish"),
    [({"max_completion_tokens": 3}, "length"), ({"max_tokens": 3}, "length"), ({"stop": "dolor"}, "stop")],
)
async def test_limits_and_stop_sequences(adapter, fake_upstream, extra, finish):
    completion = await adapter.complete(user("[[words=10]]", **extra))

    assert completion["choices"][0]["finish_reason"] == finish
    request = sent(fake_upstream)
    if "stop" in extra:
        assert request["stop_sequences"] == ["dolor"]
        assert completion["choices"][0]["message"]["content"] == "lorem ipsum "
    else:
        assert request["max_tokens"] == 3
        assert completion["choices"][0]["message"]["content"] == "lorem ipsum dolor"


async def test_images_are_sent_as_image_blocks(adapter, fake_upstream):
    body = {
        "model": "fake-claude-sonnet",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "compare"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
                ],
            }
        ],
    }

    completion = await adapter.complete(body)

    assert completion["choices"][0]["message"]["content"] == "Echo: compare [image] [image]"
    blocks = sent(fake_upstream)["messages"][0]["content"]
    assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    assert blocks[2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}


async def test_parameter_rules_apply_before_translation(adapter, fake_upstream):
    model = ResolvedModel(
        id=2,
        name="claude",
        upstream_id="fake-claude-sonnet",
        provider=adapter.config,
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("15"),
        cached_input_per_mtok=Decimal("0.30"),
        context_window=200_000,
        max_output_tokens=8192,
        parameter_rules={"drop": ["top_p"], "rename": {"max_tokens": "max_completion_tokens"}},
    )
    prepared = adapter.prepare_request(user("hi", top_p=0.5, max_tokens=50), model)

    await adapter.complete(prepared)

    request = sent(fake_upstream)
    assert request["model"] == "fake-claude-sonnet"
    assert request["max_tokens"] == 50
    assert "top_p" not in request


async def test_extra_headers_reach_the_upstream(fake_upstream):
    adapter = AnthropicAdapter(make_config(fake_upstream, extra_headers=(("anthropic-beta", "fake-beta-1"),)))
    try:
        await adapter.complete(user("hi"))
    finally:
        await adapter.aclose()

    headers = fake_upstream.requests[-1]["headers"]
    assert headers["anthropic-beta"] == "fake-beta-1"
    assert "anthropic-version" in headers
    credential = headers.get("x-api-key") or headers["authorization"]
    assert credential.endswith(API_KEY[-4:])


async def test_tool_call_round_trip(adapter, fake_upstream):
    messages = [{"role": "user", "content": "Lisbon"}]
    first = await adapter.complete({"model": "fake-claude-sonnet", "messages": messages, "tools": [WEATHER_TOOL]})

    validate_openai_schema(first, "CreateChatCompletionResponse")
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Lisbon", "days": 42}
    tools = sent(fake_upstream)["tools"]
    assert tools == [
        {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]

    messages += [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "21 degrees"}]
    final = await adapter.complete({"model": "fake-claude-sonnet", "messages": messages, "tools": [WEATHER_TOOL]})

    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["choices"][0]["message"]["content"] == "Tool result: 21 degrees"
    turns = sent(fake_upstream)["messages"]
    assert turns[1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": call["id"], "name": "get_weather", "input": {"city": "Lisbon", "days": 42}}
        ],
    }
    assert turns[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "21 degrees"}],
    }


async def test_streamed_tool_call(adapter, fake_upstream):
    body = {
        "model": "fake-claude-sonnet",
        "messages": [{"role": "user", "content": "Rome"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }

    chunks = await collect(adapter.stream(body))

    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    calls = [
        call for chunk in chunks for choice in chunk["choices"] for call in choice["delta"].get("tool_calls") or ()
    ]
    assert calls[0]["id"].startswith("toolu_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert {call["index"] for call in calls} == {0}
    assert json.loads("".join(call["function"]["arguments"] for call in calls)) == {"city": "Rome", "days": 42}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert sent(fake_upstream)["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }


async def test_a_request_it_cannot_translate_is_refused_before_any_upstream_call(adapter, fake_upstream):
    body = {"model": "fake-claude-haiku", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}

    with pytest.raises(ProviderBadRequestError) as caught:
        await adapter.complete(body)

    assert caught.value.param == "messages[0].content[0].type"
    assert caught.value.status_code == 400
    assert caught.value.provider == "fake-anthropic"
    assert fake_upstream.requests == []


# Failures ------------------------------------------------------------------------------------------

# The contract suite (test_adapter_contract.py) maps every fault; these are Anthropic's own details.


def assert_clean(error: ProviderError) -> None:
    assert error.provider == "fake-anthropic"
    assert error.__cause__ is None and error.__suppress_context__
    for text in (str(error), repr(error), error.message):
        assert API_KEY not in text


async def test_a_prompt_too_long_is_a_context_length_error(adapter):
    for call in (adapter.complete, lambda body: collect(adapter.stream(body))):
        with pytest.raises(ProviderContextLengthError) as caught:
            await call(user("hi [[fault=context]]"))
        assert "prompt is too long" in caught.value.message
        assert caught.value.code == "context_length_exceeded"
        assert_clean(caught.value)


async def test_a_stream_that_stalls_midway_is_interrupted(fake_upstream):
    adapter = AnthropicAdapter(make_config(fake_upstream, timeout=0.3))
    received = []
    try:
        with pytest.raises(ProviderStreamInterruptedError) as caught:
            async for chunk in adapter.stream(user("[[tps=1]] [[words=5]]")):
                received.append(chunk)
    finally:
        await adapter.aclose()

    assert received[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "in time" in caught.value.message


async def test_an_error_event_interrupts_the_stream(adapter):
    received = []
    with pytest.raises(ProviderStreamInterruptedError) as caught:
        async for chunk in adapter.stream(user("[[words=20]] [[fault=error-event]]")):
            received.append(chunk)

    assert streamed_text(received).split() == ["lorem", "ipsum"]
    assert "Overloaded" in caught.value.message
    assert caught.value.code == "upstream_overloaded"  # the event's overloaded_error, as its 529 before a stream
    assert_clean(caught.value)


# Cancellation --------------------------------------------------------------------------------------


async def test_closing_a_stream_closes_the_upstream_response_at_once(private_upstream):
    adapter = AnthropicAdapter(make_config(private_upstream))
    try:
        stream = adapter.stream(user("[[tps=5]] [[words=200]]"))
        await two_content_chunks(stream)
        assert open_connections_to(private_upstream.port) == 1
        await stream.aclose()

        assert await open_connections_once_closed(private_upstream.port) == 0
    finally:
        await adapter.aclose()


async def test_cancelling_the_consuming_task_closes_the_upstream_response(private_upstream):
    adapter = AnthropicAdapter(make_config(private_upstream))
    await assert_cancelling_the_consumer_closes_the_response(
        adapter, user("[[tps=5]] [[words=200]]"), private_upstream.port
    )


# Models and health ---------------------------------------------------------------------------------


async def test_list_models_and_health_check(adapter, fake_upstream):
    models = await adapter.list_models()

    claude = next(model for model in models if model.id == "fake-claude-sonnet")
    assert claude.display_name == "Fake Claude Sonnet"
    assert claude.context_window == 200_000
    assert fake_upstream.requests[-1]["path"] == "/v1/models"

    health = await adapter.health_check()
    assert health.ok and health.models_seen == len(models)


def claude(adapter: AnthropicAdapter, upstream_id: str = "fake-claude-haiku") -> ResolvedModel:
    return ResolvedModel(
        id=3,
        name="claude",
        upstream_id=upstream_id,
        provider=adapter.config,
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("15"),
        cached_input_per_mtok=None,
        context_window=200_000,
        max_output_tokens=None,
    )


async def test_a_messages_requests_input_tokens_are_counted_by_anthropic(adapter, fake_upstream):
    """Anthropic's token counting is asked with the model's upstream id and without the fields it does not take (the
    output limit, the stream, the sampling parameters, stop sequences, metadata: it refuses a field it does not know);
    what it answers is the count its message is billed at."""
    request = {"model": "claude", "system": "Be brief.", "messages": [{"role": "user", "content": "how warm is Lima"}]}
    generating = {"max_tokens": 50, "stream": True, "temperature": 1, "top_k": 5, "stop_sequences": ["END"]}

    counted = await adapter.messages_count({**request, **generating, "metadata": {"user_id": "u"}}, claude(adapter))
    billed = await adapter.messages({**request, "max_tokens": 50}, claude(adapter))

    assert counted == billed["usage"]["input_tokens"] == 12
    asked = fake_upstream.requests[-2]
    assert asked["path"] == "/v1/messages/count_tokens"
    assert asked["body"] == {**request, "model": "fake-claude-haiku"}


async def test_a_provider_that_cannot_count_is_its_error(adapter):
    with pytest.raises(ProviderError) as failed:
        await adapter.messages_count(user("x"), claude(adapter, "fault-503"))
    assert failed.value.upstream_status == 503
