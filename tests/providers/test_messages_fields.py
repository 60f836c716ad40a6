"""A refusal of the chat completion a /v1/messages request was translated into, named by the fields the client sent
(``translate_anthropic.messages_field``, ``messages_refusal_named``): each kind of chat completion's field a provider's
adapter or the provider itself can refuse (an image, a content part's type, a message's role, a tool message, a tool
call, a top-level field), with and without the system prompt that shifts the chat messages by one."""

from __future__ import annotations

import pytest

from providers.adapters.translate_anthropic import chat_request, messages_field, messages_refusal_named
from providers.exceptions import ProviderBadRequestError

IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/heic", "data": "AAAA"}}
TURNS = [
    {"role": "user", "content": "Look at this."},
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "…", "signature": "s"},
            {"type": "text", "text": "Taking two."},
            {"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}},
            {"type": "tool_use", "id": "toolu_2", "name": "shot", "input": {"zoom": 2}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "first"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "x"}, IMAGE]},
            {"type": "text", "text": "And this one:"},
            IMAGE,
        ],
    },
]
# The chat completion's messages: [system,] user, assistant, tool (toolu_1), tool (toolu_2), user (the tool result's
# image, the text, the image).
EXPECTED = {
    "messages[{0}].content": "messages.0.content",
    "messages[{0}].role": "messages.0.role",
    "messages[{1}].content": "messages.1.content",
    "messages[{1}].tool_calls": "messages.1.content",
    "messages[{1}].tool_calls[1]": "messages.1.content.3",
    "messages[{1}].tool_calls[1].function.arguments": "messages.1.content.3.input",
    "messages[{1}].tool_calls[0].function.name": "messages.1.content.2.name",
    "messages[{2}]": "messages.2.content.0",
    "messages[{2}].content": "messages.2.content.0.content",
    "messages[{3}].tool_call_id": "messages.2.content.1.tool_use_id",
    "messages[{3}].role": "messages.2.content.1.type",
    "messages[{4}].content[0].image_url.url": "messages.2.content.1.content.1.source.data",
    "messages[{4}].content[0].type": "messages.2.content.1.content.1.type",
    "messages[{4}].content[1].text": "messages.2.content.2.text",
    "messages[{4}].content[2].type": "messages.2.content.3.type",
    "messages[{4}].content[2].image_url": "messages.2.content.3",
    "messages[{4}].content[2].image_url.url": "messages.2.content.3.source.data",
    "messages[{4}].content[2].image_url.detail": "messages.2.content.3",
    "messages[{4}].role": "messages.2.role",
    "messages[{4}].name": "messages.2",
    "messages.[{4}].content.[2].type": "messages.2.content.3.type",  # OpenAI's own 400s write its paths so
}


@pytest.mark.parametrize("system", [None, "Be brief."], ids=["no-system", "system"])
def test_each_field_of_the_translation_is_named_by_the_clients_own(system):
    request = {"model": "m", "max_tokens": 10, "messages": TURNS, **({"system": system} if system else {})}
    shift = 1 if system else 0
    body = chat_request(request)
    assert [m["role"] for m in body["messages"][shift:]] == ["user", "assistant", "tool", "tool", "user"]
    for chat, client in EXPECTED.items():
        indexed = chat.format(*(shift + n for n in range(5)))
        assert messages_field(request, indexed) == client, indexed
    if system:
        assert messages_field(request, "messages[0].content") == "system"
        assert messages_field(request, "messages[0]") == "system"


def test_an_image_refused_for_its_type_names_the_media_type_and_a_url_source_its_url():
    request = {"model": "m", "max_tokens": 10, "system": "s", "messages": TURNS}
    assert messages_field(request, "messages[5].content[2].image_url.url", "invalid_image_format") == (
        "messages.2.content.3.source.media_type"
    )
    remote = {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}
    request = {"model": "m", "max_tokens": 10, "messages": [remote]}
    assert messages_field(request, "messages[0].content[0].image_url.url", "image_url_not_supported") == (
        "messages.0.content.0.source.url"
    )


@pytest.mark.parametrize(
    ("request_fields", "chat", "client"),
    [
        ({}, "stop", "stop_sequences"),
        ({}, "max_completion_tokens", "max_tokens"),
        ({}, "max_tokens", "max_tokens"),
        ({}, "user", "metadata.user_id"),
        ({}, "parallel_tool_calls", "tool_choice.disable_parallel_tool_use"),
        ({"output_config": {"effort": "high"}}, "reasoning_effort", "output_config.effort"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "reasoning_effort", "thinking.budget_tokens"),
        ({}, "response_format.json_schema.schema", "output_config.format"),
        ({"output_format": {"type": "json_schema"}}, "response_format", "output_format"),
        ({}, "tools[1].function.parameters", "tools.1.input_schema"),
        ({}, "tools[0].function.name", "tools.0.name"),
        ({}, "temperature", "temperature"),
        ({}, None, None),
    ],
)
def test_a_top_level_field_is_named_as_the_messages_api_names_it(request_fields, chat, client):
    request = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **request_fields}
    assert messages_field(request, chat) == client


def test_a_refusal_quoting_the_chat_completions_paths_quotes_the_clients():
    request = {"model": "m", "max_tokens": 10, "system": "s", "messages": TURNS}
    refused = ProviderBadRequestError(
        "`messages[5].content[2].image_url.url`: no HEIC here (see messages[2].tool_calls[1]).",
        param="messages[5].content[2].image_url.url",
        code="invalid_image_format",
    )
    named = messages_refusal_named(request, refused)
    assert named.param == "messages.2.content.3.source.media_type"
    assert named.message == "`messages.2.content.3.source.media_type`: no HEIC here (see messages.1.content.3)."
    assert str(named) == named.message
