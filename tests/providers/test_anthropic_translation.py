"""The OpenAI ⇄ Anthropic translation as pure functions: no server involved."""

from __future__ import annotations

import json

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from llmhub.testing.openapi import validate_openai_schema
from providers.adapters import adapter_class_for_kind
from providers.adapters.translate_anthropic import (
    ANSWER_FLOOR,
    DEFAULT_MAX_TOKENS,
    EventTranslator,
    StreamTranslator,
    anthropic_request,
    chat_request,
    completion_from_message,
    finish_reason,
    message_from_completion,
    openai_usage,
    stop_reason,
)
from providers.exceptions import ProviderBadRequestError

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}


def request(*messages: dict, **fields) -> dict:
    return anthropic_request({"model": "claude", "messages": list(messages), **fields})


# Requests ------------------------------------------------------------------------------------------


def test_system_and_developer_messages_become_the_system_prompt_wherever_they_are():
    translated = request(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
        {"role": "user", "content": "and again"},
    )

    assert translated["system"] == "Be brief.\n\nUse metric units."
    assert [turn["role"] for turn in translated["messages"]] == ["user", "user"]
    assert translated["max_tokens"] == DEFAULT_MAX_TOKENS


def test_no_system_key_without_system_messages():
    assert "system" not in request({"role": "user", "content": "hi"})


def test_images_from_data_and_http_urls():
    translated = request(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what are these"},
                {"type": "image_url", "image_url": {"url": "data:image/webp;base64,UklGRg=="}},
                {"type": "image_url", "image_url": {"url": "http://images.example/a.gif"}},
            ],
        }
    )

    assert translated["messages"][0]["content"] == [
        {"type": "text", "text": "what are these"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": "UklGRg=="}},
        {"type": "image", "source": {"type": "url", "url": "http://images.example/a.gif"}},
    ]


@pytest.mark.parametrize("media_type", ["image/jpeg", "image/png", "image/gif", "image/webp", "IMAGE/PNG"])
def test_an_image_of_a_type_claude_reads_is_sent_as_that_type(media_type):
    translated = request(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:{media_type};base64,AAAA"}}]}
    )

    source = {"type": "base64", "media_type": media_type.lower(), "data": "AAAA"}
    assert translated["messages"][0]["content"] == [{"type": "image", "source": source}]


@pytest.mark.parametrize("media_type", ["text/html", "image/heic", "image/bmp", "application/x-msdownload"])
def test_an_image_of_a_type_claude_does_not_read_is_a_400_naming_its_url(media_type):
    """Anthropic's base64 image source takes image/jpeg, png, gif and webp: another went up for its own 400."""
    with pytest.raises(ProviderBadRequestError) as caught:
        request(
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:{media_type};base64,AAAA"}}]}
        )

    assert (caught.value.param, caught.value.code) == ("messages[0].content[0].image_url.url", "invalid_image_format")
    assert media_type in caught.value.message


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png,not-base64"}}],
            "messages[0].content[0].image_url.url",
        ),
        ([{"type": "image_url", "image_url": {"url": "ftp://host/x.png"}}], "messages[0].content[0].image_url.url"),
        ([{"type": "input_audio", "input_audio": {}}], "messages[0].content[0].type"),
        ([{"type": "text"}], "messages[0].content[0]"),
        (42, "messages[0].content"),
    ],
)
def test_content_it_cannot_express_is_a_clear_400(content, param):
    with pytest.raises(ProviderBadRequestError) as caught:
        request({"role": "user", "content": content})

    assert caught.value.param == param
    assert caught.value.status_code == 400
    assert caught.value.error_type == "invalid_request_error"


def test_assistant_tool_calls_and_consecutive_tool_results():
    translated = request(
        {"role": "user", "content": "define two words"},
        {
            "role": "assistant",
            "content": "Looking them up.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "a"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "first letter"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "no word"}]},
        {"role": "user", "content": "thanks"},
        tools=[TOOL],
    )

    assert translated["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "define two words"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Looking them up."},
                {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"word": "a"}},
                {"type": "tool_use", "id": "call_2", "name": "lookup", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "first letter"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "no word"}]},
            ],
        },
        {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
    ]
    assert translated["tools"] == [
        {"name": "lookup", "input_schema": TOOL["function"]["parameters"], "description": "Look a word up."}
    ]


