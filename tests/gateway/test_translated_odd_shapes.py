"""Odd shapes of an OpenAI-protocol upstream's reply (vLLM's nulls, a legacy ``function_call``, a finish that names
a call beside none, a length cut in a call, usage null or missing, a refusal, ``content_filter``) read through the two
other protocols llmhub speaks to its clients: Anthropic's Messages (``/v1/messages``: every whole reply validated by
the ``anthropic`` SDK's ``Message``, every event by its ``RawMessageStreamEvent``, the stream accumulated by
``client.messages.stream``) and OpenAI's Responses (``/v1/responses``: every ``Response`` and event against OpenAI's
spec, the stream accumulated by ``client.responses.stream``)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from anthropic.types import Message

from llmhub.testing.fake_upstream import raw_directive
from llmhub.testing.openapi import validate_openai_schema
from tests.gateway.test_messages_api import WEATHER, assert_anthropic_sequence, client
from tests.gateway.test_messages_api import raw_events as message_events
from tests.gateway.test_responses_api import WEATHER as RESPONSES_WEATHER
from tests.gateway.test_responses_api import assert_spec_sequence
from tests.gateway.test_responses_api import raw_events as response_events

pytestmark = pytest.mark.django_db(transaction=True)

HEAD = {"id": "chatcmpl-odd", "created": 1, "model": "fake-gpt-4o-mini"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
PARIS = '{"city": "Paris"}'
LEGACY_CALL = {"name": "get_weather", "arguments": PARIS}
OMIT = object()


def whole(message: dict | None, finish=None, usage=USAGE) -> bytes:
    """A whole chat completion of one choice, as an OpenAI-compatible server sends it (``OMIT``: left out)."""
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    body = {**HEAD, "object": "chat.completion", "choices": [choice]}
    if usage is not OMIT:
        body["usage"] = usage
    return json.dumps(body).encode()


def streamed(deltas: list[dict], finish="stop", usage=USAGE) -> bytes:
    """A streamed chat completion: ``deltas``, then the finish and the usage chunk (``OMIT``: left out)."""
    head = {**HEAD, "object": "chat.completion.chunk"}
    chunks = [{**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage is not OMIT:
        chunks.append({**head, "choices": [], "usage": usage})
    return b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def message_request(raw: bytes) -> dict:
    return {
        "model": "gpt-test",
        "max_tokens": 50,
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": "Paris " + raw_directive(raw)}],
    }


def whole_message(gateway, raw: bytes) -> Message:
    """The whole reply as it came over the wire, validated by the SDK's ``Message`` (not constructed)."""
    headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    reply = httpx.post(gateway.url + "/v1/messages", json=message_request(raw), headers=headers, timeout=20)
    assert reply.status_code == 200, reply.text
    return Message.model_validate(reply.json())


def streamed_message(gateway, raw: bytes) -> Message:
    """The stream's events, each one of Anthropic's in Anthropic's order, and the SDK's message gathered of them."""
    reply, events = message_events(gateway, message_request(raw))
    assert reply.status_code == 200
    assert_anthropic_sequence([json.loads(data) for _, data in events])
    with client(gateway).messages.stream(**message_request(raw)) as stream:
        return stream.get_final_message()


def blocks(message: Message) -> list[tuple]:
    return [
        (block.type, block.name, block.input) if block.type == "tool_use" else (block.type, block.text)
        for block in message.content
    ]


LEGACY_STREAM = [
    {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ""}},
    {"function_call": {"arguments": '{"city": '}},
    {"function_call": {"arguments": '"Paris"}'}},
]


@pytest.mark.parametrize("stream", [False, True])
def test_a_legacy_function_call_is_a_tool_use_block_on_messages(gateway, stream):
    """A server that answers with the legacy ``function_call`` (``finish_reason: "function_call"``) had its call
    dropped on /v1/messages: an empty content that ended ``tool_use``, so a client's tool loop found no call to run.
    The call is the reply's tool_use block, whole and streamed."""
    if stream:
        message = streamed_message(gateway, streamed(LEGACY_STREAM, "function_call"))
    else:
        reply = {"role": "assistant", "content": None, "function_call": LEGACY_CALL}
        message = whole_message(gateway, whole(reply, "function_call"))
    assert blocks(message) == [("tool_use", "get_weather", {"city": "Paris"})]
    assert message.content[0].id.startswith("toolu_")
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("stream", [False, True])
def test_a_finish_naming_a_call_beside_none_is_an_end_turn_on_messages(gateway, stream):
    """A server's ``tool_calls`` finish beside text and no call ended ``tool_use`` with no tool_use block (Anthropic
    never does: a client runs the blocks it names). It ends ``end_turn``."""
    if stream:
        message = streamed_message(gateway, streamed([{"role": "assistant", "content": "hi"}], "tool_calls"))
    else:
        message = whole_message(gateway, whole({"role": "assistant", "content": "hi"}, "tool_calls"))
    assert blocks(message) == [("text", "hi")]
    assert message.stop_reason == "end_turn"


def response_request(raw: bytes) -> dict:
    return {"model": "gpt-test", "input": "Paris " + raw_directive(raw), "tools": [RESPONSES_WEATHER]}


