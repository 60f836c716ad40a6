"""Odd chat streams of an OpenAI-protocol upstream (empty deltas, a tool call's arguments split into many pieces, the
usage only at the end, with the finish or on every chunk, a failure after the stream began) read through the two other
protocols llmhub streams to its clients: Anthropic's Messages (``/v1/messages``: every event validated strictly by the
``anthropic`` SDK's ``RawMessageStreamEvent``, in Anthropic's order, the message gathered by ``client.messages.stream``;
a failure Anthropic's ``error`` event, its ``ErrorResponse``, and no ``message_stop``) and OpenAI's Responses
(``/v1/responses``: every event against the spec's ``ResponseStreamEvent``, gathered by ``client.responses.stream``; a
failure ``response.failed``). The whole replies' twin is ``test_translated_odd_shapes.py``."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from anthropic.types import ErrorResponse

from llmhub.testing.fake_upstream import raw_directive
from tests.gateway.test_messages_api import EVENT, assert_anthropic_sequence, client
from tests.gateway.test_messages_api import raw_events as message_events
from tests.gateway.test_responses_api import assert_spec_sequence, validate_event
from tests.gateway.test_responses_api import raw_events as response_events
from tests.gateway.test_translated_odd_shapes import (
    HEAD,
    OMIT,
    USAGE,
    blocks,
    message_request,
    response_request,
    streamed,
    whole,
)
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

CHUNK = {**HEAD, "object": "chat.completion.chunk"}
PARIS = {"city": "Paris"}


def call_start(call_id: str = "call_1", index: int = 0) -> dict:
    function = {"name": "get_weather", "arguments": ""}
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function", "function": function}]}


def arguments(piece: str, index: int = 0) -> dict:
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


SPLIT = ["", "{", '"ci', "ty", '": ', "", '"Pa', "ris", '"', "}"]
# Each: the upstream's deltas, its finish, its usage; the Messages reply's blocks and stop reason.
ODD = {
    "empty-deltas": (
        [{"role": "assistant"}, {}, {"content": ""}, {"content": "Hel"}, {}, {"content": ""}, {"content": "lo"}],
        "stop",
        USAGE,
        [("text", "Hello")],
        "end_turn",
    ),
    "nulls-in-empty-deltas": (
        [{"role": "assistant", "content": None}, {"content": None}, {"content": "Hello"}, {"content": None}],
        "stop",
        USAGE,
        [("text", "Hello")],
        "end_turn",
    ),
    "arguments-split": (
        [{"role": "assistant", "content": None}, call_start(), *(arguments(piece) for piece in SPLIT)],
        "tool_calls",
        USAGE,
        [("tool_use", "get_weather", PARIS)],
        "tool_use",
    ),
    "text-then-arguments-split": (
        [{"role": "assistant", "content": "Let me look."}, {}, call_start(), *(arguments(piece) for piece in SPLIT)],
        "tool_calls",
        USAGE,
        [("text", "Let me look."), ("tool_use", "get_weather", PARIS)],
        "tool_use",
    ),
    "two-calls-split": (
        [
            {"role": "assistant"},
            call_start("call_1", 0),
            *(arguments(piece, 0) for piece in SPLIT),
            call_start("call_2", 1),
            *(arguments(piece, 1) for piece in SPLIT),
        ],
        "tool_calls",
        USAGE,
        [("tool_use", "get_weather", PARIS), ("tool_use", "get_weather", PARIS)],
        "tool_use",
    ),
    "call-without-arguments": (
        [{"role": "assistant"}, call_start()],
        "tool_calls",
        USAGE,
        [("tool_use", "get_weather", {})],
        "tool_use",
    ),
    "usage-left-out": ([{"role": "assistant", "content": "Hello"}], "stop", OMIT, [("text", "Hello")], "end_turn"),
    "usage-null": ([{"role": "assistant", "content": "Hello"}], "stop", None, [("text", "Hello")], "end_turn"),
}


def with_usage_on(chunks_of: bytes, where: str) -> bytes:
    """``chunks_of``'s stream with its usage moved: onto the finish chunk, or onto every chunk."""
    events = [block for block in chunks_of.split(b"\n\n") if block]
    chunks = [json.loads(block.removeprefix(b"data: ")) for block in events if block != b"data: [DONE]"]
    [usage] = [chunk.pop("usage") for chunk in chunks if not chunk["choices"]]
    chunks = [chunk for chunk in chunks if chunk["choices"]]
    for chunk in chunks if where == "every" else chunks[-1:]:
        chunk["usage"] = usage
    return b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def upstream(case: str, usage_on: str) -> bytes:
    deltas, finish, usage, _, _ = ODD[case]
    raw = streamed(deltas, finish, usage)
    return with_usage_on(raw, usage_on) if usage_on != "end" and usage is USAGE else raw


