"""The fill-in of what OpenAI's schema requires, as pure functions: a valid chunk is left alone (its bytes can
be relayed), an incomplete one is completed so that it validates, and the stream's id and timestamp stay
the same across its chunks."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.pipeline import _chunk_pieces, _completion_text
from llmhub.testing.openapi import validate_openai_schema
from providers.adapters.base import WireChunk, chunk_json
from providers.adapters.openai_shape import MalformedReply, StreamShape, completion_chunks, completion_conform
from providers.adapters.translate_anthropic import EventTranslator, message_from_completion
from providers.tokens import COUNT_MAX

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
    bare = {
        "choices": [{"delta": {"tool_calls": [{"function": {"arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }

    assert shape.conform(bare) is False
    validate_openai_schema(bare, "CreateChatCompletionStreamResponse")
    assert (bare["id"], bare["created"], bare["model"]) == ("chatcmpl-1", 1700000000, "up-model")
    assert bare["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert bare["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def test_a_usage_that_leaves_a_count_out_is_left_so_for_settlement_to_estimate():
    """Before, the count left out was filled in as 0, and billed so. The pipeline fills in what it charged."""
    chunk = {**copy.deepcopy(VALID_CHUNK), "usage": {"prompt_tokens": 3, "completion_tokens": None}}

    assert StreamShape("m").conform(chunk) is False
    assert chunk["usage"] == {"prompt_tokens": 3}


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
    completion = {"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": None}

    completion_conform(completion, model="m")

    assert "usage" not in completion
    validate_openai_schema(completion, "CreateChatCompletionResponse")


# Whatever an upstream sends: a malformed reply, or one every reader takes as OpenAI's types ------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_TEXT_PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=5)}), max_size=2)


def _odd(value: st.SearchStrategy) -> st.SearchStrategy:
    """``value`` mostly, anything JSON sometimes."""
    return value | _JSON


_FUNCTION = st.fixed_dictionaries(
    {}, optional={"name": _odd(st.text(max_size=5)), "arguments": _odd(st.text(max_size=5))}
)
_CALL = st.fixed_dictionaries(
    {}, optional={"index": _odd(st.integers(0, 3)), "id": _odd(st.text(max_size=5)), "function": _odd(_FUNCTION)}
)
_DELTA = st.fixed_dictionaries(
    {},
    optional={
        "role": _odd(st.just("assistant")),
        "content": _odd(st.text(max_size=5)) | _TEXT_PARTS,
        "reasoning_content": _odd(st.text(max_size=5)),
        "tool_calls": _odd(st.lists(_odd(_CALL), max_size=2)),
        "function_call": _odd(_FUNCTION),
    },
)
_CHOICE = st.fixed_dictionaries(
    {},
    optional={
        "index": _odd(st.integers(0, 2)),
        "delta": _odd(_DELTA),
        "message": _odd(_DELTA),
        "finish_reason": _odd(st.sampled_from(["stop", "length", "tool_calls"])),
    },
)
_BREAKDOWN = st.fixed_dictionaries(
    {}, optional={name: _odd(st.integers(0, 2**40)) for name in ("cached_tokens", "reasoning_tokens", "audio_tokens")}
)
_COUNTS = st.fixed_dictionaries(
    {},
    optional={
        **{name: _odd(st.integers(0, 2**40)) for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
        "prompt_tokens_details": _odd(_BREAKDOWN),
        "completion_tokens_details": _odd(_BREAKDOWN),
    },
)
_REPLY = st.fixed_dictionaries(
    {},
    optional={
        "id": _odd(st.text(max_size=5)),
        "created": _odd(st.integers(0, 2**31)),
        "model": _odd(st.text(max_size=5)),
        "object": _odd(st.just("chat.completion.chunk")),
        "choices": _odd(st.lists(_odd(_CHOICE), max_size=2)),
        "usage": _odd(_COUNTS),
    },
)


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= COUNT_MAX


@settings(max_examples=400, deadline=None)
@given(chunk=_REPLY)
def test_any_chunk_is_malformed_or_read_as_openais_types(chunk):
    """What the relay, the output check, the estimate and the Messages translation read of a chunk the adapter let
    through is of OpenAI's types: before, a content or a choice of another type raised in the relay (and left a
    request with no ledger row)."""
    try:
        StreamShape("m").conform(chunk)
    except MalformedReply:
        return
    for _, piece, _ in _chunk_pieces(WireChunk(chunk, None)):
        assert type(piece) is str
    for choice in chunk["choices"]:
        assert type(choice["delta"].get("content")) in (str, type(None))
        assert type(choice["finish_reason"]) in (str, type(None))
    if chunk.get("usage") is not None:
        # Both counts, or one (settlement estimates the other): never a count billing cannot believe.
        counts = [chunk["usage"][name] for name in ("prompt_tokens", "completion_tokens") if name in chunk["usage"]]
        assert counts and all(_is_count(count) for count in counts)
        for name in ("prompt_tokens_details", "completion_tokens_details"):
            details = chunk["usage"].get(name, {})
            known = ("cached_tokens", "reasoning_tokens", "audio_tokens")
            assert type(details) is dict and all(_is_count(details[key]) for key in known if key in details)
    translator = EventTranslator()
    translator.feed(chunk)
    translator.finish()
    chunk_json(chunk)


def _or_null(value: st.SearchStrategy) -> st.SearchStrategy:
    return value | st.none()


# Chunks as the servers that say null for none send them: the fields of a delta, a call and a function, each null now
# and then (``_REPLY``'s are so odd that a null among otherwise valid fields is rare).
_PIECE_FUNCTION = st.fixed_dictionaries(
    {}, optional={"name": _or_null(st.text(max_size=5)), "arguments": _or_null(st.text(max_size=5))}
)
_PIECE_CALL = st.fixed_dictionaries(
    {"index": st.integers(0, 2)},
    optional={
        "id": _or_null(st.text(max_size=5)),
        "type": _or_null(st.just("function")),
        "function": _or_null(_PIECE_FUNCTION),
    },
)
_NULLISH_DELTA = st.fixed_dictionaries(
    {},
    optional={
        "role": _or_null(st.just("assistant")),
        "content": _or_null(st.text(max_size=5)),
        "refusal": _or_null(st.text(max_size=5)),
        "tool_calls": _or_null(st.lists(_PIECE_CALL, max_size=2)),
        "function_call": _or_null(_PIECE_FUNCTION),
    },
)
_NULLISH_CHUNK = st.fixed_dictionaries(
    {
        "id": st.just("chatcmpl-1"),
        "object": st.just("chat.completion.chunk"),
        "created": st.just(1700000000),
        "model": st.just("m"),
        "choices": st.lists(
            st.fixed_dictionaries(
                {
                    "index": st.integers(0, 2),
                    "delta": _NULLISH_DELTA,
                    "finish_reason": _or_null(st.sampled_from(["stop", "length", "tool_calls"])),
                },
                optional={"logprobs": st.none()},
            ),
            max_size=2,
        ),
    },
    optional={"usage": st.none()},
)


@settings(max_examples=400, deadline=None)
@given(chunk=_NULLISH_CHUNK | _REPLY)
def test_any_chunk_let_through_is_of_openais_stream_schema(chunk):
    """The stream twin of ``test_any_whole_reply_is_malformed_or_read_as_openais_types``: a chunk the adapter lets
    through validates against ``CreateChatCompletionStreamResponse``, whatever the upstream said null (before, a
    delta's ``"tool_calls": null``, ``"function_call": null`` or ``"role": null`` was taken as valid and relayed)."""
    try:
        StreamShape("m").conform(chunk)
    except MalformedReply:
        return
    usage = chunk.get("usage")
    if usage is not None and not ("prompt_tokens" in usage and "completion_tokens" in usage):
        del chunk["usage"]  # a count left out is settlement's to estimate, and the pipeline's to fill in
    validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")


STREAM_NULLS = {
    "tool_calls": {"content": "hi", "tool_calls": None},
    "function_call": {"content": "hi", "function_call": None},
    "role": {"role": None, "content": "hi"},
    "all three": {"role": None, "content": "hi", "tool_calls": None, "function_call": None},
    "a call's name and id": {"tool_calls": [{"index": 0, "id": None, "function": {"name": None, "arguments": "{"}}]},
    "a function call's name": {"function_call": {"name": None, "arguments": "{"}},
    "a call's function": {"tool_calls": [{"index": 0, "id": "call_1", "function": None}]},
}


@pytest.mark.parametrize("delta", STREAM_NULLS.values(), ids=STREAM_NULLS)
def test_a_deltas_nulls_the_schema_does_not_allow_are_left_out(delta):
    """vLLM, LM Studio, llama.cpp and some OpenRouter routes say null for none in every delta. Before, such a chunk
    was taken as valid and relayed as it came (and learned as the template of the stream's text chunks)."""
    choice = {"index": 0, "delta": copy.deepcopy(delta), "finish_reason": None}
    chunk = {**copy.deepcopy(VALID_CHUNK), "choices": [choice]}

    assert StreamShape("m").conform(chunk) is False  # encoded again, not relayed as it came
    validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    said = {key: value for key, value in delta.items() if value is not None and key in ("role", "content")}
    assert {key: chunk["choices"][0]["delta"][key] for key in said} == said
    assert not any(value is None for value in chunk["choices"][0]["delta"].values())


@pytest.mark.parametrize(
    "nulls", [{"function_call": None}, {"tool_calls": None}, {"function_call": None, "tool_calls": None}]
)
def test_a_whole_replys_null_calls_are_left_out_as_openai_leaves_them(nulls):
    """A server that says ``"tool_calls": null`` or ``"function_call": null`` for none: OpenAI's schema types them as
    an array and an object, so the reply is relayed without them (the case Hypothesis found in a CI run)."""
    message = {"role": "assistant", "content": "hi", **nulls}
    reply = {
        "id": "x",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
    }
    completion_conform(reply, model="m")
    assert not set(nulls) & set(reply["choices"][0]["message"])
    validate_openai_schema(reply, "CreateChatCompletionResponse")


@settings(max_examples=400, deadline=None)
@given(reply=_REPLY)
def test_any_whole_reply_is_malformed_or_read_as_openais_types(reply):
    reply.pop("object", None)
    try:
        completion_conform(reply, model="m")
    except MalformedReply:
        return
    usage = reply.get("usage")
    if usage is not None and not ("prompt_tokens" in usage and "completion_tokens" in usage):
        # A count left out is settlement's to estimate, and the pipeline's to fill in (test_odd_upstream_shapes).
        assert all(_is_count(usage[name]) for name in ("prompt_tokens", "completion_tokens") if name in usage)
        del reply["usage"]
    if _finishes_known(reply):
        validate_openai_schema(reply, "CreateChatCompletionResponse")
    message_from_completion(reply)
    assert type(_completion_text(reply, calls=True)) is str


@settings(max_examples=400, deadline=None)
@given(reply=_REPLY)
def test_any_whole_reply_answered_to_a_stream_is_relayed_as_chunks_of_openais_schema(reply):
    """A whole reply a server answered to a request for a stream (``completion_chunks``): each chunk of OpenAI's
    stream schema, the reply's text, calls and finishes all in them."""
    reply.pop("object", None)
    try:
        completion_conform(reply, model="m")
    except MalformedReply:
        return
    usage = reply.get("usage")
    if usage is not None and not ("prompt_tokens" in usage and "completion_tokens" in usage):
        del reply["usage"]
    chunks = completion_chunks(reply)
    if _finishes_known(reply):
        for chunk in chunks:
            validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
    messages = [choice["message"] for choice in reply["choices"]]
    assert "".join(delta.get("content") or "" for delta in deltas) == "".join(m["content"] or "" for m in messages)
    assert sum(len(delta.get("tool_calls") or ()) for delta in deltas) == sum(
        len(m.get("tool_calls") or ()) for m in messages
    )
    finishes = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"]]
    assert finishes == [choice["finish_reason"] for choice in reply["choices"]]
    assert (chunks[-1].get("usage") is not None) == (reply.get("usage") is not None)


def _finishes_known(reply: dict) -> bool:
    known = {"stop", "length", "tool_calls", "content_filter", "function_call"}
    return all(choice["finish_reason"] in known for choice in reply["choices"]) and all(
        type(choice["message"].get("role")) is str for choice in reply["choices"]
    )