def test_tool_results_separated_by_another_turn_are_not_merged():
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    translated = request(
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "assistant", "content": None, "tool_calls": [{**call, "id": "c2"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    )

    assert [turn["role"] for turn in translated["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert len(translated["messages"][-1]["content"]) == 1


def test_invalid_tool_call_arguments_are_refused():
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{not json"}}
    with pytest.raises(ProviderBadRequestError) as caught:
        request({"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call]})

    assert caught.value.param == "messages[1].tool_calls[0].function.arguments"


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "lookup"}}, None, {"type": "tool", "name": "lookup"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, None, None),
    ],
)
def test_tool_choice(choice, parallel, expected):
    fields = {"tools": [TOOL]}
    if choice is not None:
        fields["tool_choice"] = choice
    if parallel is not None:
        fields["parallel_tool_calls"] = parallel

    translated = request({"role": "user", "content": "x"}, **fields)

    assert translated.get("tool_choice") == expected


def test_other_fields_are_mapped_or_dropped():
    translated = request(
        {"role": "user", "content": "x"},
        max_completion_tokens=100,
        max_tokens=5,
        temperature=0.3,
        top_p=0.8,
        top_k=20,
        stop=["END", "STOP"],
        safety_identifier="hashed-user",
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}},
        seed=1,
        logit_bias={"50256": -100},
        presence_penalty=0.5,
        store=True,
        metadata={"a": "b"},
        stream_options={"include_usage": True},
        x_unknown=True,
    )

    assert translated == {
        "model": "claude",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
        "max_tokens": 100,
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 20,
        "stop_sequences": ["END", "STOP"],
        "metadata": {"user_id": "hashed-user"},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
    }


@pytest.mark.parametrize(("effort", "budget"), [("minimal", 1024), ("low", 1024), ("medium", 2048), ("high", 4096)])
def test_reasoning_effort_becomes_a_thinking_budget_with_room_for_the_reply(effort, budget):
    translated = request({"role": "user", "content": "x"}, reasoning_effort=effort)

    assert translated["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert translated["max_tokens"] == budget + DEFAULT_MAX_TOKENS


def test_reasoning_effort_none_leaves_thinking_off_and_an_explicit_thinking_wins():
    assert "thinking" not in request({"role": "user", "content": "x"}, reasoning_effort="none")
    explicit = {"type": "enabled", "budget_tokens": 3000}
    translated = request({"role": "user", "content": "x"}, reasoning_effort="high", thinking=explicit)
    assert translated["thinking"] == explicit


def test_the_clients_output_limit_is_never_raised_the_budget_fits_under_it_leaving_the_reply_room():
    translated = request({"role": "user", "content": "x"}, reasoning_effort="high", max_completion_tokens=3000)
    assert translated["max_tokens"] == 3000
    assert translated["thinking"] == {"type": "enabled", "budget_tokens": 3000 - ANSWER_FLOOR}

    # Down to Anthropic's least budget; then the reply has the rest.
    translated = request({"role": "user", "content": "x"}, reasoning_effort="medium", max_tokens=1500)
    assert translated["max_tokens"] == 1500
    assert translated["thinking"] == {"type": "enabled", "budget_tokens": 1024}

    translated = request({"role": "user", "content": "x"}, reasoning_effort="low", max_tokens=9000, temperature=1)
    assert translated["max_tokens"] == 9000
    assert translated["thinking"] == {"type": "enabled", "budget_tokens": 1024}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 1024}, "max_tokens"),
        ({"max_completion_tokens": 500}, "max_completion_tokens"),
        ({"temperature": 0.2}, "temperature"),
        ({"top_p": 0.5}, "top_p"),
        ({"top_k": 5}, "top_k"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
def test_what_claude_cannot_think_with_is_a_clear_400(fields, param):
    with pytest.raises(ProviderBadRequestError) as caught:
        request({"role": "user", "content": "x"}, **{"reasoning_effort": "medium", **fields})
    assert caught.value.param == param


@pytest.mark.parametrize(
    "fields",
    [
        {"reasoning_effort": "low", "tool_choice": "required"},
        {"reasoning_effort": "low", "tool_choice": {"type": "function", "function": {"name": "lookup"}}},
        {"thinking": {"type": "adaptive"}, "tool_choice": "required"},
    ],
)
def test_a_tool_choice_that_forces_a_call_while_claude_thinks_is_a_clear_400(fields):
    with pytest.raises(ProviderBadRequestError) as caught:
        request({"role": "user", "content": "x"}, tools=[TOOL], **fields)
    assert caught.value.param == "tool_choice"


@pytest.mark.parametrize("tool_choice", ["auto", "none", None])
def test_claude_thinks_with_a_tool_choice_of_auto_or_none(tool_choice):
    translated = request(
        {"role": "user", "content": "x"}, tools=[TOOL], reasoning_effort="low", tool_choice=tool_choice
    )
    assert translated["thinking"]["type"] == "enabled"
    translated = request(
        {"role": "user", "content": "x"}, tools=[TOOL], reasoning_effort="none", tool_choice="required"
    )
    assert translated["tool_choice"] == {"type": "any"}


def test_thinking_blocks_go_back_first_in_their_assistant_turn():
    blocks = [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "redacted_thinking", "data": "opaque"},
    ]
    call = {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}

    translated = request(
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "hmm",
            "thinking_blocks": blocks,
            "tool_calls": [call],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "found"},
    )

    assert translated["messages"][1]["content"] == [
        *blocks,
        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}},
    ]


