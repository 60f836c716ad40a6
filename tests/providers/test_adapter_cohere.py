"""CohereAdapter: its translation (pure functions) and what it sends and reads over HTTP through the cohere
SDK; the behaviour every adapter shares is in ``test_adapter_contract.py``."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import httpx
import pytest

from providers import outbound
from providers.adapters import cohere as cohere_adapter
from providers.adapters.cohere import (
    CohereAdapter,
    StreamTranslator,
    cohere_request,
    completion_from_cohere,
    embeddings_from_cohere,
)
from providers.exceptions import ProviderBadRequestError, ProviderError
from providers.fields import Secret
from providers.types import ProviderConfig
from tests.providers.test_outbound import REDIRECTOR_HOST, ControlledResolver, Redirector

API_KEY = "co-adapter-test-key-0123456789abcdef"
MODEL = "command-a-03-2025"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PNG_URL = "data:image/png;base64,iVBORw0KGgo="


def make_config(base_url: str, **overrides) -> ProviderConfig:
    values = {
        "id": 9301,
        "name": "fake-cohere",
        "kind": "cohere",
        "base_url": base_url,
        "api_key": Secret(API_KEY),
        "timeout": 5.0,
    }
    values.update(overrides)
    return ProviderConfig(**values)


@pytest.fixture
async def adapter(fake_upstream):
    adapter = CohereAdapter(make_config(fake_upstream.base_url + "/cohere"))
    yield adapter
    await adapter.aclose()


# Translation: OpenAI chat → Cohere v2 ------------------------------------------------------------------


def test_a_conversation_with_tools_images_and_sampling_translates_to_v2():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    request = cohere_request(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Weather here?"},
                        {"type": "image_url", "image_url": {"url": PNG_URL}},
                    ],
                },
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
            ],
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
            "temperature": 0.2,
            "top_p": 0.9,
            "max_completion_tokens": 50,
            "stop": "END",
            "seed": 7,
        }
    )

    assert request["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": PNG_URL}},
            ],
        },
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    assert request["tools"] == [WEATHER_TOOL]
    assert request["tool_choice"] == "REQUIRED"
    assert (request["temperature"], request["p"], request["max_tokens"], request["seed"]) == (0.2, 0.9, 50, 7)
    assert request["stop_sequences"] == ["END"]


def test_tool_choice_none_and_a_named_tool():
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL, other]}

    assert cohere_request({**body, "tool_choice": "none"})["tool_choice"] == "NONE"
    assert "tool_choice" not in cohere_request({**body, "tool_choice": "auto"})
    # Cohere cannot name the tool: only the named one is offered, and a call is required.
    named = cohere_request({**body, "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert [tool["function"]["name"] for tool in named["tools"]] == ["get_time"]
    assert named["tool_choice"] == "REQUIRED"


def test_an_assistant_turns_reasoning_goes_back_as_cohere_s_thinking_content():
    """A reasoning model's thinking is the reply's ``reasoning_content``: sent back with its assistant turn, it was
    dropped, so the model answered a later turn (a tool round's result) without what it had thought. Cohere's
    assistant message takes ``thinking`` content items, before its text (the SDK's
    ``ThinkingAssistantMessageV2ContentOneItem``); a turn without reasoning goes as before, its text a string."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    request = cohere_request(
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "why?"},
                {"role": "assistant", "content": "because", "reasoning_content": "first I weigh it"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "reasoning_content": "I must look", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
                {"role": "assistant", "content": "Mild.", "reasoning_content": ""},
            ],
        }
    )

    assert request["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "thinking", "thinking": "first I weigh it"}, {"type": "text", "text": "because"}],
    }
    assert request["messages"][3] == {
        "role": "assistant",
        "content": [{"type": "thinking", "thinking": "I must look"}],
        "tool_calls": [call],
    }
    assert request["messages"][5] == {"role": "assistant", "content": "Mild."}


