"""A refusal of a tool of the chat completion a request was translated into names the tool's field as the client wrote
it (``chat.translate_responses._tool_fields``, ``translate_anthropic.messages_field``): a /v1/responses function tool
is flat (``tools[N].parameters``), a custom or local shell tool's function is llmhub's own (named by the tool), and
``allowed_tools`` sends fewer tools than the client gave; a named tool choice is ``tool_choice.name`` in both APIs.
Until 7 December /v1/responses named the chat completion's ``tools[N].function.parameters`` and
``tool_choice.function.name``, and /v1/messages ``tool_choice.function.name`` and a function's name as the tool."""

from __future__ import annotations

import pytest

from chat.pipeline import client_refusal_named
from chat.translate_responses import responses_request_to_chat
from chat.validation import InvalidRequestError
from providers.adapters.translate_anthropic import messages_field, messages_refusal_named
from providers.exceptions import ProviderBadRequestError

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [
    {"type": "function", "name": "get_time", "parameters": SCHEMA},
    {"type": "custom", "name": "apply_patch", "description": "Patch files."},
    {"type": "local_shell"},
    {"type": "function", "name": "get_weather", "description": "The weather.", "parameters": SCHEMA, "strict": True},
]


def fields_of(**body) -> dict[str, str]:
    _chat, fields = responses_request_to_chat({"model": "m", "input": "hi", "tools": TOOLS, **body})
    return fields


@pytest.mark.parametrize(
    ("chat", "client"),
    [
        ("tools[3].function.parameters", "tools[3].parameters"),
        ("tools[3].function.parameters.properties.city", "tools[3].parameters"),
        ("tools[3].function.name", "tools[3].name"),
        ("tools[3].function.description", "tools[3].description"),
        ("tools[3].function.strict", "tools[3].strict"),
        ("tools[3].function", "tools[3]"),
        ("tools[3].type", "tools[3].type"),
        ("tools[3]", "tools[3]"),
        ("tools[1].function.name", "tools[1].name"),
        ("tools[1].function.parameters", "tools[1]"),  # llmhub's own schema of a custom tool's input
        ("tools[2].function.parameters", "tools[2]"),  # the local shell tool's action, llmhub's
        ("tools[2].function.name", "tools[2]"),
        ("tool_choice", "tool_choice"),
    ],
)
def test_a_tool_refused_is_named_as_the_responses_tool(chat, client):
    refusal = InvalidRequestError(f"Invalid '{chat}': refused.", param=chat)
    client_refusal_named(fields_of(), refusal)
    assert (refusal.param, refusal.message) == (client, f"Invalid '{client}': refused.")


@pytest.mark.parametrize("kind", ["function", "custom"])
def test_a_named_tool_choice_refused_is_named_as_the_responses_choice(kind):
    name = "get_time" if kind == "function" else "apply_patch"
    fields = fields_of(tool_choice={"type": kind, "name": name})
    for chat, client in [("tool_choice.function.name", "tool_choice.name"), ("tool_choice.function", "tool_choice")]:
        refusal = InvalidRequestError("Refused.", param=chat)
        client_refusal_named(fields, refusal)
        assert refusal.param == client


def test_a_tool_sent_by_another_index_under_allowed_tools_is_named_by_the_clients():
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]}
    chat, fields = responses_request_to_chat({"model": "m", "input": "hi", "tools": TOOLS, "tool_choice": choice})
    assert [tool["function"]["name"] for tool in chat["tools"]] == ["get_weather"]
    refusal = InvalidRequestError("Refused.", param="tools[0].function.parameters")
    client_refusal_named(fields, refusal)
    assert refusal.param == "tools[3].parameters"


MESSAGES_REQUEST = {
    "model": "m",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
    "tools": [{"name": "get_time", "input_schema": SCHEMA}, {"name": "get_weather", "input_schema": SCHEMA}],
    "tool_choice": {"type": "tool", "name": "get_weather"},
}


@pytest.mark.parametrize(
    ("chat", "client"),
    [
        ("tools[1].function.parameters", "tools.1.input_schema"),
        ("tools[1].function.name", "tools.1.name"),
        ("tools[1].function.description", "tools.1.description"),
        ("tools[1].function.strict", "tools.1.strict"),
        ("tools[1].function", "tools.1"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("tool_choice.function", "tool_choice"),
        ("tool_choice", "tool_choice"),
    ],
)
def test_a_tool_refused_is_named_as_the_messages_tool(chat, client):
    assert messages_field(MESSAGES_REQUEST, chat) == client


def test_a_messages_refusal_quoting_no_field_begins_with_the_one_it_refuses():
    """Anthropic's errors carry no ``param``: a provider's refusal whose message names no field (OpenAI's of a strict
    tool's schema) begins with the client's, as the adapters' own refusals do; one that quotes it is left as it is."""
    refused = ProviderBadRequestError(
        "Invalid schema for function 'get_weather': 'additionalProperties' is required.",
        param="tools[1].function.parameters",
    )
    named = messages_refusal_named(MESSAGES_REQUEST, refused)
    assert named.message == (
        "`tools.1.input_schema`: Invalid schema for function 'get_weather': 'additionalProperties' is required."
    )
    quoting = ProviderBadRequestError("`tools[1].function.name`: too long.", param="tools[1].function.name")
    assert messages_refusal_named(MESSAGES_REQUEST, quoting).message == "`tools.1.name`: too long."
