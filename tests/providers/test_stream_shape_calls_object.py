"""``StreamShape`` and a delta's ``tool_calls`` sent as the one call piece itself, an object (older versions of
Hugging Face TGI's OpenAI-compatible route): it becomes the array of that one call; before, the chunk was a
malformed reply (``tool_calls that are not a list``) and the stream ended at the call's first piece."""

from __future__ import annotations

from llmhub.testing.openapi import validate_openai_schema
from providers.adapters.openai_shape import StreamShape


def chunk(delta: dict) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }


def test_a_call_piece_sent_as_an_object_is_the_array_of_it():
    shape = StreamShape("m")
    opening = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    pieces = [
        chunk({"role": "assistant", "tool_calls": opening}),
        chunk({"tool_calls": {"function": {"arguments": ""}}}),
    ]
    for piece in pieces:
        assert shape.conform(piece) is False  # filled: its bytes are encoded again
        validate_openai_schema(piece, "CreateChatCompletionStreamResponse")
    assert pieces[0]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    # A piece without its index continues the call the stream is in (``_calls_numbered``), as in an array.
    assert pieces[1]["choices"][0]["delta"]["tool_calls"] == [{"index": 0, "function": {"arguments": ""}}]
