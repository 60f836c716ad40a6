"""A streamed ``delta.tool_calls`` an OpenAI-compatible server sends as the one call piece itself, an object, not an
array of it (older versions of Hugging Face TGI's OpenAI-compatible route; the fake upstream's
``[[tool_calls_shape=object]]``), alone and with the arguments as an object too (``[[arguments=object]]``, TGI's
other habit): each streamed entry point that can ask for tools (chat completions, ``/v1/messages``,
``/v1/responses``) answers the call, the chunks it relays of OpenAI's schema (``StreamShape``: the object made an
array of that one call)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest

from billing.models import UsageStatus
from llmhub.testing.openapi import validate_openai_schema
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

SHAPE = "[[tool_calls_shape=object]]"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
CITY = 'Zürich "old town"'
# The fake upstream's call: its arguments are what the user's text names (``_build_reply``).
MARKERS = {"text-arguments": SHAPE, "object-arguments": f"{SHAPE} [[arguments=object]]"}


def streamed_chunks(gateway, text: str) -> tuple[list[dict[str, Any]], str]:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": text}], "tools": [TOOL], "stream": True}
    headers = {"Authorization": f"Bearer {gateway.key}"}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=20) as response:
        assert response.status_code == 200, response.read()
        raw = response.read()
        request_id = response.headers["x-request-id"]
    payloads = [block.removeprefix(b"data: ") for block in raw.split(b"\n\n") if block]
    assert payloads[-1] == b"[DONE]", raw
    return [json.loads(payload) for payload in payloads[:-1]], request_id


def test_the_upstream_streams_the_call_as_an_object(gateway):
    """What the test's upstream says, straight: each delta's tool_calls is an object."""
    body = {"model": "fake-gpt-4o-mini", "messages": [{"role": "user", "content": f"{CITY} {SHAPE}"}]}
    with httpx.stream(
        "POST", gateway.upstream.base_url + "/v1/chat/completions", json={**body, "tools": [TOOL], "stream": True}
    ) as response:
        raw = response.read()
    chunks = [json.loads(block.removeprefix(b"data: ")) for block in raw.split(b"\n\n") if block.startswith(b"data: {")]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    deltas = [delta for delta in deltas if "tool_calls" in delta]
    assert len(deltas) > 2 and all(type(delta["tool_calls"]) is dict for delta in deltas)
    assert deltas[0]["tool_calls"]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("markers", list(MARKERS.values()), ids=list(MARKERS))
def test_a_chat_stream_relays_the_call_as_an_array_of_it(gateway, markers):
    """Before: a 502 upstream_stream_interrupted ("a malformed chunk": tool_calls that are not a list) at the call's
    first piece, the stream's first chunk (after text, the stream would have ended in band there), on every entry
    point: the call was lost."""
    chunks, request_id = streamed_chunks(gateway, f"{CITY} {markers}")
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    pieces = [
        call for chunk in chunks if chunk["choices"] for call in chunk["choices"][0]["delta"].get("tool_calls") or ()
    ]
    assert {piece["index"] for piece in pieces} == {0}
    assert [piece["function"]["name"] for piece in pieces if piece["function"].get("name")] == ["get_weather"]
    assert json.loads("".join(piece["function"].get("arguments") or "" for piece in pieces)) == {"city": CITY}
    assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == ["tool_calls"]
    assert wait_for_record(request_id).status == UsageStatus.OK


@pytest.mark.parametrize("markers", list(MARKERS.values()), ids=list(MARKERS))
def test_a_messages_stream_answers_the_call_with_its_input(gateway, markers):
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    request: dict[str, Any] = {
        "model": "gpt-test",
        "max_tokens": 100,
        "tools": [{"name": "get_weather", "input_schema": SCHEMA}],
        "messages": [{"role": "user", "content": f"{CITY} {markers}"}],
    }
    with sdk.messages.stream(**request) as events:
        message = events.get_final_message()
    calls = [block for block in message.content if block.type == "tool_use"]
    assert [(call.name, call.input) for call in calls] == [("get_weather", {"city": CITY})]
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("markers", list(MARKERS.values()), ids=list(MARKERS))
def test_a_responses_stream_answers_the_call_with_its_text(gateway, markers):
    tool = {"type": "function", "name": "get_weather", "parameters": SCHEMA}
    with gateway.client().responses.create(
        model="gpt-test", input=f"{CITY} {markers}", tools=[tool], stream=True
    ) as events:
        final = list(events)[-1]
    assert final.type == "response.completed", final
    calls = [item for item in final.response.output if item.type == "function_call"]
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": CITY})]
