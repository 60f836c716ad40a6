"""Moderation over REST, against a live llmhub and the fake upstream (which serves /v1/moderations and flags
``[flag:CATEGORY]`` markers): input checks before anything goes upstream, output checks on whole and streamed
replies, the OpenAI checker, failing services, the Messages API's error shape, the plan's policy."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from audit.models import AuditEvent
from billing.models import Plan, UsageRecord, UserPlan
from llmhub.testing.fake_upstream import THINKING_SIGNATURE, split_tokens
from llmhub.testing.openapi import validate_openai_schema
from providers.models import CatalogModel, ModerationAction, ModerationChecker, ModerationPolicy, Provider
from providers.moderation import ModerationServiceError, PolicySnapshot, policy_cache, policy_snapshot
from providers.tokens import text_tokens
from tests.factories import ProviderFactory
from tests.waiting import wait_for_record, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
MODERATIONS = "/v1/moderations"
MODERATION_MODEL = "omni-moderation-latest"
# The fake upstream's ``[[words=N]]`` cycle.
LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore "
    "magna aliqua"
)


@pytest.fixture(autouse=True)
def _fresh_policies():
    policy_cache.invalidate()
    yield
    policy_cache.invalidate()


def policy_on(model_name: str, **fields) -> ModerationPolicy:
    """A policy (a block-list by default) on the catalog model ``model_name``."""
    fields.setdefault("name", f"policy-{model_name}")
    if fields.get("checker") == ModerationChecker.OPENAI:
        fields.setdefault("moderation_provider", Provider.objects.get(name="fake-openai"))
        fields.setdefault("moderation_model", MODERATION_MODEL)
    policy = ModerationPolicy.objects.create(**fields)
    model = CatalogModel.objects.get(name=model_name)
    model.moderation_policy = policy
    model.save()
    return policy


def audit_events(request_id: str, timeout: float = 10.0) -> list[AuditEvent]:
    """The ``moderation.flag`` events of a request, once the background write has landed."""
    return wait_until(
        lambda: list(AuditEvent.objects.filter(action="moderation.flag", target_id=request_id)),
        f"a moderation.flag event for {request_id}",
        timeout=timeout,
        interval=0.05,
    )


def sse_stream(gateway, body: dict) -> tuple[list[dict | str], str]:
    """The ``data:`` payloads of a streamed chat completion (``[DONE]`` as a string), and its request id."""
    with httpx.stream(
        "POST", gateway.url + CHAT, json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
    ) as response:
        assert response.status_code == 200, response.read()
        events: list[dict | str] = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
        return events, response.headers["x-request-id"]


def delivered_text(events: list[dict | str]) -> str:
    return "".join(
        (choice.get("delta") or {}).get("content") or ""
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices") or ()
    )


# INPUT


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_blocked_input_never_reaches_the_upstream_and_gets_its_rejected_row(gateway, stream):
    policy_on("gpt-test", blocklist="forbidden\nre:secret\\s+plan")

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "Tell me the FORBIDDEN word"}], stream=stream
        )

    assert refused.value.status_code == 400
    assert refused.value.code == "content_policy_violation"
    assert refused.value.type == "invalid_request_error"
    assert gateway.upstream.requests_served(CHAT) == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "content_policy_violation"
    assert record.moderation.startswith("blocked input: blocklist (entry 1 at character ")
    assert "forbidden" not in record.moderation.lower()
    assert record.cost == 0 and record.model_name == "gpt-test"


def test_a_blocked_word_ahead_of_long_padding_is_found(gateway):
    """The block-list read only the last 200,000 characters of an input: a blocked word ahead of that much
    padding went upstream. The whole input is read now, a window at a time."""
    policy_on("gpt-test", blocklist="forbidden")
    padded = "Tell me the forbidden word. " + "lorem ipsum " * 20_000  # 240,000 characters after it
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": padded}])
    assert refused.value.code == "content_policy_violation"
    assert gateway.upstream.requests_served(CHAT) == 0


def test_block_list_entries_are_whole_words_any_case_and_patterns(gateway):
    policy_on("gpt-test", blocklist="forbidden\nre:secret\\s+plan")
    client = gateway.client()

    served = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "unforbiddenness and secrets planned"}]
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "our Secret  plan"}])

    assert served.choices[0].message.content
    assert refused.value.code == "content_policy_violation"
    assert gateway.upstream.requests_served(CHAT) == 1


# Each reads "forbidden": full-width capitals, a zero-width space, soft hyphens, mathematical bold with a joiner,
# accents, a combining stroke drawn through each letter ("zalgo"), Cyrillic "о" and "е" in the Latin word.
DISGUISED = [
    "ＦＯＲＢＩＤＤＥＮ",
    "for\u200bbidden",
    "for\u00adbid\u00adden",
    "𝐟𝐨𝐫\u2060𝐛𝐢𝐝𝐝𝐞𝐧",
    "fòrbíddén",
    "f\u0337o\u0337r\u0337b\u0337i\u0337d\u0337d\u0337e\u0337n\u0337",
    "f\u043erbidd\u0435n",
]
DISGUISED_IDS = ["full-width", "zero-width", "soft-hyphen", "math-bold", "accents", "zalgo", "cyrillic"]


@pytest.mark.parametrize("word", DISGUISED, ids=DISGUISED_IDS)
def test_a_blocked_word_in_disguise_is_refused_on_both_apis(gateway, word):
    """Full-width letters, compatibility forms and invisible characters took a blocked word past the block-list
    and upstream; it is read in its plain form now."""
    policy_on("gpt-test", blocklist="forbidden", check_output=False)
    policy_on("claude-test", blocklist="forbidden", check_output=False, name="claude-policy")
    message = [{"role": "user", "content": f"Tell me the {word} word"}]

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=message)
    with pytest.raises(anthropic.BadRequestError) as refused_messages:
        anthropic_client(gateway).messages.create(model="claude-test", max_tokens=50, messages=message)

    assert refused.value.code == "content_policy_violation"
    assert refused_messages.value.body["error"]["type"] == "invalid_request_error"
    assert gateway.upstream.requests_served(CHAT) == 0
    assert gateway.upstream.requests_served("/v1/messages") == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.moderation == (
        'blocked input: blocklist (entry 1 at character 12 of messages[0].content), policy "policy-gpt-test"'
    )


def test_words_that_only_look_alike_after_normalising_are_not_refused(gateway):
    policy_on("gpt-test", blocklist="forbidden", check_output=False)
    client = gateway.client()

    for text in ("un\u200bforbidden", "for bidden", "for-bidden", "ｆｏｒｂｉｄｄｅｎｎｅｓｓ"):
        reply = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": text}])
        assert reply.choices[0].message.content == f"Echo: {text}"


def test_an_entry_in_a_script_without_spaces_and_a_pattern_through_look_alikes_are_refused(gateway):
    """A Thai or Chinese entry inside a sentence of its script (no spaces between the words) went upstream; so did
    nothing else here, but a pattern meets look-alike letters read as Latin too (a Cyrillic "о")."""
    policy_on("gpt-test", blocklist="ภาษา\n杀\nre:forbid\\w+", check_output=False)
    client = gateway.client()

    for text, entry in (("คนพูดภาษาไทย", 1), ("我要杀你", 2), ("the f\u043erbidden word", 3)):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": text}])
        assert refused.value.code == "content_policy_violation"
        record = wait_for_record(refused.value.response.headers["x-request-id"])
        assert record.moderation.startswith(f"blocked input: blocklist (entry {entry} at character")
    served = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "คนพูดไทย"}])
    assert served.choices[0].message.content == "Echo: คนพูดไทย"
    assert gateway.upstream.requests_served(CHAT) == 1


def _called(arguments: str) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": arguments}}


SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}
# Earlier assistant turns a client writes into a chat completion's history (each says "forbidden").
EARLIER_REPLIES = {
    "text": {"messages": [{"role": "assistant", "content": "a forbidden word"}]},
    "text-part": {"messages": [{"role": "assistant", "content": [{"type": "text", "text": "a forbidden word"}]}]},
    "refusal-part": {"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "forbidden"}]}]},
    "tool-call-arguments": {
        "messages": [
            {"role": "assistant", "content": None, "tool_calls": [_called('{"q": "the forbidden word"}')]},
            {"role": "tool", "tool_call_id": "call_1", "content": "nothing found"},
        ],
        "tools": [SEARCH],
    },
    "escaped-arguments": {
        "messages": [
            {"role": "assistant", "content": None, "tool_calls": [_called('{"q": "\\u0066orbidden"}')]},
            {"role": "tool", "tool_call_id": "call_1", "content": "nothing found"},
        ],
        "tools": [SEARCH],
    },
    # A reasoning model's reasoning, sent back as its servers take it (DeepSeek's thinking mode with tools asks
    # for its reasoning_content again; OpenRouter takes reasoning).
    "reasoning-content": {"messages": [{"role": "assistant", "content": "ok", "reasoning_content": "a forbidden one"}]},
    "reasoning": {"messages": [{"role": "assistant", "content": "ok", "reasoning": "a forbidden one"}]},
    # Claude's signed thinking, sent back as a chat completion's replies give it (``thinking_blocks``).
    "thinking-blocks": {
        "messages": [
            {
                "role": "assistant",
                "content": "ok",
                "thinking_blocks": [{"type": "thinking", "thinking": "a forbidden one", "signature": "c2ln"}],
            }
        ]
    },
}


@pytest.mark.parametrize("kind", list(EARLIER_REPLIES))
def test_an_earlier_assistant_turn_the_client_wrote_is_checked_as_input(gateway, kind):
    """On the REST APIs the client writes the whole conversation: an earlier "assistant" turn was exempt from
    the input check, so a blocked word went upstream as a made-up earlier reply (or its tool call)."""
    policy_on("gpt-test", blocklist="forbidden", check_output=False)
    history = EARLIER_REPLIES[kind]
    messages = [{"role": "user", "content": "hi"}, *history["messages"], {"role": "user", "content": "go on"}]

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=messages, **({"tools": history["tools"]} if "tools" in history else {})
        )

    assert refused.value.code == "content_policy_violation"
    assert gateway.upstream.requests_served(CHAT) == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.moderation.startswith("blocked input: blocklist (entry 1")


@pytest.mark.parametrize(
    "content",
    [
        "a forbidden word",
        [{"type": "text", "text": "a forbidden word"}],
        [{"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": ["the forbidden word"]}}],
        [
            {"type": "thinking", "thinking": "the forbidden word", "signature": THINKING_SIGNATURE},
            {"type": "text", "text": "ok"},
        ],
    ],
    ids=["text", "text-block", "tool-use-input", "thinking"],
)
def test_an_earlier_assistant_turn_is_checked_as_input_on_the_messages_api(gateway, content):
    policy_on("claude-test", blocklist="forbidden", check_output=False)
    answer = (
        [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "nothing found"}]
        if isinstance(content, list) and content[0]["type"] == "tool_use"
        else "go on"
    )
    tools = [{"name": "search", "input_schema": {"type": "object", "properties": {}}}]

    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(gateway).messages.create(
            model="claude-test",
            max_tokens=50,
            tools=tools,
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": content},
                {"role": "user", "content": answer},
            ],
        )

    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "content policy" in refused.value.body["error"]["message"]
    assert gateway.upstream.requests_served("/v1/messages") == 0


@pytest.mark.parametrize(
    "blocks",
    [
        [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "forbidden"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
        ],
        [
            {
                "type": "mcp_tool_use",
                "id": "mcptoolu_1",
                "name": "find",
                "server_name": "s",
                "input": {"q": "forbidden"},
            },
            {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1", "content": [{"type": "text", "text": "none"}]},
        ],
        [
            {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "find", "server_name": "s", "input": {"q": "x"}},
            {
                "type": "mcp_tool_result",
                "tool_use_id": "mcptoolu_1",
                "content": [{"type": "text", "text": "forbidden"}],
            },
        ],
    ],
    ids=["server-tool-use", "mcp-tool-use", "mcp-tool-result"],
)
def test_a_server_or_mcp_tool_call_in_an_earlier_turn_is_checked_as_input(gateway, blocks):
    """The Messages API passes block types it does not check to an Anthropic provider: a server tool's or an MCP
    tool's call and an MCP tool's result in an earlier turn reach the model, and were not read."""
    policy_on("claude-test", blocklist="forbidden", check_output=False)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": blocks},
        {"role": "user", "content": "go on"},
    ]

    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(gateway).messages.create(model="claude-test", max_tokens=50, messages=messages)

    assert "content policy" in refused.value.body["error"]["message"]
    assert gateway.upstream.requests_served("/v1/messages") == 0


def test_tool_call_arguments_nested_too_deep_to_decode_are_read_as_they_are(gateway):
    """Arguments are read decoded when they are JSON: nested deeper than Python's parser goes, they answered 500."""
    policy_on("gpt-test", blocklist="forbidden", check_output=False)
    deep = "[" * 10_000 + '"forbidden"' + "]" * 10_000
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [_called(deep)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "none"},
        {"role": "user", "content": "go on"},
    ]

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=messages, tools=[SEARCH])

    assert refused.value.code == "content_policy_violation"
    assert refused.value.param == "messages[0].tool_calls[0].function"


