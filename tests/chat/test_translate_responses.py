"""The stream translation of ``/v1/responses`` (``chat.translate_responses.ResponseEvents``) on chunk sequences the
fake upstream does not send: the pieces of parallel tool calls interleaved, as an OpenAI-compatible server may write
them, and text after the calls. The events are checked as ``tests/gateway/test_responses_api.py`` checks a live
stream's."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chat.pipeline import client_refusal_named
from chat.translate_responses import (
    ResponseEvents,
    response_from_completion,
    response_skeleton,
    responses_request_to_chat,
)
from chat.validation import InvalidRequestError, validate_chat_request
from providers.tokens import prompt_tokens
from tests.gateway.test_responses_api import assert_spec_sequence
from tests.test_fuzz import JSON_VALUES

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


def test_custom_and_local_shell_calls_interleaved_become_their_items_when_whole():
    body = {"model": "m", "input": "hi", "tools": [{"type": "custom", "name": "patch"}, {"type": "local_shell"}]}
    events = ResponseEvents(body, response_id="resp_1", model="m", created_at=1)
    out = events.started()
    for piece in [
        chunk({"tool_calls": [{"index": 0, "id": "call_p", "function": {"name": "patch", "arguments": '{"inp'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_s", "function": {"name": "local_shell", "arguments": "ls"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ut": "*** Begin\\n"}'}}]}, "tool_calls"),
    ]:
        out.extend(events.chunk(piece))
    out.extend(events.completed())
    assert_spec_sequence(out)
    patch, shell = out[-1]["response"]["output"]
    assert (patch["type"], patch["call_id"], patch["input"]) == ("custom_tool_call", "call_p", "*** Begin\n")
    # Arguments that are no command: an empty one, which the client's shell refuses, rather than an unreadable item.
    assert (shell["type"], shell["call_id"], shell["action"]) == (
        "local_shell_call",
        "call_s",
        {"type": "exec", "command": [], "env": {}},
    )
    assert [event["delta"] for event in out if event["type"] == "response.custom_tool_call_input.delta"] == [
        "*** Begin\n"
    ]


def test_a_custom_tools_input_written_bare_is_kept_whole():
    body = {"model": "m", "input": "hi", "tools": [{"type": "custom", "name": "patch"}]}
    completion = {
        "choices": [
            {
                "message": {"tool_calls": [{"id": "c", "function": {"name": "patch", "arguments": "not json"}}]},
                "finish_reason": "tool_calls",
            }
        ]
    }
    [item] = response_from_completion(body, completion, response_id="resp_1", created_at=1)["output"]
    assert (item["type"], item["input"]) == ("custom_tool_call", "not json")


def thought(text: str) -> dict:
    # Each its own id: items of one id are refused, as OpenAI refuses them.
    return {
        "type": "reasoning",
        "id": f"rs_{uuid.uuid4().hex}",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def test_reasoning_given_back_goes_with_the_assistant_turn_it_led_to_and_only_with_one():
    chat, fields = responses_request_to_chat(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "q"},
                thought("first"),
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                thought("second"),
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "r1"},
                {"type": "function_call_output", "call_id": "c2", "output": "r2"},
                # OpenAI's own reasoning (a summary, encrypted content): for OpenAI's servers, not sent on.
                {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "s"}]},
                thought("no turn follows this one"),
                {"role": "user", "content": "next"},
                thought("third"),
            ],
        }
    )
    turns = [message.get("reasoning_content") for message in chat["messages"]]
    assert turns == [None, "first\n\nsecond", None, None, None]
    assert fields["messages[1].reasoning_content"] == "input[3].content"


def test_a_reasoning_item_with_content_that_is_not_reasoning_text_is_a_400():
    body = {
        "model": "m",
        "input": [{"type": "reasoning", "summary": [], "content": [{"type": "input_text", "text": "x"}]}],
    }
    with pytest.raises(InvalidRequestError) as refused:
        responses_request_to_chat(body)
    assert refused.value.param == "input[0].content[0].type"


def test_streamed_reasoning_then_a_call_then_an_interrupted_reasoning_each_get_their_item():
    events = run(
        [
            chunk({"reasoning_content": "think "}),
            chunk({"reasoning": "more"}),
            chunk({"tool_calls": [call(0, "{}", call_id="call_a")]}),
            chunk({"reasoning_content": "after"}),
            chunk({"content": "done"}, "stop"),
        ]
    )
    assert_spec_sequence(events)
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["reasoning", "function_call", "reasoning", "message"]
    assert [output[0]["content"], output[2]["content"]] == [
        [{"type": "reasoning_text", "text": "think more"}],
        [{"type": "reasoning_text", "text": "after"}],
    ]


# Arbitrary Responses API bodies: the translation (and the chat validation after it) accepts, or refuses with a
# 400; never anything else. What it accepts can be forwarded and priced.
ITEMS = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            [
                "message",
                "function_call",
                "function_call_output",
                "reasoning",
                "item_reference",
                "custom_tool_call",
                "custom_tool_call_output",
                "local_shell_call",
                "local_shell_call_output",
            ]
        )
        | JSON_VALUES,
        "role": st.sampled_from(["user", "system", "developer", "assistant", "tool"]) | JSON_VALUES,
        "content": st.text(max_size=12)
        | st.lists(
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["input_text", "output_text", "input_image", "refusal", "reasoning_text"])
                    | JSON_VALUES
                },
                optional={"text": JSON_VALUES, "image_url": JSON_VALUES, "refusal": JSON_VALUES},
            ),
            max_size=3,
        )
        | JSON_VALUES,
        "call_id": st.text(max_size=6) | JSON_VALUES,
        "name": st.text(max_size=6) | JSON_VALUES,
        "arguments": st.text(max_size=6) | JSON_VALUES,
        "output": st.text(max_size=6) | JSON_VALUES,
        "input": st.text(max_size=6) | JSON_VALUES,
        "id": st.text(max_size=6) | JSON_VALUES,
        "action": st.fixed_dictionaries({"command": st.lists(st.text(max_size=4), max_size=2) | JSON_VALUES})
        | JSON_VALUES,
    },
)
RESPONSES_BODIES = (
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.just("m") | JSON_VALUES,
            "input": st.text(max_size=12) | st.lists(ITEMS, max_size=4) | JSON_VALUES,
            "instructions": st.text(max_size=8) | JSON_VALUES,
            "tools": st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["function", "custom", "local_shell"]) | JSON_VALUES},
                    optional={
                        "name": st.text(max_size=6) | JSON_VALUES,
                        "parameters": JSON_VALUES,
                        "description": st.text(max_size=6) | JSON_VALUES,
                        "format": st.fixed_dictionaries(
                            {"type": st.sampled_from(["text", "grammar"]) | JSON_VALUES},
                            optional={
                                "syntax": st.sampled_from(["lark", "regex"]) | JSON_VALUES,
                                "definition": JSON_VALUES,
                            },
                        )
                        | JSON_VALUES,
                    },
                ),
                max_size=2,
            )
            | JSON_VALUES,
            "tool_choice": st.sampled_from(["none", "auto", "required"])
            | st.fixed_dictionaries({"type": st.sampled_from(["function", "custom"]), "name": JSON_VALUES})
            | JSON_VALUES,
            **{
                name: JSON_VALUES
                for name in (
                    "text",
                    "reasoning",
                    "include",
                    "metadata",
                    "max_output_tokens",
                    "temperature",
                    "top_p",
                    "stream",
                    "truncation",
                    "previous_response_id",
                    "background",
                    "parallel_tool_calls",
                    "top_logprobs",
                    "stream_options",
                    "max_tool_calls",
                    "prompt_cache_retention",
                )
            },
        },
    )
    | JSON_VALUES
)


@settings(max_examples=500, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(RESPONSES_BODIES)
# The values that once crashed it (a 500): a list or an object where a name is expected.
@example({"model": "m", "input": "hi", "include": [{}]})
# The log probabilities asked for: chat completions' logprobs and top_logprobs, which it validates together.
@example({"model": "m", "input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 20})
@example({"model": "m", "input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 0})
@example({"model": "m", "input": "hi", "top_logprobs": 3, "stream": True, "stream_options": {}})
@example({"model": "m", "input": [{"role": ["user"], "content": "x"}]})
@example({"model": "m", "input": [{"role": "user", "content": [{"type": ["input_text"], "text": "x"}]}]})
def test_the_translation_accepts_or_answers_400_and_what_it_accepts_can_be_sent(body):
    try:
        chat, _ = responses_request_to_chat(body)
        validate_chat_request(chat)
    except InvalidRequestError as exc:
        assert exc.status_code == 400 and exc.error_type == "invalid_request_error"
        assert exc.param is None or isinstance(exc.param, str)
        return
    json.dumps(chat, ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert prompt_tokens(chat, operation="responses", upper_bound=True) >= 0
    response_skeleton(body, response_id="resp_1", model="m", created_at=1)


@pytest.mark.parametrize(
    ("quoted", "named"),
    [
        ("messages[2].content[1].image_url.url", "input[1].content"),  # instructions are messages[0]
        ("messages.[2].content.[0].type", "input[1].content"),  # OpenAI's own 400s' spelling
        ("messages[1].content", "input[0].content"),
    ],
)
def test_a_refusal_of_the_chat_completion_names_the_responses_field_in_param_and_message(quoted, named):
    """A refusal of the translated chat completion (chat validation's in the pipeline, an adapter's or the provider's
    after it: ``client_refusal_named``) quoted the chat completion's path in its message beside a ``param`` naming the
    Responses field; both now name the Responses field, and a message quoting no path is left as it was."""
    body = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": [{"type": "input_text", "text": "What is it?"}]},
        ],
    }
    _chat, fields = responses_request_to_chat(body)
    refusal = InvalidRequestError(f"`{quoted}`: not taken here; `{quoted}` again.", param=quoted)
    client_refusal_named(fields, refusal)
    assert (refusal.param, refusal.message) == (named, f"`{named}`: not taken here; `{named}` again.")
    assert str(refusal) == refusal.message
    untouched = InvalidRequestError("This model does not stream.", param="stream")
    client_refusal_named(fields, untouched)
    assert (untouched.param, untouched.message) == ("stream", "This model does not stream.")
