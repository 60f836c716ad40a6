"""OpenAI's Responses API inbound (``/v1/responses``; its stored responses in ``test_responses_stored.py``): the
official ``openai`` SDK against a live llmhub, with the fake upstream behind an OpenAI-protocol model (``gpt-test``)
and an Anthropic-protocol one (``claude-test``), both reached through the chat-completions translation. Objects and
events are checked against OpenAI's published spec."""

from __future__ import annotations

import json
import signal
import threading
from decimal import Decimal

import httpx
import openai
import pytest
from django.test import override_settings

from billing.models import UsageRecord
from billing.services.budgets import api_key_limits_set
from chat.translate_responses import thinking_content
from llmhub.testing.fake_upstream import THINKING_SIGNATURE
from llmhub.testing.openapi import validate_openai_schema
from providers.models import CatalogModel, ProviderKind
from providers.moderation import policy_cache
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_ledger import settle_quietly
from tests.gateway.test_moderation import policy_on
from tests.test_metrics import TOKEN, scrape, scrape_until, value
from tests.waiting import wait_for_record, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MILLION = Decimal(1_000_000)
PRICES = {"gpt-test": (Decimal("0.15"), Decimal("0.60")), "claude-test": (Decimal("0.80"), Decimal("4.00"))}
MODELS = ["gpt-test", "claude-test"]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}


def expected_cost(model: str, record: UsageRecord) -> Decimal:
    input_price, output_price = PRICES[model]
    cost = (Decimal(record.prompt_tokens) * input_price + Decimal(record.completion_tokens) * output_price) / MILLION
    return cost.quantize(Decimal("0.0000000001"))


def raw_events(gateway, body: dict) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    """The SSE events as they came over the wire: (event name, decoded data)."""
    events: list[tuple[str, dict]] = []
    headers = {"Authorization": f"Bearer {gateway.key}"}
    with httpx.stream(
        "POST", gateway.url + "/v1/responses", json={**body, "stream": True}, headers=headers, timeout=20
    ) as reply:
        name = None
        for line in reply.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return reply, events


# The spec's schema of each event llmhub sends (checked first: a failure of the union says little).
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.refusal.delta": "ResponseRefusalDeltaEvent",
    "response.refusal.done": "ResponseRefusalDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.custom_tool_call_input.delta": "ResponseCustomToolCallInputDeltaEvent",
    "response.custom_tool_call_input.done": "ResponseCustomToolCallInputDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
}


def validate_event(event: dict) -> None:
    validate_openai_schema(event, EVENT_SCHEMAS[event["type"]])
    validate_openai_schema(event, "ResponseStreamEvent")


def assert_spec_sequence(events: list[dict]) -> None:
    """Every event is one of the spec's, numbered 0, 1, 2, … in order; an item is added empty, at the next
    output_index, and written to only between its added and done events; the final response holds every item as
    its done event showed it."""
    for event in events:
        validate_event(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert [event["type"] for event in events[:2]] == ["response.created", "response.in_progress"]
    open_items: dict[str, int] = {}
    done: dict[int, dict] = {}
    for event in events:
        if event["type"] == "response.output_item.added":
            item = event["item"]
            assert event["output_index"] == len(done) + len(open_items)
            assert item.get("content", []) == [] and item.get("arguments", "") == "", item
            open_items[item["id"]] = event["output_index"]
        elif "item_id" in event:
            assert open_items[event["item_id"]] == event["output_index"]
        elif event["type"] == "response.output_item.done":
            assert open_items.pop(event["item"]["id"]) == event["output_index"]
            done[event["output_index"]] = event["item"]
    if events[-1]["type"] != "response.failed":  # a failed one may stop with an item open
        assert not open_items
        assert events[-1]["response"]["output"] == [done[index] for index in range(len(done))]


@pytest.mark.parametrize("model", MODELS)
def test_non_streamed_text_response_and_its_ledger_row(gateway, model):
    raw = gateway.client().responses.with_raw_response.create(
        model=model,
        instructions="Be brief.",
        input="one two three [[reply=hello there]]",
        max_output_tokens=100,
        metadata={"ticket": "42"},
    )
    response = raw.parse()
    validate_openai_schema(raw.http_response.json(), "Response")
    assert response.id == "resp_" + raw.headers["x-request-id"].removeprefix("req_")
    assert response.object == "response" and response.status == "completed" and response.model == model
    assert response.output_text == "hello there"
    assert [item.type for item in response.output] == ["message"]
    assert response.instructions == "Be brief." and response.metadata == {"ticket": "42"}
    assert response.usage.output_tokens == 2 and response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 2
    record = wait_for_record(raw.headers["x-request-id"])
    settle_quietly()
    assert UsageRecord.objects.count() == 1
    assert record.operation == "responses" and record.status == "ok" and record.stream is False
    assert (record.model_name, record.prompt_tokens, record.completion_tokens) == (
        model,
        response.usage.input_tokens,
        2,
    )
    assert record.cost == expected_cost(model, record) and record.cost > 0


def test_instructions_and_input_items_reach_the_model_as_a_conversation(gateway):
    gateway.client().responses.create(
        model="gpt-test",
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "ok", "annotations": []}],
            },
            {"role": "user", "content": "second [[reply=done]]"},
        ],
        temperature=0.5,
        top_p=0.9,
        user="end-user-7",
    )
    sent = gateway.upstream.requests[-1]["body"]
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "text", "text": "first"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second [[reply=done]]"},
    ]
    assert (sent["temperature"], sent["top_p"], sent["user"]) == (0.5, 0.9, "end-user-7")


@pytest.mark.parametrize("model", MODELS)
def test_streamed_text_through_the_sdk(gateway, model):
    with gateway.client().responses.create(model=model, input="[[words=7]]", stream=True) as stream:
        events = list(stream)
    dumped = [event.model_dump(mode="json", exclude_unset=True) for event in events]
    assert_spec_sequence(dumped)
    kinds = [event.type for event in events]
    assert kinds[-1] == "response.completed"
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert len(deltas.split()) == 7
    done = events[-1].response
    assert done.status == "completed" and done.output_text == deltas and done.model == model
    assert done.usage.output_tokens == 7
    record = wait_for_record(done.id.replace("resp_", "req_", 1))
    settle_quietly()
    assert UsageRecord.objects.count() == 1
    assert record.operation == "responses" and record.stream is True and record.status == "ok"
    assert (record.prompt_tokens, record.completion_tokens) == (done.usage.input_tokens, 7)
    assert record.cost == expected_cost(model, record)


@pytest.mark.parametrize("model", MODELS)
def test_function_call_round_trip(gateway, model):
    client = gateway.client()
    # As most clients write it: no `strict`, which the Response lists all the same (null), as the spec has it.
    loose = {key: value for key, value in WEATHER.items() if key != "strict"}
    raw = client.responses.with_raw_response.create(model=model, input="Weather in Paris?", tools=[loose])
    validate_openai_schema(raw.http_response.json(), "Response")
    first = raw.parse()
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Weather in Paris?"}
    second = client.responses.create(
        model=model,
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
        ],
    )
    assert second.output_text == "Tool result: sunny, 21 C"
    assert second.status == "completed"