def test_the_openai_checker_reads_an_earlier_assistant_turn(gateway):
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, check_output=False)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "sure [flag:violence]"},
        {"role": "user", "content": "go on"},
    ]

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=messages)

    assert refused.value.code == "content_policy_violation" and "violence" in refused.value.message
    assert gateway.upstream.requests_served(CHAT) == 0


def _search_tool(description: str = "Search the web.", name: str = "search", about_q: str = "what to find") -> dict:
    parameters = {"type": "object", "properties": {"q": {"type": "string", "description": about_q}}}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


# What a client defines beside the messages, each saying "forbidden" somewhere the model reads it.
DEFINITIONS = {
    "tool-name": {"tools": [_search_tool(name="forbidden")]},
    "tool-description": {"tools": [_search_tool(description="Finds the forbidden word.")]},
    "parameter-description": {"tools": [_search_tool(about_q="a forbidden word")]},
    "parameter-enum": {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "pick",
                    "parameters": {"type": "object", "properties": {"w": {"type": "string", "enum": ["forbidden"]}}},
                },
            }
        ]
    },
    "legacy-function": {"functions": [{"name": "search", "description": "Finds the forbidden word."}]},
    "response-format-schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"a": {"type": "string", "description": "forbidden"}}},
            },
        }
    },
}


@pytest.mark.parametrize("kind", list(DEFINITIONS))
def test_a_tool_or_schema_the_client_defines_is_checked_as_input(gateway, kind):
    """A tool's name, description and parameter schema (and a response format's schema) reach the model as
    much as a message does: a blocked word in them went upstream unread."""
    policy_on("gpt-test", blocklist="forbidden", check_output=False)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], **DEFINITIONS[kind]
        )

    assert refused.value.code == "content_policy_violation"
    assert gateway.upstream.requests_served(CHAT) == 0


@pytest.mark.parametrize(
    "tool",
    [
        {"name": "forbidden", "input_schema": {"type": "object"}},
        {"name": "search", "description": "Finds the forbidden word.", "input_schema": {"type": "object"}},
        {
            "name": "search",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string", "description": "forbidden"}}},
        },
    ],
    ids=["name", "description", "parameter-description"],
)
def test_a_tool_the_client_defines_is_checked_as_input_on_the_messages_api(gateway, tool):
    policy_on("claude-test", blocklist="forbidden", check_output=False)

    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(gateway).messages.create(
            model="claude-test", max_tokens=50, tools=[tool], messages=[{"role": "user", "content": "hi"}]
        )

    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert gateway.upstream.requests_served("/v1/messages") == 0


def test_the_openai_checker_reads_a_tools_description(gateway):
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, check_output=False)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            tools=[_search_tool(description="Use it [flag:violence]")],
        )

    assert refused.value.code == "content_policy_violation" and "violence" in refused.value.message
    assert gateway.upstream.requests_served(CHAT) == 0


def test_a_messages_participant_name_is_checked_as_input(gateway):
    """A message's ``name`` (a participant's) reaches the model with its turn: it was not read."""
    policy_on("gpt-test", blocklist="forbidden", check_output=False)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "name": "forbidden", "content": "hi"}]
        )

    assert refused.value.code == "content_policy_violation" and refused.value.param == "messages[0].name"
    assert gateway.upstream.requests_served(CHAT) == 0