@pytest.mark.parametrize("blocks", [{"type": "thinking"}, [{"type": "thinking", "thinking": "hmm"}], ["x"]])
def test_malformed_thinking_blocks_are_a_clear_400(blocks):
    with pytest.raises(ProviderBadRequestError) as caught:
        request({"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "thinking_blocks": blocks})
    assert caught.value.param.startswith("messages[1].thinking_blocks")


def test_more_than_one_choice_is_refused():
    with pytest.raises(ProviderBadRequestError) as caught:
        request({"role": "user", "content": "x"}, n=3)
    assert caught.value.param == "n"


def test_the_input_body_is_left_as_it_was():
    body = {"model": "claude", "messages": [{"role": "user", "content": "x"}], "stop": "END"}
    snapshot = json.dumps(body, sort_keys=True)

    anthropic_request(body)

    assert json.dumps(body, sort_keys=True) == snapshot


# Responses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, "stop"),
    ],
)
def test_stop_reasons(stop_reason, expected):
    assert finish_reason(stop_reason) == expected


def test_usage_counts_cached_tokens_inside_prompt_tokens():
    usage = openai_usage(
        {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}
    )

    assert usage == {
        "prompt_tokens": 130,
        "completion_tokens": 5,
        "total_tokens": 135,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 20},
    }


def test_message_with_text_and_tool_use_becomes_a_completion():
    completion = completion_from_message(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"word": "é"}},
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 7, "output_tokens": 3},
        }
    )

    validate_openai_schema(completion, "CreateChatCompletionResponse")
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["reasoning_content"] == "hmm"
    assert choice["message"]["thinking_blocks"] == [{"type": "thinking", "thinking": "hmm", "signature": "sig"}]
    assert choice["message"]["refusal"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"word": "é"})}}
    ]
    assert completion["usage"]["total_tokens"] == 10


def test_a_refusal_is_a_content_filter_stop():
    completion = completion_from_message(
        {"id": "msg_2", "model": "m", "content": [], "stop_reason": "refusal", "usage": {"input_tokens": 1}}
    )

    validate_openai_schema(completion, "CreateChatCompletionResponse")
    assert completion["choices"][0]["finish_reason"] == "content_filter"
    assert completion["choices"][0]["message"]["content"] == ""


# Streams -------------------------------------------------------------------------------------------

TOOL_STREAM = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_9",
            "model": "claude-x",
            "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 4},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_9", "name": "lookup", "input": {}},
    },
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"wo'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'rd": "x"}'}},
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
    {"type": "message_stop"},
]


