"""Responses and stream chunks meet OpenAI's published schema even when the upstream left out a field the
schema requires, as several OpenAI-compatible servers do (``[[omit=...]]`` steers the fake upstream).

Each case is first shown to break the schema straight from the upstream, so that the test through llmhub
can fail; then the same request through llmhub, with the official openai SDK, validates."""

from __future__ import annotations

import json

import httpx
import pytest
from jsonschema import ValidationError

from llmhub.testing.openapi import validate_openai_schema
from tests.gateway.test_chat_completions import WEATHER_TOOL
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

# What OpenAI's schema requires and some server leaves out. `finish_reason` in a stream is left out only
# where it is null (the chunk that finishes still says why).
RESPONSE_FIELDS = [
    "logprobs",
    "refusal",
    "content",
    "role",
    "index",
    "finish_reason",
    "id",
    "object",
    "created",
    "model",
    "tool_calls.type",
    "usage.total_tokens",
]
CHUNK_FIELDS = [
    "index",
    "finish_reason",
    "id",
    "object",
    "created",
    "model",
    "tool_calls.index",
    "usage.total_tokens",
]
# Asked with a tool: a server that leaves `content` out does so when it calls one.
WITH_TOOLS = {"content", "tool_calls.type", "tool_calls.index"}


def request_for(field: str, *, stream: bool) -> dict:
    body: dict = {
        "messages": [{"role": "user", "content": f"what is the weather in Paris [[omit={field}]]"}],
    }
    if field in WITH_TOOLS:
        body["tools"] = [WEATHER_TOOL]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def upstream_documents(upstream, field: str, *, stream: bool) -> list[dict]:
    """The upstream's own answer to the same request, straight from the fake server."""
    body = {"model": "fake-gpt-4o-mini", **request_for(field, stream=stream)}
    response = httpx.post(upstream.base_url + "/v1/chat/completions", json=body, timeout=20)
    assert response.status_code == 200
    if not stream:
        return [response.json()]
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def fails_schema(document: dict, schema: str) -> bool:
    try:
        validate_openai_schema(document, schema)
    except ValidationError:
        return True
    return False


@pytest.mark.parametrize("field", RESPONSE_FIELDS)
def test_a_response_missing_a_required_field_is_filled_in(gateway, field):
    (upstream_answer,) = upstream_documents(gateway.upstream, field, stream=False)
    assert fails_schema(upstream_answer, "CreateChatCompletionResponse")

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-test", **request_for(field, stream=False)
    )
    answer = json.loads(raw.http_response.text)

    validate_openai_schema(answer, "CreateChatCompletionResponse")
    assert answer["model"] == "gpt-test"
    choice = answer["choices"][0]
    if field in WITH_TOOLS:
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        assert choice["message"]["tool_calls"][0]["type"] == "function"
    else:
        assert choice["message"]["content"] == "Echo: what is the weather in Paris"
        assert choice["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])


@pytest.mark.parametrize("field", CHUNK_FIELDS)
def test_stream_chunks_missing_a_required_field_are_filled_in(gateway, field):
    upstream_chunks = upstream_documents(gateway.upstream, field, stream=True)
    assert any(fails_schema(chunk, "CreateChatCompletionStreamResponse") for chunk in upstream_chunks)

    client = gateway.client()
    with client.chat.completions.with_streaming_response.create(
        model="gpt-test", **request_for(field, stream=True)
    ) as response:
        lines = [line for line in response.iter_lines() if line]
        request_id = response.headers["x-request-id"]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]

    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    # Every chunk of one stream has the same id and timestamp, made up or not.
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert len({chunk["created"] for chunk in chunks}) == 1
    assert {chunk["model"] for chunk in chunks} == {"gpt-test"}
    deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
    if field in WITH_TOOLS:
        arguments = "".join(call["function"].get("arguments") or "" for d in deltas for call in d.get("tool_calls", ()))
        assert json.loads(arguments) == {"city": "what is the weather in Paris"}
    else:
        assert "".join(d.get("content") or "" for d in deltas) == "Echo: what is the weather in Paris"
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert wait_for_record(request_id).completion_tokens == usage["completion_tokens"]


def test_the_sdk_reads_a_filled_in_stream_as_it_reads_openai(gateway):
    """The SDK's typed objects, not only the raw JSON: what a client program actually sees."""
    stream = gateway.client().chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hello [[omit=id,created,object,index,finish_reason]]"}],
        stream=True,
    )
    chunks = list(stream)
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "Echo: hello"
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["response", "stream"])
def test_a_translated_anthropic_answer_meets_the_schema(gateway, stream):
    """An Anthropic deployment's answer is built by llmhub's translation, which must meet the schema too."""
    body = {"model": "claude-test", **request_for("nothing", stream=stream)}
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    )
    assert response.status_code == 200
    if not stream:
        validate_openai_schema(response.json(), "CreateChatCompletionResponse")
        return
    events = [event.removeprefix("data: ") for event in response.text.split("\n\n") if event]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        validate_openai_schema(json.loads(event), "CreateChatCompletionStreamResponse")