@pytest.mark.parametrize(
    ("request_fields", "field", "character"),
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a forbidden"}]},
            "messages[1].content",
            2,
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [_search_tool(about_q="the forbidden one")]},
            "tools[0]",
            4,
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": [_called('{"q": "forbidden"}')]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "none"},
                    {"role": "user", "content": "go on"},
                ],
                "tools": [SEARCH],
            },
            "messages[0].tool_calls[0].function",
            0,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok", "reasoning_content": "so: forbidden"},
                    {"role": "user", "content": "go on"},
                ]
            },
            "messages[1].reasoning_content",
            4,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": "ok",
                        "thinking_blocks": [
                            {"type": "redacted_thinking", "data": "b3BhcXVl"},
                            {"type": "thinking", "thinking": "so: forbidden", "signature": "c2ln"},
                        ],
                    },
                    {"role": "user", "content": "go on"},
                ]
            },
            "messages[1].thinking_blocks[1]",
            4,
        ),
    ],
    ids=["earlier-reply", "tool", "tool-call", "reasoning", "thinking-blocks"],
)
def test_a_refused_input_names_the_field_the_blocked_word_is_in(gateway, request_fields, field, character):
    """The whole input is one text, scanned once: the hit's character named a place in that text, which the
    client never sent. It names the field and the character in it now, as the error's ``param`` too."""
    policy_on("gpt-test", blocklist="forbidden", check_output=False, name="house rules")

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", **request_fields)

    assert refused.value.param == field
    assert refused.value.body["message"] == (
        f'Your request was refused by the content policy "house rules" (blocklist) in `{field}`.'
    )
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert (
        record.moderation
        == f'blocked input: blocklist (entry 1 at character {character} of {field}), policy "house rules"'
    )


def test_a_refused_input_names_the_field_on_the_messages_api(gateway):
    policy_on("claude-test", blocklist="forbidden", check_output=False, name="house rules")

    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(gateway).messages.create(
            model="claude-test",
            max_tokens=50,
            system=[{"type": "text", "text": "Be kind."}, {"type": "text", "text": "Never say forbidden."}],
            messages=[{"role": "user", "content": "hi"}],
        )

    assert refused.value.body["error"]["message"] == (
        'Your request was refused by the content policy "house rules" (blocklist) in `system`.'
    )
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.moderation == 'blocked input: blocklist (entry 1 at character 10 of system), policy "house rules"'


def test_a_clean_conversation_with_earlier_turns_and_tool_calls_is_served(gateway):
    policy_on("gpt-test", blocklist="forbidden", check_output=False)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [_called('{"q": "unforbidden"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "nothing found"},
        {"role": "assistant", "content": "Nothing found."},
        {"role": "user", "content": "go on"},
    ]

    reply = gateway.client().chat.completions.create(model="gpt-test", messages=messages, tools=[_search_tool()])

    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls
    assert gateway.upstream.requests_served(CHAT) == 1


def test_an_assistant_prefill_is_the_clients_text_and_is_checked_as_input(gateway):
    policy_on("gpt-test", blocklist="forbidden", check_output=False)
    policy_on("claude-test", blocklist="forbidden", check_output=False, name="claude-policy")
    prefilled = [{"role": "user", "content": "go on"}, {"role": "assistant", "content": "The forbidden"}]

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=prefilled)
    with pytest.raises(anthropic.BadRequestError) as refused_messages:
        anthropic_client(gateway).messages.create(model="claude-test", max_tokens=50, messages=prefilled)

    assert refused.value.code == "content_policy_violation"
    assert refused_messages.value.body["error"]["type"] == "invalid_request_error"
    assert gateway.upstream.requests_served(CHAT) == 0
    assert gateway.upstream.requests_served("/v1/messages") == 0


def test_a_flagged_input_is_served_and_recorded_on_the_ledger_and_in_the_audit_log(gateway):
    policy_on("gpt-test", blocklist="forbidden", action=ModerationAction.FLAG, check_output=False)

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "say the forbidden word"}]
    )

    assert raw.parse().choices[0].message.content == "Echo: say the forbidden word"
    request_id = raw.headers["x-request-id"]
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.cost > 0
    assert record.moderation == (
        'flagged input: blocklist (entry 1 at character 8 of messages[0].content), policy "policy-gpt-test"'
    )
    (event,) = audit_events(request_id)
    assert (event.actor_type, event.actor_id) == ("key", str(gateway.api_key.pk))
    assert event.changes["flagged"][1] == {
        "direction": "input",
        "categories": ["blocklist"],
        "policy": "policy-gpt-test",
        "where": "entry 1 at character 8 of messages[0].content",
    }
    assert "forbidden" not in json.dumps(event.changes) + event.target_repr


def test_the_plans_policy_applies_to_every_model_of_the_plan(gateway):
    policy = ModerationPolicy.objects.create(name="plan-policy", blocklist="forbidden")
    plan = Plan.objects.create(name="moderated", allow_all_models=True, moderation_policy=policy)
    UserPlan.objects.create(user=gateway.user, plan=plan)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "the forbidden word"}]
        )

    assert refused.value.code == "content_policy_violation"
    assert gateway.upstream.requests_served(CHAT) == 0


def test_a_refusal_says_which_policy_refused_it_when_the_model_and_the_plan_each_have_one(gateway):
    policy_on("gpt-test", blocklist="harmless\nunkind", name="model rules")
    policy = ModerationPolicy.objects.create(name="plan rules", blocklist="# house words\nforbidden")
    plan = Plan.objects.create(name="moderated", allow_all_models=True, moderation_policy=policy)
    UserPlan.objects.create(user=gateway.user, plan=plan)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "a forbidden plan"}]
        )

    assert refused.value.body["message"] == (
        'Your request was refused by the content policy "plan rules" (blocklist) in `messages[0].content`.'
    )
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.moderation == (
        'blocked input: blocklist (entry 2 at character 2 of messages[0].content), policy "plan rules"'
    )


def test_a_policy_saved_in_the_admin_applies_to_the_next_request(gateway):
    policy = policy_on("gpt-test", blocklist="forbidden")
    client = gateway.client()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "forbidden"}])

    policy.enabled = False
    policy.save()

    reply = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "forbidden"}])
    assert reply.choices[0].message.content == "Echo: forbidden"


# OUTPUT


def test_a_streamed_reply_crossing_the_block_list_is_cut_in_band_and_its_delivered_tokens_are_billed(gateway):
    policy_on("gpt-test", blocklist="adipiscing", stream_interval_chars=1)
    full = " ".join(LOREM.split()[:30])

    events, request_id = sse_stream(
        gateway, {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "[[words=30]]"}]}
    )

    assert "[DONE]" not in events
    error = events[-1]["error"]
    assert error["code"] == "content_policy_violation"
    text = delivered_text(events)
    assert text and full.startswith(text) and len(text) < len(full)
    assert "adipiscing" not in text, "the client got the blocked word"
    record = wait_for_record(request_id)
    assert record.error_type == "content_policy_violation"
    assert record.moderation.startswith("blocked output: blocklist (entry 1 at character ")
    assert record.completion_tokens == text_tokens(text) and record.usage_estimated
    assert record.cost > 0


def test_the_openai_sdk_raises_on_a_cut_stream(gateway):
    policy_on("gpt-test", blocklist="adipiscing", stream_interval_chars=20)
    pieces: list[str] = []

    with pytest.raises(openai.APIError) as cut:
        for chunk in gateway.client().chat.completions.create(
            model="gpt-test", stream=True, messages=[{"role": "user", "content": "[[words=60]]"}]
        ):
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)

    assert "content policy" in cut.value.message
    full = " ".join((LOREM.split() * 4)[:60])
    assert full.startswith("".join(pieces)) and len("".join(pieces)) < len(full)


def test_a_term_at_the_very_end_of_a_stream_is_found_by_the_final_check(gateway):
    policy_on("gpt-test", blocklist="labore", check_input=False, stream_interval_chars=10_000)

    events, request_id = sse_stream(
        gateway,
        {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "[[reply=ut labore]]"}]},
    )

    assert "[DONE]" not in events and events[-1]["error"]["code"] == "content_policy_violation"
    # A blocking block-list scans every piece whatever the interval: the word waits for the final check.
    assert delivered_text(events) == "ut"
    assert wait_for_record(request_id).completion_tokens == len(split_tokens("ut labore"))


def test_a_blocking_blocklist_relays_no_blocked_word_at_its_default_interval(gateway):
    """The interval (200 characters by default) spaces a moderation service's questions; a block-list that
    blocks scans each piece, so a blocked word early in a reply never reaches the client."""
    policy_on("gpt-test", blocklist="dolor", check_input=False)
    pieces: list[str] = []

    with pytest.raises(openai.APIError) as cut:
        for chunk in gateway.client().chat.completions.create(
            model="gpt-test", stream=True, messages=[{"role": "user", "content": "[[words=60]]"}]
        ):
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)

    assert "content policy" in cut.value.message
    assert "".join(pieces) == "lorem ipsum"


