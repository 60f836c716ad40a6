"""GeminiAdapter: the translation (pure functions) and what only Gemini does, over HTTP to the fake upstream's
Gemini routes through google-genai. The behaviour every adapter shares is in test_adapter_contract.py."""

from __future__ import annotations

import base64
import struct

import pytest

from llmhub.testing.fake_upstream import UpstreamSpec
from llmhub.testing.openapi import validate_openai_schema
from providers.adapters.gemini import GeminiAdapter
from providers.adapters.translate_gemini import StreamTranslator, completion_from_response, gemini_request
from providers.exceptions import ProviderAuthenticationError, ProviderBadRequestError, ProviderError
from providers.fields import Secret
from providers.types import ProviderConfig
from tests.providers.conftest import (
    assert_cancelling_the_consumer_closes_the_response,
    open_connections_once_closed,
    open_connections_to,
    two_content_chunks,
)

API_KEY = "AIza-gemini-adapter-test-key-0123456789"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def make_config(base_url: str, **overrides) -> ProviderConfig:
    values = {
        "id": 9301,
        "name": "fake-gemini",
        "kind": "gemini",
        "base_url": base_url,
        "api_key": Secret(API_KEY),
        "timeout": 5.0,
    }
    values.update(overrides)
    return ProviderConfig(**values)


@pytest.fixture
async def adapter(fake_upstream):
    adapter = GeminiAdapter(make_config(fake_upstream.base_url))
    yield adapter
    await adapter.aclose()


def chat(text: str, **extra) -> dict:
    return {"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": text}], **extra}


def last_body(upstream) -> dict:
    return upstream.requests[-1]["body"]


# Translation, as pure functions ---------------------------------------------------------------------


def test_system_messages_become_the_system_instruction_and_turns_alternate():
    request = gemini_request(
        {
            "model": "gemini-2.5-flash",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
                {"role": "user", "content": "And tomorrow?"},
            ],
            "max_tokens": 50,
            "temperature": 0.2,
            "stop": "END",
            "n": 2,
        }
    )

    assert request["model"] == "gemini-2.5-flash"
    config = request["config"]
    assert config["system_instruction"] == {"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]}
    assert config["max_output_tokens"] == 50
    assert config["temperature"] == 0.2
    assert config["stop_sequences"] == ["END"]
    assert config["candidate_count"] == 2
    assert request["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {"role": "model", "parts": [{"function_call": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        # The tool's answer and the next question are one user turn: Gemini wants the roles to alternate.
        {
            "role": "user",
            "parts": [
                {"function_response": {"name": "get_weather", "response": {"output": "18 degrees"}}},
                {"text": "And tomorrow?"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("none", {"mode": "NONE"}),
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowed_function_names": ["get_weather"]},
        ),
    ],
)
def test_tools_and_tool_choice(choice, expected):
    config = gemini_request({**chat("hi"), "tools": [WEATHER_TOOL], "tool_choice": choice})["config"]

    declaration = config["tools"][0]["function_declarations"][0]
    assert declaration["name"] == "get_weather"
    assert declaration["parameters_json_schema"] == WEATHER_TOOL["function"]["parameters"]
    assert config["tool_config"] == {"function_calling_config": expected}
    assert config["automatic_function_calling"] == {"disable": True}


def test_a_data_url_image_goes_inline_and_an_http_url_is_a_400():
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    request = gemini_request({"model": "m", "messages": [{"role": "user", "content": parts}]})

    inline = request["contents"][0]["parts"][1]["inline_data"]
    assert inline == {"mime_type": "image/png", "data": base64.b64decode(PNG)}

    remote = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    with pytest.raises(ProviderBadRequestError) as caught:
        gemini_request({"model": "m", "messages": [{"role": "user", "content": remote}]})
    assert caught.value.code == "image_url_not_supported"
    assert caught.value.status_code == 400


def test_a_tool_message_without_its_call_is_a_400():
    with pytest.raises(ProviderBadRequestError):
        gemini_request({"model": "m", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]})


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
    ],
)
def test_finish_reasons(reason, finish):
    response = {"response_id": "r1", "candidates": [{"content": {"parts": [{"text": "x"}]}, "finish_reason": reason}]}
    assert completion_from_response(response, "m")["choices"][0]["finish_reason"] == finish


