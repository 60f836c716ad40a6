"""The fake upstream against the real OpenAI and Anthropic SDKs (and raw HTTP where the SDKs hide details)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPException
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import jsonschema
import openai
import pytest

from llmhub.testing.fake_upstream import (
    FakeUpstream,
    FakeUpstreams,
    UpstreamSpec,
    parse_upstream,
    raw_directive,
    split_tokens,
)
from llmhub.testing.openapi import validate_openai_schema
from tests.conftest import process_stop
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]

WEATHER_TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": WEATHER_TOOL_OPENAI["function"]["parameters"],
}


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> FakeUpstream:
    upstream_server.reset()
    return upstream_server


@pytest.fixture
def oai(upstream: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=upstream.base_url + "/v1", api_key="sk-test-1234", max_retries=0, timeout=5)


@pytest.fixture
def ant(upstream: FakeUpstream) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=upstream.base_url, api_key="sk-ant-test-5678", max_retries=0, timeout=5)


def http(
    upstream: FakeUpstream, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(upstream.base_url + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def openai_sse(raw: bytes) -> list[Any]:
    """`data:` payloads in order; the terminal `[DONE]` is kept as the string."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def anthropic_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: "), block
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == event_line[len("event: ") :]
        events.append((data["type"], data))
    return events


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------------------------
# OpenAI


def test_openai_non_stream_matches_schema_and_counts_tokens(upstream: FakeUpstream, oai: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there world"}]
    status, headers, raw = http(
        upstream, "POST", "/v1/chat/completions", {"model": "fake-gpt-4o", "messages": messages}
    )
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    body = json.loads(raw)
    validate_openai_schema(body, "CreateChatCompletionResponse")
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Echo: hello there world",
        "refusal": None,
        "annotations": [],
    }
    # (3 + 2) for the system message, (3 + 3) for the user message; the reply has 4 words.
    assert body["usage"]["prompt_tokens"] == 11
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == 15
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0

    completion = oai.chat.completions.create(model="fake-gpt-4o-mini", messages=messages, n=3)
    assert completion.model == "fake-gpt-4o-mini"
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert {choice.message.content for choice in completion.choices} == {"Echo: hello there world"}
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 12


@pytest.mark.parametrize(
    "model", ["gpt-4o-search-preview", "gpt-4o-mini-search-preview-2025-03-11", "gpt-5-search-api"]
)
def test_an_openai_search_model_cites_what_it_found_unasked(oai: openai.OpenAI, model: str) -> None:
    """OpenAI's search models search before every answer, ``web_search_options`` or not: the fake answers one named so
    citing its source, as it answers ``web_search_options``; another model asked nothing cites nothing."""
    completion = oai.chat.completions.create(model=model, messages=user("[[reply=sunny today]]"))
    annotation = completion.choices[0].message.annotations[0]
    assert (annotation.type, annotation.url_citation.url) == ("url_citation", "https://search.example/1")
    assert annotation.url_citation.end_index == len("sunny today")
    assert not oai.chat.completions.create(model="fake-gpt-4o", messages=user("hi")).choices[0].message.annotations


def stream_body(content: str) -> dict:
    """A streamed chat completion's request for ``content``, usage asked for."""
    return {
        "model": "fake-gpt-4o",
        "messages": user(content),
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_openai_stream_chunks_match_schema(upstream: FakeUpstream) -> None:
    body = stream_body("one two three")
    status, headers, raw = http(upstream, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = openai_sse(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:5]] == ["Echo:", " one", " two", " three"]
    assert chunks[5]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 6 and chunks[-1]["usage"]["completion_tokens"] == 4

    # Without include_usage the key is absent altogether, as with the real API.
    _, _, raw = http(upstream, "POST", "/v1/chat/completions", {**body, "stream_options": None})
    chunks = openai_sse(raw)[:-1]
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_stream_obfuscation_pads_every_chunk_on_request(upstream: FakeUpstream) -> None:
    body = stream_body("one two three four five six [[obfuscation=on]]")
    _, _, raw = http(upstream, "POST", "/v1/chat/completions", body)
    chunks = openai_sse(raw)[:-1]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
        assert list(chunk)[-1] == "obfuscation"  # last, as OpenAI sends it
        assert re.fullmatch(r"[A-Za-z0-9]{1,16}", chunk["obfuscation"])
    assert len({chunk["obfuscation"] for chunk in chunks}) > 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == (
        "Echo: one two three four five six"
    )

    # Off unless asked for, and off again when the client says include_obfuscation: false, as OpenAI's is.
    turned_off = {**body, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    for request in (turned_off, {**body, "messages": user("one two three")}):
        _, _, raw = http(upstream, "POST", "/v1/chat/completions", request)
        chunks = openai_sse(raw)[:-1]
        assert chunks and all("obfuscation" not in chunk for chunk in chunks)


def test_an_upstream_started_with_obfuscation_pads_every_stream_unless_told_otherwise() -> None:
    """``--obfuscation``: every stream padded, as OpenAI's own are; ``[[obfuscation=off]]`` or the client's
    ``include_obfuscation: false`` turn it off."""
    spec = parse_upstream("padded=0", UpstreamSpec(obfuscation=True))
    body = {"model": "fake-gpt-4o", "messages": user("one two three"), "stream": True}
    with FakeUpstreams([spec]) as upstreams:
        padded = upstreams["padded"]

        def chunks(request: dict[str, Any]) -> list[dict[str, Any]]:
            status, _, raw = http(padded, "POST", "/v1/chat/completions", request)
            assert status == 200
            return openai_sse(raw)[:-1]

        assert all(isinstance(chunk["obfuscation"], str) for chunk in chunks(body))
        for off in (
            {**body, "messages": user("one two three [[obfuscation=off]]")},
            {**body, "stream_options": {"include_obfuscation": False}},
        ):
            assert all("obfuscation" not in chunk for chunk in chunks(off))


def test_openai_sdk_stream_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="fake-gpt-4o",
        messages=user("stream me please"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "Echo: stream me please"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6 + 4


async def test_async_openai_stream(upstream: FakeUpstream) -> None:
    client = openai.AsyncOpenAI(base_url=upstream.base_url + "/v1", api_key="k", max_retries=0, timeout=5)
    async with client:
        stream = await client.chat.completions.create(model="fake-gpt-4o", messages=user("async hi"), stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
        completion = await client.chat.completions.create(model="fake-gpt-4o", messages=user("async hi"))
    assert "".join(piece or "" for piece in pieces) == "Echo: async hi"
    assert completion.choices[0].message.content == "Echo: async hi"


def test_openai_tool_call_round_trip(upstream: FakeUpstream, oai: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = user("Paris")
    completion = oai.chat.completions.create(model="fake-gpt-4o", messages=messages, tools=[WEATHER_TOOL_OPENAI])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 42, "metric": True, "unit": "celsius"}

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    follow_up = oai.chat.completions.create(model="fake-gpt-4o", messages=messages, tools=[WEATHER_TOOL_OPENAI])
    assert follow_up.choices[0].finish_reason == "stop"
    assert follow_up.choices[0].message.content == "Tool result: sunny, 21C"

    # tool_choice "none" suppresses the call.
    plain = oai.chat.completions.create(
        model="fake-gpt-4o", messages=user("Paris"), tools=[WEATHER_TOOL_OPENAI], tool_choice="none"
    )
    assert plain.choices[0].message.content == "Echo: Paris"


def test_openai_streamed_tool_call(upstream: FakeUpstream, oai: openai.OpenAI) -> None:
    body = {"model": "fake-gpt-4o", "messages": user("Rome"), "tools": [WEATHER_TOOL_OPENAI], "stream": True}
    _, _, raw = http(upstream, "POST", "/v1/chat/completions", body)
    chunks = openai_sse(raw)[:-1]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for chunk in chunks[1:-1]]
    assert 2 <= len(fragments) <= 3
    assert json.loads("".join(fragments))["city"] == "Rome"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    with oai.chat.completions.stream(model="fake-gpt-4o", messages=user("Rome"), tools=[WEATHER_TOOL_OPENAI]) as stream:
        final = stream.get_final_completion()
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments)["city"] == "Rome"


def test_openai_legacy_functions_are_answered_with_a_function_call(upstream: FakeUpstream, oai: openai.OpenAI) -> None:
    functions = [WEATHER_TOOL_OPENAI["function"], {"name": "get_time", "parameters": {"type": "object"}}]
    completion = oai.chat.completions.create(model="fake-gpt-4o", messages=user("Paris"), functions=functions)
    choice = completion.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments)["city"] == "Paris"

    named = oai.chat.completions.create(
        model="fake-gpt-4o", messages=user("Paris"), functions=functions, function_call={"name": "get_time"}
    )
    assert named.choices[0].message.function_call.name == "get_time"
    plain = oai.chat.completions.create(
        model="fake-gpt-4o", messages=user("Paris"), functions=functions, function_call="none"
    )
    assert plain.choices[0].message.content == "Echo: Paris" and plain.choices[0].message.function_call is None

    body = {"model": "fake-gpt-4o", "messages": user("Rome"), "functions": functions, "stream": True}
    _, _, raw = http(upstream, "POST", "/v1/chat/completions", body)
    chunks = openai_sse(raw)[:-1]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"]["function_call"] == {"name": "get_weather", "arguments": ""}
    fragments = [chunk["choices"][0]["delta"]["function_call"]["arguments"] for chunk in chunks[1:-1]]
    assert len(fragments) >= 2 and json.loads("".join(fragments))["city"] == "Rome"
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_openai_reasoning_marker(upstream: FakeUpstream, field: str) -> None:
    """``[[reasoning=TEXT]]`` answers that reasoning before the reply, in ``reasoning_content`` (DeepSeek, vLLM) or,
    with ``[[reasoning_field=reasoning]]``, in ``reasoning`` (OpenRouter, Ollama); billed as output."""
    marker = "[[reasoning=let me think it over]]" + (" [[reasoning_field=reasoning]]" if field == "reasoning" else "")
    body = {"model": "fake-gpt-4o", "messages": user(f"{marker} hi")}
    _, _, raw = http(upstream, "POST", "/v1/chat/completions", body)
    completion = json.loads(raw)
    validate_openai_schema(completion, "CreateChatCompletionResponse")
    message = completion["choices"][0]["message"]
    assert message[field] == "let me think it over" and message["content"] == "Echo: hi"
    assert completion["usage"]["completion_tokens"] == 5 + 2
    assert completion["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5

    _, _, raw = http(upstream, "POST", "/v1/chat/completions", {**body, "stream": True, "n": 2})
    chunks = openai_sse(raw)[:-1]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    for index in (0, 1):
        deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"][0]["index"] == index]
        thought = [delta[field] for delta in deltas if field in delta]
        assert len(thought) > 1 and "".join(thought) == "let me think it over"
        texts = [delta["content"] for delta in deltas if delta.get("content")]
        assert "".join(texts) == "Echo: hi"
        assert deltas.index({field: thought[-1]}) < deltas.index({"content": texts[0]}), "reasoning first"


def test_mistral_spells_reasoning_as_thinking_chunks(upstream: FakeUpstream) -> None:
    """Under /mistral, ``[[reasoning=TEXT]]`` is written as Mistral's reasoning models write it: content chunks."""
    body = {"model": "magistral-small-latest", "messages": user("[[reasoning=let me think]] hi")}
    _, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", body)
    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "let me think"}]}
    assert json.loads(raw)["choices"][0]["message"]["content"] == [thinking, {"type": "text", "text": "Echo: hi"}]

    _, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", {**body, "stream": True})
    contents = [chunk["choices"][0]["delta"].get("content") for chunk in openai_sse(raw)[:-1] if chunk["choices"]]
    chunks = [part for content in contents if isinstance(content, list) for part in content]
    thought = "".join(part["thinking"][0]["text"] for part in chunks if part["type"] == "thinking")
    assert thought == "let me think"
    assert "".join(part["text"] for part in chunks if part["type"] == "text") == "Echo: hi"