def test_a_flagging_blocklist_keeps_its_interval(gateway):
    policy_on("gpt-test", blocklist="dolor", check_input=False, action=ModerationAction.FLAG)
    events, request_id = sse_stream(
        gateway,
        {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "[[words=8]]"}]},
    )
    assert "[DONE]" in events and delivered_text(events).startswith("lorem ipsum dolor")
    assert "flagged output" in wait_for_record(request_id).moderation


def test_a_blocked_word_ending_the_text_so_far_is_held_back_and_never_relayed(gateway):
    policy_on("gpt-test", blocklist="labore", check_input=False, stream_interval_chars=1)

    events, request_id = sse_stream(
        gateway,
        {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "[[reply=ut labore]]"}]},
    )

    assert "[DONE]" not in events and events[-1]["error"]["code"] == "content_policy_violation"
    assert delivered_text(events) == "ut"
    # The provider's usage had arrived: the generated tokens are billed, the withheld word included.
    record = wait_for_record(request_id)
    assert record.completion_tokens == len(split_tokens("ut labore")) and not record.usage_estimated


@pytest.mark.parametrize("word", DISGUISED, ids=DISGUISED_IDS)
def test_a_streamed_reply_with_a_blocked_word_in_disguise_is_cut_before_it(gateway, word):
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    pieces: list[str] = []

    with pytest.raises(openai.APIError) as cut:
        for chunk in gateway.client().chat.completions.create(
            model="gpt-test", stream=True, messages=[{"role": "user", "content": f"[[reply=ut {word} elit]]"}]
        ):
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)

    assert "content policy" in cut.value.message
    assert "".join(pieces) == "ut"


def test_a_pattern_spanning_two_chunks_is_cut_before_its_end_is_relayed(gateway):
    policy_on("gpt-test", blocklist="re:secret\\s+plan", check_input=False, stream_interval_chars=1)
    pieces: list[str] = []

    with pytest.raises(openai.APIError) as cut:
        for chunk in gateway.client().chat.completions.create(
            model="gpt-test", stream=True, messages=[{"role": "user", "content": "[[reply=our secret plan is set]]"}]
        ):
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)

    assert "content policy" in cut.value.message
    assert "".join(pieces) == "our secret"


def test_each_choice_of_a_stream_is_checked_as_its_own_text(gateway):
    # The choices' pieces come interleaved ("lorem", "lorem", " ipsum", " ipsum"...): read as one text, the
    # first word of one choice runs into the other's ("loremlorem") and is no whole word.
    policy_on("gpt-test", blocklist="lorem", check_input=False, stream_interval_chars=1)

    events, request_id = sse_stream(
        gateway,
        {
            "model": "gpt-test",
            "stream": True,
            "n": 2,
            "messages": [{"role": "user", "content": "[[reply=lorem ipsum dolor]]"}],
        },
    )

    assert "[DONE]" not in events and events[-1]["error"]["code"] == "content_policy_violation"
    assert "lorem" not in delivered_text(events)
    assert wait_for_record(request_id).moderation.startswith("blocked output: blocklist (entry 1 at character 0)")


def test_a_clean_stream_under_a_policy_ends_normally(gateway):
    policy_on("gpt-test", blocklist="forbidden", stream_interval_chars=5)

    events, request_id = sse_stream(
        gateway, {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "[[words=40]]"}]}
    )

    assert events[-1] == "[DONE]"
    assert delivered_text(events) == " ".join((LOREM.split() * 3)[:40])
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.moderation == ""


def test_a_whole_reply_with_a_blocked_word_is_withheld_with_an_error_and_billed(gateway):
    policy_on("gpt-test", blocklist="forbidden", check_input=False)

    with pytest.raises(openai.BadRequestError) as withheld:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "[[reply=a forbidden answer]]"}]
        )

    assert withheld.value.code == "content_policy_violation"
    assert "forbidden" not in withheld.value.message
    assert gateway.upstream.requests_served(CHAT) == 1
    record = wait_for_record(withheld.value.response.headers["x-request-id"])
    assert record.status == "invalid" and record.error_type == "content_policy_violation"
    assert record.completion_tokens == 3 and not record.usage_estimated
    assert record.cost == (record.prompt_tokens * Decimal("0.15") + 3 * Decimal("0.60")) / Decimal(1_000_000)
    assert record.moderation == 'blocked output: blocklist (entry 1 at character 2), policy "policy-gpt-test"'


# THE OPENAI CHECKER


def test_the_openai_checker_blocks_a_flagged_input_before_the_call(gateway):
    policy_on("gpt-test", checker=ModerationChecker.OPENAI)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello [flag:violence]"}]
        )

    assert refused.value.code == "content_policy_violation" and "violence" in refused.value.message
    assert gateway.upstream.requests_served(MODERATIONS) == 1
    assert gateway.upstream.requests_served(CHAT) == 0
    moderated = [r for r in gateway.upstream.requests if r["path"] == MODERATIONS]
    assert moderated[0]["body"] == {"input": "hello [flag:violence]", "model": MODERATION_MODEL}
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.moderation == 'blocked input: violence, policy "policy-gpt-test"'


def moderation_inputs(gateway) -> list[list[str]]:
    """The inputs of each call the fake upstream's /v1/moderations was sent, in order."""
    calls = [r["body"]["input"] for r in gateway.upstream.requests if r["path"] == MODERATIONS]
    return [[given] if isinstance(given, str) else given for given in calls]


def test_the_openai_checker_is_asked_about_the_whole_input_in_one_call(gateway):
    """It was asked about the last 32,000 characters only: a flagged passage ahead of that much text went
    upstream. The whole input goes now, as several inputs of at most 4,000 characters in the one call."""
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, check_output=False)
    text = "hello [flag:violence] " + "lorem ipsum " * 6_000  # 72,022 characters

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": text}])

    assert refused.value.code == "content_policy_violation" and "violence" in refused.value.message
    assert gateway.upstream.requests_served(CHAT) == 0
    (moderated,) = moderation_inputs(gateway)
    assert len(moderated) == 21 and all(len(part) <= 4_000 for part in moderated)
    assert moderated[0].startswith("hello [flag:violence]") and moderated[-1].endswith(text[-500:])
    clean = "hello" + " lorem ipsum" * 6_000
    reply = gateway.client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": clean}])
    assert reply.choices[0].message.content == f"Echo: {clean}"


def test_a_long_input_is_asked_in_pieces_the_service_reads_whole(gateway):
    """A 36,000-character input went as inputs of 32,000 characters, of which OpenAI's moderation reads only the
    start (the fake upstream its first 16,000 characters, about 4,000 tokens): a passage flagged 24,000 characters
    in reached the model unread. Each input is at most 4,000 characters now, read whole."""
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, check_output=False)
    text = "lorem ipsum " * 2_000 + "[flag:violence] " + "lorem ipsum " * 1_000

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": text}])

    assert refused.value.code == "content_policy_violation" and "violence" in refused.value.message
    assert gateway.upstream.requests_served(CHAT) == 0
    assert all(len(part) <= 4_000 for call in moderation_inputs(gateway) for part in call)


def test_a_very_long_input_costs_the_service_calls_in_proportion_to_it(gateway):
    """400,000 characters went in one call of 13 inputs of 32,000, a body of 400 KB: the whole input in one
    question, however long (4,000,000 characters may be sent). They go as 4 calls of at most 32 inputs of at most
    4,000 characters, each input re-reading the last 500 characters of the one before: about 1.14 times the text,
    every character of it in some input."""
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, check_output=False)
    text = " ".join(f"{number:07d}" for number in range(50_000))  # 399,999 characters, no two places alike

    reply = gateway.client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": text}])

    assert reply.choices[0].message.content == f"Echo: {text}"
    calls = moderation_inputs(gateway)
    assert len(calls) == 4 and all(len(call) <= 32 for call in calls)
    parts = [part for call in calls for part in call]
    assert all(len(part) <= 4_000 for part in parts)
    starts = [text.index(part) for part in parts]
    ends = [start + len(part) for start, part in zip(starts, parts, strict=True)]
    assert starts[0] == 0 and ends[-1] == len(text) and starts == sorted(starts)
    assert all(end - start >= 500 for end, start in zip(ends, starts[1:], strict=False))  # each seam read whole
    assert sum(map(len, parts)) <= 1.15 * len(text)