def test_logprobs_are_asked_for_and_a_token_without_a_log_probability_is_certain():
    config = gemini_request(chat("hi", logprobs=True, top_logprobs=3))["config"]
    assert (config["response_logprobs"], config["logprobs"]) == (True, 3)
    assert "response_logprobs" not in gemini_request(chat("hi", logprobs=False))["config"]
    # Gemini's JSON leaves a zero out: a token chosen with certainty has no logProbability.
    chosen = [{"token": "Hi", "token_id": 7}, {"token": " there", "log_probability": -0.25}]
    response = {
        "response_id": "abc",
        "candidates": [
            {
                "index": 0,
                "content": {"role": "model", "parts": [{"text": "Hi there"}]},
                "finish_reason": "STOP",
                "logprobs_result": {"chosen_candidates": chosen},
            }
        ],
    }
    completion = completion_from_response(response, "gemini-2.5-flash")
    validate_openai_schema(completion, "CreateChatCompletionResponse")
    assert completion["choices"][0]["logprobs"]["content"] == [
        {"token": "Hi", "logprob": 0.0, "bytes": [72, 105], "top_logprobs": []},
        {"token": " there", "logprob": -0.25, "bytes": list(b" there"), "top_logprobs": []},
    ]


def test_usage_counts_cached_and_thought_tokens():
    response = {
        "response_id": "r1",
        "candidates": [{"content": {"parts": [{"text": "x"}]}, "finish_reason": "STOP"}],
        "usage_metadata": {
            "prompt_token_count": 10,
            "candidates_token_count": 4,
            "cached_content_token_count": 6,
            "thoughts_token_count": 3,
        },
    }
    usage = completion_from_response(response, "m")["usage"]
    assert usage == {
        "prompt_tokens": 10,
        "completion_tokens": 7,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 6},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }


def test_tool_call_ids_are_deterministic_and_a_stream_numbers_its_calls():
    response = {
        "response_id": "abc",
        "candidates": [
            {"content": {"parts": [{"function_call": {"name": "f", "args": {"a": 1}}}]}, "finish_reason": "STOP"}
        ],
    }
    first = completion_from_response(response, "m")["choices"][0]["message"]["tool_calls"]
    again = completion_from_response(response, "m")["choices"][0]["message"]["tool_calls"]
    assert first == again
    assert first[0]["id"] == "call_abc_0"

    translator = StreamTranslator("m")
    call = {"content": {"parts": [{"function_call": {"name": "f", "args": {}}}]}}
    one = translator.feed({"response_id": "abc", "candidates": [call]})
    two = translator.feed({"response_id": "abc", "candidates": [{**call, "finish_reason": "STOP"}]})
    assert one["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert two["choices"][0]["delta"]["tool_calls"][0]["index"] == 1
    assert two["choices"][0]["delta"]["tool_calls"][0]["id"] == "call_abc_1"
    assert two["choices"][0]["finish_reason"] == "tool_calls"


def test_a_stream_of_several_candidates_numbers_each_ones_calls_and_finishes_each_by_its_own():
    translator = StreamTranslator("m")
    call = {"content": {"parts": [{"function_call": {"name": "f", "args": {}}}]}}
    text = {"content": {"parts": [{"text": "hi"}]}}
    first = translator.feed({"response_id": "abc", "candidates": [{**call, "index": 0}, {**call, "index": 1}]})
    last = translator.feed(
        {
            "response_id": "abc",
            "candidates": [
                {**text, "index": 0, "finish_reason": "STOP"},
                {**text, "index": 1, "finish_reason": "STOP"},
            ],
        }
    )
    calls = [choice["delta"]["tool_calls"][0] for choice in first["choices"]]
    assert [call["index"] for call in calls] == [0, 0]
    assert calls[0]["id"] != calls[1]["id"]
    assert [choice["finish_reason"] for choice in last["choices"]] == ["tool_calls", "tool_calls"]

    mixed = StreamTranslator("m")
    mixed.feed({"response_id": "abc", "candidates": [{**call, "index": 0}, {**text, "index": 1}]})
    ends = mixed.feed(
        {
            "response_id": "abc",
            "candidates": [{"index": 0, "finish_reason": "STOP"}, {"index": 1, "finish_reason": "STOP"}],
        }
    )
    assert [choice["finish_reason"] for choice in ends["choices"]] == ["tool_calls", "stop"]


def test_a_stream_of_several_candidates_is_finished_only_once_every_one_has_finished():
    # Candidates of different lengths end in different chunks: a stream cut after the first one's finish has
    # not finished the others, and must end as interrupted rather than as a complete answer.
    translator = StreamTranslator("m")
    text = {"content": {"parts": [{"text": "hi"}]}}
    translator.feed({"response_id": "abc", "candidates": [{**text, "index": 0}, {**text, "index": 1}]})
    translator.feed({"response_id": "abc", "candidates": [{**text, "index": 0, "finish_reason": "STOP"}]})
    assert not translator.finished
    translator.feed({"response_id": "abc", "candidates": [{**text, "index": 1, "finish_reason": "MAX_TOKENS"}]})
    assert translator.finished


# Over HTTP ------------------------------------------------------------------------------------------


async def test_the_request_reaches_gemini_in_its_own_shape(adapter, fake_upstream):
    body = {
        "model": "gemini-2.5-flash",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            },
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": "none",
        "max_tokens": 40,
    }
    completion = await adapter.complete(body)

    validate_openai_schema(completion, "CreateChatCompletionResponse")
    assert completion["choices"][0]["message"]["content"] == "Echo: Look [image]"
    request = fake_upstream.requests[-1]
    assert request["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request["headers"]["x-goog-api-key"] != API_KEY  # masked in the log: it was sent
    sent = request["body"]
    assert sent["systemInstruction"]["parts"][0]["text"] == "Be brief."
    inline = sent["contents"][0]["parts"][1]["inlineData"]
    assert inline["data"] == PNG
    assert (inline.get("mimeType") or inline.get("mime_type")) == "image/png"
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}
    assert sent["generationConfig"]["maxOutputTokens"] == 40