def test_raw_marker_answers_exactly_the_bytes_given(upstream: FakeUpstream) -> None:
    """``[[raw=...]]`` sends what a test gives it, however odd: a stream's body, or a whole reply's."""
    body_bytes = b'event: odd\ndata: {"choices": null}\n\ndata: \xff\n\n'
    body = {"model": "fake-gpt-4o-mini", "messages": user("hi " + raw_directive(body_bytes)), "stream": True}
    status, headers, raw = http(upstream, "POST", "/v1/chat/completions", body)
    assert (status, headers["Content-Type"].split(";")[0], raw) == (200, "text/event-stream", body_bytes)

    body = {"model": "fake-gpt-4o-mini", "messages": user(raw_directive(b"[1, 2]"))}
    status, headers, raw = http(upstream, "POST", "/v1/chat/completions", body)
    assert (status, headers["Content-Type"].split(";")[0], raw) == (200, "application/json", b"[1, 2]")


def test_openai_preamble_marker_puts_text_before_a_call(upstream: FakeUpstream, oai: openai.OpenAI) -> None:
    """``[[preamble=TEXT]]`` is the text a model writes before its tool or legacy function call."""
    prompt = user("[[preamble=Let me look.]] Paris")
    functions = [WEATHER_TOOL_OPENAI["function"]]
    completion = oai.chat.completions.create(model="fake-gpt-4o", messages=prompt, functions=functions)
    message = completion.choices[0].message
    assert message.content == "Let me look." and message.function_call.name == "get_weather"
    assert completion.usage.completion_tokens == 3 + len(f"get_weather {message.function_call.arguments}".split())
    called = oai.chat.completions.create(model="fake-gpt-4o", messages=prompt, tools=[WEATHER_TOOL_OPENAI])
    assert called.choices[0].message.content == "Let me look." and called.choices[0].message.tool_calls
    plain = oai.chat.completions.create(model="fake-gpt-4o", messages=prompt)
    assert plain.choices[0].message.content == "Echo: Paris", "no call: the marker does nothing"

    for request in ({"functions": functions}, {"tools": [WEATHER_TOOL_OPENAI]}):
        _, _, raw = http(
            upstream, "POST", "/v1/chat/completions", {"model": "m", "messages": prompt, "stream": True, **request}
        )
        chunks = openai_sse(raw)[:-1]
        for chunk in chunks:
            validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
        deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
        assert deltas[0] == {"role": "assistant", "content": "", "refusal": None}
        assert "".join(delta.get("content") or "" for delta in deltas) == "Let me look."
        opening = next(i for i, delta in enumerate(deltas) if delta.get("function_call") or delta.get("tool_calls"))
        assert not any(delta.get("content") for delta in deltas[opening:]), "the text, then the call"
    with oai.chat.completions.stream(model="fake-gpt-4o", messages=prompt, tools=[WEATHER_TOOL_OPENAI]) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Let me look."
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments)["city"] == "Paris"

    # Given the start of it as a prefill, the model goes on: the rest of the preamble, then the call.
    continued = [*prompt, {"role": "assistant", "content": "Let me"}]
    answer = oai.chat.completions.create(model="fake-gpt-4o", messages=continued, functions=functions)
    assert answer.choices[0].message.content == " look." and answer.choices[0].message.function_call.name
    other = oai.chat.completions.create(
        model="fake-gpt-4o", messages=[*prompt, {"role": "assistant", "content": "No"}], functions=functions
    )
    assert other.choices[0].message.content == "Echo: Paris", "a prefill that is not the preamble: no call"


