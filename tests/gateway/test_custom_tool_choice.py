"""A ``tool_choice`` that names a custom tool (``type: "custom"``, free-form input: Codex's ``apply_patch``) wrongly is
a 400 before any upstream call whose message names the custom tool and the field to change, not a function: a name no
tool has, a function chosen as a custom tool, a custom tool chosen as a function, a custom choice without its name.
On ``/v1/responses`` (flat tools and choices, ``{"type": "custom", "name": ...}``) and ``/v1/chat/completions``
(``{"type": "custom", "custom": {"name": ...}}``)."""

from __future__ import annotations

import pytest

from tests.gateway.test_bad_input import assert_openai_error
from tests.gateway.test_openai_image_types import post
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

RESPONSES_TOOLS = [
    {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    {"type": "custom", "name": "apply_patch", "description": "Patch files."},
]
CHAT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}},
    {"type": "custom", "custom": {"name": "apply_patch", "description": "Patch files."}},
]


def refused(gateway, path: str, body: dict, param: str) -> str:
    response = post(gateway, path, {"model": "gpt-test", **body})
    error = assert_openai_error(response, 400, param=param)
    assert wait_for_record(response.headers["x-request-id"]).status == "rejected"
    assert gateway.upstream.requests_served() == 0
    return error["message"]


@pytest.mark.parametrize(
    ("choice", "said"),
    [
        # Before: "no function named 'nope' is among 'tools'".
        ({"type": "custom", "name": "nope"}, "no custom tool named 'nope' is among 'tools'"),
        # Before: both went upstream, the choice sent as the function of that name.
        (
            {"type": "custom", "name": "get_weather"},
            '\'get_weather\' is a function among \'tools\': choose it with {"type": "function", "name": "get_weather"}',
        ),
        (
            {"type": "function", "name": "apply_patch"},
            "'apply_patch' is a custom tool among 'tools': choose it with "
            '{"type": "custom", "name": "apply_patch"}',
        ),
    ],
)
def test_a_responses_tool_choice_naming_a_custom_tool_wrongly_says_so(gateway, choice, said):
    body = {"input": "Patch it.", "tools": RESPONSES_TOOLS, "tool_choice": choice}
    message = refused(gateway, "/v1/responses", body, "tool_choice")
    assert said in message and "function named" not in message, message


@pytest.mark.parametrize(
    ("choice", "said"),
    [
        # Before: 'expected {"type": "function", "function": {"name": ...}}' for each of the first two.
        ({"type": "custom", "custom": {}}, 'expected {"type": "custom", "custom": {"name": ...}}'),
        (
            {"type": "custom", "function": {"name": "apply_patch"}},
            'expected {"type": "custom", "custom": {"name": ...}}',
        ),
        # Before: "no custom named 'nope' is among 'tools'".
        ({"type": "custom", "custom": {"name": "nope"}}, "no custom tool named 'nope' is among 'tools'"),
        # Before: "no custom named 'get_weather'" and "no function named 'apply_patch'", which is among them.
        (
            {"type": "custom", "custom": {"name": "get_weather"}},
            "'get_weather' is a function among 'tools': choose it with "
            '{"type": "function", "function": {"name": "get_weather"}}',
        ),
        (
            {"type": "function", "function": {"name": "apply_patch"}},
            "'apply_patch' is a custom tool among 'tools': choose it with "
            '{"type": "custom", "custom": {"name": "apply_patch"}}',
        ),
    ],
)
def test_a_chat_tool_choice_naming_a_custom_tool_wrongly_says_so(gateway, choice, said):
    body = {"messages": [{"role": "user", "content": "Patch it."}], "tools": CHAT_TOOLS, "tool_choice": choice}
    message = refused(gateway, "/v1/chat/completions", body, "tool_choice")
    assert said in message, message


def test_a_chat_tool_of_another_type_is_told_both_types(gateway):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "web_search"}]}
    # Before: "expected 'function'", though a custom tool is taken too.
    assert "expected 'function' or 'custom'" in refused(gateway, "/v1/chat/completions", body, "tools[0].type")