def test_a_stream_of_events_becomes_openai_chunks():
    translator = StreamTranslator()
    chunks = [chunk for event in TOOL_STREAM if (chunk := translator.feed(event)) is not None]

    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Checking"},
        {
            "tool_calls": [
                {"index": 0, "id": "toolu_9", "type": "function", "function": {"name": "lookup", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"wo'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'rd": "x"}'}}]},
        {},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 16
    assert chunks[-1]["usage"]["completion_tokens"] == 9
    assert {chunk["id"] for chunk in chunks} == {"msg_9"}
    assert translator.complete


def test_a_streamed_thinking_block_becomes_reasoning_deltas_then_the_signed_block():
    events = [
        {"type": "message_start", "message": {"id": "msg_t", "model": "claude-x", "usage": {"input_tokens": 5}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "opaque"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Done."}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]
    translator = StreamTranslator()
    chunks = [chunk for event in events if (chunk := translator.feed(event)) is not None]

    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Let me "},
        {"reasoning_content": "think."},
        {"thinking_blocks": [{"type": "thinking", "thinking": "Let me think.", "signature": "sig"}]},
        {"thinking_blocks": [{"type": "redacted_thinking", "data": "opaque"}]},
        {"content": "Done."},
        {},
    ]


def test_a_stream_without_message_stop_is_incomplete():
    translator = StreamTranslator()
    for event in TOOL_STREAM[:-1]:
        translator.feed(event)

    assert not translator.complete


# Inbound: a Messages API request for an OpenAI-protocol model, and its answer back --------------------------

MESSAGES_TOOL = {
    "name": "lookup",
    "description": "Look a word up.",
    "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}},
}
_EVENT = TypeAdapter(RawMessageStreamEvent)


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 2047}, "low"),
        ({"type": "enabled", "budget_tokens": 2048}, "medium"),
        ({"type": "enabled", "budget_tokens": 4095}, "medium"),
        ({"type": "enabled", "budget_tokens": 4096}, "high"),
        ({"type": "enabled", "budget_tokens": 32000}, "high"),
        ({"type": "disabled"}, None),
        ({"type": "adaptive"}, None),
        (None, None),
    ],
)
def test_a_messages_thinking_budget_becomes_the_reasoning_effort_it_reaches(thinking, effort):
    body = chat_request(
        {"model": "m", "max_tokens": 40000, "thinking": thinking, "messages": [{"role": "user", "content": "x"}]}
    )
    assert body.get("reasoning_effort") == effort


@pytest.mark.parametrize("budget", [None, 512, "2048", True])
def test_a_thinking_budget_that_is_not_one_is_a_clear_400(budget):
    with pytest.raises(ProviderBadRequestError) as caught:
        chat_request(
            {
                "model": "m",
                "max_tokens": 9000,
                "thinking": {"type": "enabled", "budget_tokens": budget},
                "messages": [{"role": "user", "content": "x"}],
            }
        )
    assert caught.value.param == "thinking.budget_tokens"


FIVE_STOPS_ASKED = {
    "model": "m",
    "max_tokens": 5,
    "stop_sequences": list("abcde"),
    "messages": [{"role": "user", "content": "x"}],
}


def test_more_stop_sequences_than_the_provider_takes_are_refused_naming_stop_sequences():
    """OpenAI's API takes at most 4 stop strings and refused more with its own 400 naming ``stop``, which a Messages
    client never sent: refused before any call, naming ``stop_sequences``, for a provider with such a limit only."""
    request = {
        "model": "m",
        "max_tokens": 5,
        "stop_sequences": list("abcde"),
        "messages": [{"role": "user", "content": "x"}],
    }
    with pytest.raises(ProviderBadRequestError) as caught:
        chat_request(request, stop_max=4)
    assert caught.value.param == "stop_sequences"
    assert str(caught.value).startswith("stop_sequences: List should have at most 4 items after validation, not 5")
    assert chat_request(request)["stop"] == list("abcde")
    assert chat_request({**request, "stop_sequences": list("abcd")}, stop_max=4)["stop"] == list("abcd")


@pytest.mark.parametrize("kind", ["openai", "azure_openai"])
def test_openais_api_and_azures_take_at_most_four_stop_strings(kind):
    request = {
        "model": "m",
        "max_tokens": 5,
        "stop_sequences": list("abcde"),
        "messages": [{"role": "user", "content": "x"}],
    }
    with pytest.raises(ProviderBadRequestError):
        adapter_class_for_kind(kind).messages_check(request)
    for other in ("openai_compatible", "vllm", "anthropic"):
        adapter_class_for_kind(other).messages_check(request)


@pytest.mark.parametrize(
    ("kind", "standard"),
    [
        ("openai", "default"),  # OpenAI's standard processing, whatever the project's default tier
        # Azure's, whatever the deployment's tier (an api-version without the field is sent none: prepare_request)
        ("azure_openai", "default"),
        ("openai_compatible", None),  # a compatible server's tiers are its own (Groq's on_demand)
        ("vllm", None),
        ("mistral", None),  # Mistral refuses service_tier
        ("ollama", None),
    ],
)
def test_standard_only_asks_the_providers_standard_tier_where_it_has_one(kind, standard):
    """Anthropic's ``standard_only`` went to OpenAI as no tier, which a project whose default is priority or flex
    served at that tier; OpenAI's own API is sent its ``default``, another provider no tier, and ``auto`` (or none)
    no tier anywhere: the project's default."""
    request = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    translate = adapter_class_for_kind(kind)._chat_request
    assert translate({**request, "service_tier": "standard_only"}).get("service_tier") == standard
    assert "service_tier" not in translate({**request, "service_tier": "auto"})
    assert "service_tier" not in translate(request)


@pytest.mark.parametrize("max_tokens", [2048, 1500])
def test_a_thinking_budget_not_under_max_tokens_is_refused_as_anthropic_refuses_it(max_tokens):
    """Anthropic refuses a thinking budget that leaves the reply no room (``max_tokens`` must be greater than
    ``thinking.budget_tokens``); a translated model took it, so the same request worked on one model and not on
    another. Refused alike, naming ``max_tokens``, before any upstream call."""
    request = {
        "model": "m",
        "max_tokens": max_tokens,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "messages": [{"role": "user", "content": "x"}],
    }
    with pytest.raises(ProviderBadRequestError) as caught:
        chat_request(request)
    assert caught.value.param == "max_tokens"
    assert "`max_tokens` must be greater than `thinking.budget_tokens`" in str(caught.value)
    assert chat_request({**request, "max_tokens": 2049})["reasoning_effort"] == "medium"


def test_messages_request_becomes_a_chat_request():
    body = chat_request(
        {
            "model": "m",
            "max_tokens": 64,
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 5,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u"},
            "tools": [MESSAGES_TOOL],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Define these."},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA="}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                        {"type": "text", "text": "Looking up."},
                        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"word": "a"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "And then?"},
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "A."}]},
                    ],
                },
            ],
        }
    )
    assert body == {
        "model": "m",
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END"],
        "user": "u",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "parameters": MESSAGES_TOOL["input_schema"],
                    "description": "Look a word up.",
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "messages": [
            {"role": "system", "content": "Be brief.\n\nBe kind."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Define these."},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA="}},
                ],
            },
            {
                "role": "assistant",
                "content": "Looking up.",
                "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "a"}'}}
                ],
            },
            # The tool's answer first: OpenAI wants it right after the call that asked for it.
            {"role": "tool", "tool_call_id": "toolu_1", "content": "A."},
            {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
        ],
    }
    validate_openai_schema(body, "CreateChatCompletionRequest")