def test_openai_logprobs(upstream: FakeUpstream) -> None:
    body = {"model": "fake-gpt-4o", "messages": user("log me"), "logprobs": True, "top_logprobs": 2}
    _, _, raw = http(upstream, "POST", "/v1/chat/completions", body)
    completion = json.loads(raw)
    validate_openai_schema(completion, "CreateChatCompletionResponse")
    entries = completion["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in entries] == ["Echo:", " log", " me"]
    assert entries[1]["bytes"] == list(b" log") and len(entries[1]["top_logprobs"]) == 2
    assert completion["choices"][0]["logprobs"]["refusal"] is None

    _, _, raw_again = http(upstream, "POST", "/v1/chat/completions", body)
    assert json.loads(raw_again)["choices"][0]["logprobs"] == completion["choices"][0]["logprobs"]

    _, _, raw = http(upstream, "POST", "/v1/chat/completions", {**body, "stream": True})
    chunks = openai_sse(raw)[:-1]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    streamed = [chunk["choices"][0]["logprobs"]["content"][0] for chunk in chunks[1:-1]]
    assert streamed == entries


def test_openai_max_tokens_stop_and_images(oai: openai.OpenAI) -> None:
    truncated = oai.chat.completions.create(model="fake-gpt-4o", messages=user("a b c d e f"), max_completion_tokens=3)
    assert truncated.choices[0].message.content == "Echo: a b"
    assert truncated.choices[0].finish_reason == "length"
    assert truncated.usage is not None and truncated.usage.completion_tokens == 3

    legacy = oai.chat.completions.create(model="fake-gpt-4o", messages=user("a b c d e f"), max_tokens=2)
    assert legacy.choices[0].message.content == "Echo: a"

    stopped = oai.chat.completions.create(model="fake-gpt-4o", messages=user("a b STOP c d"), stop=["STOP", "zz"])
    assert stopped.choices[0].message.content == "Echo: a b "
    assert stopped.choices[0].finish_reason == "stop"

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with_image = oai.chat.completions.create(
        model="fake-gpt-4o",
        messages=[{"role": "user", "content": [{"type": "text", "text": "what is this"}, image]}],
    )
    assert with_image.choices[0].message.content == "Echo: what is this [image]"
    assert with_image.usage is not None and with_image.usage.prompt_tokens == 3 + 3 + 85


def test_directives(upstream: FakeUpstream, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    words = oai.chat.completions.create(model="fake-gpt-4o", messages=user("give me [[words=7]] words"))
    assert len(words.choices[0].message.content.split()) == 7
    assert words.usage is not None and words.usage.completion_tokens == 7

    exact = oai.chat.completions.create(model="fake-gpt-4o", messages=user("[[reply=Bonjour tout le monde]]"))
    assert exact.choices[0].message.content == "Bonjour tout le monde"

    stripped = oai.chat.completions.create(model="fake-gpt-4o", messages=user("keep [[cache=4]] this"))
    assert stripped.choices[0].message.content == "Echo: keep this"
    assert stripped.usage is not None and stripped.usage.prompt_tokens_details.cached_tokens == 4
    assert stripped.usage.prompt_tokens == 3 + 3

    message = ant.messages.create(model="fake-claude-haiku", max_tokens=100, messages=user("x y [[cache=2]] z"))
    # Anthropic reports cached tokens apart from input_tokens: 7 prompt tokens (the directive is a word too)
    # = 5 uncached + 2 read from the cache.
    assert message.usage.input_tokens == 5 and message.usage.cache_read_input_tokens == 2
    assert message.usage.cache_creation_input_tokens == 0

    started = time.monotonic()
    oai.chat.completions.create(model="fake-gpt-4o", messages=user("slow [[latency=300]]"))
    assert time.monotonic() - started >= 0.3

    started = time.monotonic()
    stream = oai.chat.completions.create(model="fake-gpt-4o", messages=user("[[words=10]] [[tps=40]]"), stream=True)
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) == 10
    assert time.monotonic() - started >= 10 / 40


def test_a_chat_prompt_counted_in_bytes(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    """``[[count=bytes]]``: a prompt counted a token a UTF-8 byte, as a byte-level BPE at its worst counts CJK text
    (three a character), on OpenAI's and Anthropic's chat; its system prompt and earlier turns too."""
    prompt = "東京の天気 [[count=bytes]]"
    counted = oai.chat.completions.create(model="fake-gpt-4o", messages=user(prompt))
    assert counted.usage is not None and counted.usage.prompt_tokens == 3 + len(prompt.encode()) == 3 + 15 + 16
    earlier = [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい"}]
    message = ant.messages.create(
        model="fake-claude-haiku", max_tokens=100, system="日本語", messages=[*earlier, *user(prompt)]
    )
    assert message.usage.input_tokens == (3 + 9) + (3 + 15) + (3 + 6) + (3 + len(prompt.encode()))
    words = oai.chat.completions.create(model="fake-gpt-4o", messages=user("東京の天気"))
    assert words.usage is not None and words.usage.prompt_tokens == 3 + 1  # without it: a word


def test_server_wide_latency_and_tps() -> None:
    with FakeUpstream(latency_ms=150, tps=50) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="k", max_retries=0, timeout=5)
        started = time.monotonic()
        client.chat.completions.create(model="m", messages=user("[[words=5]]"))
        # 150 ms latency, then 5 tokens at 50 per second also hold back a non-streamed reply.
        assert time.monotonic() - started >= 0.15 + 5 / 50
        started = time.monotonic()
        client.chat.completions.create(model="m", messages=user("[[words=5]] [[latency=0]] [[tps=0]]"))


def test_split_tokens_round_trips() -> None:
    for text in ["Echo: hello  world ", "  lead", "one", "", "a\nb\tc"]:
        assert "".join(split_tokens(text)) == (text if text.strip() else "")
    assert split_tokens("Echo: hi there") == ["Echo:", " hi", " there"]


# ---------------------------------------------------------------------------------------------------------------
# Anthropic


def test_anthropic_non_stream(ant: anthropic.Anthropic) -> None:
    message = ant.messages.create(
        model="fake-claude-sonnet",
        max_tokens=100,
        system=[{"type": "text", "text": "you are terse"}],
        messages=user("hi there claude"),
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "fake-claude-sonnet"
    assert message.content[0].type == "text" and message.content[0].text == "Echo: hi there claude"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == (3 + 3) + (3 + 3)
    assert message.usage.output_tokens == 4

    string_system = ant.messages.create(
        model="fake-claude-sonnet", max_tokens=100, system="you are terse", messages=user("hi there claude")
    )
    assert string_system.usage.input_tokens == message.usage.input_tokens


def test_anthropic_refuses_a_prefill_ending_in_whitespace_as_anthropic_does(ant: anthropic.Anthropic) -> None:
    for content in ("Hello there\n", [{"type": "text", "text": "Hello there "}]):
        with pytest.raises(anthropic.BadRequestError, match="trailing whitespace"):
            ant.messages.create(
                model="fake-claude-sonnet",
                max_tokens=20,
                messages=[*user("hi"), {"role": "assistant", "content": content}],
            )
    prefilled = ant.messages.create(
        model="fake-claude-sonnet", max_tokens=20, messages=[*user("hi"), {"role": "assistant", "content": "Hello"}]
    )
    assert prefilled.content[0].text


def test_anthropic_stream_event_sequence(upstream: FakeUpstream) -> None:
    body = {"model": "fake-claude-haiku", "max_tokens": 100, "messages": user("one two"), "stream": True}
    status, headers, raw = http(upstream, "POST", "/v1/messages", body, {"anthropic-version": "2023-06-01"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = anthropic_sse(raw)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {
        "input_tokens": 5,
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [data["delta"] for _, data in events[3:6]] == [
        {"type": "text_delta", "text": "Echo:"},
        {"type": "text_delta", "text": " one"},
        {"type": "text_delta", "text": " two"},
    ]
    assert events[7][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[7][1]["usage"] == {"output_tokens": 3}


def test_anthropic_sdk_stream_helper(ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(model="fake-claude-haiku", max_tokens=100, messages=user("stream this")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Echo: stream this"
    assert final.content[0].text == text
    assert final.usage.input_tokens == 5 and final.usage.output_tokens == 3
    assert final.stop_reason == "end_turn"


def test_anthropic_thinking_marker(ant: anthropic.Anthropic) -> None:
    """``[[thinking=TEXT]]`` answers a thinking block before the reply, whole and streamed, when the request enables
    thinking; without ``thinking`` enabled the marker is only left out of the echo."""
    thinking = {"type": "enabled", "budget_tokens": 1024}
    prompt = user("[[thinking=let me think it over]] hi")
    message = ant.messages.create(model="fake-claude-haiku", max_tokens=2000, messages=prompt, thinking=thinking)
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "let me think it over" and message.content[0].signature
    assert message.content[1].text == "Echo: hi"
    plain = ant.messages.create(model="fake-claude-haiku", max_tokens=100, messages=prompt)
    assert [block.type for block in plain.content] == ["text"] and plain.content[0].text == "Echo: hi"

    with ant.messages.stream(model="fake-claude-haiku", max_tokens=2000, messages=prompt, thinking=thinking) as stream:
        events = list(stream)
        final = stream.get_final_message()
    deltas = [event.delta for event in events if event.type == "content_block_delta"]
    pieces = [delta.thinking for delta in deltas if delta.type == "thinking_delta"]
    assert len(pieces) > 1 and "".join(pieces) == "let me think it over"
    assert [delta.type for delta in deltas].index("signature_delta") == len(pieces)
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "let me think it over" and final.content[1].text == "Echo: hi"


def test_anthropic_refuses_max_tokens_past_what_the_model_writes(ant: anthropic.Anthropic) -> None:
    """As Anthropic's: a ``max_tokens`` past the model's most (its listing's ``max_tokens``) is a 400."""
    with pytest.raises(anthropic.BadRequestError) as refused:
        ant.messages.create(model="fake-claude-haiku", max_tokens=64_001, messages=user("hi"))
    assert "64001 > 64000" in refused.value.message
    assert ant.messages.create(model="fake-claude-haiku", max_tokens=64_000, messages=user("hi")).content


def test_anthropic_thinking_counts_against_max_tokens(ant: anthropic.Anthropic) -> None:
    """As Anthropic's, ``max_tokens`` bounds the thinking and the reply together: the thinking stops at its budget
    and the reply has what is left."""
    thinking = {"type": "enabled", "budget_tokens": 1024}
    prompt = user("[[thinking=" + "hmm " * 1500 + "]] hi there")
    message = ant.messages.create(model="fake-claude-haiku", max_tokens=1026, messages=prompt, thinking=thinking)
    assert len(message.content[0].thinking.split()) == 1024
    assert message.content[1].text == "Echo: hi" and message.stop_reason == "max_tokens"

    roomy = ant.messages.create(model="fake-claude-haiku", max_tokens=2000, messages=prompt, thinking=thinking)
    assert roomy.content[1].text == "Echo: hi there" and roomy.stop_reason == "end_turn"


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_anthropic_refuses_a_forced_tool_choice_while_thinking(ant: anthropic.Anthropic, choice) -> None:
    with pytest.raises(anthropic.BadRequestError, match="tool_choice forces tool use"):
        ant.messages.create(
            model="fake-claude-haiku",
            max_tokens=2000,
            thinking={"type": "enabled", "budget_tokens": 1024},
            tools=[WEATHER_TOOL_ANTHROPIC],
            tool_choice=choice,
            messages=user("Oslo"),
        )


@pytest.mark.parametrize("thinking", [{"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"}])
@pytest.mark.parametrize(
    ("sampling", "words"),
    [
        ({"temperature": 0.5}, "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode"),
        ({"top_p": 0.9}, "`top_p` must be greater than or equal to 0.95 or unset when thinking is enabled"),
        ({"top_k": 5}, "`top_k` must be unset when thinking is enabled"),
    ],
)
def test_anthropic_refuses_sampling_it_cannot_think_with(ant: anthropic.Anthropic, thinking, sampling, words) -> None:
    """As Anthropic's: while thinking (enabled or adaptive), temperature 1 only, top_p 0.95 or more, no top_k."""
    ask = {"model": "fake-claude-haiku", "max_tokens": 2000, "thinking": thinking, "messages": user("hi")}
    with pytest.raises(anthropic.BadRequestError) as refused:
        ant.messages.create(**ask, extra_body=sampling)
    assert refused.value.body["error"]["message"] == words
    assert ant.messages.create(**ask, extra_body={"temperature": 1, "top_p": 0.95}).content


def test_anthropic_tool_round_trip(ant: anthropic.Anthropic) -> None:
    messages: list[dict[str, Any]] = user("Oslo")
    message = ant.messages.create(
        model="fake-claude-haiku", max_tokens=100, tools=[WEATHER_TOOL_ANTHROPIC], messages=messages
    )
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name == "get_weather"
    assert block.input == {"city": "Oslo", "days": 42, "metric": True, "unit": "celsius"}

    messages += [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True)]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "snowing"}]},
    ]
    follow_up = ant.messages.create(
        model="fake-claude-haiku", max_tokens=100, tools=[WEATHER_TOOL_ANTHROPIC], messages=messages
    )
    assert follow_up.stop_reason == "end_turn"
    assert follow_up.content[0].text == "Tool result: snowing"


def test_anthropic_streamed_tool_use(upstream: FakeUpstream, ant: anthropic.Anthropic) -> None:
    body = {
        "model": "fake-claude-haiku",
        "max_tokens": 100,
        "messages": user("Lima"),
        "tools": [WEATHER_TOOL_ANTHROPIC],
        "stream": True,
    }
    _, _, raw = http(upstream, "POST", "/v1/messages", body)
    events = anthropic_sse(raw)
    start = events[1][1]["content_block"]
    assert start["type"] == "tool_use" and start["name"] == "get_weather" and start["input"] == {}
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert 2 <= len(deltas) <= 3 and {delta["type"] for delta in deltas} == {"input_json_delta"}
    assert json.loads("".join(delta["partial_json"] for delta in deltas))["city"] == "Lima"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    with ant.messages.stream(
        model="fake-claude-haiku", max_tokens=100, tools=[WEATHER_TOOL_ANTHROPIC], messages=user("Lima")
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input["city"] == "Lima"


def test_anthropic_counts_a_requests_input_tokens_as_its_messages_are_billed(
    upstream: FakeUpstream, ant: anthropic.Anthropic
) -> None:
    """``client.messages.count_tokens`` answers the input tokens a Messages request of the same input is billed."""
    request = {"model": "fake-claude-haiku", "system": "Be brief.", "messages": user("how warm is Lima")}
    counted = ant.messages.count_tokens(**request)
    billed = ant.messages.create(**request, max_tokens=20)
    assert counted.input_tokens == billed.usage.input_tokens == (3 + 2) + (3 + 4)

    body = {**request, "max_tokens": 20}
    status, _, raw = http(upstream, "POST", "/v1/messages/count_tokens", body)
    assert status == 400
    assert json.loads(raw)["error"]["message"] == "max_tokens: Extra inputs are not permitted"
    with pytest.raises(anthropic.InternalServerError):
        ant.messages.count_tokens(model="fault-500", messages=user("x"))


def test_anthropic_limits_stop_sequences_and_images(upstream: FakeUpstream, ant: anthropic.Anthropic) -> None:
    truncated = ant.messages.create(model="fake-claude-haiku", max_tokens=2, messages=user("a b c d"))
    assert truncated.content[0].text == "Echo: a" and truncated.stop_reason == "max_tokens"
    assert truncated.usage.output_tokens == 2

    stopped = ant.messages.create(
        model="fake-claude-haiku", max_tokens=100, stop_sequences=["END"], messages=user("a b END c")
    )
    assert stopped.content[0].text == "Echo: a b " and stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == "END"

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    seen = ant.messages.create(
        model="fake-claude-haiku",
        max_tokens=100,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "describe"}]}],
    )
    assert seen.content[0].text == "Echo: [image] describe"
    assert seen.usage.input_tokens == 3 + 1 + 85

    status, _, raw = http(upstream, "POST", "/v1/messages", {"model": "fake-claude-haiku", "messages": user("x")})
    assert status == 400
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in json.loads(raw)["error"]["message"]


# ---------------------------------------------------------------------------------------------------------------
# Faults

STATUS_FAULTS = [
    ("429", openai.RateLimitError, anthropic.RateLimitError, "rate_limit_error"),
    ("500", openai.InternalServerError, anthropic.InternalServerError, "api_error"),
    ("503", openai.InternalServerError, anthropic.ServiceUnavailableError, "api_error"),
    ("529", openai.InternalServerError, anthropic.OverloadedError, "overloaded_error"),
    ("401", openai.AuthenticationError, anthropic.AuthenticationError, "authentication_error"),
    ("400", openai.BadRequestError, anthropic.BadRequestError, "invalid_request_error"),
    ("context", openai.BadRequestError, anthropic.BadRequestError, "invalid_request_error"),
]


@pytest.mark.parametrize(("fault", "openai_error", "anthropic_error", "anthropic_type"), STATUS_FAULTS)
@pytest.mark.parametrize("stream", [False, True])
def test_status_faults(
    oai: openai.OpenAI,
    ant: anthropic.Anthropic,
    fault: str,
    openai_error: type[Exception],
    anthropic_error: type[Exception],
    anthropic_type: str,
    stream: bool,
) -> None:
    status = 400 if fault == "context" else int(fault)
    headers = {"x-fake-fault": fault}
    with pytest.raises(openai_error) as openai_info:
        oai.chat.completions.create(model="fake-gpt-4o", messages=user("hi"), stream=stream, extra_headers=headers)
    error = openai_info.value
    assert isinstance(error, openai.APIStatusError) and error.status_code == status
    assert set(error.body) == {"message", "type", "param", "code"}

    with pytest.raises(anthropic_error) as anthropic_info:
        ant.messages.create(
            model="fake-claude-haiku", max_tokens=10, messages=user("hi"), stream=stream, extra_headers=headers
        )
    assert anthropic_info.value.status_code == status
    assert anthropic_info.value.type == anthropic_type

    if fault == "429":
        assert error.response.headers["retry-after"] == "2"
        assert anthropic_info.value.response.headers["retry-after"] == "2"
    if fault == "context":
        assert error.code == "context_length_exceeded" and error.param == "messages"
        assert error.body["type"] == "invalid_request_error"
        assert "maximum context length" in error.message
        assert "prompt is too long:" in anthropic_info.value.api_message
        assert anthropic_info.value.api_message.endswith("maximum")


def test_fault_selection_priority(upstream: FakeUpstream, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="fault-429", messages=user("hi"))
    with pytest.raises(openai.InternalServerError) as by_directive:
        oai.chat.completions.create(model="fault-429", messages=user("hi [[fault=500]]"))
    assert by_directive.value.status_code == 500
    with pytest.raises(openai.AuthenticationError):
        oai.chat.completions.create(
            model="fault-429", messages=user("hi [[fault=500]]"), extra_headers={"x-fake-fault": "401"}
        )
    with pytest.raises(openai.BadRequestError, match="Unknown fake fault"):
        oai.chat.completions.create(model="fake-gpt-4o", messages=user("[[fault=nope]]"))
    assert upstream.stats["by_model"] == {"fault-429": 3, "fake-gpt-4o": 1}


def test_a_fault_with_times_hits_that_many_requests_then_they_are_answered(
    upstream: FakeUpstream, oai: openai.OpenAI
) -> None:
    # A provider's blip: the requests carrying these markers fail twice, then succeed; other markers count apart.
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            oai.embeddings.create(model="m", input="a [[fault=500]] [[fault_times=2]]", encoding_format="float")
    assert oai.embeddings.create(model="m", input="b [[fault=500]] [[fault_times=2]]", encoding_format="float").data
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="fake-gpt-4o", messages=user("hi [[fault=429]] [[fault_times=1]]"))
    assert oai.chat.completions.create(model="fake-gpt-4o", messages=user("hi [[fault=429]] [[fault_times=1]]"))
    upstream.reset()  # counted from zero again
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="fake-gpt-4o", messages=user("hi [[fault=429]] [[fault_times=1]]"))