# Where the upstream says its usage: in a chunk of its own at the end, on the finish chunk, on every chunk.
CASES = [
    pytest.param(case, usage_on, id=f"{case}-{usage_on}")
    for case in ODD
    for usage_on in ("end", "finish", "every")
    if usage_on == "end" or ODD[case][2] is USAGE
]


@pytest.mark.parametrize(("case", "usage_on"), CASES)
def test_an_odd_stream_is_anthropics_events_and_message(gateway, case, usage_on):
    _, _, usage, expected, stop = ODD[case]
    raw = upstream(case, usage_on)
    reply, events = message_events(gateway, message_request(raw))
    assert reply.status_code == 200
    decoded = [json.loads(data) for _, data in events]
    assert [name for name, _ in events] == [event["type"] for event in decoded]
    assert_anthropic_sequence(decoded)
    [delta] = [event for event in decoded if event["type"] == "message_delta"]
    assert delta["delta"]["stop_reason"] == stop
    if usage is USAGE:
        assert delta["usage"]["output_tokens"] == USAGE["completion_tokens"]
    with client(gateway).messages.stream(**message_request(raw)) as stream:
        message = stream.get_final_message()
    assert blocks(message) == expected and message.stop_reason == stop
    assert wait_for_record(reply.headers["x-request-id"]).status == "ok"


@pytest.mark.parametrize(("case", "usage_on"), CASES)
def test_an_odd_stream_is_the_specs_response_events(gateway, case, usage_on):
    _, _, usage, expected, _ = ODD[case]
    raw = upstream(case, usage_on)
    reply, events = response_events(gateway, response_request(raw))
    assert reply.status_code == 200
    assert_spec_sequence([event for _, event in events])
    response = events[-1][1]["response"]
    assert response["status"] == "completed"
    if usage is USAGE:
        assert response["usage"]["output_tokens"] == USAGE["completion_tokens"]
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=20)
    with sdk.responses.stream(**response_request(raw)) as helper:
        final = helper.get_final_response()
    items = [
        ("text", item.content[0].text)
        if item.type == "message"
        else ("tool_use", item.name, json.loads(item.arguments))
        for item in final.output
    ]
    assert items == expected
    assert wait_for_record(reply.headers["x-request-id"]).status == "ok"


def sse(*chunks: dict | bytes) -> bytes:
    return b"".join(
        chunk if isinstance(chunk, bytes) else b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks
    )


def delta_chunk(delta: dict) -> dict:
    return {**CHUNK, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


IN_BAND = {"error": {"message": "The server had an error.", "type": "server_error", "param": None, "code": None}}
BEGUN = [delta_chunk({"role": "assistant", "content": "Hel"}), delta_chunk({"content": ""}), delta_chunk({})]
IN_CALL = [delta_chunk({"role": "assistant"}), delta_chunk(call_start()), *map(delta_chunk, map(arguments, SPLIT[:4]))]
# Each: how an upstream fails after its stream began.
FAILURES = {
    "error-chunk-in-text": sse(*BEGUN, IN_BAND),
    "error-event-in-text": sse(*BEGUN, b"event: error\ndata: " + json.dumps(IN_BAND).encode() + b"\n\n"),
    "ended-without-finish-in-text": sse(*BEGUN),
    "ended-without-finish-after-usage": sse(*BEGUN, {**CHUNK, "choices": [], "usage": USAGE}),
    "error-chunk-in-a-call": sse(*IN_CALL, IN_BAND),
    "ended-without-finish-in-a-call": sse(*IN_CALL),
    "not-json-in-text": sse(*BEGUN, b"data: {not json\n\n"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failure_after_the_stream_began_is_anthropics_error_event(gateway, case):
    reply, events = message_events(gateway, message_request(FAILURES[case]))
    assert reply.status_code == 200
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "error", names
    assert "message_stop" not in names and "message_delta" not in names
    for _, data in events[:-1]:
        event = json.loads(data)
        if event["type"] != "ping":
            EVENT.validate_python(event, strict=True)
    error = ErrorResponse.model_validate(json.loads(events[-1][1]), strict=True)
    assert error.error.message and "sk-" not in error.error.message
    with (
        pytest.raises(anthropic.APIStatusError),
        client(gateway).messages.stream(**message_request(FAILURES[case])) as s,
    ):
        s.get_final_message()
    assert wait_for_record(reply.headers["x-request-id"]).status == "upstream_error"


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failure_after_the_stream_began_is_response_failed(gateway, case):
    reply, events = response_events(gateway, response_request(FAILURES[case]))
    assert reply.status_code == 200
    for _, event in events:
        validate_event(event)
    assert [event["sequence_number"] for _, event in events] == list(range(len(events)))
    kinds = [event["type"] for _, event in events]
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds, kinds
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"]
    assert wait_for_record(reply.headers["x-request-id"]).status == "upstream_error"


def test_a_call_given_no_arguments_is_one_of_an_empty_object_in_a_whole_response(gateway):
    """The whole reply's twin of ``call-without-arguments`` (a function of no parameters, from a server that sends
    its call no arguments): the ``function_call`` item's arguments are ``{}``, as OpenAI's are, which a client parses.
    Before, ``""`` whole and streamed (``json.loads`` failed on it, as Codex's parse does)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    raw = whole({"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls")
    headers = {"Authorization": f"Bearer {gateway.key}"}
    reply = httpx.post(gateway.url + "/v1/responses", json=response_request(raw), headers=headers, timeout=20)
    assert reply.status_code == 200, reply.text
    [item] = reply.json()["output"]
    assert (item["type"], item["name"], json.loads(item["arguments"])) == ("function_call", "get_weather", {})


def anthropic_sse(*events: dict) -> bytes:
    return b"".join(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events)


def claude_stream(*middle: dict, end: bool = True) -> bytes:
    """A Claude stream: ``message_start`` (its usage counting the prompt only), ``middle``, then (``end``) the
    ``message_delta`` with the output's count and ``message_stop``."""
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_odd",
            "type": "message",
            "role": "assistant",
            "model": "claude-fake",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 1},
        },
    }
    closing = [
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 8},
        },
        {"type": "message_stop"},
    ]
    return anthropic_sse(start, *middle, *(closing if end else ()))