def most_in_flight(entries: list[dict]) -> int:
    """The most of ``entries`` (the fake upstream's log) the upstream held at once: each from its
    ``received_at`` to its ``answered_at``, both the upstream's own clock."""
    edges = sorted([(e["received_at"], 1) for e in entries] + [(e["answered_at"], -1) for e in entries])
    most = held = 0
    for _, step in edges:  # at a tie the answer (-1) sorts first: one ending as another starts is not two
        held += step
        most = max(most, held)
    return most


def test_a_very_long_inputs_calls_go_four_at_a_time(gateway):
    """The calls of one input go at most 4 at once: of 5 calls that each take a second, 4 are in flight together
    and the fifth waits for one of them, not all 5 at once (whatever the input's length) nor one at a time.
    Counted from the upstream's own log of when each call came and was answered (it checked this by the
    request's wall time until 7 December: 6 to 10 seconds, which a loaded machine could miss)."""
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, check_output=False)
    gateway.upstream.handles[0].set_timing(latency_ms=1_000)  # the chat's call, and each moderation call
    text = " ".join(f"{number:07d}" for number in range(66_000))  # 527,999 characters: 151 inputs, 5 calls

    reply = gateway.client(timeout=60).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": text}]
    )

    assert reply.choices[0].message.content == f"Echo: {text}"
    assert [len(call) for call in moderation_inputs(gateway)] == [32, 32, 32, 32, 23]
    calls = [entry for entry in gateway.upstream.requests if entry["path"] == MODERATIONS]
    assert most_in_flight(calls) == 4


def test_the_openai_checker_lets_a_clean_input_through_and_counts_only_its_categories(gateway):
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, categories=["self-harm"], check_output=False)
    client = gateway.client()

    clean = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hello"}])
    other = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello [flag:violence]"}]
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "[flag:self-harm]"}])

    assert clean.choices[0].message.content == "Echo: hello"
    assert other.choices[0].message.content == "Echo: hello [flag:violence]"
    assert gateway.upstream.requests_served(CHAT) == 2


def test_the_openai_checker_flags_a_streamed_reply_which_is_served_whole(gateway):
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, action=ModerationAction.FLAG, check_input=False)
    prompt = "[[reply=one two [flag:hate] three four five six]]"

    events, request_id = sse_stream(
        gateway, {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    )

    assert events[-1] == "[DONE]"
    assert delivered_text(events) == "one two [flag:hate] three four five six"
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.moderation == 'flagged output: hate, policy "policy-gpt-test"'
    (event,) = audit_events(request_id)
    assert event.changes["flagged"][1]["direction"] == "output"


def test_the_openai_checker_cuts_a_streamed_reply(gateway):
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, check_input=False, stream_interval_chars=30)
    # Paced, so that the verdict on the first marks may come while the reply is still streaming (it cuts the
    # stream there); on a fast machine the final check cuts it instead, after the last piece. Either way:
    prompt = "[[tps=400]] [[reply=" + " ".join(["calm"] * 20) + " [flag:violence] " + " ".join(["calm"] * 200) + "]]"

    events, request_id = sse_stream(
        gateway, {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    )

    assert "[DONE]" not in events and events[-1]["error"]["code"] == "content_policy_violation"
    text = delivered_text(events)
    record = wait_for_record(request_id)
    assert record.moderation == 'blocked output: violence, policy "policy-gpt-test"'
    # What was relayed is billed: counted by the provider when its usage came before the cut, else estimated.
    assert record.completion_tokens == (len(split_tokens(text)) if not record.usage_estimated else text_tokens(text))
    assert record.cost > 0
    assert gateway.upstream.requests_served(MODERATIONS) >= 1


def test_a_long_streamed_reply_costs_the_service_in_proportion_to_its_length(gateway):
    """Each question about a streamed reply sent the reply so far (its last 32,000 characters): a reply asked every
    200 characters cost the square of its length (20,000 characters: hundreds of thousands sent). Each question now
    sends what no question has read yet and the 500 characters before it, so the reply is read whole, about
    once, plus 500 characters a question."""
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, check_input=False, stream_interval_chars=200)
    words = [f"{number:039d}" for number in range(500)]  # 20,000 characters with the spaces, no two places alike
    prompt = "[[tps=400]] [[reply=" + " ".join(words) + "]]"

    events, _ = sse_stream(
        gateway, {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    )

    assert events[-1] == "[DONE]"
    reply = delivered_text(events)
    parts = [part for call in moderation_inputs(gateway) for part in call]
    questions = gateway.upstream.requests_served(MODERATIONS)
    assert (
        sum(map(len, parts)) <= len(reply) + 500 * questions <= 3.5 * len(reply) + 500
    )  # a question a mark, and the last
    read = [False] * len(reply)
    for part in parts:
        start = reply.index(part)
        read[start : start + len(part)] = [True] * len(part)
    assert all(read)


def test_a_streamed_reply_is_read_whole_however_slow_the_service(gateway):
    """A question is out while the reply streams on: the next (and the final one) sent the reply's last 32,000
    characters, so a passage flagged further back than that, which streamed while the service was thinking,
    was never read and the stream ended with a clean [DONE]. The next question reads everything since the last
    one's end (and 500 characters before it), however much came meanwhile."""
    policy_on(
        "gpt-test",
        checker=ModerationChecker.OPENAI,
        check_input=False,
        stream_interval_chars=200,
        timeout_seconds=Decimal("30"),
    )
    gateway.upstream.handles[0].set_timing(latency_ms=2_000)  # the chat's call, and each question
    calm = " ".join(["x" * 60] * 100) + " [flag:violence] " + " ".join(["y" * 60] * 700)  # 49,000 characters

    events, request_id = sse_stream(
        gateway,
        {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": f"[[reply={calm}]]"}]},
    )

    assert "[DONE]" not in events and events[-1]["error"]["code"] == "content_policy_violation"
    record = wait_for_record(request_id)
    assert record.moderation == 'blocked output: violence, policy "policy-gpt-test"'


# A FAILING MODERATION SERVICE


def test_a_failing_service_refuses_the_request_when_the_policy_fails_closed(gateway):
    policy_on("gpt-test", checker=ModerationChecker.OPENAI)
    gateway.upstream.set_fault("503", models=[MODERATION_MODEL])

    with pytest.raises(openai.InternalServerError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hello"}])

    assert refused.value.status_code == 503 and refused.value.code == "moderation_unavailable"
    assert gateway.upstream.requests_served(CHAT) == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "moderation_unavailable"
    assert record.moderation == "input unchecked: moderation unavailable"


def test_a_service_too_slow_for_the_policys_timeout_counts_as_failing(gateway):
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, timeout_seconds=Decimal("0.5"))
    gateway.upstream.set_fault("hang", models=[MODERATION_MODEL])

    with pytest.raises(openai.InternalServerError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hello"}])

    assert refused.value.code == "moderation_unavailable"
    assert gateway.upstream.requests_served(CHAT) == 0


def test_a_failing_service_serves_the_request_and_says_so_when_the_policy_fails_open(gateway, caplog):
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, fail_open=True)
    gateway.upstream.set_fault("503", models=[MODERATION_MODEL])

    with caplog.at_level("WARNING", logger="llmhub.moderation"):
        raw = gateway.client().chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}]
        )
        record = wait_for_record(raw.headers["x-request-id"])

    assert raw.parse().choices[0].message.content == "Echo: hello"
    assert record.status == "ok"
    assert (
        record.moderation
        == "input unchecked: moderation unavailable (fail open); output unchecked: moderation unavailable (fail open)"
    )
    assert any("served unchecked" in r.getMessage() for r in caplog.records if r.name == "llmhub.moderation")


@pytest.mark.parametrize("wait", ["0.3", "300ms", "none"], ids=["retry-after", "retry-after-ms", "unsaid"])
def test_a_rate_limited_service_is_asked_again_and_the_request_moderated(gateway, wait):
    """OpenAI's moderation answers 429 at low usage tiers (it is limited by the token; a long input's 4 calls at
    once meet it sooner): the 429 failed the check, and a fail-closed policy refused the request with 503 though the
    service would have answered a moment later. The call is asked again after the wait the service says
    (``retry-after``, ``retry-after-ms``; else a short backoff) within its timeout: the request is moderated, its
    flag recorded, and answered."""
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, action=ModerationAction.FLAG, check_output=False)
    text = f"hello [flag:violence] [[fault=429:{wait}]] [[fault_times=1]]"

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": text}]
    )

    assert raw.parse().choices[0].message.content.startswith("Echo: hello [flag:violence]")
    assert gateway.upstream.requests_served(MODERATIONS) == 2
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.status == "ok" and record.moderation == 'flagged input: violence, policy "policy-gpt-test"'