@pytest.mark.parametrize(
    ("fault", "headers"),
    [
        ("429", {"retry-after": "2"}),
        ("429:0.5", {"retry-after": "0.5"}),
        ("429:250ms", {"retry-after-ms": "250"}),
        ("429:none", {}),
    ],
)
def test_the_moderation_route_is_rate_limited_with_the_wait_said_as_a_provider_says_it(
    upstream: FakeUpstream, oai: openai.OpenAI, fault: str, headers: dict[str, str]
) -> None:
    """OpenAI's moderation answers 429 at low tiers, saying the wait in ``retry-after`` (seconds), in
    ``retry-after-ms``, or not at all: the fake says each (a client's backoff without a wait said had no 429 to
    meet, every one saying ``Retry-After: 2``), once with ``[[fault_times=1]]``, then answers."""
    text = f"hello [flag:violence] [[fault={fault}]] [[fault_times=1]]"
    with pytest.raises(openai.RateLimitError) as limited:
        oai.moderations.create(model="omni-moderation-latest", input=text)
    said = {name: limited.value.response.headers.get(name) for name in ("retry-after", "retry-after-ms")}
    assert {name: value for name, value in said.items() if value is not None} == headers
    assert oai.moderations.create(model="omni-moderation-latest", input=text).results[0].flagged


def test_hang_times_out(upstream: FakeUpstream, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    with pytest.raises(openai.APITimeoutError):
        oai.chat.completions.create(model="fake-gpt-4o", messages=user("[[fault=hang]]"), timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        oai.chat.completions.create(model="fake-gpt-4o", messages=user("[[fault=hang]]"), stream=True, timeout=0.3)
    with pytest.raises(anthropic.APITimeoutError):
        ant.messages.create(model="fault-hang", max_tokens=5, messages=user("x"), timeout=0.3)


def test_hang_does_not_block_stop() -> None:
    server = FakeUpstream().start()
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="k", max_retries=0, timeout=30)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.chat.completions.create(model="fault-hang", messages=user("x"))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: server.stats["requests"] > 0, "the hanging request reached the server", timeout=5, interval=0.01)
    server.stop()
    caller.join(timeout=5)
    assert isinstance(outcome[0], openai.APIConnectionError)


