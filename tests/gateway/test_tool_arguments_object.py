"""A tool call whose ``function.arguments`` an OpenAI-compatible server sends as a JSON object, not its text (Hugging
Face TGI; llama.cpp's server with ``--tool-args-object``; the fake upstream's ``[[arguments=object]]``): every entry
point that can ask for tools (chat completions, ``/v1/messages``, ``/v1/responses``) answers the call, its arguments
the object's exact JSON text. The chat WebSocket sends no tools, so it never gets a call."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest

from billing.models import UsageStatus
from llmhub.testing.openapi import validate_openai_schema
from tests.gateway.chat_streams import assert_valid_stream, chat_stream, tool_call_pieces
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

OBJECT = "[[arguments=object]]"
# A text with what a compact JSON writer could get wrong: a quote, a backslash, a line break and a non-ASCII letter.
CITY = 'Zürich "old town" \\ east\nside'
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "array"}},
    "required": ["city"],
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
ARGUMENTS = {"city": CITY, "days": 42, "units": []}


def chat(gateway, **extra: Any) -> httpx.Response:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": f"{CITY} {OBJECT}"}], **extra}
    return httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
    )


def test_the_upstream_sends_the_arguments_as_an_object(gateway):
    """What the test's upstream says, straight: the object, not its text."""
    answer = httpx.post(
        gateway.upstream.base_url + "/v1/chat/completions",
        json={
            "model": "fake-gpt-4o-mini",
            "messages": [{"role": "user", "content": f"{CITY} {OBJECT}"}],
            "tools": [TOOL],
        },
        timeout=20,
    ).json()
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == ARGUMENTS


def test_a_whole_replys_call_with_object_arguments_is_answered_with_their_exact_text(gateway):
    """Before: a 502 (a function that is not an object with a text name and arguments), every call of such a
    deployment failed."""
    response = chat(gateway, tools=[TOOL])
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    [call] = response.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"] == json.dumps(ARGUMENTS, separators=(",", ":"), ensure_ascii=False)
    assert json.loads(call["function"]["arguments"]) == ARGUMENTS
    record = wait_for_record(response.headers["x-request-id"])
    assert (record.status, record.usage_estimated) == (UsageStatus.OK, False)


def test_a_legacy_function_call_with_object_arguments_is_answered_with_their_text(gateway):
    response = chat(gateway, functions=[TOOL["function"]])
    assert response.status_code == 200, response.text
    validate_openai_schema(response.json(), "CreateChatCompletionResponse")
    assert json.loads(response.json()["choices"][0]["message"]["function_call"]["arguments"]) == ARGUMENTS


def test_a_streamed_call_whose_arguments_come_as_one_object_is_relayed_as_their_text(gateway):
    """Before: the stream ended in band with upstream_stream_interrupted at the object."""
    stream = chat_stream(gateway, f"{CITY} {OBJECT}", tools=[TOOL])
    assert stream.done, stream.raw
    chunks = stream.chunks
    assert_valid_stream(chunks, done=True)
    pieces = tool_call_pieces(chunks)
    assert {piece["index"] for piece in pieces} == {0}
    assert json.loads("".join(piece["function"].get("arguments") or "" for piece in pieces)) == ARGUMENTS
    assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == ["tool_calls"]
    assert wait_for_record(stream.request_id).status == UsageStatus.OK


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_messages_translation_answers_the_call_with_its_input(gateway, stream):
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    request: dict[str, Any] = {
        "model": "gpt-test",
        "max_tokens": 100,
        "tools": [{"name": "get_weather", "input_schema": SCHEMA}],
        "messages": [{"role": "user", "content": f"{CITY} {OBJECT}"}],
    }
    if stream:
        with sdk.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = sdk.messages.create(**request)
    calls = [block for block in message.content if block.type == "tool_use"]
    assert [(call.name, call.input) for call in calls] == [("get_weather", ARGUMENTS)]
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_responses_translation_answers_the_call_with_its_text(gateway, stream):
    tool = {"type": "function", "name": "get_weather", "parameters": SCHEMA}
    request: dict[str, Any] = {"model": "gpt-test", "input": f"{CITY} {OBJECT}", "tools": [tool]}
    client = gateway.client()
    if stream:
        with client.responses.create(**request, stream=True) as events:
            final = list(events)[-1]
        assert final.type == "response.completed"
        response = final.response
    else:
        response = client.responses.create(**request)
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", ARGUMENTS)]
