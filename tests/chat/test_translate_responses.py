"""The stream translation of ``/v1/responses`` (``chat.translate_responses.ResponseEvents``) on chunk sequences the
fake upstream does not send: the pieces of parallel tool calls interleaved, as an OpenAI-compatible server may write
them, and text after the calls. The events are checked as ``tests/gateway/test_responses_api.py`` checks a live
stream's."""

from __future__ import annotations

import json

from chat.translate_responses import ResponseEvents
from tests.gateway.test_responses_api import assert_spec_sequence

BODY = {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}]}


def chunk(delta: dict, finish_reason: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def call(index: int, arguments: str, *, call_id: str | None = None) -> dict:
    piece: dict = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        piece.update(id=call_id, type="function")
        piece["function"]["name"] = "f"
    return piece


def run(chunks: list[dict]) -> list[dict]:
    events = ResponseEvents(BODY, response_id="resp_1", model="m", created_at=1)
    out = events.started()
    for piece in chunks:
        out.extend(events.chunk(piece))
    return [*out, *events.completed()]


def test_interleaved_parallel_calls_keep_every_piece_of_their_arguments():
    events = run(
        [
            chunk({"tool_calls": [call(0, '{"a"', call_id="call_a")]}),
            chunk({"tool_calls": [call(1, '{"b"', call_id="call_b")]}),
            chunk({"tool_calls": [call(0, ": 1}")]}),
            chunk({"tool_calls": [call(1, ": 2}")]}, finish_reason="tool_calls"),
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
        ]
    )
    assert_spec_sequence(events)
    output = events[-1]["response"]["output"]
    assert [(item["call_id"], json.loads(item["arguments"])) for item in output] == [
        ("call_a", {"a": 1}),
        ("call_b", {"b": 2}),
    ]
    assert events[-1]["response"]["usage"]["total_tokens"] == 7


def test_text_after_a_call_is_a_message_item_after_it():
    events = run(
        [
            chunk({"tool_calls": [call(0, "{}", call_id="call_a")]}),
            chunk({"content": "and "}),
            chunk({"content": "then"}, finish_reason="stop"),
        ]
    )
    assert_spec_sequence(events)
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["function_call", "message"]
    assert output[1]["content"][0]["text"] == "and then"
    assert events[-1]["type"] == "response.completed" and "usage" not in events[-1]["response"]


def test_a_refusal_is_its_own_content_part_of_the_message():
    events = run([chunk({"refusal": "I can't "}), chunk({"refusal": "help."}), chunk({"content": "Sorry."}, "stop")])
    assert_spec_sequence(events)
    [message] = events[-1]["response"]["output"]
    assert message["content"] == [
        {"type": "refusal", "refusal": "I can't help."},
        {"type": "output_text", "text": "Sorry.", "annotations": [], "logprobs": []},
    ]