def test_stop_ends_paced_streams_and_long_latencies_at_once() -> None:
    """A stop does not wait out a reply's pauses: a stream paced at one token a second and a reply held back a
    minute both end at once, as dropped connections."""
    server = FakeUpstream().start()
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="k", max_retries=0, timeout=30)
    outcome: dict[str, BaseException | None] = {}
    streamed: list[str] = []

    def paced() -> None:
        try:
            stream = client.chat.completions.create(model="m", messages=user("[[words=100]] [[tps=1]]"), stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    streamed.append(chunk.choices[0].delta.content)
            outcome["paced"] = None
        except BaseException as exc:
            outcome["paced"] = exc

    def held() -> None:
        try:
            client.chat.completions.create(model="m", messages=user("[[latency=60000]] x"))
            outcome["held"] = None
        except BaseException as exc:
            outcome["held"] = exc

    callers = [threading.Thread(target=paced), threading.Thread(target=held)]
    for caller in callers:
        caller.start()
    wait_until(lambda: server.stats["requests"] == 2 and streamed, "both requests reached the server", timeout=10)
    started = time.monotonic()
    server.stop()
    for caller in callers:
        caller.join(timeout=10)
    assert time.monotonic() - started < 5
    assert len(streamed) < 100
    assert isinstance(outcome["paced"], openai.APIConnectionError)
    assert isinstance(outcome["held"], openai.APIConnectionError)


def test_halt_ends_a_pause_in_progress_at_once() -> None:
    """The server's stop (``_App.halt``) ends a paced reply's pause rather than letting it run out: a pause of a
    minute raises at once, and a pause begun after the stop raises without waiting at all."""
    from llmhub.testing import fake_upstream

    async def scenario() -> None:
        app = fake_upstream._App(latency_ms=0, tps=0, api_key=None)
        await app._on_startup(None)
        pausing = asyncio.create_task(app._pause(60))
        await asyncio.sleep(0.05)
        assert not pausing.done()
        app.halt()
        with pytest.raises(fake_upstream._Aborted):
            await asyncio.wait_for(pausing, 5)
        with pytest.raises(fake_upstream._Aborted):
            await asyncio.wait_for(app._pause(60), 5)
        assert not app._pausing

    asyncio.run(scenario())


def test_cut_faults(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    received: list[str] = []
    stream = oai.chat.completions.create(
        model="fake-gpt-4o", messages=user("[[words=10]] [[fault=cut-3]]"), stream=True
    )
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert len([piece for piece in received if piece]) == 3

    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="fault-cut-3", messages=user("x"))

    deltas: list[str] = []
    events = ant.messages.create(model="fault-cut-2", max_tokens=50, messages=user("a b c d e"), stream=True)
    # The Anthropic SDK does not wrap transport errors raised while iterating a stream.
    with pytest.raises(httpx2.RemoteProtocolError):
        for event in events:
            if event.type == "content_block_delta":
                deltas.append(event.delta.text)
    assert deltas == ["Echo:", " a"]

    with pytest.raises(anthropic.APIConnectionError):
        ant.messages.create(model="fault-cut-2", max_tokens=50, messages=user("x"))


def test_cut_fault_raw_stream_has_no_terminator(upstream: FakeUpstream) -> None:
    body = {"model": "fault-cut-2", "messages": user("a b c d"), "stream": True}
    request = urllib.request.Request(
        upstream.base_url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        with pytest.raises((HTTPException, OSError)) as info:
            response.read()
    partial = getattr(info.value, "partial", b"") or b""
    assert b"[DONE]" not in partial and b'finish_reason":"stop' not in partial


def test_error_event_faults(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    received: list[str] = []
    stream = oai.chat.completions.create(
        model="fake-gpt-4o", messages=user("a b c d e f"), stream=True, extra_headers={"x-fake-fault": "error-event"}
    )
    with pytest.raises(openai.APIError) as openai_info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert not isinstance(openai_info.value, openai.APIStatusError)
    assert openai_info.value.body["type"] == "server_error"
    assert [piece for piece in received if piece] == ["Echo:", " a"]

    events = ant.messages.create(
        model="fake-claude-haiku", max_tokens=50, messages=user("a b c [[fault=error-event]]"), stream=True
    )
    with pytest.raises(anthropic.APIStatusError) as anthropic_info:
        for _ in events:
            pass
    # The stream was a 200, so the SDK cannot map the error to OverloadedError; only the body says so.
    assert type(anthropic_info.value) is anthropic.APIStatusError
    assert anthropic_info.value.status_code == 200
    assert anthropic_info.value.type == "overloaded_error"


def test_api_key_enforced() -> None:
    with FakeUpstream(api_key="sekrit-key") as server:
        good_oai = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sekrit-key", max_retries=0)
        assert good_oai.chat.completions.create(model="m", messages=user("ok")).choices[0].message.content == "Echo: ok"
        bad_oai = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as openai_info:
            bad_oai.models.list()
        assert openai_info.value.code == "invalid_api_key"

        good_ant = anthropic.Anthropic(base_url=server.base_url, api_key="sekrit-key", max_retries=0)
        assert good_ant.messages.create(model="m", max_tokens=5, messages=user("ok")).content[0].text == "Echo: ok"
        # anthropic 2.x sends its api_key as a bearer token; x-api-key (what older SDKs and curl use) works too.
        body = {"model": "m", "max_tokens": 5, "messages": user("ok")}
        assert http(server, "POST", "/v1/messages", body, {"x-api-key": "sekrit-key"})[0] == 200
        status, _, raw = http(server, "POST", "/v1/messages", body, {"x-api-key": "nope"})
        assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
        assert http(server, "GET", "/_fake/stats")[0] == 200
        bad_ant = anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as anthropic_info:
            bad_ant.messages.create(model="m", max_tokens=5, messages=user("no"))
        assert anthropic_info.value.type == "authentication_error"


# ---------------------------------------------------------------------------------------------------------------
# Models, observability, CLI

EXPECTED_MODELS = ["fake-gpt-4o-mini", "fake-gpt-4o", "fake-o3-mini", "fake-claude-haiku", "fake-claude-sonnet"]


def test_models_list_in_both_shapes(upstream: FakeUpstream, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    listed = oai.models.list()
    assert [model.id for model in listed.data] == [*EXPECTED_MODELS, "fake-embedding-small"]
    assert oai.models.retrieve("fake-embedding-small").id == "fake-embedding-small"
    assert {model.owned_by for model in listed.data} == {"fake"}
    assert oai.models.retrieve("fake-o3-mini").id == "fake-o3-mini"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-nope")

    assert [model.id for model in ant.models.list()] == EXPECTED_MODELS
    _, _, raw = http(upstream, "GET", "/v1/models", headers={"anthropic-version": "2023-06-01"})
    page = json.loads(raw)
    assert page["has_more"] is False
    assert (page["first_id"], page["last_id"]) == ("fake-gpt-4o-mini", "fake-claude-sonnet")
    assert page["data"][0]["type"] == "model" and page["data"][0]["created_at"] == "2025-01-01T00:00:00Z"
    assert ant.models.retrieve("fake-claude-haiku").display_name == "Fake Claude Haiku"

    _, _, raw = http(upstream, "GET", "/v1/models")
    assert json.loads(raw)["object"] == "list"


def test_stats_requests_and_reset(upstream: FakeUpstream, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    oai.chat.completions.create(model="fake-gpt-4o", messages=user("hi"), extra_body={"surprise": {"x": 1}})
    oai.chat.completions.create(model="fake-gpt-4o", messages=user("hi"))
    ant.messages.create(model="fake-claude-haiku", max_tokens=5, messages=user("hi"))
    oai.models.list()

    _, _, raw = http(upstream, "GET", "/_fake/stats")
    stats = json.loads(raw)
    assert stats == upstream.stats
    assert stats == {
        "requests": 4,
        "by_path": {"/v1/chat/completions": 2, "/v1/messages": 1, "/v1/models": 1},
        "by_model": {"fake-gpt-4o": 2, "fake-claude-haiku": 1},
    }

    _, _, raw = http(upstream, "GET", "/_fake/requests")
    logged = json.loads(raw)
    assert logged == upstream.requests
    assert [entry["path"] for entry in logged] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/models",
    ]
    first = logged[0]
    assert first["method"] == "POST" and first["body"]["surprise"] == {"x": 1}
    assert first["headers"]["authorization"].endswith("1234")
    assert "sk-test" not in first["headers"]["authorization"]
    assert all(key == key.lower() for key in first["headers"])
    assert logged[3]["method"] == "GET" and logged[3]["body"] is None

    status, _, _ = http(upstream, "POST", "/_fake/reset")
    assert status == 200
    assert upstream.stats == {"requests": 0, "by_path": {}, "by_model": {}}
    assert upstream.requests == []


def test_log_keeps_last_hundred(upstream: FakeUpstream) -> None:
    for i in range(105):
        http(upstream, "POST", "/v1/chat/completions", {"model": f"m{i}", "messages": user("x")})
    logged = upstream.requests
    assert len(logged) == 100 and logged[0]["body"]["model"] == "m5"
    assert upstream.stats["requests"] == 105


def test_unknown_path_and_bad_json(upstream: FakeUpstream) -> None:
    status, _, raw = http(upstream, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in json.loads(raw)
    request = urllib.request.Request(upstream.base_url + "/v1/chat/completions", data=b"{nope", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------------------------------
# Demo mode (what `make run` starts): canned Markdown answers instead of the echo

DEMO_TPS = 200
# One prompt per keyword group; each must get its own answer.
DEMO_PROMPTS = ["Write a Python function", "Give me a list of tips", "How do I call the API?", "Hello!"]


@pytest.fixture(scope="module")
def demo_server() -> Iterator[FakeUpstream]:
    with FakeUpstream(demo=True, tps=DEMO_TPS) as server:
        yield server


@pytest.fixture
def demo_oai(demo_server: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key="k", max_retries=0, timeout=10)


@pytest.fixture
def demo_ant(demo_server: FakeUpstream) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=demo_server.base_url, api_key="k", max_retries=0, timeout=10)


def assert_renders_markdown(text: str) -> None:
    """What a newcomer's first chat should show off: emphasis or a heading, a list and highlighted code."""
    assert "**" in text or re.search(r"^#{1,3} ", text, re.MULTILINE), text
    assert re.search(r"^(- |\d+\. )\S", text, re.MULTILINE), text
    assert re.search(r"^```[a-z]+\n.*?\n```$", text, re.MULTILINE | re.DOTALL), text


def test_demo_mode_answers_in_markdown_chosen_from_the_prompt(
    demo_oai: openai.OpenAI, demo_ant: anthropic.Anthropic, oai: openai.OpenAI
) -> None:
    answers = {}
    for prompt in DEMO_PROMPTS:
        reply = demo_oai.chat.completions.create(model="fake-gpt-4o-mini", messages=user(prompt))
        text = reply.choices[0].message.content
        assert_renders_markdown(text)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.completion_tokens == len(text.split())
        message = demo_ant.messages.create(model="fake-claude-haiku", max_tokens=1000, messages=user(prompt))
        assert message.content[0].text == text, "both wire shapes give the same answer"
        assert message.usage.output_tokens == len(text.split()) and message.stop_reason == "end_turn"
        answers[prompt] = text
    assert len(set(answers.values())) == len(DEMO_PROMPTS), "each kind of question has its own answer"
    assert "```python\n" in answers["Write a Python function"]

    # A prompt without keywords still gets one of them, the same one every time.
    unmatched = [f"Tell me about the sea, take {i}" for i in range(12)]
    picked = [
        demo_oai.chat.completions.create(model="m", messages=user(p)).choices[0].message.content for p in unmatched
    ]
    assert set(picked) <= set(answers.values()) and len(set(picked)) > 1, "chosen from the prompt, not fixed"
    again = demo_oai.chat.completions.create(model="m", messages=user(unmatched[0])).choices[0].message.content
    assert again == picked[0]

    # The default, which the rest of the suite relies on, is still the echo.
    assert oai.chat.completions.create(model="m", messages=user("Hello!")).choices[0].message.content == "Echo: Hello!"


def test_demo_mode_thinks_aloud_when_a_request_enables_thinking(demo_ant: anthropic.Anthropic) -> None:
    """`make run`'s chat page offers a Reasoning control for the demo Claude: asked to think, the demo model
    shows a thought (about the prompt, within its budget) before its canned answer; not asked, none."""
    prompt = user("Give me a list of tips")
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = demo_ant.messages.create(model="fake-claude-haiku", max_tokens=3000, messages=prompt, thinking=thinking)
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert '"Give me a list of tips"' in message.content[0].thinking and message.content[0].signature
    assert (
        message.content[1].text
        == demo_ant.messages.create(model="fake-claude-haiku", max_tokens=3000, messages=prompt).content[0].text
    ), "the same answer as without thinking"

    with demo_ant.messages.stream(
        model="fake-claude-haiku", max_tokens=3000, messages=prompt, thinking=thinking
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].thinking == message.content[0].thinking

    plain = demo_ant.messages.create(model="fake-claude-haiku", max_tokens=3000, messages=prompt)
    assert [block.type for block in plain.content] == ["text"]
    # A [[thinking=...]] marker still says what the thought is.
    marked = demo_ant.messages.create(
        model="fake-claude-haiku", max_tokens=3000, messages=user("Hi [[thinking=just this]]"), thinking=thinking
    )
    assert marked.content[0].thinking == "just this"


def test_demo_mode_streams_token_by_token_at_the_configured_tps(
    demo_server: FakeUpstream, demo_oai: openai.OpenAI, demo_ant: anthropic.Anthropic
) -> None:
    prompt = user("Show me some code")
    whole = demo_oai.chat.completions.create(model="fake-gpt-4o", messages=prompt).choices[0].message.content
    tokens = len(whole.split())

    started = time.monotonic()
    stream = demo_oai.chat.completions.create(model="fake-gpt-4o", messages=prompt, stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert time.monotonic() - started >= tokens / DEMO_TPS
    assert "".join(pieces) == whole, "the Markdown, newlines and indentation included, arrives intact"
    assert len(pieces) == tokens, "one chunk per token"

    body = {"model": "fake-claude-haiku", "max_tokens": 1000, "messages": prompt, "stream": True}
    started = time.monotonic()
    status, _, raw = http(demo_server, "POST", "/v1/messages", body, {"anthropic-version": "2023-06-01"})
    assert time.monotonic() - started >= tokens / DEMO_TPS
    assert status == 200
    deltas = [data["delta"]["text"] for name, data in anthropic_sse(raw) if name == "content_block_delta"]
    assert "".join(deltas) == whole and len(deltas) == tokens
    with demo_ant.messages.stream(model="fake-claude-haiku", max_tokens=1000, messages=prompt) as helper:
        assert "".join(helper.text_stream) == whole


def test_demo_mode_markers_and_limits_still_steer(demo_oai: openai.OpenAI, demo_ant: anthropic.Anthropic) -> None:
    exact = demo_oai.chat.completions.create(model="m", messages=user("python [[reply=just this]]"))
    assert exact.choices[0].message.content == "just this"
    counted = demo_ant.messages.create(model="m", max_tokens=100, messages=user("Hello [[words=4]]"))
    assert counted.content[0].text == "lorem ipsum dolor sit"

    cut = demo_oai.chat.completions.create(model="m", messages=user("Hello!"), max_tokens=5)
    assert cut.choices[0].finish_reason == "length" and len(cut.choices[0].message.content.split()) == 5
    with pytest.raises(openai.RateLimitError):
        demo_oai.chat.completions.create(model="m", messages=user("Hello [[fault=429]]"))


def test_cli_serves_and_logs_address() -> None:
    with FakeUpstream() as probe:
        port = probe.port  # a port that was free a moment ago
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "llmhub.testing.fake_upstream", "--port", str(port), "--tps", "0"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line == f"fake upstream listening on http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=5)
        assert client.chat.completions.create(model="x", messages=user("cli")).choices[0].message.content == "Echo: cli"
    finally:
        process_stop(process)


def test_openapi_validator_rejects_bad_documents() -> None:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}
    validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    validate_openai_schema({**chunk, "usage": None}, "CreateChatCompletionStreamResponse")
    with pytest.raises(jsonschema.ValidationError):
        validate_openai_schema({**chunk, "object": "chat.completion"}, "CreateChatCompletionStreamResponse")
    with pytest.raises(jsonschema.ValidationError):
        validate_openai_schema(
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "done"}]},
            "CreateChatCompletionStreamResponse",
        )
    with pytest.raises(KeyError):
        validate_openai_schema(chunk, "NoSuchSchema")


# Embeddings ---------------------------------------------------------------------------------------------


def test_embeddings_are_deterministic_unit_vectors_with_word_counted_usage(oai: openai.OpenAI) -> None:
    raw = oai.embeddings.with_raw_response.create(
        model="fake-embedding-small", input=["the quick brown fox", "jumps"], encoding_format="float"
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateEmbeddingResponse")
    first = raw.parse()
    assert [item.index for item in first.data] == [0, 1]
    assert all(len(item.embedding) == 256 for item in first.data)
    assert all(abs(sum(x * x for x in item.embedding) - 1) < 1e-5 for item in first.data)
    assert first.usage.prompt_tokens == first.usage.total_tokens == 5  # 4 words + 1 word
    again = oai.embeddings.create(model="fake-embedding-small", input="jumps", encoding_format="float")
    assert again.data[0].embedding == first.data[1].embedding
    assert first.data[0].embedding != first.data[1].embedding


def test_embeddings_honour_dimensions_tokens_and_base64(oai: openai.OpenAI, upstream: FakeUpstream) -> None:
    floats = oai.embeddings.create(model="m", input=[[1, 2, 3], [4]], dimensions=8, encoding_format="float")
    assert [len(item.embedding) for item in floats.data] == [8, 8]
    assert floats.usage.prompt_tokens == 4
    status, _, body = http(
        upstream,
        "POST",
        "/v1/embeddings",
        {"model": "m", "input": [[1, 2, 3], [4]], "dimensions": 8, "encoding_format": "base64"},
    )
    assert status == 200
    encoded = json.loads(body)["data"]
    assert all(isinstance(item["embedding"], str) for item in encoded)
    # The SDK decodes base64 itself when no format is asked for: the same numbers as the floats.
    decoded = oai.embeddings.create(model="m", input=[[1, 2, 3], [4]], dimensions=8)
    assert [item.embedding for item in decoded.data] == [item.embedding for item in floats.data]


def test_embeddings_directives_and_faults(oai: openai.OpenAI, upstream: FakeUpstream) -> None:
    status, _, body = http(
        upstream, "POST", "/v1/embeddings", {"model": "m", "input": "hi [[usage=none]]", "encoding_format": "base64"}
    )
    assert status == 200 and "usage" not in json.loads(body)
    status, _, body = http(
        upstream,
        "POST",
        "/v1/embeddings",
        {"model": "m", "input": "hi [[encoding=float]]", "encoding_format": "base64"},
    )
    assert isinstance(json.loads(body)["data"][0]["embedding"], list)
    texts = ["a", "b [[order=reversed]]", "c"]
    alone = [oai.embeddings.create(model="m", input=text, encoding_format="float").data[0].embedding for text in texts]
    reversed_ = oai.embeddings.create(model="m", input=texts, encoding_format="float").data
    assert [(item.index, item.embedding) for item in reversed_] == [(2, alone[2]), (1, alone[1]), (0, alone[0])]
    status, _, body = http(upstream, "POST", "/v1/embeddings", {"model": "m", "input": ["a", "c [[omit=index]]"]})
    assert [set(item) for item in json.loads(body)["data"]] == [{"object", "embedding"}] * 2
    fewer = oai.embeddings.create(model="m", input=["a", "b", "c [[vectors=2]]"], encoding_format="float").data
    assert [item.index for item in fewer] == [0, 1]
    with pytest.raises(openai.RateLimitError):
        oai.embeddings.create(model="m", input="hi [[fault=429]]", encoding_format="float")
    with pytest.raises(openai.InternalServerError):
        oai.embeddings.create(model="fault-500", input="hi", encoding_format="float")
    for bad in (
        {"model": "m", "input": ""},
        {"model": "m", "input": []},
        {"model": "m", "input": [1, "a"]},
        {"input": "x"},
    ):
        status, _, body = http(upstream, "POST", "/v1/embeddings", bad)
        assert status == 400 and "error" in json.loads(body), bad
    assert upstream.stats["by_path"]["/v1/embeddings"] == 14


# -- Cohere v2 (under /cohere) ---------------------------------------------------------------------------


@pytest.fixture
def co(upstream: FakeUpstream):
    import cohere

    return cohere.ClientV2(api_key="co-test-1234", base_url=upstream.base_url + "/cohere", max_retries=0, timeout=5)


def test_cohere_chat_tool_round_trip_and_embed_through_the_sdk(upstream: FakeUpstream, co) -> None:
    reply = co.chat(model="command-a-03-2025", messages=[{"role": "user", "content": "hello [[cache=1]]"}])
    assert reply.finish_reason == "COMPLETE"
    assert reply.message.content[0].text == "Echo: hello"
    assert reply.usage.billed_units.output_tokens == 2
    assert reply.usage.cached_tokens == 1

    first = co.chat(
        model="command-a-03-2025", messages=[{"role": "user", "content": "Paris"}], tools=[WEATHER_TOOL_OPENAI]
    )
    assert first.finish_reason == "TOOL_CALL"
    call = first.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    final = co.chat(
        model="command-a-03-2025",
        messages=[
            {"role": "user", "content": "Paris"},
            {"role": "assistant", "tool_calls": [call.dict()], "tool_plan": first.message.tool_plan},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
        tools=[WEATHER_TOOL_OPENAI],
    )
    assert final.message.content[0].text == "Tool result: sunny"

    embedded = co.embed(
        texts=["one two", "three"], model="embed-v4.0", input_type="search_document", embedding_types=["float"]
    )
    assert [len(vector) for vector in embedded.embeddings.float_] == [256, 256]
    import cohere

    co.embed(texts=["x"] * 96, model="embed-v4.0", input_type="search_document", embedding_types=["float"])
    fewer = co.embed(texts=["a", "b [[vectors=1]]"], model="embed-v4.0", input_type="search_document")
    assert len(fewer.embeddings.float_) == 1
    with pytest.raises(cohere.errors.BadRequestError) as caught:  # Cohere's batch limit
        co.embed(texts=["x"] * 97, model="embed-v4.0", input_type="search_document", embedding_types=["float"])
    assert "at most 96" in caught.value.body["message"]
    assert embedded.meta.billed_units.input_tokens == 3
    assert "command-a-03-2025" in {model.name for model in co.models.list().models}
    assert upstream.stats["by_path"]["/cohere/v2/chat"] == 3


def test_cohere_stream_events_are_framed_as_cohere_frames_them(upstream: FakeUpstream, co) -> None:
    status, headers, raw = http(
        upstream, "POST", "/cohere/v2/chat", {"model": "c", "stream": True, "messages": user("[[words=3]]")}
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = anthropic_sse(raw)  # `event: <type>` then one `data:` line whose type matches
    assert [name for name, _ in events] == [
        "message-start",
        "content-start",
        "content-delta",
        "content-delta",
        "content-delta",
        "content-end",
        "message-end",
    ]
    assert events[-1][1]["delta"]["usage"]["billed_units"]["output_tokens"] == 3

    streamed = list(
        co.chat_stream(
            model="command-a-03-2025", messages=[{"role": "user", "content": "Oslo"}], tools=[WEATHER_TOOL_OPENAI]
        )
    )
    kinds = [event.type for event in streamed]
    assert kinds[:3] == ["message-start", "tool-plan-delta", "tool-call-start"]
    assert kinds[-2:] == ["tool-call-end", "message-end"]
    arguments = "".join(
        e.delta.message.tool_calls.function.arguments or "" for e in streamed if e.type == "tool-call-delta"
    )
    assert json.loads(arguments)["city"] == "Oslo"
    assert streamed[-1].delta.finish_reason == "TOOL_CALL"


def test_cohere_chat_takes_thinking_of_cohere_s_type_and_refuses_another(upstream: FakeUpstream, co) -> None:
    import cohere

    for thinking in ({"type": "enabled", "token_budget": 2048}, {"type": "disabled"}, {"type": "enabled"}):
        reply = co.chat(model="command-a-03-2025", messages=[{"role": "user", "content": "hi"}], thinking=thinking)
        assert reply.finish_reason == "COMPLETE"
    for thinking in ({"type": "on"}, {"type": "enabled", "token_budget": 0}, {"type": "enabled", "budget": 5}):
        with pytest.raises(cohere.errors.BadRequestError) as caught:
            co.chat(model="command-a-03-2025", messages=[{"role": "user", "content": "hi"}], thinking=thinking)
        assert "thinking" in caught.value.body["message"]


def test_cohere_faults_answer_in_cohere_error_shape(upstream: FakeUpstream) -> None:
    for fault, status in (("429", 429), ("503", 503), ("context", 400)):
        code, headers, body = http(
            upstream, "POST", "/cohere/v2/chat", {"model": "c", "messages": user(f"hi [[fault={fault}]]")}
        )
        assert code == status and set(json.loads(body)) == {"message"}, fault
    assert "too many tokens" in json.loads(body)["message"]
    code, headers, _ = http(
        upstream,
        "POST",
        "/cohere/v2/embed",
        {"model": "e", "texts": ["x"], "input_type": "search_document"},
        {"x-fake-fault": "429"},
    )
    assert code == 429 and headers["Retry-After"] == "2"
    _, _, raw = http(
        upstream,
        "POST",
        "/cohere/v2/chat",
        {"model": "c", "stream": True, "messages": user("[[words=9]] [[fault=error-event]]")},
    )
    events = anthropic_sse(raw)
    assert [name for name, _ in events].count("content-delta") == 2
    assert events[-1][1]["delta"]["finish_reason"] == "ERROR"
    # OpenAI's model list keeps its own path and shape.
    assert "data" in json.loads(http(upstream, "GET", "/v1/models")[2])


# -- Google Gemini's routes (v1beta), driven by google-genai --------------------------------------------------


@pytest.fixture
def genai_client(upstream: FakeUpstream):
    from google import genai
    from google.genai import types

    return genai.Client(
        api_key="AIza-fake",
        http_options=types.HttpOptions(
            base_url=upstream.base_url, api_version="v1beta", retry_options=types.HttpRetryOptions(attempts=1)
        ),
    )


def test_gemini_generate_content_echoes_with_usage_and_tool_calls(genai_client, upstream: FakeUpstream) -> None:
    response = genai_client.models.generate_content(
        model="gemini-2.5-flash",
        contents="hello there [[cache=2]]",
        config={"system_instruction": "be brief"},
    )
    assert response.text == "Echo: hello there"
    assert response.candidates[0].finish_reason.value == "STOP"
    usage = response.usage_metadata
    assert usage.cached_content_token_count == 2
    assert usage.candidates_token_count == 3
    assert usage.total_token_count == usage.prompt_token_count + 3
    assert upstream.requests[-1]["headers"]["x-goog-api-key"] != "AIza-fake"  # sent, and masked in the log

    tool = {
        "function_declarations": [
            {
                "name": "get_weather",
                "parameters_json_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ]
    }
    called = genai_client.models.generate_content(
        model="gemini-2.5-flash",
        contents="Paris",
        config={"tools": [tool], "automatic_function_calling": {"disable": True}},
    )
    call = called.candidates[0].content.parts[0].function_call
    assert (call.name, call.args) == ("get_weather", {"city": "Paris"})
    answered = genai_client.models.generate_content(
        model="gemini-2.5-flash",
        contents=[
            {"role": "user", "parts": [{"text": "Paris"}]},
            {"role": "model", "parts": [{"function_call": {"name": "get_weather", "args": {"city": "Paris"}}}]},
            {
                "role": "user",
                "parts": [{"function_response": {"name": "get_weather", "response": {"output": "sunny"}}}],
            },
        ],
        config={"tools": [tool], "automatic_function_calling": {"disable": True}},
    )
    assert answered.text == "Tool result: sunny"


def test_gemini_stream_is_sse_one_token_per_chunk_with_usage_last(genai_client) -> None:
    chunks = list(genai_client.models.generate_content_stream(model="gemini-2.5-flash", contents="[[words=5]]"))
    assert "".join(chunk.text for chunk in chunks).split() == ["lorem", "ipsum", "dolor", "sit", "amet"]
    assert len(chunks) == 5
    assert chunks[-1].candidates[0].finish_reason.value == "STOP"
    assert chunks[-1].usage_metadata.candidates_token_count == 5
    assert all(chunk.usage_metadata is None for chunk in chunks[:-1])


def test_gemini_safety_blocks(genai_client) -> None:
    blocked = genai_client.models.generate_content(model="m", contents="x [[safety=response]]")
    assert blocked.candidates[0].finish_reason.value == "SAFETY"
    assert blocked.candidates[0].content is None
    prompt = genai_client.models.generate_content(model="m", contents="x [[safety=prompt]]")
    assert prompt.prompt_feedback.block_reason.value == "SAFETY"
    assert not prompt.candidates


def test_gemini_faults_in_googles_error_shape(genai_client, upstream: FakeUpstream) -> None:
    from google.genai import errors

    with pytest.raises(errors.ClientError) as caught:
        genai_client.models.generate_content(model="m", contents="x [[fault=429]]")
    assert (caught.value.code, caught.value.status) == (429, "RESOURCE_EXHAUSTED")
    with pytest.raises(errors.ServerError) as caught:
        genai_client.models.generate_content(model="fault-503", contents="x")
    assert (caught.value.code, caught.value.status) == (503, "UNAVAILABLE")
    with pytest.raises(errors.ClientError) as caught:
        genai_client.models.generate_content(model="m", contents="x [[fault=context]]")
    assert caught.value.status == "INVALID_ARGUMENT" and "input token count" in caught.value.message
    with pytest.raises(errors.ServerError):
        list(genai_client.models.generate_content_stream(model="m", contents="[[words=9]] [[fault=error-event]]"))
    status, _, body = http(upstream, "POST", "/v1beta/models/m:generateContent", {"contents": []})
    assert status == 400 and json.loads(body)["error"]["status"] == "INVALID_ARGUMENT"


def test_gemini_models_and_embeddings(genai_client, upstream: FakeUpstream) -> None:
    names = [model.name for model in genai_client.models.list()]
    assert "models/fake-gpt-4o-mini" in names and "models/fake-gemini-embedding" in names
    response = genai_client.models.embed_content(
        model="fake-gemini-embedding", contents=["one two", "three"], config={"output_dimensionality": 8}
    )
    vectors = [embedding.values for embedding in response.embeddings]
    assert [len(vector) for vector in vectors] == [8, 8]
    assert vectors[0] != vectors[1]
    again = genai_client.models.embed_content(
        model="fake-gemini-embedding", contents=["one two"], config={"output_dimensionality": 8}
    )
    assert again.embeddings[0].values == vectors[0]  # deterministic
    from google.genai import errors

    genai_client.models.embed_content(model="fake-gemini-embedding", contents=["x"] * 100)
    with pytest.raises(errors.ClientError) as caught:  # Google's batch limit
        genai_client.models.embed_content(model="fake-gemini-embedding", contents=["x"] * 101)
    assert caught.value.code == 400 and "at most 100 requests" in caught.value.message


def test_gemini_key_in_the_query_string_is_accepted_when_a_key_is_required() -> None:
    with FakeUpstream(api_key="AIza-required") as server:
        # Google refuses a key it does not know with 400 INVALID_ARGUMENT, reason API_KEY_INVALID (not 401).
        for query in ("", "?key=AIza-unknown"):
            status, _, body = http(server, "GET", "/v1beta/models" + query)
            error = json.loads(body)["error"]
            assert (status, error["status"]) == (400, "INVALID_ARGUMENT")
            assert error["details"][0]["reason"] == "API_KEY_INVALID"
        status, _, body = http(server, "GET", "/v1beta/models?key=AIza-required")
        assert status == 200 and json.loads(body)["models"]
        status, _, _ = http(server, "GET", "/v1beta/models", headers={"x-goog-api-key": "AIza-required"})
        assert status == 200


def test_gemini_answers_candidate_count_candidates_streamed_or_not(genai_client, upstream: FakeUpstream) -> None:
    from google.genai import errors

    response = genai_client.models.generate_content(
        model="gemini-2.5-flash", contents="[[words=3]]", config={"candidate_count": 2}
    )
    assert [candidate.index for candidate in response.candidates] == [0, 1]
    assert [candidate.content.parts[0].text for candidate in response.candidates] == ["lorem ipsum dolor"] * 2
    assert [candidate.finish_reason.value for candidate in response.candidates] == ["STOP", "STOP"]
    assert response.usage_metadata.candidates_token_count == 6  # both candidates' tokens

    chunks = list(
        genai_client.models.generate_content_stream(
            model="gemini-2.5-flash", contents="[[words=3]]", config={"candidate_count": 2}
        )
    )
    assert len(chunks) == 3
    for number in (0, 1):
        pieces = [c.content.parts[0].text for chunk in chunks for c in chunk.candidates if c.index == number]
        assert "".join(pieces).split() == ["lorem", "ipsum", "dolor"]
    assert [c.finish_reason.value for c in chunks[-1].candidates] == ["STOP", "STOP"]
    assert chunks[-1].usage_metadata.candidates_token_count == 6

    with pytest.raises(errors.ClientError) as caught:
        genai_client.models.generate_content(model="m", contents="x", config={"candidate_count": 9})
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    "model", ["gemini-2.5-pro", "gemini-2.5-pro-preview-06-05", "gemini-3-pro-preview", "gemini-3.1-pro-preview"]
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_gemini_refuses_a_thinking_budget_of_0_for_a_pro_model_as_google_does(genai_client, model, stream) -> None:
    """A Pro model since 2.5 always thinks: Google answers ``thinkingBudget`` 0 with its 400 INVALID_ARGUMENT,
    "Budget 0 is invalid. This model only works in thinking mode.", which the fake took, so a translation sending it
    would pass its tests. A budget it takes (and 0 for a Flash model, whose thinking it turns off) is answered."""
    from google.genai import errors

    def ask(model: str, budget: int) -> object:
        config = {"thinking_config": {"thinking_budget": budget}}
        if stream:
            return list(genai_client.models.generate_content_stream(model=model, contents="[[words=3]]", config=config))
        return genai_client.models.generate_content(model=model, contents="[[words=3]]", config=config)

    with pytest.raises(errors.ClientError) as caught:
        ask(model, 0)
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert caught.value.message == "Budget 0 is invalid. This model only works in thinking mode."
    assert ask(model, 1024)
    assert ask("gemini-2.5-flash", 0)


# -- Mistral's routes: OpenAI's protocol, strict about its fields ----------------------------------------------


def test_mistral_refuses_the_fields_it_does_not_take_with_its_422(upstream: FakeUpstream) -> None:
    mistral = openai.OpenAI(base_url=upstream.base_url + "/mistral/v1", api_key="mistral-key", max_retries=0)
    messages = [{"role": "user", "content": "[[words=3]]"}]
    for extra in (
        {"stream_options": {"include_usage": True}, "stream": True},
        {"max_completion_tokens": 5},
        {"seed": 7},
        {"logprobs": True},
    ):
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            mistral.chat.completions.create(model="mistral-small-latest", messages=messages, **extra)
        body = caught.value.response.json()
        assert body["object"] == "error" and body["type"] == "invalid_request_error"
        [detail] = [item for item in body["message"]["detail"] if item["loc"][1] != "stream"]
        assert (detail["type"], detail["msg"]) == ("extra_forbidden", "Extra inputs are not permitted")

    completion = mistral.chat.completions.create(
        model="mistral-small-latest", messages=messages, max_tokens=2, extra_body={"random_seed": 7}
    )
    assert completion.choices[0].message.content == "lorem ipsum"

    chunks = list(mistral.chat.completions.create(model="mistral-small-latest", messages=messages, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"  # usage on the last chunk, unasked
    assert chunks[-1].usage.completion_tokens == 3
    assert all(chunk.usage is None for chunk in chunks[:-1])

    with pytest.raises(openai.UnprocessableEntityError):
        mistral.embeddings.create(model="mistral-embed", input="one two", dimensions=8)
    vector = mistral.embeddings.create(
        model="mistral-embed", input="one two", encoding_format="float", extra_body={"output_dimension": 8}
    )
    assert len(vector.data[0].embedding) == 8
    assert len(mistral.embeddings.create(model="mistral-embed", input=["x"] * 512, encoding_format="float").data) == 512
    with pytest.raises(openai.BadRequestError) as caught:  # Mistral's limit of inputs a request
        mistral.embeddings.create(model="mistral-embed", input=["x"] * 513, encoding_format="float")
    assert "Too many inputs" in caught.value.message


def test_mistral_takes_reasoning_effort_and_guardrails(upstream: FakeUpstream) -> None:
    """Mistral's chat completions take ``reasoning_effort`` (its ``ReasoningEffort``: ``none`` or ``high``, the
    adjustable reasoning of Mistral Small) and ``guardrails`` (a list of its ``GuardrailConfig``), which the Mistral
    route refused with the 422 of a field Mistral does not take; an effort Mistral has not is its 422 of a value
    outside the enum, naming it."""
    mistral = openai.OpenAI(base_url=upstream.base_url + "/mistral/v1", api_key="mistral-key", max_retries=0)
    messages = [{"role": "user", "content": "[[words=3]]"}]
    guardrails = [{"block_on_error": True, "moderation_llm_v1": {"action": "block"}}]
    for effort in ("none", "high"):
        completion = mistral.chat.completions.create(
            model="mistral-small-latest",
            messages=messages,
            reasoning_effort=effort,
            extra_body={"guardrails": guardrails},
        )
        assert completion.choices[0].message.content == "lorem ipsum dolor"
        assert upstream.requests[-1]["body"]["reasoning_effort"] == effort
        assert upstream.requests[-1]["body"]["guardrails"] == guardrails
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        mistral.chat.completions.create(model="mistral-small-latest", messages=messages, reasoning_effort="low")
    [detail] = caught.value.response.json()["message"]["detail"]
    assert (detail["type"], detail["loc"], detail["input"]) == ("enum", ["body", "reasoning_effort"], "low")
    assert detail["msg"] == "Input should be 'none' or 'high'"


def test_mistral_refuses_a_content_chunk_of_a_type_it_has_not_with_its_422(upstream: FakeUpstream) -> None:
    """Mistral's messages take the chunks of its ``ContentChunk`` (text, image_url, document_url, reference, file,
    thinking, input_audio), a system message text and thinking: another, such as OpenAI's ``refusal`` part, is its 422
    naming the chunk; the route took it."""
    refused = {"type": "refusal", "refusal": "Not that."}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "Write it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Half. "}, refused]},
        {"role": "user", "content": "Why?"},
    ]
    body = {"model": "mistral-small-latest", "messages": messages}
    status, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", body)
    assert status == 422, raw
    [detail] = json.loads(raw)["message"]["detail"]
    assert (detail["type"], detail["loc"], detail["input"]) == (
        "union_tag_invalid",
        ["body", "messages", 2, "assistant", "content", 1],
        refused,
    )
    assert "Input tag 'refusal' found using 'type'" in detail["msg"]

    messages[2]["content"][1] = {"type": "text", "text": "Not that."}
    status, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", body)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "Echo: Why?", raw

    messages[0]["content"].append({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})
    status, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", body)
    assert status == 422 and json.loads(raw)["message"]["detail"][0]["loc"][2:] == [0, "system", "content", 1], raw


def test_ollama_answers_one_choice_whatever_n_asked(upstream: FakeUpstream) -> None:
    ollama = openai.OpenAI(base_url=upstream.base_url + "/ollama/v1", api_key="ollama", max_retries=0)
    messages = [{"role": "user", "content": "[[words=3]]"}]
    completion = ollama.chat.completions.create(model="llama3.2", messages=messages, n=3)
    assert len(completion.choices) == 1 and completion.usage.completion_tokens == 3
    chunks = list(ollama.chat.completions.create(model="llama3.2", messages=messages, n=3, stream=True))
    assert {choice.index for chunk in chunks for choice in chunk.choices} == {0}


def test_ollama_limits_a_reply_by_max_tokens_only(upstream: FakeUpstream) -> None:
    # Ollama's ChatCompletionRequest has no max_completion_tokens: the field is ignored, max_tokens honoured.
    ollama = openai.OpenAI(base_url=upstream.base_url + "/ollama/v1", api_key="ollama", max_retries=0)
    messages = [{"role": "user", "content": "[[words=6]]"}]
    unlimited = ollama.chat.completions.create(model="llama3.2", messages=messages, max_completion_tokens=2)
    assert (unlimited.usage.completion_tokens, unlimited.choices[0].finish_reason) == (6, "stop")
    limited = ollama.chat.completions.create(model="llama3.2", messages=messages, max_tokens=2)
    assert (limited.usage.completion_tokens, limited.choices[0].finish_reason) == (2, "length")


def test_ollama_refuses_a_content_part_it_does_not_read(upstream: FakeUpstream) -> None:
    """As Ollama's OpenAI compatibility (its ``FromChatRequest``): a message's parts are text or image_url, whatever its
    role; another, such as an assistant's ``refusal`` part, is its 400 ``invalid message format``. The route took it."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Draw it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Half. "}, image]},
        {"role": "user", "content": "Why?"},
    ]
    body = {"model": "llama3.2", "messages": messages}
    status, _, raw = http(upstream, "POST", "/ollama/v1/chat/completions", body)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "Echo: Why?", raw

    messages[1]["content"].append({"type": "refusal", "refusal": "Not the rest."})
    status, _, raw = http(upstream, "POST", "/ollama/v1/chat/completions", body)
    assert status == 400, raw
    assert json.loads(raw)["error"] == {
        "message": "invalid message format",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_openai_refuses_a_limit_past_what_the_model_writes(oai: openai.OpenAI, name: str) -> None:
    """As OpenAI's: a limit past the model's most (16384 for gpt-4o-mini) is a 400 naming it."""
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="fake-gpt-4o-mini", messages=user("hi"), **{name: 16_385})
    assert refused.value.body["param"] == name and refused.value.code == "invalid_value"
    assert f"{name} is too large: 16385" in refused.value.message
    assert oai.chat.completions.create(model="fake-gpt-4o-mini", messages=user("hi"), **{name: 16_384}).choices
    assert oai.chat.completions.create(model="some-other-model", messages=user("hi"), **{name: 100_000}).choices


def test_mistral_takes_a_last_assistant_message_only_as_a_prefix(upstream: FakeUpstream) -> None:
    """As Mistral: a last assistant message is a 400 unless it says ``"prefix": true``; then the reply begins with
    it, whole or streamed (``[[prefix_echo=off]]``: it only continues it)."""
    prefill = {"role": "assistant", "content": "Echo: "}
    body = {"model": "mistral-small-latest", "messages": [*user("hi"), prefill]}
    status, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", body)
    assert status == 400 and json.loads(raw)["type"] == "invalid_request_message_order", raw
    assert "Assistant with prefix True" in json.loads(raw)["message"]

    body["messages"][-1] = {**prefill, "prefix": True}
    status, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", body)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "Echo: Echo: hi", raw
    assert json.loads(raw)["usage"]["completion_tokens"] == len(split_tokens("Echo: Echo: hi"))

    status, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", {**body, "stream": True})
    deltas = [chunk["choices"][0]["delta"].get("content") or "" for chunk in openai_sse(raw)[:-1] if chunk["choices"]]
    assert status == 200 and "".join(deltas) == "Echo: Echo: hi"
    assert len([delta for delta in deltas if delta]) > 2, "the prefix in pieces, as any text"

    body["messages"][0]["content"] = "hi [[prefix_echo=off]]"
    _, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", body)
    assert json.loads(raw)["choices"][0]["message"]["content"] == "Echo: hi"
    _, _, raw = http(upstream, "POST", "/mistral/v1/chat/completions", {**body, "stream": True})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in openai_sse(raw)[:-1] if c["choices"]) == (
        "Echo: hi"
    )