@pytest.mark.parametrize("stream", [False, True])
def test_a_legacy_function_call_is_a_function_call_item_on_responses(gateway, stream):
    """The same legacy ``function_call`` on /v1/responses was dropped: a completed response without output, whole
    and streamed. It is the response's ``function_call`` item, every event and the response of OpenAI's spec and the
    SDK's stream helper gathering it."""
    if stream:
        raw = streamed(LEGACY_STREAM, "function_call")
        reply, events = response_events(gateway, response_request(raw))
        assert reply.status_code == 200
        assert_spec_sequence([event for _, event in events])
        sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=20)
        with sdk.responses.stream(**response_request(raw)) as helper:
            response = helper.get_final_response().model_dump(mode="json")
    else:
        raw = whole({"role": "assistant", "content": None, "function_call": LEGACY_CALL}, "function_call")
        headers = {"Authorization": f"Bearer {gateway.key}"}
        reply = httpx.post(gateway.url + "/v1/responses", json=response_request(raw), headers=headers, timeout=20)
        assert reply.status_code == 200, reply.text
        response = reply.json()
        validate_openai_schema(response, "Response")
    [item] = response["output"]
    assert (item["type"], item["name"], json.loads(item["arguments"])) == (
        "function_call",
        "get_weather",
        {"city": "Paris"},
    )
    assert item["call_id"] and item["status"] == "completed" and response["status"] == "completed"


def test_the_unnumbered_calls_of_a_stream_keep_their_own_arguments_on_chat_completions(gateway):
    """A server that numbers no call piece (no ``index``; each call's first piece with its ``id``) has each piece
    numbered by llmhub. The first argument piece so filled was learned as the template the pieces like it were relayed
    as, its filled-in index with it (8311dbe), so every later call's arguments went to the second call: a chat client
    joined them into one call's JSON, and a Messages client (test_several_streamed_tool_calls_of_a_translated_model_
    stay_apart) got the third call without input. Each call keeps its own."""
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=20)
    arguments: dict[int, str] = {}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}
    for chunk in sdk.chat.completions.create(
        model="gpt-test",
        stream=True,
        tools=[tool],
        messages=[{"role": "user", "content": "Paris [[tool_calls=3]] [[omit=tool_calls.index]]"}],
    ):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
    assert {index: json.loads(text) for index, text in arguments.items()} == {i: {"city": "Paris"} for i in range(3)}


# Odd shapes read right before these fixes (kept as guards): what the upstream sent, whole and streamed; the Messages
# reply's blocks and stop_reason; the Response's status.
NULL_CALL = {"id": None, "type": None, "function": {"name": "get_weather", "arguments": PARIS}}
GUARDS = {
    "refusal": (
        {"role": "assistant", "content": None, "refusal": "no"},
        [{"role": "assistant", "content": None, "refusal": ""}, {"refusal": "no"}],
        "stop",
        [("text", "no")],
        "refusal",
        "completed",
    ),
    "content_filter": (
        {"role": "assistant", "content": "par"},
        [{"role": "assistant", "content": "par"}],
        "content_filter",
        [("text", "par")],
        "refusal",
        "incomplete",
    ),
    "length_in_a_call": (
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    **NULL_CALL,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Pa'},
                }
            ],
        },
        [
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            },
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]},
        ],
        "length",
        [("tool_use", "get_weather", {})],
        "max_tokens",
        "incomplete",
    ),
    "vllm_nulls": (
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [NULL_CALL],
            "function_call": None,
            "refusal": None,
            "annotations": None,
            "reasoning_content": None,
        },
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": None}}
                ],
                "function_call": None,
            },
            {
                "role": None,
                "content": None,
                "tool_calls": [{"index": 0, "id": None, "type": None, "function": {"name": None, "arguments": PARIS}}],
                "function_call": None,
            },
        ],
        "tool_calls",
        [("tool_use", "get_weather", {"city": "Paris"})],
        "tool_use",
        "completed",
    ),
    "empty": (
        {"role": "assistant", "content": ""},
        [{"role": "assistant", "content": ""}],
        "stop",
        [],
        "end_turn",
        "completed",
    ),
}
USAGES = {"usage_given": USAGE, "usage_null": None, "usage_missing": OMIT}


@pytest.mark.parametrize("usage", list(USAGES))
@pytest.mark.parametrize("case", list(GUARDS))
@pytest.mark.parametrize("stream", [False, True])
def test_odd_shapes_are_anthropics_message_and_events(gateway, case, usage, stream):
    """Each is a ``Message`` the SDK validates (every event one of its own, in order, gathered by its stream helper)
    with the reply's blocks and stop_reason, whatever usage the upstream said."""
    message, deltas, finish, expected, stop, _ = GUARDS[case]
    if stream:
        got = streamed_message(gateway, streamed(deltas, finish, USAGES[usage]))
    else:
        got = whole_message(gateway, whole(message, finish, USAGES[usage]))
    assert blocks(got) == expected and got.stop_reason == stop


@pytest.mark.parametrize("case", list(GUARDS))
@pytest.mark.parametrize("stream", [False, True])
def test_odd_shapes_are_openais_response_and_events(gateway, case, stream):
    """Each is a ``Response`` of OpenAI's spec (every event one of the spec's, in order), of the status its finish
    says; one that completed is gathered by the SDK's stream helper (which gathers nothing but a completed one)."""
    message, deltas, finish, _, _, status = GUARDS[case]
    if stream:
        raw = streamed(deltas, finish, None)
        reply, events = response_events(gateway, response_request(raw))
        assert reply.status_code == 200
        assert_spec_sequence([event for _, event in events])
        response = events[-1][1]["response"]
        if status == "completed":
            sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=20)
            with sdk.responses.stream(**response_request(raw)) as helper:
                assert helper.get_final_response().status == "completed"
    else:
        headers = {"Authorization": f"Bearer {gateway.key}"}
        raw = whole(message, finish, None)
        reply = httpx.post(gateway.url + "/v1/responses", json=response_request(raw), headers=headers, timeout=20)
        assert reply.status_code == 200, reply.text
        response = reply.json()
        validate_openai_schema(response, "Response")
    assert response["status"] == status