@pytest.mark.parametrize(("wait", "fail_open"), [("0.8", False), ("30", True)], ids=["fails-closed", "fails-open"])
def test_a_service_rate_limiting_until_the_timeout_gets_the_policys_decision_within_it(gateway, wait, fail_open):
    """A service that answers 429 on and on is asked again only while the wait it says fits in the policy's
    timeout (2 s here: asked at 0, 0.8 and 1.6 s, not at 2.4), never past it, and a wait longer than what is left
    (30 s) is not waited at all: the policy decides (fail closed: 503 ``moderation_unavailable``; fail open: served,
    said so) within the timeout, not after it, nor after the service's wait."""
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, timeout_seconds=Decimal("2"), fail_open=fail_open)
    gateway.upstream.set_fault(f"429:{wait}", models=[MODERATION_MODEL])
    ask = gateway.client().chat.completions.with_raw_response.create
    hello = [{"role": "user", "content": "hello"}]

    if fail_open:
        raw = ask(model="gpt-test", messages=hello)
        assert raw.parse().choices[0].message.content == "Echo: hello"
        request_id = raw.headers["x-request-id"]
    else:
        with pytest.raises(openai.InternalServerError) as refused:
            ask(model="gpt-test", messages=hello)
        assert refused.value.status_code == 503 and refused.value.code == "moderation_unavailable"
        request_id = refused.value.response.headers["x-request-id"]

    asked = [entry["received_at"] for entry in gateway.upstream.requests if entry["path"] == MODERATIONS]
    assert asked[-1] - asked[0] < 2
    record = wait_for_record(request_id)
    if fail_open:
        assert len(asked) == 2  # the input and the reply, each once
        assert record.moderation.startswith("input unchecked: moderation unavailable (fail open)")
    else:
        assert len(asked) == 3 and gateway.upstream.requests_served(CHAT) == 0
        assert record.moderation == "input unchecked: moderation unavailable"


def test_a_moderation_account_out_of_quota_is_not_asked_again(gateway):
    """A 429 that says the account's quota is exhausted (``insufficient_quota``) is no passing limit: no wait helps,
    so the call is not asked again and the policy decides at once, as before."""
    no_quota = ProviderFactory(base_url=gateway.upstream.base_url + "/v1", api_key="sk-moderation-noquota")
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, moderation_provider=no_quota)

    with pytest.raises(openai.InternalServerError) as refused:
        gateway.client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hello"}])

    assert refused.value.code == "moderation_unavailable"
    assert gateway.upstream.requests_served(MODERATIONS) == 1 and gateway.upstream.requests_served(CHAT) == 0


# 1,791,999 characters, no two places alike: 512 inputs, 16 calls of 32, four rounds of 4 calls at once.
FOUR_ROUNDS = " ".join(f"{number:07d}" for number in range(224_000))


def test_a_long_inputs_calls_share_the_checks_one_deadline(gateway):
    """The policy's timeout bounded each call, not the check: a long input's calls go 4 at a time, so a service
    answering each in 1.5 s, within a 2 s timeout, took 4 rounds, 6 s, for an input of 16 calls (at 4,000,000
    characters, 36 calls: 9 rounds, up to 9 times the timeout) before the verdict. The timeout is one deadline
    for the whole check, taken when it starts, each call and each 429 retry within it: past it, the check fails
    (the policy decides) however many calls are left. Measured by the loop's clock, well under the old 3 times
    the timeout (6 s) whatever the machine's load; no call of a third round is asked."""
    policy = policy_on("gpt-test", checker=ModerationChecker.OPENAI, timeout_seconds=Decimal("2"), check_output=False)
    snapshot = policy_snapshot(policy, policy.moderation_provider)
    gateway.upstream.handles[0].set_timing(latency_ms=1_500)

    async def ask() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ModerationServiceError, match="no answer within 2 seconds"):
            await snapshot.ask_service(FOUR_ROUNDS)
        return loop.time() - started

    took = asyncio.run(ask())

    assert took < 2 * snapshot.timeout_seconds
    assert len(moderation_inputs(gateway)) <= 8  # two rounds at most: the third would start past the deadline


def test_a_fail_closed_policy_refuses_a_long_input_within_its_timeout(gateway):
    """The same through the gateway: the input's check fails at its deadline, and the fail-closed policy refuses
    the request with 503 ``moderation_unavailable``, having asked no call of a third round (16 before), and the
    model nothing."""
    policy_on("gpt-test", checker=ModerationChecker.OPENAI, timeout_seconds=Decimal("2"), check_output=False)
    gateway.upstream.handles[0].set_timing(latency_ms=1_500)

    with pytest.raises(openai.InternalServerError) as refused:
        gateway.client(timeout=60).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": FOUR_ROUNDS}]
        )

    assert refused.value.status_code == 503 and refused.value.code == "moderation_unavailable"
    assert len(moderation_inputs(gateway)) <= 8 and gateway.upstream.requests_served(CHAT) == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.moderation == "input unchecked: moderation unavailable"


def test_calls_failing_together_leave_no_exception_unread(gateway, monkeypatch):
    """A long input's calls that failed in the same turn of the loop were read one: the first's failure was raised,
    and each other's exception was left in its task, which asyncio reports as "Task exception was never retrieved"
    when the task is collected (an ERROR line per call). Every finished call is read now. The service's calls
    fail here without a round trip (the fake's answers come at different turns of the loop, so a live service
    cannot make them finish together at will); what is tested is the loop that reads them."""
    policy = policy_on("gpt-test", checker=ModerationChecker.OPENAI, fail_open=True, check_output=False)
    snapshot = policy_snapshot(policy, policy.moderation_provider)
    text = " ".join(f"{number:07d}" for number in range(66_000))  # 5 calls, the first 4 at once
    sent: list[int] = []

    async def failing_call(self, inputs: list[str], deadline: float) -> None:
        sent.append(len(inputs))
        await asyncio.sleep(0)
        raise ModerationServiceError("the moderation service answered 503")

    monkeypatch.setattr(PolicySnapshot, "_ask_call", failing_call)
    reported: list[str] = []

    async def ask() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context["message"]))
        with pytest.raises(ModerationServiceError):
            await snapshot.ask_service(text)
        gc.collect()  # the calls' tasks: a task's __del__ reports an exception nobody read

    asyncio.run(ask())

    assert sent == [32, 32, 32, 32]
    assert not [message for message in reported if "never retrieved" in message]


TOOLS = [
    {
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
    }
]


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_tool_calls_arguments_are_checked_as_output(gateway, stream):
    # The fake upstream calls the first tool with the user's text as its string argument.
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    arguments: list[str] = []

    with pytest.raises(openai.APIError) as stopped:
        reply = gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "forbidden"}], tools=TOOLS, stream=stream
        )
        for chunk in reply if stream else ():
            arguments.extend(call.function.arguments or "" for call in chunk.choices[0].delta.tool_calls or ())

    assert "content policy" in stopped.value.message
    assert "forbidden" not in "".join(arguments)
    (record,) = wait_until(
        lambda: list(UsageRecord.objects.filter(model_name="gpt-test")), "a ledger row", timeout=10, interval=0.05
    )
    assert record.error_type == "content_policy_violation" and record.moderation.startswith("blocked output")


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_tool_uses_input_is_checked_as_output_on_the_messages_api(gateway, stream):
    policy_on("claude-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    tools = [{"name": "search", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    request = {
        "model": "claude-test",
        "max_tokens": 50,
        "tools": tools,
        "messages": [{"role": "user", "content": "forbidden"}],
    }
    partial: list[str] = []

    with pytest.raises(anthropic.APIError) as stopped:
        if stream:
            with anthropic_client(gateway).messages.stream(**request) as events:
                partial.extend(event.partial_json for event in events if event.type == "input_json")
        else:
            anthropic_client(gateway).messages.create(**request)

    assert "content policy" in str(stopped.value)
    assert "forbidden" not in "".join(partial)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("word", ["forbidden", "ｆｏｒｂｉｄｄｅｎ"], ids=["plain", "escaped"])