async def test_a_tool_messages_text_parts_reach_gemini_joined_as_one_text(adapter, fake_upstream):
    """A tool message's text parts are one text, as OpenAI reads a message's parts and as the Cohere translation joins
    them: the function response Gemini was sent joined them with a space, so a result the client split mid-line (a
    CSV's row across two parts) reached the model with a space inside a word."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    parts = [{"type": "text", "text": "city,temp\nPar"}, {"type": "text", "text": "is,21\n"}]
    body = {
        "model": "gemini-2.5-flash",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": parts},
        ],
        "tools": [WEATHER_TOOL],
    }
    await adapter.complete(body)

    (part,) = last_body(fake_upstream)["contents"][-1]["parts"]
    response = part.get("functionResponse") or part["function_response"]
    assert response["name"] == "get_weather"
    assert response["response"] == {"output": "city,temp\nParis,21\n"}


async def test_a_safety_block_of_the_answer_is_content_filter(adapter):
    completion = await adapter.complete(chat("something [[safety=response]]"))
    validate_openai_schema(completion, "CreateChatCompletionResponse")
    assert completion["choices"][0]["finish_reason"] == "content_filter"
    assert completion["choices"][0]["message"]["content"] == ""

    chunks = [chunk async for chunk in adapter.stream(chat("something [[safety=response]]"))]
    assert chunks[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert chunks[-1]["usage"]["prompt_tokens"] > 0


async def test_a_blocked_prompt_is_content_filter_with_empty_content(adapter):
    completion = await adapter.complete(chat("something [[safety=prompt]]"))
    validate_openai_schema(completion, "CreateChatCompletionResponse")
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == ""
    assert completion["usage"]["completion_tokens"] == 0

    chunks = [chunk async for chunk in adapter.stream(chat("something [[safety=prompt]]"))]
    assert chunks[0]["choices"][0]["finish_reason"] == "content_filter"


async def test_max_tokens_is_length(adapter):
    completion = await adapter.complete(chat("[[words=10]]", max_completion_tokens=3))
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 3


async def test_embeddings_dimensions_and_base64(adapter, fake_upstream):
    floats = await adapter.embed({"model": "gemini-embedding-001", "input": "one two", "dimensions": 8})
    assert len(floats["data"][0]["embedding"]) == 8
    assert fake_upstream.requests[-1]["path"] == "/v1beta/models/gemini-embedding-001:batchEmbedContents"

    packed = await adapter.embed(
        {"model": "gemini-embedding-001", "input": "one two", "dimensions": 8, "encoding_format": "base64"}
    )
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"]))
    assert list(decoded) == pytest.approx(floats["data"][0]["embedding"], rel=1e-6)

    with pytest.raises(ProviderBadRequestError):
        await adapter.embed({"model": "gemini-embedding-001", "input": [[1, 2, 3]]})


async def test_list_models_drops_the_models_prefix(adapter):
    ids = {model.id for model in await adapter.list_models()}
    assert "fake-gemini-embedding" in ids
    assert not any(model_id.startswith("models/") for model_id in ids)


async def test_the_sdk_connects_only_through_the_outbound_policy(settings):
    """google-genai would open its own (unguarded) aiohttp session; the adapter gives it our guarded client,
    so a provider URL pointing at the cloud metadata address is refused before any connection."""
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True  # even then: link-local is never allowed
    adapter = GeminiAdapter(make_config("http://169.254.169.254"))
    try:
        for call in (adapter.complete, lambda body: _drain(adapter.stream(body))):
            with pytest.raises(ProviderError) as caught:
                await call(chat("hi"))
            assert caught.value.code == "upstream_destination_refused"
        with pytest.raises(ProviderError) as caught:
            await adapter.list_models()
        assert caught.value.code == "upstream_destination_refused"
    finally:
        await adapter.aclose()


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def test_closing_a_stream_closes_the_upstream_response_at_once(private_upstream):
    adapter = GeminiAdapter(make_config(private_upstream.base_url))
    try:
        stream = adapter.stream(chat("[[tps=5]] [[words=200]]"))
        await two_content_chunks(stream)
        assert open_connections_to(private_upstream.port) == 1
        await stream.aclose()

        assert await open_connections_once_closed(private_upstream.port) == 0
    finally:
        await adapter.aclose()


async def test_cancelling_the_consuming_task_closes_the_upstream_response(private_upstream):
    adapter = GeminiAdapter(make_config(private_upstream.base_url))
    await assert_cancelling_the_consumer_closes_the_response(
        adapter, chat("[[tps=5]] [[words=200]]"), private_upstream.port
    )


async def test_a_key_google_does_not_know_is_a_refused_key_not_a_bad_request(fake_upstreams):
    """Google answers an unknown API key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID: the same refusal
    as another provider's 401, so that a user's own key is marked invalid and a provider's key is the admin's
    502, not the client's "bad request"."""
    upstream = fake_upstreams(UpstreamSpec(name="google", api_key="AIza-the-only-key-google-knows-0000"))["google"]
    adapter = GeminiAdapter(make_config(upstream.base_url, api_key=Secret("AIza-a-revoked-key-0000000000000")))
    try:
        with pytest.raises(ProviderAuthenticationError) as refused:
            await adapter.complete(chat("hi"))
        with pytest.raises(ProviderAuthenticationError):
            await adapter.list_models()
    finally:
        await adapter.aclose()

    assert refused.value.upstream_status == 401
    assert "AIza-a-revoked" not in str(refused.value)