@pytest.mark.parametrize("model", MODELS)
def test_streamed_function_call(gateway, model):
    with gateway.client().responses.create(
        model=model, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required", stream=True
    ) as stream:
        events = list(stream)
    dumped = [event.model_dump(mode="json", exclude_unset=True) for event in events]
    assert_spec_sequence(dumped)
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(event for event in events if event.type == "response.function_call_arguments.done")
    assert done.name == "get_weather" and json.loads(done.arguments) == {"city": "Weather in Oslo?"}
    final = events[-1]
    assert final.type == "response.completed"
    [call] = [item for item in final.response.output if item.type == "function_call"]
    assert call.arguments == done.arguments and call.call_id


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"conversation": "conv_123"}, "conversation"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
        ({"tools": [WEATHER, {"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[1].type"),
        ({"tools": [{"type": "image_generation"}]}, "tools[0].type"),
        ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://example.com"}]}, "tools[0].type"),
        (
            {
                "tools": [
                    {"type": "computer_use_preview", "display_width": 8, "display_height": 8, "environment": "linux"}
                ]
            },
            "tools[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"truncation": "auto"}, "truncation"),
    ],
)
def test_what_is_not_supported_is_a_400_naming_the_parameter(gateway, extra, param):
    body = {"model": "gpt-test", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(**body)
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param
    assert refused.value.body["type"] == "invalid_request_error"
    assert gateway.upstream.requests_served() == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses" and record.cost == 0


@pytest.mark.parametrize(
    ("extra", "param", "code", "said"),
    [
        # A chat completion's parameters brought along: the Responses API has them under another name.
        ({"max_tokens": 50}, "max_tokens", "unsupported_parameter", "moved to 'max_output_tokens'"),
        ({"max_completion_tokens": 50}, "max_completion_tokens", "unsupported_parameter", "'max_output_tokens'"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter", "'text.format'"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter", "'reasoning.effort'"),
        ({"verbosity": "low"}, "verbosity", "unsupported_parameter", "'text.verbosity'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "unsupported_parameter", "'input'"),
        # A misspelt name, and one no version of the API has.
        ({"max_output_token": 5}, "max_output_token", "unknown_parameter", "Unknown parameter: 'max_output_token'"),
        ({"frobnicate": True}, "frobnicate", "unknown_parameter", "Unknown parameter: 'frobnicate'"),
        # The spec's, asking for something llmhub does not do by request (its moderation is an admin's policy).
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation", "unsupported_parameter", "policies"),
    ],
)
def test_a_parameter_the_responses_api_does_not_take_is_a_400_naming_it_not_dropped(gateway, extra, param, code, said):
    """Nothing but the Responses API's own parameters reaches the model: one it does not have (a chat completion's
    ``max_tokens``, a misspelt name) was dropped, so the limit or the format the client asked for did not apply."""
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(model="gpt-test", input="hi", extra_body=extra)
    assert (refused.value.body["param"], refused.value.body["code"]) == (param, code)
    assert said in refused.value.body["message"]
    assert gateway.upstream.requests_served() == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses"


def test_the_specs_parameters_that_change_nothing_here_are_accepted(gateway):
    """``stream_options`` (llmhub's events have no obfuscation to turn off), ``max_tool_calls`` (it counts built-in
    tools' calls: llmhub has none) and the prompt cache's retention (sent on) are the spec's: taken, not refused."""
    response = gateway.client().responses.create(
        model="gpt-test",
        input="hi [[reply=ok]]",
        extra_body={"max_tool_calls": 3, "prompt_cache_retention": "24h", "moderation": None},
    )
    assert response.output_text == "ok"
    with gateway.client().responses.create(
        model="gpt-test", input="hi [[reply=ok]]", stream=True, stream_options={"include_obfuscation": False}
    ) as stream:
        assert [event.type for event in stream][-1] == "response.completed"


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"stream_options": "include_obfuscation"}, "stream_options", "invalid_type"),
        ({"stream_options": ["include_obfuscation"]}, "stream_options", "invalid_type"),
        ({"stream_options": {"include_obfuscation": "false"}}, "stream_options.include_obfuscation", "invalid_type"),
        # Chat completions' option, which the Responses API's stream does not have (its usage is in the last event).
        ({"stream_options": {"include_usage": True}}, "stream_options.include_usage", "unknown_parameter"),
        ({"max_tool_calls": "3"}, "max_tool_calls", "invalid_type"),
        ({"max_tool_calls": 2.5}, "max_tool_calls", "invalid_type"),
        ({"max_tool_calls": True}, "max_tool_calls", "invalid_type"),
        ({"max_tool_calls": {"total": 3}}, "max_tool_calls", "invalid_type"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_stream_options_or_max_tool_calls_of_the_wrong_type_is_a_400_naming_it(gateway, extra, param, code, stream):
    """``stream_options`` (an object with a boolean ``include_obfuscation``) and ``max_tool_calls`` (an integer) as
    the spec types them: until 7 December either was taken whatever it was, unchecked."""
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(model="gpt-test", input="hi", stream=stream, extra_body=extra)
    assert (refused.value.body["param"], refused.value.body["code"]) == (param, code)
    assert refused.value.body["type"] == "invalid_request_error"
    assert gateway.upstream.requests_served() == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses" and record.cost == 0


@pytest.mark.parametrize("retention", ["in_memory", "24h"])
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_cache_retention_reaches_an_openai_model_and_no_other(gateway, retention, stream):
    """OpenAI's chat completions take ``prompt_cache_retention`` as the Responses API does: it is sent on (until 7
    December it was dropped, and the 24 hours asked for were the provider's default), beside ``prompt_cache_key``; a
    Claude model, whose prompt cache is asked for otherwise, is sent neither, as before."""
    client = gateway.client()
    for model in MODELS:
        fields = {"prompt_cache_key": "tenant-7", "prompt_cache_retention": retention}
        if stream:
            with client.responses.create(model=model, input="hi [[reply=ok]]", stream=True, extra_body=fields) as got:
                assert [event.type for event in got][-1] == "response.completed"
        else:
            assert client.responses.create(model=model, input="hi [[reply=ok]]", extra_body=fields).output_text == "ok"
        sent = gateway.upstream.requests[-1]["body"]
        if model == "gpt-test":
            assert (sent["prompt_cache_key"], sent["prompt_cache_retention"]) == ("tenant-7", retention)
        else:
            assert not {"prompt_cache_key", "prompt_cache_retention"} & set(sent)


LOGPROBS = "message.output_text.logprobs"


@pytest.mark.parametrize("model", ["gpt-test", "gemini-test"])
@pytest.mark.parametrize("top", [None, 0, 3])
def test_logprobs_asked_for_are_on_the_output_text(gateway, model, top):
    """``include`` with ``message.output_text.logprobs`` (and ``top_logprobs``, 0 to 20, the alternatives a token) is
    chat completions' ``logprobs`` (and ``top_logprobs``), given back on the ``output_text`` part in the spec's shape,
    whole and streamed (each ``response.output_text.delta`` with its tokens'); until 7 December ``top_logprobs`` was
    refused and ``include`` could not ask for them."""
    if model == "gemini-test":
        provider = ProviderFactory(name="fake-gemini", kind=ProviderKind.GEMINI, base_url=gateway.upstream.base_url)
        ModelFactory(name="gemini-test", provider=provider, upstream_id="gemini-2.5-flash")
    fields = {"include": [LOGPROBS]} if top is None else {"include": [LOGPROBS], "top_logprobs": top}
    raw = gateway.client().responses.with_raw_response.create(model=model, input="[[reply=red green blue]]", **fields)
    validate_openai_schema(raw.http_response.json(), "Response")
    response = raw.parse()
    assert response.top_logprobs == top
    part = response.output[0].content[0]
    assert "".join(logprob.token for logprob in part.logprobs) == part.text == "red green blue"
    for logprob in part.logprobs:
        assert logprob.logprob <= 0 and bytes(logprob.bytes) == logprob.token.encode()
        assert len(logprob.top_logprobs) == (top or 0)
        assert [each.token for each in logprob.top_logprobs][:1] == [logprob.token][: top or 0]
    if model == "gpt-test":
        sent = gateway.upstream.requests[-1]["body"]
        assert sent["logprobs"] is True and sent.get("top_logprobs") == top
    # Kept with the stored response, and read back, as OpenAI's, only when asked for again.
    assert gateway.client().responses.retrieve(response.id).output[0].content[0].logprobs == []
    again = gateway.client().responses.retrieve(response.id, include=[LOGPROBS]).output[0].content[0]
    assert again.logprobs == part.logprobs
    _, events = raw_events(gateway, {"model": model, "input": "[[reply=red green blue]]", **fields})
    events = [event for _, event in events]
    assert_spec_sequence(events)
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert all(delta["delta"] == "".join(each["token"] for each in delta["logprobs"]) for delta in deltas)
    streamed = [each for delta in deltas for each in delta["logprobs"]]
    assert [each["token"] for each in streamed] == [logprob.token for logprob in part.logprobs]
    assert all(len(each["top_logprobs"]) == (top or 0) for each in streamed)
    (done,) = [event for event in events if event["type"] == "response.output_text.done"]
    assert done["logprobs"] == streamed
    final = events[-1]["response"]["output"][0]["content"][0]
    assert [each["token"] for each in final["logprobs"]] == [each["token"] for each in streamed]
    assert [each["logprob"] for each in final["logprobs"]] == [each["logprob"] for each in streamed]


@pytest.mark.parametrize("stream", [False, True])
def test_top_logprobs_without_include_is_taken_and_answers_none(gateway, stream):
    """As OpenAI answers it: ``top_logprobs`` alone asks for no log probabilities (``include`` does), so none are
    asked of the provider, and the ``output_text`` has none; a Claude model, which has none, is not refused."""
    for model in MODELS:
        if stream:
            _, events = raw_events(gateway, {"model": model, "input": "[[reply=ok]]", "top_logprobs": 5})
            part = events[-1][1]["response"]["output"][0]["content"][0]
            assert all(event.get("logprobs", []) == [] for _, event in events)
        else:
            response = gateway.client().responses.create(model=model, input="[[reply=ok]]", top_logprobs=5)
            part = response.output[0].content[0].model_dump()
        assert part["text"] == "ok" and part["logprobs"] == []
        assert not {"logprobs", "top_logprobs"} & set(gateway.upstream.requests[-1]["body"])


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_asked_of_a_model_that_has_none_are_a_400_naming_include(gateway, stream):
    """A Claude model returns no log probabilities: asked for them, it is refused before any upstream call, as chat
    completions' ``logprobs: true`` is, naming what the client wrote (``include``)."""
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(
            model="claude-test", input="hi", include=[LOGPROBS], top_logprobs=2, stream=stream
        )
    assert (refused.value.body["param"], refused.value.body["code"]) == ("include", "unsupported_parameter")
    # What the client sent, not chat completions' ``logprobs`` it never wrote (before: "`logprobs` is not supported").
    assert refused.value.body["message"] == (
        "This model does not return log probabilities: `include` cannot ask for `message.output_text.logprobs` with it."
    )
    assert gateway.upstream.requests_served() == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert (record.status, record.operation, record.cost) == ("invalid", "responses", 0)  # refused by its adapter


@pytest.mark.parametrize("top", [-1, 21, 2.5, "3", True])
def test_a_top_logprobs_out_of_range_is_a_400_naming_it(gateway, top):
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(
            model="gpt-test", input="hi", include=[LOGPROBS], extra_body={"top_logprobs": top}
        )
    assert refused.value.body["param"] == "top_logprobs"
    assert gateway.upstream.requests_served() == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses"


def test_a_stream_cut_after_it_began_ends_with_response_failed(gateway):
    reply, events = raw_events(gateway, {"model": "gpt-test", "input": "[[words=9]] [[fault=cut-3]]"})
    assert reply.status_code == 200
    for name, event in events:
        assert name == event["type"]
        validate_event(event)
    assert_spec_sequence([event for _, event in events])
    kinds = [event["type"] for _, event in events]
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    record = wait_for_record(reply.headers["x-request-id"])
    assert record.status == "upstream_error" and record.operation == "responses"


def test_a_key_not_allowed_the_model_is_refused_as_on_chat_completions(gateway):
    from billing.services.keys import api_key_create
    from providers.models import CatalogModel

    created = api_key_create(
        user=gateway.user, name="narrow", allowed_models=[CatalogModel.objects.get(name="claude-test")]
    )
    with pytest.raises(openai.NotFoundError):
        gateway.client(api_key=created.secret).responses.create(model="gpt-test", input="hi")
    assert gateway.upstream.requests_served() == 0


def test_moderation_refuses_a_blocked_input_and_cuts_a_blocked_stream(gateway):
    policy_cache.invalidate()
    policy_on("gpt-test", blocklist="adipiscing", stream_interval_chars=1)
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            gateway.client().responses.create(model="gpt-test", input="say adipiscing")
        assert refused.value.code == "content_policy_violation"
        assert gateway.upstream.requests_served() == 0

        reply, events = raw_events(gateway, {"model": "gpt-test", "input": "[[words=30]]"})
    finally:
        policy_cache.invalidate()
    kinds = [event["type"] for _, event in events]
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds
    validate_event(events[-1][1])
    delivered = "".join(event["delta"] for _, event in events if event["type"] == "response.output_text.delta")
    assert delivered and "adipiscing" not in delivered
    assert "content policy" in events[-1][1]["response"]["error"]["message"]
    record = wait_for_record(reply.headers["x-request-id"])
    assert record.operation == "responses" and record.error_type == "content_policy_violation"


def test_an_exhausted_budget_is_a_429_before_any_upstream_call(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.0001"))
    with pytest.raises(openai.RateLimitError):
        gateway.client().responses.create(model="claude-test", input="hi", max_output_tokens=4000)
    assert gateway.upstream.requests_served() == 0


def test_metrics_count_responses_under_their_own_operation(gateway):
    labels = {"model": "gpt-test", "operation": "responses", "status": "ok"}
    with override_settings(LLMHUB_METRICS_TOKEN=TOKEN, LLMHUB_METRICS_ALLOWED_IPS=[]):
        before = value(scrape(gateway.url), "llmhub_requests_total", **labels)
        gateway.client().responses.create(model="gpt-test", input="hi [[reply=ok]]")
        scrape_until(gateway.url, "llmhub_requests_total", before + 1, **labels)


def test_the_sdks_stream_helper_accumulates_the_final_response(gateway):
    with gateway.client().responses.stream(model="claude-test", input="[[reply=one two three]]") as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == "one two three" == final.output_text
    assert final.status == "completed" and final.usage.output_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_cut_by_max_output_tokens_is_incomplete(gateway, stream):
    body = {"model": "gpt-test", "input": "[[words=20]]", "max_output_tokens": 5}
    if stream:
        reply, events = raw_events(gateway, body)
        assert_spec_sequence([event for _, event in events])
        assert events[-1][0] == "response.incomplete"
        response = events[-1][1]["response"]
    else:
        reply = httpx.post(
            gateway.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
        )
        response = reply.json()
        validate_openai_schema(response, "Response")
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["usage"]["output_tokens"] == 5
    assert [item["status"] for item in response["output"]] == ["incomplete"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_before_any_output_is_an_http_error(gateway, stream):
    with pytest.raises(openai.InternalServerError) as failed:
        response = gateway.client().responses.create(model="broken", input="hi", stream=stream)
        list(response) if stream else None
    assert set(failed.value.body) >= {"message", "type", "param", "code"}  # OpenAI's error shape
    assert failed.value.body["message"], failed.value.body
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert record.status == "upstream_error" and record.operation == "responses"


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_that_reports_no_usage_is_charged_and_answered_an_estimate(gateway, stream):
    body = {"model": "gpt-test", "input": "one two three [[reply=four five]] [[usage=none]]"}
    if stream:
        reply, events = raw_events(gateway, body)
        response = events[-1][1]["response"]
    else:
        reply = httpx.post(
            gateway.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
        )
        response = reply.json()
    record = wait_for_record(reply.headers["x-request-id"])
    assert record.usage_estimated and record.completion_tokens > 0
    assert (response["usage"]["input_tokens"], response["usage"]["output_tokens"]) == (
        record.prompt_tokens,
        record.completion_tokens,
    )
    assert record.cost == expected_cost("gpt-test", record)


def test_no_key_is_a_401_and_a_get_a_405(gateway):
    with pytest.raises(openai.AuthenticationError):
        gateway.client(api_key="sk-wrong").responses.create(model="gpt-test", input="hi")
    reply = httpx.get(gateway.url + "/v1/responses", headers={"Authorization": f"Bearer {gateway.key}"})
    assert reply.status_code == 405 and reply.json()["error"]["code"] == "method_not_allowed"
    record = wait_for_record(reply.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses"


@pytest.mark.parametrize("model", MODELS)
def test_parallel_function_calls_each_get_their_item(gateway, model):
    _, events = raw_events(
        gateway, {"model": model, "input": "Weather? [[tool_calls=2]]", "tools": [WEATHER], "tool_choice": "required"}
    )
    assert_spec_sequence([event for _, event in events])
    final = events[-1][1]["response"]
    calls = [item for item in final["output"] if item["type"] == "function_call"]
    assert calls and all(json.loads(call["arguments"]) == {"city": "Weather?"} for call in calls)
    assert len({call["call_id"] for call in calls}) == len(calls)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-test"}, "input"),
        ({"model": "gpt-test", "input": 7}, "input"),
        ({"model": "gpt-test", "input": []}, "input"),
        ({"model": "gpt-test", "input": ["hi"]}, "input[0]"),
        ({"model": "gpt-test", "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"model": "gpt-test", "input": [{"role": "user", "content": None}]}, "input[0].content"),
        ({"model": "gpt-test", "input": [{"role": "user", "content": []}]}, "input[0].content"),
        ({"model": "gpt-test", "input": [{"role": "user", "content": ["x"]}]}, "input[0].content[0].type"),
        ({"model": "gpt-test", "input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
        (
            {"model": "gpt-test", "input": [{"type": "function_call_output", "call_id": "c", "output": 3}]},
            "input[0].output",
        ),
        ({"model": "gpt-test", "input": "hi", "instructions": ["x"]}, "instructions"),
        ({"model": "gpt-test", "input": "hi", "tools": {"type": "function"}}, "tools"),
        ({"model": "gpt-test", "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"model": "gpt-test", "input": "hi", "tools": [{**WEATHER, "parameters": "city"}]}, "tools[0].parameters"),
        ({"model": "gpt-test", "input": "hi", "tool_choice": "required"}, "tool_choice"),
        (
            {"model": "gpt-test", "input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "f"}},
            "tool_choice",
        ),
        (
            {"model": "gpt-test", "input": "hi", "tools": [WEATHER], "tool_choice": {"type": "web_search"}},
            "tool_choice",
        ),
        ({"model": "gpt-test", "input": "hi", "metadata": {"a": 1}}, "metadata"),
        # OpenAI's bounds: 16 pairs, keys of 64 characters at most, values of 512 (llmhub keeps them with the response).
        ({"model": "gpt-test", "input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"model": "gpt-test", "input": "hi", "metadata": {"k" * 65: "v"}}, "metadata"),
        ({"model": "gpt-test", "input": "hi", "metadata": {"k": "v" * 513}}, "metadata"),
        ({"model": "gpt-test", "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
        # A field `text` does not have (a misspelt format, chat's name for it): until 6 December dropped, the format
        # asked for not applied.
        ({"model": "gpt-test", "input": "hi", "text": {"formt": {"type": "json_object"}}}, "text.formt"),
        (
            {"model": "gpt-test", "input": "hi", "text": {"response_format": {"type": "json_object"}}},
            "text.response_format",
        ),
        ({"model": "gpt-test", "input": "hi", "reasoning": "high"}, "reasoning"),
        ({"model": "gpt-test", "input": "hi", "include": ["message.input_image.image_url"]}, "include"),
        ({"model": "gpt-test", "input": "hi", "temperature": 3}, "temperature"),
        ({"model": "gpt-test", "input": "hi", "stream": "yes"}, "stream"),
        ({"input": "hi"}, "model"),
        # Values that cannot be looked up in a set (a list, an object) where a name is expected.
        ({"model": "gpt-test", "input": "hi", "include": [{}]}, "include"),
        ({"model": "gpt-test", "input": [{"role": ["user"], "content": "x"}]}, "input[0].role"),
        (
            {"model": "gpt-test", "input": [{"role": "user", "content": [{"type": ["input_text"]}]}]},
            "input[0].content[0].type",
        ),
        ({"model": "gpt-test", "input": [{"type": {"a": 1}}]}, "input[0].type"),
        ({"model": "gpt-test", "input": "hi", "tools": [{"type": ["function"]}]}, "tools[0].type"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(gateway, body, param):
    reply = httpx.post(
        gateway.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert gateway.upstream.requests_served() == 0


def test_a_gemini_model_with_cached_tokens_behind_it(gateway):
    provider = ProviderFactory(name="fake-gemini", kind=ProviderKind.GEMINI, base_url=gateway.upstream.base_url)
    ModelFactory(
        name="gemini-test",
        provider=provider,
        upstream_id="gemini-2.5-flash",
        input_per_mtok=Decimal("0.30"),
        output_per_mtok=Decimal("2.50"),
        cached_input_per_mtok=Decimal("0.075"),
    )
    raw = gateway.client().responses.with_raw_response.create(
        model="gemini-test", instructions="be brief", input="hello there [[cache=2]]"
    )
    validate_openai_schema(raw.http_response.json(), "Response")
    response = raw.parse()
    assert response.output_text == "Echo: hello there" and response.model == "gemini-test"
    assert response.usage.input_tokens_details.cached_tokens == 2
    _, events = raw_events(gateway, {"model": "gemini-test", "input": "[[words=5]]"})
    assert_spec_sequence([event for _, event in events])
    assert events[-1][0] == "response.completed"
    record = wait_for_record(raw.headers["x-request-id"])
    cost = (
        (record.prompt_tokens - 2) * Decimal("0.30") + 2 * Decimal("0.075") + record.completion_tokens * Decimal("2.50")
    ) / MILLION
    assert record.operation == "responses" and record.cached_tokens == 2 and record.cost == cost


def test_anthropic_cache_reads_and_writes_are_in_the_usage_details(gateway):
    raw = gateway.client().responses.with_raw_response.create(
        model="claude-test", input="one two three four five six [[cache=2]] [[cache_write=3]]"
    )
    validate_openai_schema(raw.http_response.json(), "Response")
    details = raw.parse().usage.input_tokens_details
    assert (details.cached_tokens, details.cache_write_tokens) == (2, 3)
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.cached_tokens, record.cache_write_tokens) == (2, 3)


def test_a_stream_the_servers_shutdown_cuts_ends_with_response_failed(fake_upstream, tmp_path):
    from billing.services.keys import api_key_create
    from tests.factories import UserFactory
    from tests.gateway.conftest import make_catalog
    from tests.gateway.test_shutdown import ENDLESS, stopped, upstream_received, uvicorn_server

    make_catalog(fake_upstream)
    key = api_key_create(user=UserFactory(username="shutdown"), name="t").secret
    events: list[dict] = []
    request_ids: list[str] = []

    def read(port: int) -> None:
        body = {"model": "gpt-test", "stream": True, "input": ENDLESS}
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/responses",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ) as reply:
            request_ids.append(reply.headers["x-request-id"])
            events.extend(json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: "))

    with uvicorn_server(tmp_path, grace_seconds=1) as (server, port, _spool):
        reader = threading.Thread(target=read, args=(port,), daemon=True)
        reader.start()
        upstream_received(fake_upstream, 1)
        wait_until(lambda: len(events) >= 5, "the response's first words arrived")
        server.send_signal(signal.SIGTERM)
        reader.join(timeout=60)
        stopped(server)

    assert_spec_sequence(events)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {
        "code": "server_error",
        "message": "The server is restarting and ended this reply; retry the request.",
    }
    [request_id] = request_ids
    row = UsageRecord.objects.get(request_id=request_id)
    assert row.status == "server_shutdown" and row.operation == "responses" and row.cost > 0


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"instructions": "Never say forbidden.", "input": "hi"}, "instructions"),
        (
            {
                "instructions": "Be kind.",
                "input": [{"role": "user", "content": "hi"}, {"role": "user", "content": "forbidden"}],
            },
            "input[1].content",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "look it up"},
                    {
                        "type": "function_call",
                        "call_id": "c1",
                        "name": "get_weather",
                        "arguments": '{"city": "forbidden"}',
                    },
                    {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                ],
                "tools": [WEATHER],
            },
            "input[1]",
        ),
        (
            {
                "input": [
                    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "forbidden"},
                ],
                "tools": [WEATHER],
            },
            "input[1].output",
        ),
        ({"input": "hi", "tools": [{**WEATHER, "description": "forbidden"}]}, "tools[0]"),
        (
            {
                "input": "hi",
                "tools": [WEATHER, {**WEATHER, "name": "get_time", "description": "forbidden"}],
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "auto",
                    "tools": [{"type": "function", "name": "get_time"}],
                },
            },
            "tools[1]",
        ),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"title": "forbidden"}}}},
            "text.format",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "hi"},
                    {
                        "type": "reasoning",
                        "id": "rs_1",
                        "summary": [],
                        "content": [{"type": "reasoning_text", "text": "a forbidden plan"}],
                    },
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "and?"},
                ]
            },
            "input[1].content",
        ),
    ],
    ids=[
        "instructions",
        "message",
        "function-call",
        "function-call-output",
        "tool",
        "allowed-tool",
        "text-format",
        "reasoning",
    ],
)
def test_a_refused_input_names_the_responses_field_the_blocked_word_is_in(gateway, request_fields, field):
    policy_cache.invalidate()
    policy_on("gpt-test", blocklist="forbidden", check_output=False, name="house rules")
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            gateway.client().responses.create(model="gpt-test", **request_fields)
    finally:
        policy_cache.invalidate()
    assert refused.value.code == "content_policy_violation" and refused.value.param == field
    assert refused.value.body["message"] == (
        f'Your request was refused by the content policy "house rules" (blocklist) in `{field}`.'
    )
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert f" of {field}), " in record.moderation


def test_a_traced_response_is_a_chat_span(fake_upstream, tmp_path):
    from billing.services.keys import api_key_create
    from tests.factories import UserFactory
    from tests.gateway.conftest import make_catalog
    from tests.test_tracing import Collector, traced_server

    collector = Collector().start()
    make_catalog(fake_upstream)
    key = api_key_create(user=UserFactory(username="traced"), name="traces").secret
    try:
        with traced_server(collector, tmp_path) as url:
            reply = httpx.post(
                url + "/v1/responses",
                json={"model": "gpt-test", "input": "hello [[words=3]]"},
                headers={"authorization": f"Bearer {key}"},
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
            wait_for_record(reply.headers["x-request-id"])
        span = collector.of_request(reply.headers["x-request-id"])
    finally:
        collector.stop()
    assert span["name"] == "chat gpt-test"
    assert span["attributes"]["gen_ai.operation.name"] == "chat"
    assert span["attributes"]["gen_ai.usage.output_tokens"] == reply.json()["usage"]["output_tokens"] == 3


def test_a_refusal_of_the_chat_completion_names_the_field_the_client_wrote(gateway):
    """What the request became was refused naming its own fields, which the client never wrote: more input items
    than a chat completion holds (``messages``), an effort Claude has no budget for (``reasoning_effort``), a call's
    arguments Claude cannot read (``messages[1].tool_calls[0].function.arguments``), given or from the
    ``previous_response_id``. Each names the client's field (the item, for a field inside it)."""
    client = gateway.client()

    def refused_param(**body) -> str:
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**body)
        return refused.value.body["param"]

    assert refused_param(model="gpt-test", input=[{"role": "user", "content": "x"}] * 4097) == "input"
    assert refused_param(model="claude-test", input="hi", reasoning={"effort": "extreme"}) == "reasoning.effort"
    cut = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Par'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    assert refused_param(model="claude-test", input=cut, tools=[WEATHER]) == "input[1]"
    unnamed = [cut[0], {**cut[1], "call_id": "", "arguments": "{}"}, {**cut[2], "call_id": ""}]
    assert refused_param(model="claude-test", input=unnamed, tools=[WEATHER]) == "input[1]"
    # An OpenAI model takes the arguments as they are; continued on Claude, they are the previous response's.
    first = client.responses.create(model="gpt-test", input=cut, tools=[WEATHER])
    assert refused_param(model="claude-test", previous_response_id=first.id, input="and?", tools=[WEATHER]) == (
        "previous_response_id"
    )


def test_the_endpoints_beside_responses_are_404s_that_say_they_are_not_served(gateway):
    client = gateway.client()
    with pytest.raises(openai.NotFoundError) as counted:
        client.responses.input_tokens.count(model="gpt-test", input="hi")
    with pytest.raises(openai.NotFoundError) as compacted:
        client.responses.compact(model="gpt-test", input="hi")
    for refused, path in ((counted, "input_tokens"), (compacted, "compact")):
        assert refused.value.body["code"] == "unknown_url"
        assert f"POST /v1/responses/{path}" in refused.value.body["message"]
        assert "No response found" not in refused.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_fallback_that_answered_is_the_responses_model(gateway, stream):
    CatalogModel.objects.filter(name="broken").update(fallbacks=["gpt-test"], retries=0)
    body = {"model": "broken", "input": "hi [[reply=saved]]"}
    if stream:
        reply, events = raw_events(gateway, body)
        models = {event["response"]["model"] for _, event in events if "response" in event}
    else:
        reply = httpx.post(
            gateway.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
        )
        models = {reply.json()["model"]}
    assert models == {"gpt-test"} == {reply.headers["x-llmhub-model"]}
    assert wait_for_record(reply.headers["x-request-id"]).model_name == "gpt-test"


def test_parallel_tool_calls_goes_upstream_only_with_tools(gateway):
    """The Responses API takes ``parallel_tool_calls`` (and ``tool_choice: none``) without tools; OpenAI's chat
    completions refuse them there, so they are sent only beside the tools."""
    client = gateway.client()
    for choice in ("none", "auto"):  # the default asks for nothing without tools: taken, as OpenAI takes it
        client.responses.create(model="gpt-test", input="hi", parallel_tool_calls=False, tool_choice=choice)
        assert not {"parallel_tool_calls", "tool_choice", "tools"} & set(gateway.upstream.requests[-1]["body"])
    client.responses.create(model="gpt-test", input="hi", parallel_tool_calls=False, tools=[WEATHER])
    assert gateway.upstream.requests[-1]["body"]["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    ("reasoning", "param"),
    [
        ({"summary": "detailed"}, "reasoning.summary"),
        ({"summary": "concise"}, "reasoning.summary"),
        # The deprecated name of `summary`, which older clients still send: refused alike, not taken for none.
        ({"generate_summary": "detailed"}, "reasoning.generate_summary"),
        ({"generate_summary": "concise", "effort": "low"}, "reasoning.generate_summary"),
        ({"summary": "auto", "generate_summary": "detailed"}, "reasoning.generate_summary"),
        ({"generate_summary": ["auto"]}, "reasoning.generate_summary"),
    ],
)
def test_a_reasoning_summary_asked_for_under_either_name_is_a_400_naming_it(gateway, reasoning, param):
    """llmhub writes no reasoning summary: one asked for is refused before any upstream call, whether as ``summary``
    or as its deprecated name ``generate_summary`` (until 6 December taken and answered with none, unsaid)."""
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(model="gpt-test", input="hi", extra_body={"reasoning": reasoning})
    assert (refused.value.body["param"], refused.value.body["type"]) == (param, "invalid_request_error")
    assert f"'{param}'" in refused.value.body["message"]
    assert gateway.upstream.requests_served() == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses"


@pytest.mark.parametrize("reasoning", [{"summary": "auto"}, {"generate_summary": "auto"}])
def test_a_summary_auto_under_either_name_is_taken_and_answered_with_none(gateway, reasoning):
    """``auto`` (Codex's default) lets the model write none, which is what llmhub answers: ``summary: null``."""
    raw = gateway.client().responses.with_raw_response.create(
        model="gpt-test", input="hi [[reply=ok]]", extra_body={"reasoning": {**reasoning, "effort": "low"}}
    )
    validate_openai_schema(raw.http_response.json(), "Response")
    assert raw.http_response.json()["reasoning"] == {"effort": "low", "summary": None}
    assert gateway.upstream.requests[-1]["body"]["reasoning_effort"] == "low"


@pytest.mark.parametrize(
    ("reasoning", "param", "code"),
    [
        # OpenAI's pro mode (more compute, its price): a chat completion has no such mode on any provider.
        ({"mode": "pro"}, "reasoning.mode", "unsupported_value"),
        ({"mode": "pro", "effort": "high"}, "reasoning.mode", "unsupported_value"),
        ({"mode": ["standard"]}, "reasoning.mode", "unsupported_value"),
        ({"context": "every_turn"}, "reasoning.context", "unsupported_value"),
        ({"effort": "low", "budget": 10}, "reasoning.budget", "unknown_parameter"),
    ],
)
def test_a_reasoning_mode_or_context_llmhub_cannot_keep_is_a_400_naming_it(gateway, reasoning, param, code):
    """``reasoning.mode`` and ``reasoning.context`` change what the model does and is shown; until 6 December they
    (and any misspelt field of ``reasoning``) were dropped unsaid, a ``pro`` request answered in the standard mode."""
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(model="gpt-test", input="hi", extra_body={"reasoning": reasoning})
    assert (refused.value.body["param"], refused.value.body["code"]) == (param, code)
    assert f"'{param}'" in refused.value.body["message"]
    assert gateway.upstream.requests_served() == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses"


@pytest.mark.parametrize("model", MODELS)
def test_reasoning_context_current_turn_sends_no_earlier_turn_s_reasoning(gateway, model):
    """``reasoning.context: current_turn`` renders the reasoning of this turn only (since the last user message): an
    earlier turn's reasoning item given back is not sent, this turn's is; ``auto``, ``all_turns`` and ``standard`` mode
    send both, as before (the provider decides what its model reads)."""

    def thought(text: str) -> dict:
        # As llmhub answers it: the text in the clear (what an OpenAI-protocol model is sent), and Claude's signed
        # thinking in `encrypted_content` (what Claude is sent).
        signed = thinking_content([{"type": "thinking", "thinking": text, "signature": THINKING_SIGNATURE}])
        content = [{"type": "reasoning_text", "text": text}]
        return {"type": "reasoning", "summary": [], "content": content, "encrypted_content": signed}

    earlier, current = thought("EARLIER-THOUGHT"), thought("CURRENT-THOUGHT")
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    items = [
        {"role": "user", "content": "first"},
        earlier,
        {"role": "assistant", "content": [{"type": "output_text", "text": "one"}]},
        {"role": "user", "content": "second [[reply=ok]]"},
        current,
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]

    def sent(reasoning: dict) -> str:
        gateway.client().responses.create(
            model=model, input=items, tools=[WEATHER], store=False, extra_body={"reasoning": reasoning}
        )
        return json.dumps(gateway.upstream.requests[-1]["body"])

    both = sent({"context": "auto", "mode": "standard"})
    assert "EARLIER-THOUGHT" in both and "CURRENT-THOUGHT" in both
    every_turn = sent({"context": "all_turns"})  # what OpenAI's gpt-5.6 does by default: taken, not refused
    assert "EARLIER-THOUGHT" in every_turn and "CURRENT-THOUGHT" in every_turn
    only_current = sent({"context": "current_turn"})
    assert "EARLIER-THOUGHT" not in only_current and "CURRENT-THOUGHT" in only_current


@pytest.mark.parametrize("stream", [False, True])
def test_the_response_echoes_the_verbosity_asked_for_or_medium(gateway, stream):
    """OpenAI's ``Response`` says the ``text.verbosity`` it was made with (``medium`` when none was asked), beside
    the format: until 6 December llmhub sent it on and echoed ``text`` with the format alone."""
    said, kept = {}, {}
    for asked in ("low", "high", None):
        text = {"format": {"type": "text"}} if asked is None else {"verbosity": asked}
        body = {"model": "gpt-test", "input": "hi [[reply=ok]]", "text": text}
        if stream:
            _, events = raw_events(gateway, body)
            assert_spec_sequence([event for _, event in events])
            echoed = [event["response"] for _, event in events if "response" in event]
            assert len({json.dumps(response["text"]) for response in echoed}) == 1
            response = echoed[-1]
        else:
            reply = httpx.post(
                gateway.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
            )
            response = reply.json()
            validate_openai_schema(response, "Response")
        assert gateway.upstream.requests[-1]["body"].get("verbosity") == asked  # sent on as before
        said[asked] = response["text"]
        kept[asked] = gateway.client().responses.retrieve(response["id"]).to_dict()["text"]
    assert said == kept
    assert said == {
        "low": {"format": {"type": "text"}, "verbosity": "low"},
        "high": {"format": {"type": "text"}, "verbosity": "high"},
        None: {"format": {"type": "text"}, "verbosity": "medium"},
    }


@pytest.mark.parametrize("model", MODELS)
def test_an_input_image_reaches_the_model(gateway, model):
    pixel = (
        "data:image/png;base64,"
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
    )
    content = [
        {"type": "input_text", "text": "what is it"},
        {"type": "input_image", "image_url": pixel, "detail": "low"},
    ]
    with_image = gateway.client().responses.create(model=model, input=[{"role": "user", "content": content}])
    without = gateway.client().responses.create(model=model, input=[{"role": "user", "content": content[:1]}])
    assert with_image.usage.input_tokens - without.usage.input_tokens == 85  # the fake upstream's charge an image


def test_a_rate_limited_key_gets_a_429_with_its_headers(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, rpm=1)
    client = gateway.client()
    served = client.responses.with_raw_response.create(model="gpt-test", input="hi")
    assert served.headers["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(openai.RateLimitError) as limited:
        client.responses.create(model="gpt-test", input="hi")
    assert limited.value.response.headers.get("retry-after")
    assert wait_for_record(limited.value.response.headers["x-request-id"]).status == "rejected"
    assert gateway.upstream.requests_served() == 1


PATCH_TOOL = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch to the files.",
    "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /(.|\\n)+/'},
}


@pytest.mark.parametrize("model", MODELS)
def test_a_custom_tool_round_trip(gateway, model):
    """Codex's free-form tools (``apply_patch``): a function of one string ``input`` upstream, whose description
    carries the grammar; the model's call is a ``custom_tool_call``, and its output goes back as a tool message."""
    client = gateway.client()
    raw = client.responses.with_raw_response.create(model=model, input="Fix the bug", tools=[PATCH_TOOL, WEATHER])
    validate_openai_schema(raw.http_response.json(), "Response")
    [call] = raw.parse().output
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and call.input == "Fix the bug"
    assert raw.parse().tools[0].format.definition == PATCH_TOOL["format"]["definition"]
    if model == "gpt-test":
        [sent, _weather] = gateway.upstream.requests[-1]["body"]["tools"]
        assert sent["function"]["parameters"]["properties"] == {
            "input": {"type": "string", "description": "The tool's whole input, as free-form text."}
        }
        assert sent["function"]["description"].startswith("Apply a patch to the files.\n\n")
        assert PATCH_TOOL["format"]["definition"] in sent["function"]["description"]
    second = client.responses.create(
        model=model,
        tools=[PATCH_TOOL],
        input=[
            {"role": "user", "content": "Fix the bug"},
            {"type": "custom_tool_call", "call_id": call.call_id, "name": call.name, "input": call.input},
            {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"},
        ],
    )
    assert second.output_text == "Tool result: Done!"
    if model == "gpt-test":
        assistant = gateway.upstream.requests[-1]["body"]["messages"][1]
        assert assistant["tool_calls"][0]["id"] == call.call_id
        assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"input": "Fix the bug"}


@pytest.mark.parametrize("model", MODELS)
def test_a_local_shell_round_trip(gateway, model):
    client = gateway.client()
    raw = client.responses.with_raw_response.create(model=model, input="List files", tools=[{"type": "local_shell"}])
    validate_openai_schema(raw.http_response.json(), "Response")
    [call] = raw.parse().output
    assert call.type == "local_shell_call" and call.status == "completed"
    # The fake upstream fills a string with the question, a number with 42, an array and an object empty.
    assert call.action.model_dump(exclude_none=True) == {
        "type": "exec",
        "command": [],
        "env": {},
        "timeout_ms": 42,
        "working_directory": "List files",
        "user": "List files",
    }
    second = client.responses.create(
        model=model,
        tools=[{"type": "local_shell"}],
        input=[
            {"role": "user", "content": "List files"},
            {
                "type": "local_shell_call",
                "id": call.id,
                "call_id": call.call_id,
                "status": "completed",
                "action": {"type": "exec", "command": ["ls", "-a"], "env": {}},
            },
            # The spec names the call by its id in the output's `id`.
            {"type": "local_shell_call_output", "id": call.call_id, "output": "README.md"},
        ],
    )
    assert second.output_text == "Tool result: README.md"
    if model == "gpt-test":
        [call_sent] = gateway.upstream.requests[-1]["body"]["messages"][1]["tool_calls"]
        assert call_sent["id"] == call.call_id and call_sent["function"]["name"] == "local_shell"
        assert json.loads(call_sent["function"]["arguments"]) == {"command": ["ls", "-a"], "env": {}}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("tool", "item_type"), [(PATCH_TOOL, "custom_tool_call"), ({"type": "local_shell"}, "local_shell_call")]
)
def test_streamed_custom_and_local_shell_calls(gateway, model, tool, item_type):
    with gateway.client().responses.create(
        model=model, input="Go on", tools=[tool], tool_choice="required", stream=True
    ) as stream:
        events = list(stream)
    dumped = [event.model_dump(mode="json", exclude_unset=True) for event in events]
    assert_spec_sequence(dumped)
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" not in kinds
    [item] = events[-1].response.output
    assert item.type == item_type and item.call_id and events[-1].type == "response.completed"
    if item_type == "custom_tool_call":
        assert item.input == "Go on"
        done = next(event for event in events if event.type == "response.custom_tool_call_input.done")
        deltas = "".join(event.delta for event in events if event.type == "response.custom_tool_call_input.delta")
        assert done.input == deltas == "Go on" and done.item_id == item.id
    else:
        assert item.action.working_directory == "Go on"


def test_a_tool_choice_that_names_a_custom_tool_forces_its_call(gateway):
    response = gateway.client().responses.create(
        model="gpt-test",
        input="Fix it",
        tools=[WEATHER, PATCH_TOOL],
        tool_choice={"type": "custom", "name": "apply_patch"},
    )
    assert gateway.upstream.requests[-1]["body"]["tool_choice"] == {
        "type": "function",
        "function": {"name": "apply_patch"},
    }
    assert [(item.type, item.name) for item in response.output] == [("custom_tool_call", "apply_patch")]


TIME = {
    "type": "function",
    "name": "get_time",
    "description": "The time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}


def allowed(mode: str, *tools: dict) -> dict:
    return {"type": "allowed_tools", "mode": mode, "tools": list(tools)}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode", ["auto", "required"])
def test_allowed_tools_are_the_only_tools_the_model_may_call(gateway, model, mode):
    """``tool_choice: {"type": "allowed_tools", ...}`` (OpenAI's way to narrow a long tool list for one turn): the
    model may call only those, so they alone go upstream, with ``auto`` or ``required``; the Response lists every
    tool and the choice as given. The fake model calls the first tool it is sent: here the second one defined.
    Until 6 December it was refused as a built-in tool's choice."""
    choice = allowed(mode, {"type": "function", "name": "get_time"}, {"type": "custom", "name": "apply_patch"})
    raw = gateway.client().responses.with_raw_response.create(
        model=model, input="Oslo", tools=[WEATHER, TIME, PATCH_TOOL], tool_choice=choice
    )
    validate_openai_schema(raw.http_response.json(), "Response")
    response = raw.parse()
    [call] = response.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_time", {"city": "Oslo"})
    assert raw.http_response.json()["tool_choice"] == choice
    assert [tool.name for tool in response.tools] == ["get_weather", "get_time", "apply_patch"]
    sent = gateway.upstream.requests[-1]["body"]
    if model == "gpt-test":
        assert [tool["function"]["name"] for tool in sent["tools"]] == ["get_time", "apply_patch"]
        assert sent["tool_choice"] == mode
    else:
        assert [tool["name"] for tool in sent["tools"]] == ["get_time", "apply_patch"]
        assert sent["tool_choice"]["type"] == {"auto": "auto", "required": "any"}[mode]


def test_allowed_tools_narrow_a_stream_and_the_local_shell(gateway):
    choice = allowed("required", {"type": "local_shell"})
    with gateway.client().responses.create(
        model="gpt-test", input="List files", tools=[WEATHER, {"type": "local_shell"}], tool_choice=choice, stream=True
    ) as stream:
        events = list(stream)
    assert_spec_sequence([event.model_dump(mode="json", exclude_unset=True) for event in events])
    assert [item.type for item in events[-1].response.output] == ["local_shell_call"]
    assert [tool["function"]["name"] for tool in gateway.upstream.requests[-1]["body"]["tools"]] == ["local_shell"]


@pytest.mark.parametrize(
    ("choice", "param"),
    [
        (allowed("none", {"type": "function", "name": "get_time"}), "tool_choice.mode"),
        ({"type": "allowed_tools", "tools": [{"type": "function", "name": "get_time"}]}, "tool_choice.mode"),
        (allowed("auto"), "tool_choice.tools"),
        ({"type": "allowed_tools", "mode": "auto", "tools": {"type": "function"}}, "tool_choice.tools"),
        (allowed("auto", "get_time"), "tool_choice.tools[0]"),
        (allowed("auto", {"type": "function"}), "tool_choice.tools[0].name"),
        (
            allowed("auto", {"type": "function", "name": "get_time"}, {"type": "web_search"}),
            "tool_choice.tools[1].type",
        ),
        (allowed("required", {"type": "function", "name": "get_date"}), "tool_choice.tools[0].name"),
        (allowed("required", {"type": "custom", "name": "get_time"}), "tool_choice.tools[0].name"),
        (allowed("required", {"type": "local_shell"}), "tool_choice.tools[0].type"),
    ],
)
def test_allowed_tools_that_are_not_among_the_tools_or_not_supported_are_a_400_naming_them(gateway, choice, param):
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(model="gpt-test", input="hi", tools=[WEATHER, TIME], tool_choice=choice)
    assert (refused.value.body["param"], refused.value.body["type"]) == (param, "invalid_request_error")
    assert gateway.upstream.requests_served() == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "responses"


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([WEATHER, {"type": "custom", "name": "get_weather"}], "tools[1].name"),
        ([{**WEATHER, "name": "local_shell"}, {"type": "local_shell"}], "tools[1].type"),
        ([{"type": "custom"}], "tools[0].name"),
        (
            [{"type": "custom", "name": "x", "format": {"type": "grammar", "syntax": "ebnf", "definition": ""}}],
            "tools[0].format",
        ),
    ],
)
def test_a_tool_name_clash_or_a_bad_custom_tool_is_a_400(gateway, tools, param):
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(model="gpt-test", input="hi", tools=tools)
    assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"
    assert gateway.upstream.requests_served() == 0


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_reasoning_models_reasoning_is_a_reasoning_item_before_the_message_and_charged(gateway, field):
    """What an OpenAI-compatible server of a reasoning model answers in ``reasoning_content`` (DeepSeek, vLLM) or
    ``reasoning`` (OpenRouter, Ollama): a ``reasoning`` item with the text as a ``reasoning_text`` part."""
    raw = gateway.client().responses.with_raw_response.create(
        model="gpt-test", input=f"Why? [[reasoning=let me think]] [[reply=because]] [[reasoning_field={field}]]"
    )
    validate_openai_schema(raw.http_response.json(), "Response")
    response = raw.parse()
    assert [item.type for item in response.output] == ["reasoning", "message"]
    thought = response.output[0]
    assert [(part.type, part.text) for part in thought.content] == [("reasoning_text", "let me think")]
    assert thought.summary == [] and thought.status == "completed" and thought.id.startswith("rs_")
    assert response.output_text == "because"
    assert response.usage.output_tokens == 4 and response.usage.output_tokens_details.reasoning_tokens == 3
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.completion_tokens == 4 and record.cost == expected_cost("gpt-test", record)