def test_images_in_a_tool_result_reach_the_model_in_the_user_turn_that_follows():
    """An OpenAI tool message holds text only: a tool result's images (a screenshot, a chart) were dropped
    without a word, and the model answered without them. They now open the user turn that follows the tool
    messages, before the turn's own text."""
    chart = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA="}}
    body = chat_request(
        {
            "model": "m",
            "max_tokens": 64,
            "messages": [
                {"role": "user", "content": "Plot it."},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "plot", "input": {}}]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "is_error": False,
                            "content": [{"type": "text", "text": "Plotted."}, chart],
                        },
                        {"type": "text", "text": "What does it show?"},
                    ],
                },
            ],
        }
    )
    assert body["messages"][2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Plotted."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA="}},
                {"type": "text", "text": "What does it show?"},
            ],
        },
    ]
    validate_openai_schema(body, "CreateChatCompletionRequest")


def test_a_tool_results_text_blocks_are_joined_as_a_system_prompts_are():
    """A tool result of several text blocks (a search tool's hits) reached the model as one run-on text ("18 CLight
    wind"); its blocks are now joined by blank lines, as the system prompt's blocks are."""
    texts = [{"type": "text", "text": "18 C"}, {"type": "text", "text": "Light wind"}]
    body = chat_request(
        {
            "model": "m",
            "max_tokens": 64,
            "system": texts,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": texts}]},
            ],
        }
    )
    assert body["messages"][0] == {"role": "system", "content": "18 C\n\nLight wind"}
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C\n\nLight wind"}