def test_no_parallel_tool_calls_keeps_the_first_call_of_each_choice():
    """Gemini cannot be told to call one tool a turn, and often asks for several at once; a client that sent
    ``parallel_tool_calls: false`` runs one call a turn and would be handed more. The answer keeps each
    choice's first call, streamed or not; without the flag every call is kept."""
    two_calls = {
        "content": {
            "parts": [
                {"function_call": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"function_call": {"name": "get_weather", "args": {"city": "Oslo"}}},
            ]
        },
        "finish_reason": "STOP",
    }
    response = {"response_id": "abc", "candidates": [two_calls, {**two_calls, "index": 1}]}
    limited = completion_from_response(response, "m", max_calls=1)
    validate_openai_schema(limited, "CreateChatCompletionResponse")
    for choice in limited["choices"]:
        assert [call["function"]["arguments"] for call in choice["message"]["tool_calls"]] == ['{"city": "Paris"}']
        assert choice["finish_reason"] == "tool_calls"
    assert len(completion_from_response(response, "m")["choices"][0]["message"]["tool_calls"]) == 2

    translator = StreamTranslator("m", max_calls=1)
    first_part = {"content": {"parts": two_calls["content"]["parts"][:1]}}
    second_part = {"content": {"parts": two_calls["content"]["parts"][1:]}, "finish_reason": "STOP"}
    one = translator.feed({"response_id": "abc", "candidates": [first_part]})
    two = translator.feed({"response_id": "abc", "candidates": [second_part]})
    assert [call["index"] for call in one["choices"][0]["delta"]["tool_calls"]] == [0]
    assert "tool_calls" not in two["choices"][0]["delta"]
    assert two["choices"][0]["finish_reason"] == "tool_calls"
    assert translator.finished


@pytest.mark.parametrize(("flag", "expected"), [(False, 1), (True, None), (None, None)])
def test_max_tool_calls_reads_the_clients_flag(flag, expected):
    from providers.adapters.common import max_tool_calls

    body = chat("hi") if flag is None else chat("hi", parallel_tool_calls=flag)
    assert max_tool_calls(body) == expected


async def test_a_logit_bias_gemini_cannot_apply_is_a_400_before_any_call(adapter, fake_upstream):
    before = len(fake_upstream.requests)
    with pytest.raises(ProviderBadRequestError) as refused:
        await adapter.complete(chat("hi", logit_bias={"50256": -100}))
    assert refused.value.param == "logit_bias"
    with pytest.raises(ProviderBadRequestError):
        await anext(aiter(adapter.stream(chat("hi", logit_bias={"50256": -100}))))
    assert len(fake_upstream.requests) == before
    completion = await adapter.complete(chat("hi", logit_bias={}))  # nothing to apply: nothing refused
    assert completion["choices"][0]["message"]["content"]
