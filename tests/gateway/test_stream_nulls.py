"""A stream whose deltas say null for none (``"role": null``, ``"tool_calls": null``, ``"function_call": null``, as
vLLM, LM Studio, llama.cpp and some OpenRouter routes send them in every chunk; the fake upstream's ``[[nulls=...]]``):
every chunk a client of ``/v1/chat/completions`` gets is of OpenAI's stream schema, and the translations fed by such a
stream (``/v1/messages``, ``/v1/responses`` on an OpenAI-protocol deployment) neither break nor make an empty call
of a null."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest

from billing.models import UsageStatus
from tests.gateway.chat_streams import WEATHER_TOOL, assert_valid_stream, chat_stream, tool_call_pieces
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

NULLS = "[[nulls=role,tool_calls,function_call]]"


def test_a_text_stream_whose_deltas_say_null_for_none_is_relayed_of_openais_schema(gateway):
    """Before, every chunk was relayed with its nulls (the first decoded one taken as valid, the rest read from it
    without a decode), which OpenAI's schema types as a role, an array and an object: a typed client failed on the
    stream's first chunk."""
    stream = chat_stream(gateway, f"[[words=12]] {NULLS}", stream_options={"include_usage": True})
    chunks, request_id = stream.chunks, stream.request_id
    assert stream.done, stream.raw
    assert_valid_stream(chunks, done=True)
    assert all(b'"tool_calls":null' not in line and b'"tool_calls": null' not in line for line in stream.payloads)
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert len(text.split()) == 12
    record = wait_for_record(request_id)
    assert (record.status, record.completion_tokens) == (UsageStatus.OK, 12)
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    # What the upstream itself sends, straight: the nulls in every chunk's delta.
    direct = httpx.post(
        gateway.upstream.base_url + "/v1/chat/completions",
        json={"model": "fake-gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": f"hi {NULLS}"}]},
        timeout=20,
    )
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in direct.text.splitlines() if "delta" in line]
    assert deltas and all({"tool_calls", "function_call"} <= set(delta) for delta in deltas)
    assert [delta["role"] for delta in deltas][1:] == [None] * (len(deltas) - 1)


def test_a_tool_call_stream_whose_deltas_say_null_for_none_relays_the_one_call(gateway):
    stream = chat_stream(gateway, f"Paris {NULLS}", tools=[WEATHER_TOOL])
    assert stream.done, stream.raw
    assert_valid_stream(stream.chunks, done=True)
    pieces = tool_call_pieces(stream.chunks)
    assert {piece["index"] for piece in pieces} == {0}
    assert [piece["function"]["name"] for piece in pieces if piece["function"].get("name")] == ["get_weather"]
    assert json.loads("".join(piece["function"].get("arguments") or "" for piece in pieces)) == {"city": "Paris"}
    assert wait_for_record(stream.request_id).status == UsageStatus.OK


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tool call"])
def test_the_messages_translation_of_such_a_stream_makes_no_call_of_a_null(gateway, tools):
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    request: dict[str, Any] = {"model": "gpt-test", "max_tokens": 100}
    if tools:
        request["tools"] = [{"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    with sdk.messages.stream(**request, messages=[{"role": "user", "content": f"Paris {NULLS}"}]) as stream:
        message = stream.get_final_message()
    calls = [block for block in message.content if block.type == "tool_use"]
    if tools:
        assert [(call.name, call.input) for call in calls] == [("get_weather", {"city": "Paris"})]
        assert message.stop_reason == "tool_use"
    else:
        assert calls == [] and message.stop_reason == "end_turn"
        assert "".join(block.text for block in message.content if block.type == "text").startswith("Echo: Paris")


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tool call"])
def test_the_responses_translation_of_such_a_stream_makes_no_call_of_a_null(gateway, tools):
    extra: dict[str, Any] = {}
    if tools:
        tool = {"type": "function", "name": "get_weather", **WEATHER_TOOL["function"]}
        extra = {"tools": [tool], "tool_choice": "required"}
    with gateway.client().responses.create(model="gpt-test", input=f"Paris {NULLS}", stream=True, **extra) as stream:
        events = list(stream)
    final = events[-1]
    assert final.type == "response.completed"
    calls = [item for item in final.response.output if item.type == "function_call"]
    if tools:
        assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": "Paris"})]
    else:
        assert calls == [] and final.response.output_text.startswith("Echo: Paris")


@pytest.mark.parametrize("nulls", ["", NULLS], ids=["as sent", "with nulls"])
def test_several_streamed_calls_numbered_by_none_each_keep_their_arguments(gateway, nulls):
    """A server that calls several tools at once and numbers no call piece (``[[omit=tool_calls.index]]``): each
    piece's index is filled in, so its bytes are encoded again. Before: a piece so filled was learned as the template
    of the next argument pieces (8311dbe), which were then relayed with its call's index: the last call's arguments
    were joined to the one before (its own came out empty), here and on /v1/messages."""
    content = f"Paris [[tool_calls=3]] [[omit=tool_calls.index]] {nulls}"
    stream = chat_stream(gateway, content, tools=[WEATHER_TOOL])
    assert stream.done, stream.raw
    assert_valid_stream(stream.chunks, done=True)
    pieces = tool_call_pieces(stream.chunks)
    for index in range(3):
        arguments = "".join(piece["function"].get("arguments") or "" for piece in pieces if piece["index"] == index)
        assert json.loads(arguments) == {"city": "Paris"}, index
    assert {piece["index"] for piece in pieces} == {0, 1, 2}
    assert wait_for_record(stream.request_id).status == UsageStatus.OK