def test_a_tool_result_block_without_an_openai_equivalent_is_refused():
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [document]}
    with pytest.raises(ProviderBadRequestError) as refused:
        chat_request({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [result]}]})
    assert "document" in refused.value.message


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "lookup"}, {"type": "function", "function": {"name": "lookup"}}),
    ],
)
def test_tool_choice_translation(choice, expected):
    body = chat_request(
        {"model": "m", "max_tokens": 1, "tools": [MESSAGES_TOOL], "tool_choice": choice, "messages": []}
    )
    assert body["tool_choice"] == expected


@pytest.mark.parametrize(
    "block",
    [
        {"type": "document", "source": {"type": "text", "data": "x"}},
        {"type": "image", "source": {"type": "file", "file_id": "f"}},
    ],
)
def test_blocks_without_an_openai_equivalent_are_refused(block):
    with pytest.raises(ProviderBadRequestError):
        chat_request({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [block]}]})


def test_server_tools_are_refused():
    with pytest.raises(ProviderBadRequestError):
        chat_request(
            {
                "model": "m",
                "max_tokens": 1,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
                "messages": [{"role": "user", "content": "hi"}],
            }
        )


@pytest.mark.parametrize(
    ("finish", "expected"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")],
)
def test_finish_reasons_become_stop_reasons(finish, expected):
    assert stop_reason(finish) == expected


def test_completion_becomes_a_message():
    message = message_from_completion(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {
                        "role": "assistant",
                        "content": "Let me look.",
                        "tool_calls": [
                            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"w":1}'}}
                        ],
                    },
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 6}},
        }
    )
    assert Message.model_validate(message, strict=True)
    assert message["id"] == "msg_chatcmpl-1" and message["stop_reason"] == "tool_use"
    assert message["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"w": 1}},
    ]
    assert message["usage"] == {
        "input_tokens": 4,
        "output_tokens": 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 6,
    }


def _url_citation(url, start, end, title="Source"):
    return {
        "type": "url_citation",
        "url_citation": {"url": url, "title": title, "start_index": start, "end_index": end},
    }


# Of what a server may put in ``annotations``, only a ``url_citation`` with a URL is cited; one without its span cites
# no text.
ANNOTATIONS = [
    _url_citation("https://a.example/", 0, 5),
    _url_citation("https://b.example/", 6, 11, title=None),
    _url_citation("https://c.example/", None, 3),
    {"type": "file_citation", "file_citation": {"file_id": "f"}},
    {"type": "url_citation", "url_citation": {"title": "no url"}},
    "not an object",
]
CITATIONS = [
    {"type": "web_search_result_location", "url": "https://a.example/", "title": "Source", "cited_text": "Sunny",
     "encrypted_index": ""},
    {"type": "web_search_result_location", "url": "https://b.example/", "title": None, "cited_text": "today",
     "encrypted_index": ""},
    {"type": "web_search_result_location", "url": "https://c.example/", "title": "Source", "cited_text": "",
     "encrypted_index": ""},
]  # fmt: skip


def test_url_citations_become_web_search_citations_on_the_text():
    reply = {"role": "assistant", "content": "Sunny today.", "annotations": ANNOTATIONS}
    message = message_from_completion({"id": "c", "choices": [{"index": 0, "finish_reason": "stop", "message": reply}]})
    assert Message.model_validate(message, strict=True)
    assert message["content"] == [{"type": "text", "text": "Sunny today.", "citations": CITATIONS}]