def test_streamed_reasoning_comes_first_with_its_events(gateway):
    with gateway.client().responses.create(
        model="gpt-test", input="[[reasoning=one two three four five]] [[words=4]]", stream=True
    ) as stream:
        events = list(stream)
    dumped = [event.model_dump(mode="json", exclude_unset=True) for event in events]
    assert_spec_sequence(dumped)
    kinds = [event.type for event in events]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    thinking = "".join(event.delta for event in events if event.type == "response.reasoning_text.delta")
    [done] = [event for event in events if event.type == "response.reasoning_text.done"]
    assert thinking == done.text == "one two three four five"
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == thinking and len(final.output_text.split()) == 4
    assert final.usage.output_tokens_details.reasoning_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_an_upstream_did_not_count_is_charged_as_output(gateway, stream):
    rows = []
    for thought in ("", "[[reasoning=" + " ".join(["hmm"] * 40) + "]]"):
        body = {"model": "gpt-test", "input": f"one two [[reply=four five]] [[usage=none]] {thought}"}
        if stream:
            reply, events = raw_events(gateway, body)
            response = events[-1][1]["response"]
        else:
            reply = httpx.post(
                gateway.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=20
            )
            response = reply.json()
        record = wait_for_record(reply.headers["x-request-id"])
        assert record.usage_estimated and response["usage"]["output_tokens"] == record.completion_tokens
        rows.append(record)
    assert rows[1].completion_tokens > rows[0].completion_tokens