def test_a_content_part_cohere_cannot_take_is_a_bad_request():
    with pytest.raises(ProviderBadRequestError):
        cohere_request({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": PNG_URL}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ],
    ids=["image", "audio"],
)
def test_a_tool_messages_part_that_is_not_text_is_refused_naming_it_not_dropped(part):
    """Cohere's tool message takes text or document items (its ToolContent), no image: the translation kept the
    text parts alone, and the model answered as if the tool had shown nothing. A part of another type is refused
    naming it, as Gemini's is (``common.text_parts_only``)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Weather here?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "see the map"}, part]},
    ]
    with pytest.raises(ProviderBadRequestError) as caught:
        cohere_request({"model": MODEL, "messages": messages, "tools": [WEATHER_TOOL]})
    assert caught.value.param == "messages[2].content[1].type"
    assert repr(part["type"]) in str(caught.value)


# Translation: Cohere v2 → OpenAI chat ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cohere", "openai"),
    [
        ("COMPLETE", "stop"),
        ("STOP_SEQUENCE", "stop"),
        ("MAX_TOKENS", "length"),
        ("TOOL_CALL", "tool_calls"),
        ("ERROR_TOXIC", "content_filter"),
    ],
)
def test_finish_reasons(cohere, openai):
    completion = completion_from_cohere(
        {
            "id": "r",
            "finish_reason": cohere,
            "message": {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
        },
        model=MODEL,
    )
    assert completion["choices"][0]["finish_reason"] == openai


def test_usage_prefers_billed_units_and_keeps_cached_tokens():
    usage = {
        "billed_units": {"input_tokens": 10, "output_tokens": 4},
        "tokens": {"input_tokens": 210, "output_tokens": 4},
        "cached_tokens": 6,
    }
    completion = completion_from_cohere(
        {"id": "r", "finish_reason": "COMPLETE", "message": {"content": []}, "usage": usage}, model=MODEL
    )

    assert completion["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 6},
    }


def test_stream_events_with_a_tool_call_become_chunks():
    translator = StreamTranslator(model=MODEL)
    call = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    events = [
        {"type": "message-start", "id": "msg_1", "delta": {"message": {"role": "assistant"}}},
        {"type": "tool-plan-delta", "delta": {"message": {"tool_plan": "I will look it up."}}},
        {"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": call}}},
        {
            "type": "tool-call-delta",
            "index": 0,
            "delta": {"message": {"tool_calls": {"function": {"arguments": '{"city":'}}}},
        },
        {
            "type": "tool-call-delta",
            "index": 0,
            "delta": {"message": {"tool_calls": {"function": {"arguments": '"Oslo"}'}}}},
        },
        {"type": "tool-call-end", "index": 0},
        {
            "type": "message-end",
            "delta": {"finish_reason": "TOOL_CALL", "usage": {"billed_units": {"input_tokens": 5, "output_tokens": 3}}},
        },
    ]

    chunks = [chunk for event in events for chunk in translator.feed(event)]

    assert translator.complete and not translator.failed
    assert {chunk["id"] for chunk in chunks} == {"msg_1"}
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    calls = [call for delta in deltas for call in delta.get("tool_calls", ())]
    assert calls[0]["id"] == "call_9" and calls[0]["function"]["name"] == "get_weather"
    assert {call["index"] for call in calls} == {0}
    assert json.loads("".join(call["function"]["arguments"] for call in calls)) == {"city": "Oslo"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8


def test_a_message_end_with_error_fails_the_stream():
    translator = StreamTranslator(model=MODEL)
    translator.feed({"type": "message-start", "id": "m"})
    assert translator.feed({"type": "message-end", "delta": {"finish_reason": "ERROR"}}) == []
    assert translator.failed and not translator.complete


def test_embeddings_as_floats_or_base64():
    response = {"embeddings": {"float": [[0.5, -1.0]]}, "meta": {"billed_units": {"input_tokens": 3}}}

    floats = embeddings_from_cohere([response], model="embed-v4.0", encoding=None)
    encoded = embeddings_from_cohere([response], model="embed-v4.0", encoding="base64")

    assert floats["data"][0]["embedding"] == [0.5, -1.0]
    assert struct.unpack("<2f", base64.b64decode(encoded["data"][0]["embedding"])) == (0.5, -1.0)
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


# Over HTTP through the SDK ---------------------------------------------------------------------------


async def test_the_sdk_posts_v2_chat_with_the_bearer_key_and_no_retries(adapter, fake_upstream):
    completion = await adapter.complete(
        {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20, "top_p": 0.5}
    )

    assert completion["choices"][0]["message"]["content"] == "Echo: hello"
    sent = fake_upstream.requests[-1]
    assert sent["path"] == "/cohere/v2/chat"
    assert sent["headers"]["authorization"]  # the fake logs it masked
    assert sent["body"]["max_tokens"] == 20 and sent["body"]["p"] == 0.5
    with pytest.raises(ProviderError):
        await adapter.complete({"model": MODEL, "messages": [{"role": "user", "content": "[[fault=503]]"}]})
    assert fake_upstream.stats["by_path"]["/cohere/v2/chat"] == 2  # the 503 was asked once


async def test_max_tokens_and_stop_sequences_end_the_reply(adapter):
    cut = await adapter.complete(
        {"model": MODEL, "messages": [{"role": "user", "content": "[[words=9]]"}], "max_tokens": 3}
    )
    stopped = await adapter.complete(
        {"model": MODEL, "messages": [{"role": "user", "content": "[[reply=one two END three]]"}], "stop": ["END"]}
    )

    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["choices"][0]["message"]["content"].split() == ["lorem", "ipsum", "dolor"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"].strip() == "one two"


async def test_embeddings_go_to_v2_embed_as_search_documents(adapter, fake_upstream):
    floats = await adapter.embed({"model": "embed-v4.0", "input": "one two three"})
    encoded = await adapter.embed({"model": "embed-v4.0", "input": "one two three", "encoding_format": "base64"})

    sent = fake_upstream.requests[-1]
    assert sent["path"] == "/cohere/v2/embed"
    assert sent["body"]["input_type"] == "search_document" and sent["body"]["embedding_types"] == ["float"]
    vector = floats["data"][0]["embedding"]
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(vector)}f", raw)) == pytest.approx(vector)
    assert floats["usage"]["prompt_tokens"] == 3


async def test_token_arrays_are_refused_before_any_request(adapter, fake_upstream):
    with pytest.raises(ProviderBadRequestError) as caught:
        await adapter.embed({"model": "embed-v4.0", "input": [[1, 2, 3]]})
    assert caught.value.param == "input"
    assert fake_upstream.stats["requests"] == 0


# The outbound policy holds for the SDK's plain httpx client -----------------------------------------------


@pytest.fixture
def production_rules(settings, monkeypatch) -> ControlledResolver:
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = False
    settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = [f"{REDIRECTOR_HOST}/32"]
    resolver = ControlledResolver({"rebind.test": [["127.0.0.1"]]})
    monkeypatch.setattr(outbound, "resolver", resolver)
    return resolver


@pytest.fixture(scope="module")
def redirector(fake_upstream_server) -> Iterator[Redirector]:
    server = Redirector(fake_upstream_server.base_url).start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "169.254.169.254", "[::ffff:127.0.0.1]", "rebind.test", "metadata.google.internal"]
)
async def test_private_and_metadata_destinations_are_refused(host, production_rules, fake_upstream):
    adapter = CohereAdapter(make_config(f"http://{host}:{fake_upstream.port}/cohere"))
    try:
        for call in (
            adapter.complete({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            adapter.list_models(),
            adapter.embed({"model": "embed-v4.0", "input": "hi"}),
        ):
            with pytest.raises(ProviderError) as caught:
                await call
            assert caught.value.code == "upstream_destination_refused"
    finally:
        await adapter.aclose()
    assert fake_upstream.stats["requests"] == 0


async def test_a_redirect_off_the_origin_is_not_followed(production_rules, redirector, fake_upstream):
    adapter = CohereAdapter(make_config(f"{redirector.url}/cross/307/cohere"))
    try:
        with pytest.raises(ProviderError) as caught:
            await adapter.list_models()
    finally:
        await adapter.aclose()

    assert caught.value.code == "upstream_destination_refused"
    assert "another origin" in caught.value.message
    assert redirector.hits
    assert fake_upstream.stats["requests"] == 0


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (httpx.DecodingError("corrupt gzip"), "the provider sent a malformed body (not the encoding it declared)."),
        (httpx.ReadTimeout("timed out"), "no data arrived in time."),
        (httpx.RemoteProtocolError("peer closed"), "the connection closed before the response was complete."),
        (ValueError("not JSON"), "the provider sent a malformed event."),
        (RuntimeError("anything else"), "the provider reported an error."),
    ],
)
def test_a_broken_stream_says_why_in_words_of_its_own(failure, reason):
    """Why a Cohere stream broke, for each failure its reader meets (plain httpx's, which the SDK sends through, not
    httpx2's; an event that is not Cohere's): never the exception's own text, which may quote the request."""
    assert cohere_adapter._interruption_reason(failure) == reason
