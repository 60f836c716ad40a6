"""What is kept of a ``/v1/responses`` request's input (``chat.responses_chain``): the spec's items, which read back
as the same conversation when a later request chains on them, and the client's names of a chained request's fields."""

from __future__ import annotations

import pytest

from chat.responses_chain import chain, input_items
from chat.translate_responses import responses_request_to_chat
from llmhub.testing.openapi import validate_openai_schema

TOOLS = [
    {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
    {"type": "custom", "name": "apply_patch"},
    {"type": "local_shell"},
]
# One item of every kind a request may give, written as loosely as clients write them.
EVERY_KIND = [
    {"role": "developer", "content": "Answer in English."},
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
        ],
    },
    {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "I need the tool"}]},
    {"role": "assistant", "content": "Let me check."},
    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
    {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "*** Begin Patch"},
    {"type": "custom_tool_call_output", "call_id": "c2", "output": "done"},
    {
        "type": "local_shell_call",
        "id": "ls1",
        "call_id": "c3",
        "status": "completed",
        "action": {"type": "exec", "command": ["ls"], "env": {}},
    },
    {"type": "local_shell_call_output", "id": "c3", "output": "a.txt"},
    {"role": "user", "content": "thanks"},
]


def _plain(messages: list[dict]) -> list[dict]:
    def text(content):
        if isinstance(content, list) and all(part["type"] == "text" for part in content):
            return "".join(part["text"] for part in content)
        return content

    return [{**message, "content": text(message.get("content"))} for message in messages]


def test_kept_items_are_the_specs_and_read_back_as_the_same_conversation():
    kept = input_items(EVERY_KIND)
    for item in kept:
        validate_openai_schema(item, "ItemResource")
    assert len({item["id"] for item in kept}) == len(kept)
    given, _ = responses_request_to_chat({"model": "m", "input": EVERY_KIND, "tools": TOOLS})
    read_back, _ = responses_request_to_chat({"model": "m", "input": kept, "tools": TOOLS})
    # A string and a list of text parts are one text to the model (kept items have parts, as the spec writes them).
    assert _plain(read_back["messages"]) == _plain(given["messages"])
    assert input_items(kept) == kept  # kept again (a chain's items), they keep their ids


def test_a_string_input_is_kept_as_one_user_message_and_an_image_without_detail_as_auto():
    [item] = input_items("hello")
    validate_openai_schema(item, "ItemResource")
    assert item["role"] == "user" and item["content"] == [{"type": "input_text", "text": "hello"}]
    [image] = input_items([{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}])
    validate_openai_schema(image, "ItemResource")  # the spec wants a detail: its default, as OpenAI reads none
    assert image["content"][0]["detail"] == "auto"


@pytest.mark.parametrize(
    ("index", "named"), [(0, "previous_response_id"), (1, "previous_response_id"), (2, "input[0].content")]
)
def test_a_chained_requests_fields_are_named_as_the_client_sent_them(index, named):
    stored_input = input_items("first")
    stored_output = [
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "one", "annotations": []}],
        }
    ]
    chained = chain(
        {"model": "m", "input": "second", "previous_response_id": "resp_1"},
        input_items=stored_input,
        output_items=stored_output,
    )
    chat, fields = responses_request_to_chat(chained.body)
    assert [
        message["content"] if isinstance(message["content"], str) else message["content"][0]["text"]
        for message in chat["messages"]
    ] == ["first", "one", "second"]
    assert chained.fields_named(fields)[f"messages[{index}].content"] == named