def block(index: int, kind: str, *deltas: dict) -> list[dict]:
    started = (
        {"type": "text", "text": ""}
        if kind == "text"
        else {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    )
    return [
        {"type": "content_block_start", "index": index, "content_block": started},
        *({"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas),
        {"type": "content_block_stop", "index": index},
    ]


def text_delta(text: str) -> dict:
    return {"type": "text_delta", "text": text}


def json_delta(piece: str) -> dict:
    return {"type": "input_json_delta", "partial_json": piece}


CLAUDE_ODD = claude_stream(
    {"type": "ping"},
    *block(0, "text", text_delta(""), text_delta("Let me "), text_delta(""), text_delta("look.")),
    *block(1, "tool_use", *(json_delta(piece) for piece in SPLIT)),
)
CLAUDE_FAILED = claude_stream(
    *block(0, "text", text_delta("Let me")),
    {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    end=False,
)


def claude_prompt(raw: bytes) -> str:
    return "Paris " + raw_directive(raw, marker="raw_anthropic")


def claude_request(raw: bytes) -> dict:
    """A /v1/messages request to ``claude-test``, answered with Claude's stream ``raw``."""
    return {
        **message_request(b""),
        "model": "claude-test",
        "messages": [{"role": "user", "content": claude_prompt(raw)}],
    }


def test_an_odd_claude_stream_is_anthropics_events_and_the_specs_response_events(gateway):
    """Claude's own stream, odd (a ping, empty text deltas, a tool's input in ten pieces, the output counted only at
    the end) through /v1/messages and /v1/responses. Read right before: kept as a guard."""
    body = claude_request(CLAUDE_ODD)
    reply, events = message_events(gateway, body)
    assert reply.status_code == 200
    assert_anthropic_sequence([json.loads(data) for _, data in events])
    with client(gateway).messages.stream(**body) as stream:
        message = stream.get_final_message()
    assert blocks(message) == [("text", "Let me look."), ("tool_use", "get_weather", PARIS)]
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 8

    request = {**response_request(b""), "model": "claude-test", "input": claude_prompt(CLAUDE_ODD)}
    reply, events = response_events(gateway, request)
    assert_spec_sequence([event for _, event in events])
    response = events[-1][1]["response"]
    assert response["status"] == "completed" and response["usage"]["output_tokens"] == 8
    assert [item["type"] for item in response["output"]] == ["message", "function_call"]
    assert json.loads(response["output"][1]["arguments"]) == PARIS


def test_a_claude_error_event_mid_stream_is_anthropics_error_event_and_response_failed(gateway):
    """Claude's ``error`` event after its stream began: Anthropic's ``error`` event on /v1/messages (no
    ``message_stop``), ``response.failed`` on /v1/responses. Read right before: kept as a guard."""
    reply, events = message_events(gateway, claude_request(CLAUDE_FAILED))
    names = [name for name, _ in events]
    assert names[-1] == "error" and "message_stop" not in names, names
    ErrorResponse.model_validate(json.loads(events[-1][1]), strict=True)
    assert wait_for_record(reply.headers["x-request-id"]).status == "upstream_error"

    reply, events = response_events(gateway, {"model": "claude-test", "input": claude_prompt(CLAUDE_FAILED)})
    for _, event in events:
        validate_event(event)
    assert events[-1][1]["type"] == "response.failed"
    assert wait_for_record(reply.headers["x-request-id"]).status == "upstream_error"