def test_reasoning_given_back_reaches_the_model_as_the_turns_reasoning_content(gateway):
    """DeepSeek-style servers take the reasoning back (in a tool-call round they ask for it): as
    ``/v1/chat/completions`` passes an assistant turn's ``reasoning_content`` on, a reasoning item given back is
    that."""
    client = gateway.client()
    first = client.responses.create(
        model="gpt-test", input="Weather in Rome? [[reasoning=I need the tool]]", tools=[WEATHER]
    )
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    second = client.responses.create(
        model="gpt-test",
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather in Rome?"},
            *[item.model_dump(exclude_none=True) for item in first.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    assert second.output_text == "Tool result: sunny"
    sent = gateway.upstream.requests[-1]["body"]["messages"]
    assert sent[1]["role"] == "assistant" and sent[1]["reasoning_content"] == "I need the tool"
    assert sent[1]["tool_calls"][0]["id"] == call.call_id
    assert all("reasoning_content" not in message for message in sent[2:])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_provider_refusal_names_the_responses_field_not_the_chat_completions_one(gateway, stream):
    """An OpenAI model refuses an output limit past what it writes (a model whose catalog entry sets none): its 400
    named ``max_completion_tokens``, a field the client never sent; it names ``max_output_tokens``, as OpenAI's
    Responses API does."""
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(model="gpt-test", input="hi", max_output_tokens=999_999, stream=stream)
    assert refused.value.param == "max_output_tokens"
    assert refused.value.code == "upstream_bad_request"
    assert gateway.upstream.requests_served() == 1
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "invalid" and record.operation == "responses"