def test_streamed_url_citations_are_citations_deltas_once_each():
    translator = EventTranslator()
    events = [
        *translator.feed(_chunk({"role": "assistant", "content": "Sunny"})),
        *translator.feed(_chunk({"content": " today."})),
        *translator.feed(_chunk({"annotations": ANNOTATIONS[:2]})),
        *translator.feed(_chunk({"annotations": ANNOTATIONS}, "stop")),
        *translator.finish(),
    ]
    citations = [
        e["delta"]["citation"] for e in events if e["type"] == "content_block_delta" and "citation" in e["delta"]
    ]
    assert citations == CITATIONS
    assert {e["index"] for e in events if e["type"].startswith("content_block")} == {0}


_CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}


@pytest.mark.parametrize("text", ["Sunny today.", None], ids=["after-text", "no-text"])
def test_a_url_citation_after_a_tool_call_opens_no_empty_text_block(text):
    """An annotation arriving once a tool call's block had opened closed it and opened a new, empty text block for the
    citation, which Anthropic's stream never has (and Anthropic refuses when sent back). Nor does it go on the text
    block, which has ended: every delta of a block comes before its stop. It is not streamed; the whole reply cites it
    on its text, and with no text drops it."""
    translator = EventTranslator()
    chunks = [
        *([_chunk({"role": "assistant", "content": text})] if text else []),
        _chunk({"tool_calls": [_CALL]}),
        _chunk({"annotations": ANNOTATIONS[:2]}),
        _chunk({}, "tool_calls"),
    ]
    events = [event for chunk in chunks for event in translator.feed(chunk)] + translator.finish()
    for event in events:
        if event["type"] != "ping":
            _EVENT.validate_python(event, strict=True)
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [block["type"] for block in starts] == (["text"] if text else []) + ["tool_use"]
    citations = [
        (e["index"], e["delta"]["citation"]) for e in events if e.get("delta", {}).get("type") == "citations_delta"
    ]
    assert citations == []

    whole = {"role": "assistant", "content": text, "tool_calls": [_CALL], "annotations": ANNOTATIONS[:2]}
    message = message_from_completion(
        {"id": "c", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": whole}]}
    )
    assert [block.get("citations") for block in message["content"] if block["type"] == "text"] == (
        [CITATIONS[:2]] if text else []
    )


def test_a_url_citation_in_the_chunk_that_starts_a_tool_call_goes_on_the_text_before_its_stop():
    translator = EventTranslator()
    chunks = [
        _chunk({"role": "assistant", "content": "Sunny today."}),
        _chunk({"annotations": ANNOTATIONS[:1], "tool_calls": [_CALL]}),
        _chunk({}, "tool_calls"),
    ]
    events = [event for chunk in chunks for event in translator.feed(chunk)] + translator.finish()
    on_text = [(e["type"], e.get("delta", {}).get("type")) for e in events if e.get("index") == 0]
    assert on_text == [
        ("content_block_start", None),
        ("content_block_delta", "text_delta"),
        ("content_block_delta", "citations_delta"),
        ("content_block_stop", None),
    ]


def _chunk(delta: dict, finish: str | None = None, **extra) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def test_chunks_become_anthropics_event_sequence():
    translator = EventTranslator(input_tokens_estimate=12)
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning_content": "Think."}),
        _chunk({"content": "Hi"}),
        _chunk({"content": " there"}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "a"}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "b"}}]}),
        _chunk({}, "tool_calls"),
        {**_chunk({}), "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}},
    ]
    events = [event for chunk in chunks for event in translator.feed(chunk)] + translator.finish()
    for event in events:
        if event["type"] != "ping":
            _EVENT.validate_python(event, strict=True)
    assert [
        (e["type"], e.get("index"), (e.get("delta") or e.get("content_block") or {}).get("type")) for e in events
    ] == [
        ("message_start", None, None),
        ("ping", None, None),
        ("content_block_start", 0, "thinking"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("content_block_start", 3, "tool_use"),
        ("content_block_stop", 3, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]
    assert events[0]["message"]["usage"] == {"input_tokens": 12, "output_tokens": 0}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"]["input_tokens"] == 9 and events[-2]["usage"]["output_tokens"] == 5
