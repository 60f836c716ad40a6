"""The fill-in of what OpenAI's schema requires, as pure functions: a valid chunk is left alone (its bytes can
be relayed), an incomplete one is completed so that it validates, and the stream's id and timestamp stay
the same across its chunks."""

from __future__ import annotations

import copy

from llmhub.testing.openapi import validate_openai_schema
from providers.adapters.openai_shape import StreamShape, completion_conform

VALID_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
}


def test_a_valid_chunk_is_left_exactly_as_it_came():
    chunk = copy.deepcopy(VALID_CHUNK)

    assert StreamShape("m").conform(chunk) is True
    assert chunk == VALID_CHUNK


def test_later_chunks_get_the_first_chunks_id_and_timestamp():
    shape = StreamShape("up-model")
    shape.conform(copy.deepcopy(VALID_CHUNK))
    bare = {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "{}"}}]}}], "usage": {"prompt_tokens": 3}}

    assert shape.conform(bare) is False
    validate_openai_schema(bare, "CreateChatCompletionStreamResponse")
    assert (bare["id"], bare["created"], bare["model"]) == ("chatcmpl-1", 1700000000, "up-model")
    assert bare["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert bare["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}


def test_a_stream_without_ids_makes_one_up_for_all_its_chunks():
    shape = StreamShape("m")
    first, second = ({"choices": [{"index": 0, "delta": {}, "finish_reason": None}]} for _ in range(2))
    shape.conform(first)
    shape.conform(second)

    assert first["id"].startswith("chatcmpl-") and first["id"] == second["id"]
    assert first["created"] == second["created"]


def test_a_bare_completion_is_completed():
    completion = {
        "created": 1700000000.7,
        "choices": [{"message": {"tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2},
    }

    completion_conform(completion, model="up-model")

    validate_openai_schema(completion, "CreateChatCompletionResponse")
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert (completion["created"], completion["model"], completion["usage"]["total_tokens"]) == (
        1700000000,
        "up-model",
        7,
    )


def test_a_null_usage_in_a_completion_is_dropped():
    completion = {"id": "x", "choices": [], "usage": None}

    completion_conform(completion, model="m")

    assert "usage" not in completion
    validate_openai_schema(completion, "CreateChatCompletionResponse")