def test_a_legacy_function_calls_arguments_are_checked_as_output(gateway, stream, word):
    # Given the legacy ``functions``, the fake upstream answers (as OpenAI does) a ``function_call`` with the
    # user's text as its string argument: ``json.dumps`` writes the full-width word as ``\u`` escapes.
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    functions = [TOOLS[0]["function"]]
    arguments: list[str] = []

    with pytest.raises(openai.APIError) as stopped:
        reply = gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": word}], functions=functions, stream=stream
        )
        for chunk in reply if stream else ():
            calls = [choice.delta.function_call for choice in chunk.choices if choice.delta.function_call]
            arguments.extend(call.arguments or "" for call in calls)

    assert "content policy" in stopped.value.message
    whole = json.dumps({"q": word})
    relayed = "".join(arguments)
    assert whole.startswith(relayed) and len(relayed) < len(whole) - len('"}')
    (record,) = wait_until(
        lambda: list(UsageRecord.objects.filter(model_name="gpt-test")), "a ledger row", timeout=10, interval=0.05
    )
    assert record.error_type == "content_policy_violation" and record.moderation.startswith("blocked output")


# What the tool is given, which the fake upstream writes with ``json.dumps`` (non-ASCII characters as ``\u`` escapes,
# beyond the BMP as a surrogate pair, a line break as ``\n``): read as the raw JSON text, each was no word at all.
ESCAPED = {
    "full-width": "ｆｏｒｂｉｄｄｅｎ",  # \uff46\uff4f...: the stream splits inside an escape
    "math-bold": "𝐟𝐨𝐫𝐛𝐢𝐝𝐝𝐞𝐧",  # \ud835\udc1f...: surrogate pairs, split over pieces
    "line-break": "see\nforbidden",  # "see\nforbidden" reads "nforbidden" undecoded
}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("word", ESCAPED.values(), ids=ESCAPED.keys())
def test_a_blocked_word_in_a_tool_calls_arguments_is_read_through_json_escapes(gateway, stream, word):
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    arguments: list[str] = []

    with pytest.raises(openai.APIError) as stopped:
        reply = gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": word}], tools=TOOLS, stream=stream
        )
        for chunk in reply if stream else ():
            arguments.extend(call.function.arguments or "" for call in chunk.choices[0].delta.tool_calls or ())

    assert "content policy" in stopped.value.message
    whole = json.dumps({"q": word})  # the word ends the arguments' one string: its last letter is never relayed
    relayed = "".join(arguments)
    assert whole.startswith(relayed) and len(relayed) < len(whole) - len('"}')
    (record,) = wait_until(
        lambda: list(UsageRecord.objects.filter(model_name="gpt-test")), "a ledger row", timeout=10, interval=0.05
    )
    assert record.error_type == "content_policy_violation" and record.moderation.startswith("blocked output")


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("word", ESCAPED.values(), ids=ESCAPED.keys())
def test_a_blocked_word_in_a_tool_uses_input_is_read_through_json_escapes(gateway, stream, word):
    policy_on("claude-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    tools = [{"name": "search", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    messages = [{"role": "user", "content": word}]
    request = {"model": "claude-test", "max_tokens": 50, "tools": tools, "messages": messages}
    partial: list[str] = []

    with pytest.raises(anthropic.APIError) as stopped:
        if stream:
            with anthropic_client(gateway).messages.stream(**request) as events:
                partial.extend(event.partial_json for event in events if event.type == "input_json")
        else:
            anthropic_client(gateway).messages.create(**request)

    assert "content policy" in str(stopped.value)
    whole = json.dumps({"q": word})
    relayed = "".join(partial)
    assert whole.startswith(relayed) and len(relayed) < len(whole) - len('"}')


# Extended thinking: the fake upstream answers ``[[thinking=TEXT]]`` with a ``thinking`` block (streamed as
# ``thinking_delta`` events) when the request enables thinking. Clients show it to their users.
THINKING = {"type": "enabled", "budget_tokens": 1024}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(
    ("thinking", "word"),
    [("the forbidden word, then more", "forbidden"), ("it ends ｆｏｒｂｉｄｄｅｎ", "ｆｏｒｂｉｄｄｅｎ")],
    ids=["inside", "at-end"],
)
def test_a_blocked_word_in_the_models_thinking_is_checked_as_output(gateway, stream, thinking, word):
    policy_on("claude-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    messages = [{"role": "user", "content": f"[[thinking={thinking}]] hi"}]
    request = {"model": "claude-test", "max_tokens": 2000, "thinking": THINKING, "messages": messages}
    thought: list[str] = []

    with pytest.raises(anthropic.APIError) as stopped:
        if stream:
            with anthropic_client(gateway).messages.stream(**request) as events:
                thought.extend(event.thinking for event in events if event.type == "thinking")
        else:
            anthropic_client(gateway).messages.create(**request)

    assert "content policy" in str(stopped.value)
    assert word not in "".join(thought)
    (record,) = wait_until(
        lambda: list(UsageRecord.objects.filter(model_name="claude-test")), "a ledger row", timeout=10, interval=0.05
    )
    assert record.error_type == "content_policy_violation" and record.moderation.startswith("blocked output")


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_the_models_thinking_and_its_reply_are_read_as_two_texts(gateway, stream):
    # The thinking ends in "forbid", the reply begins with "den": no word of either is the blocked one.
    policy_on("claude-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    messages = [{"role": "user", "content": "[[thinking=must not forbid]] [[reply=den of lions]]"}]
    request = {"model": "claude-test", "max_tokens": 2000, "thinking": THINKING, "messages": messages}

    if stream:
        with anthropic_client(gateway).messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = anthropic_client(gateway).messages.create(**request)

    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "must not forbid" and message.content[1].text == "den of lions"


# Reasoning on chat completions: the fake upstream answers ``[[reasoning=TEXT]]`` with that reasoning before the reply,
# in ``reasoning_content`` (DeepSeek, vLLM) or, with ``[[reasoning_field=reasoning]]``, in ``reasoning`` (OpenRouter,
# Ollama), streamed in the deltas' field of that name. Clients show it to their users.
REASONING_FIELDS = {"reasoning_content": "", "reasoning": " [[reasoning_field=reasoning]]"}


def relayed(events: list[dict | str], field: str, index: int = 0) -> str:
    return "".join(
        (choice.get("delta") or {}).get(field) or ""
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices") or ()
        if choice.get("index") == index
    )


@pytest.mark.parametrize("field", list(REASONING_FIELDS))
@pytest.mark.parametrize(
    ("reasoning", "word"),
    [("the forbidden word, then more", "forbidden"), ("it ends ｆｏｒｂｉｄｄｅｎ", "ｆｏｒｂｉｄｄｅｎ")],
    ids=["inside", "at-end"],
)
def test_a_blocked_word_in_the_models_reasoning_is_checked_as_output_when_streamed(gateway, field, reasoning, word):
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    content = f"[[reasoning={reasoning}]]{REASONING_FIELDS[field]} hi"

    events, request_id = sse_stream(
        gateway, {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": content}]}
    )

    assert "[DONE]" not in events and events[-1]["error"]["code"] == "content_policy_violation"
    assert word not in relayed(events, field)
    assert delivered_text(events) == "", "no reply after the refused reasoning"
    record = wait_for_record(request_id)
    assert record.error_type == "content_policy_violation" and record.moderation.startswith("blocked output")


def test_a_stream_cut_on_its_first_words_is_charged_its_prompt(gateway):
    """The output check withholds the first words (they hold a blocked one) and cuts the stream before anything is
    relayed, so before the usage the upstream sends at the end. The provider processed the prompt and billed it:
    the row is an estimate of it (and of the completion relayed, none), where it was a free request (0 tokens,
    $0) as if the model had written nothing."""
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    body = {
        "model": "gpt-test",
        "stream": True,
        "messages": [{"role": "user", "content": "[[reply=forbidden words first]]"}],
    }

    events, request_id = sse_stream(gateway, body)

    assert events[-1]["error"]["code"] == "content_policy_violation"
    assert delivered_text(events) == ""
    record = wait_for_record(request_id)
    assert record.usage_estimated and record.prompt_tokens > 0
    assert record.completion_tokens == 0 and record.cost > 0


def test_a_stream_cut_while_the_output_check_holds_text_back_is_charged_the_held_text(gateway):
    """The output check holds back the reply's last word, a blocked one, until the next piece shows whether it is a
    whole word, and the upstream's connection is cut then, before its usage chunk. The provider wrote the held
    word, and billed it, but the row's completion counted only the words relayed; it counts every word the
    upstream wrote now, relayed or held, as for a cut stream without a policy."""
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    written = "one two three forbidden"
    body = {
        "model": "gpt-test",
        "stream": True,
        "messages": [{"role": "user", "content": f"[[reply={written} four five]] [[fault=cut-4]]"}],
    }

    events, request_id = sse_stream(gateway, body)

    assert "[DONE]" not in events and isinstance(events[-1], dict) and "error" in events[-1]
    assert delivered_text(events) == "one two three"  # " forbidden" held back when the stream was cut
    record = wait_for_record(request_id)
    assert record.usage_estimated and record.prompt_tokens > 0
    assert record.completion_tokens == text_tokens(written) > text_tokens("one two three")


def test_a_client_that_leaves_while_the_output_check_holds_text_back_ends_the_upstream_call_and_pays_what_it_wrote(
    gateway, caplog
):
    """The output check holds back the reply's last word, a blocked one, until the next piece shows whether it is a
    whole word; the client closes the stream then, having read "one two three". The upstream call is given up (its
    connection closed before the reply's end, the hour it had left not waited for), the row says the client left and
    counts every word the upstream wrote, relayed or held (the provider billed them: ``docs/moderation.md``), and
    nothing is logged as an error. The words come every 2 s: the client leaves 3 s after "three", between the held
    word's arrival and the next one's."""
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    written = "one two three forbidden"
    prompt = f"[[reply={written}{' more' * 1800}]] [[tps=0.5]]"
    read: list[str] = []
    with httpx.stream(
        "POST",
        gateway.url + CHAT,
        json={"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": prompt}]},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=30,
    ) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                read.append(delivered_text([json.loads(line[len("data: ") :])]))
            if "".join(read) == "one two three":
                time.sleep(3)
                break

    record = wait_for_record(request_id)
    assert record.status == "client_disconnected", (record.status, record.error_type, record.moderation)
    assert record.usage_estimated and record.prompt_tokens > 0
    assert record.completion_tokens == text_tokens(written)
    wait_until(
        lambda: [entry for entry in gateway.upstream.requests if entry.get("closed_early")],
        "the upstream's connection closed before its reply's end",
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_a_messages_stream_cut_while_the_output_check_holds_text_back_is_charged_the_held_text(gateway):
    """As on chat completions: the held word was written and billed by the provider, and is counted now."""
    policy_on("claude-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    written = "one two three forbidden"
    messages = [{"role": "user", "content": f"[[reply={written} four five]] [[fault=cut-4]]"}]
    relayed: list[str] = []

    with pytest.raises(anthropic.APIError) as cut:
        with anthropic_client(gateway).messages.stream(model="claude-test", max_tokens=50, messages=messages) as events:
            relayed.extend(event.text for event in events if event.type == "text")

    assert "".join(relayed) == "one two three"
    record = wait_for_record(cut.value.response.headers["x-request-id"])
    assert record.usage_estimated and record.prompt_tokens > 0
    assert record.completion_tokens == text_tokens(written) > text_tokens("one two three")


@pytest.mark.parametrize("field", list(REASONING_FIELDS))
def test_a_blocked_word_in_a_whole_replys_reasoning_is_checked_as_output(gateway, field):
    policy_on("gpt-test", blocklist="forbidden", check_input=False)
    content = f"[[reasoning=the forbidden word]]{REASONING_FIELDS[field]} hi"

    with pytest.raises(openai.BadRequestError) as withheld:
        gateway.client().chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": content}])

    assert withheld.value.code == "content_policy_violation"
    record = wait_for_record(withheld.value.response.headers["x-request-id"])
    assert record.status == "invalid" and record.moderation.startswith("blocked output: blocklist (entry 1 at ")


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_the_models_reasoning_and_its_reply_are_read_as_two_texts(gateway, stream):
    # The reasoning ends in "forbid", the reply begins with "den": no word of either is the blocked one.
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    content = "[[reasoning=must not forbid]] [[reply=den of lions]]"
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": content}], "n": 2}

    if stream:
        events, _ = sse_stream(gateway, {**body, "stream": True})
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            validate_openai_schema(event, "CreateChatCompletionStreamResponse")
        for index in (0, 1):
            assert relayed(events, "reasoning_content", index) == "must not forbid"
            assert relayed(events, "content", index) == "den of lions"
    else:
        response = httpx.post(
            gateway.url + CHAT, json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
        ).json()
        validate_openai_schema(response, "CreateChatCompletionResponse")
        messages = [choice["message"] for choice in response["choices"]]
        assert [(m["reasoning_content"], m["content"]) for m in messages] == [("must not forbid", "den of lions")] * 2


def test_a_clean_tool_call_under_a_policy_relays_the_models_arguments_as_they_came(gateway):
    policy_on("gpt-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    word = "ｆｏｒｂｉｄ 𝐝𝐞𝐧\nok"  # escaped on the wire, and no blocked word once decoded

    arguments = "".join(
        call.function.arguments or ""
        for chunk in gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": word}], tools=TOOLS, stream=True
        )
        for choice in chunk.choices
        for call in choice.delta.tool_calls or ()
    )

    assert arguments == json.dumps({"q": word})


# THE MESSAGES API


def anthropic_client(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)


def test_a_blocked_input_on_the_messages_api_answers_in_anthropics_shape(gateway):
    policy_on("claude-test", blocklist="forbidden")

    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(gateway).messages.create(
            model="claude-test",
            max_tokens=100,
            system="Never say forbidden things.",
            messages=[{"role": "user", "content": "hello"}],
        )

    assert refused.value.status_code == 400
    assert refused.value.body["type"] == "error"
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "content policy" in refused.value.body["error"]["message"]
    assert gateway.upstream.requests_served("/v1/messages") == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "content_policy_violation"


@pytest.mark.parametrize(
    "block",
    [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "the forbidden plan"}},
        {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "forbidden"}]}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}, "title": "Forbidden"},
        {
            "type": "search_result",
            "source": "https://example.com",
            "title": "t",
            "content": [{"type": "text", "text": "a forbidden result"}],
        },
    ],
    ids=["text-document", "content-document", "document-title", "search-result"],
)
def test_text_a_document_or_search_result_block_carries_is_checked_as_input(gateway, block):
    policy_on("claude-test", blocklist="forbidden", check_output=False)

    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(gateway).messages.create(
            model="claude-test",
            max_tokens=100,
            messages=[{"role": "user", "content": [block, {"type": "text", "text": "Summarise it."}]}],
        )

    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert gateway.upstream.requests_served("/v1/messages") == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "content_policy_violation"


def test_a_streamed_message_crossing_the_block_list_ends_with_an_error_event(gateway):
    policy_on("claude-test", blocklist="adipiscing", stream_interval_chars=1)
    text: list[str] = []

    with pytest.raises(anthropic.APIStatusError) as cut:
        with anthropic_client(gateway).messages.stream(
            model="claude-test", max_tokens=200, messages=[{"role": "user", "content": "[[words=30]]"}]
        ) as stream:
            for piece in stream.text_stream:
                text.append(piece)

    assert "content policy" in str(cut.value)
    delivered = "".join(text)
    assert delivered and " ".join(LOREM.split()[:30]).startswith(delivered) and "adipiscing" not in delivered
    record = wait_until(
        lambda: list(UsageRecord.objects.filter(model_name="claude-test")),
        "a ledger row for claude-test",
        timeout=10,
        interval=0.05,
    )
    assert record[0].error_type == "content_policy_violation" and record[0].cost > 0


def test_a_messages_stream_cut_on_its_first_words_is_charged_its_prompt(gateway):
    """As on chat completions: cut before any of its words were relayed, the message is charged the prompt that
    ``message_start`` counted (it was free: 0 tokens, $0)."""
    policy_on("claude-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    messages = [{"role": "user", "content": "[[reply=forbidden words first]]"}]
    request = {"model": "claude-test", "max_tokens": 50, "messages": messages}
    relayed: list[str] = []

    with pytest.raises(anthropic.APIError) as stopped:
        with anthropic_client(gateway).messages.stream(**request) as events:
            relayed.extend(event.text for event in events if event.type == "text")

    assert "content policy" in str(stopped.value) and relayed == []
    record = wait_for_record(stopped.value.response.headers["x-request-id"])
    assert record.usage_estimated and record.prompt_tokens > 0
    assert record.completion_tokens == 0 and record.cost > 0
