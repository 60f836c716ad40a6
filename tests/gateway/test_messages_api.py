"""Anthropic's Messages API inbound (``/v1/messages``): the official ``anthropic`` SDK against a live llmhub,
with the fake upstream behind an Anthropic-protocol model (``claude-test``: passed through) and an
OpenAI-protocol one (``gpt-test``: translated both ways)."""

from __future__ import annotations

import json
import logging
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from billing.models import Operation, UsageRecord
from billing.services.budgets import api_key_limits_set
from chat.pipeline import _message_written, _reported_usage
from llmhub.testing.fake_upstream import THINKING_SIGNATURE, raw_directive
from providers.models import CatalogModel, Deployment, Provider, ProviderKind
from providers.routing.breaker_machine import OPEN
from providers.routing.breakers import breaker_state
from providers.tokens import prompt_tokens, text_tokens
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_ledger import settle_quietly
from tests.providers.health_probes import breakers_closed_after  # noqa: F401  (a fixture)
from tests.waiting import wait_for_record, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MILLION = Decimal(1_000_000)
PRICES = {"gpt-test": (Decimal("0.15"), Decimal("0.60")), "claude-test": (Decimal("0.80"), Decimal("4.00"))}
MODELS = ["claude-test", "gpt-test"]
EVENT = TypeAdapter(RawMessageStreamEvent)
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ORDER = {"message_start": 0, "content_block_start": 1, "content_block_delta": 1, "content_block_stop": 1}


def client(gateway, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gateway.url, api_key=kwargs.pop("api_key", gateway.key), max_retries=0, timeout=20, **kwargs
    )


def async_client(gateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)


def message_of(gateway, request: dict, *, stream: bool) -> anthropic.types.Message:
    """The SDK's message for ``request``: answered whole, or streamed and gathered into its final message."""
    sdk = client(gateway)
    if stream:
        with sdk.messages.stream(**request) as events:
            return events.get_final_message()
    return sdk.messages.create(**request)


def openai_reply(reply_id: str, *, message: dict, deltas: list[dict], stream: bool) -> bytes:
    """An OpenAI-protocol upstream's reply of one choice ending ``stop``, as its bytes for ``raw_directive``:
    ``message`` whole, or ``deltas`` streamed, then the finish and the usage."""
    head = {"id": reply_id, "created": 1, "model": "fake-gpt-4o-mini"}
    usage = {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    if not stream:
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return json.dumps({**head, "object": "chat.completion", "choices": [choice], "usage": usage}).encode()
    chunk = {**head, "object": "chat.completion.chunk"}
    chunks = [{**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    chunks.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**chunk, "choices": [], "usage": usage})
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def expected_cost(model: str, record: UsageRecord) -> Decimal:
    input_price, output_price = PRICES[model]
    cost = (Decimal(record.prompt_tokens) * input_price + Decimal(record.completion_tokens) * output_price) / MILLION
    return cost.quantize(Decimal("0.0000000001"))


def raw_events(gateway, body: dict) -> tuple[httpx.Response, list[tuple[str, bytes]]]:
    """The SSE events as they came over the wire: (event name, data bytes)."""
    events: list[tuple[str, bytes]] = []
    headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", gateway.url + "/v1/messages", json={**body, "stream": True}, headers=headers) as reply:
        name = None
        for line in reply.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, line[6:].encode()))
    return reply, events


def assert_anthropic_sequence(events: list[dict]) -> None:
    """Every event is one of Anthropic's (strict), in Anthropic's order. ``ping`` is not in the SDK's
    union of events (its stream reader skips it): it must be exactly ``{"type": "ping"}``."""
    for event in events:
        if event["type"] == "ping":
            assert event == {"type": "ping"}
        else:
            EVENT.validate_python(event, strict=True)
    kinds = [event["type"] for event in events if event["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    open_block = None
    for event in events:
        if event["type"] == "content_block_start":
            assert open_block is None
            open_block = event["index"]
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_block
        elif event["type"] == "content_block_stop":
            assert event["index"] == open_block
            open_block = None
    assert open_block is None


@pytest.mark.parametrize("model", MODELS)
def test_non_streaming_message_and_its_ledger_row(gateway, model):
    raw = client(gateway).messages.with_raw_response.create(
        model=model,
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "one two three [[reply=hello there]]"}],
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.model == model
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "hello there"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 2 and message.usage.input_tokens > 0
    record = wait_for_record(raw.headers["x-request-id"])
    settle_quietly()
    assert UsageRecord.objects.count() == 1
    assert record.operation == "messages" and record.status == "ok" and record.stream is False
    assert (record.model_name, record.prompt_tokens, record.completion_tokens) == (
        model,
        message.usage.input_tokens,
        2,
    )
    assert record.cost == expected_cost(model, record) and record.cost > 0


@pytest.mark.parametrize("model", MODELS)
def test_streamed_text_through_the_sdk(gateway, model):
    with client(gateway).messages.stream(
        model=model, max_tokens=100, messages=[{"role": "user", "content": "[[words=7]]"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert text == "lorem ipsum dolor sit amet consectetur adipiscing"
    assert final.content[0].text == text and final.stop_reason == "end_turn" and final.model == model
    assert final.usage.output_tokens == 7
    record = wait_for_record(request_id)
    assert record.operation == "messages" and record.stream is True and record.status == "ok"
    assert record.completion_tokens == 7 and record.usage_estimated is False
    assert record.prompt_tokens == final.usage.input_tokens
    assert record.cost == expected_cost(model, record)


CITED = "https://example.com/paris-weather"


def test_a_translated_models_url_citation_is_an_anthropic_web_search_citation_on_its_text(gateway):
    """OpenAI's search models cite their sources as ``url_citation`` annotations on the message, which the
    translation dropped: the client of /v1/messages got the text without them. Each is a ``web_search_result_location``
    citation on the text block, its ``cited_text`` the part of the reply the annotation spans."""
    message = client(gateway).messages.create(
        model="gpt-test",
        max_tokens=100,
        messages=[{"role": "user", "content": f"[[reply=It is sunny.]] [[url_citation={CITED}]]"}],
    )
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "It is sunny."
    assert [citation.model_dump() for citation in message.content[0].citations] == [
        {
            "type": "web_search_result_location",
            "url": CITED,
            "title": "Fake source",
            "cited_text": "It is sunny.",
            "encrypted_index": "",
        }
    ]


def test_a_translated_models_url_citation_is_streamed_as_a_citations_delta(gateway):
    body = {
        "model": "gpt-test",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": f"[[reply=It is sunny.]] [[url_citation={CITED}]]"}],
    }
    _, wire = raw_events(gateway, body)
    events = [json.loads(data) for _, data in wire]
    assert_anthropic_sequence(events)
    deltas = [event["delta"] for event in events if event["type"] == "content_block_delta"]
    assert [delta["citation"]["url"] for delta in deltas if delta["type"] == "citations_delta"] == [CITED]

    with client(gateway).messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "It is sunny."
    assert [(c.type, c.url, c.cited_text) for c in final.content[0].citations] == [
        ("web_search_result_location", CITED, "It is sunny.")
    ]


def test_a_url_citation_that_comes_after_its_text_blocks_end_is_not_streamed_after_that_end(gateway):
    """An upstream that cites its sources at the end of a reply that wrote text, then called a tool (OpenRouter's web
    search does, its annotations last): the text block had ended (``content_block_stop``) when the tool's block opened,
    and its ``citations_delta`` came after that end, which Anthropic's stream never has; the TypeScript SDK's
    ``citation`` event (read on the last block) lost it, and a client that finishes a block at its stop dropped it or
    failed. Every block's deltas now come before its stop: the late citation is not streamed (the whole reply, which
    has every block at once, still carries it)."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    span = {"url": CITED, "title": "Source", "start_index": 0, "end_index": 12}
    deltas = [
        {"role": "assistant", "content": "It is sunny."},
        {"tool_calls": [call]},
        {"annotations": [{"type": "url_citation", "url_citation": span}]},
    ]
    upstream = openai_reply("chatcmpl-cited", message={}, deltas=deltas, stream=True)
    body = {"model": "gpt-test", "max_tokens": 100, "messages": [{"role": "user", "content": raw_directive(upstream)}]}

    _, wire = raw_events(gateway, body)

    events = [json.loads(data) for _, data in wire]
    assert_anthropic_sequence(events)
    assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == ["text", "tool_use"]
    assert not [e for e in events if e.get("delta", {}).get("type") == "citations_delta"]


@pytest.mark.parametrize("model", MODELS)
def test_every_streamed_event_has_anthropics_shape_and_order(gateway, model):
    reply, events = raw_events(
        gateway, {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "[[words=3]]"}]}
    )
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    decoded = [json.loads(data) for _, data in events]
    assert [name for name, _ in events] == [event["type"] for event in decoded]
    assert_anthropic_sequence(decoded)
    assert decoded[0]["message"]["model"] == model
    assert decoded[-2]["delta"]["stop_reason"] == "end_turn" and decoded[-2]["usage"]["output_tokens"] == 3


@pytest.mark.parametrize("model", MODELS)
def test_tool_use_round_trip(gateway, model):
    sdk = client(gateway)
    question = {"role": "user", "content": "Paris"}
    with sdk.messages.stream(model=model, max_tokens=100, tools=[WEATHER], messages=[question]) as stream:
        events = [event.model_dump(mode="json", exclude_none=True) for event in stream if event.type in ORDER]
        call = stream.get_final_message()
    assert call.stop_reason == "tool_use"
    [tool_use] = [block for block in call.content if block.type == "tool_use"]
    assert (tool_use.name, tool_use.input) == ("get_weather", {"city": "Paris"})
    deltas = [event["delta"] for event in events if event["type"] == "content_block_delta"]
    assert deltas and all(delta["type"] == "input_json_delta" for delta in deltas)
    assert json.loads("".join(delta["partial_json"] for delta in deltas)) == {"city": "Paris"}

    answer = sdk.messages.create(
        model=model,
        max_tokens=100,
        tools=[WEATHER],
        messages=[
            question,
            {"role": "assistant", "content": [tool_use.model_dump(exclude_none=True)]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "18 C"}]},
        ],
    )
    assert answer.content[0].text == "Tool result: 18 C" and answer.stop_reason == "end_turn"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_claudes_signed_thinking_reaches_the_client_and_goes_back_with_a_tool_use_round(gateway, stream):
    """Anthropic signs each thinking block (``signature`` on a whole reply, a ``signature_delta`` before the block's
    stop in a stream) and wants it back, signed, in the request that answers a tool call made while thinking. The
    signature reaches the SDK as Claude wrote it, whole and streamed, and the next turn with the thinking block sent
    back as the SDK gave it is answered (the fake upstream refuses a block whose signature is not the one it made)."""
    sdk = client(gateway)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    question = {"role": "user", "content": "[[thinking=I should look the weather up]] Paris"}
    request = {"model": "claude-test", "max_tokens": 2048, "thinking": thinking, "tools": [WEATHER]}
    if stream:
        with sdk.messages.stream(**request, messages=[question]) as events:
            deltas = [event.delta.type for event in events if event.type == "content_block_delta" and event.index == 0]
            call = events.get_final_message()
        assert deltas[-1] == "signature_delta" and set(deltas) == {"thinking_delta", "signature_delta"}
    else:
        call = sdk.messages.create(**request, messages=[question])
    assert [block.type for block in call.content] == ["thinking", "tool_use"] and call.stop_reason == "tool_use"
    signed, tool_use = call.content
    assert signed.thinking == "I should look the weather up"
    assert signed.signature == THINKING_SIGNATURE

    answer = sdk.messages.create(
        **request,
        messages=[
            question,
            {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in call.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "18 C"}]},
        ],
    )
    assert answer.content[-1].text == "Tool result: 18 C" and answer.stop_reason == "end_turn"
    sent_back = gateway.upstream.requests[-1]["body"]["messages"][1]["content"][0]
    assert sent_back == {"type": "thinking", "thinking": signed.thinking, "signature": signed.signature}


@pytest.mark.parametrize("numbered", [True, False])
def test_several_streamed_tool_calls_of_a_translated_model_stay_apart(gateway, numbered):
    """An OpenAI-compatible server that calls several tools at once and numbers no call in its chunks (no
    ``index``, each call's first piece with its ``id``): every piece was taken for the first call's, and the
    client got one tool_use block whose input was several JSON objects run together, the other calls lost. Each
    call is now its own block, as in the message the same request gets unstreamed."""
    content = "Paris [[tool_calls=3]]" + ("" if numbered else " [[omit=tool_calls.index]]")
    request = {
        "model": "gpt-test",
        "max_tokens": 100,
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": content}],
    }
    sdk = client(gateway)
    with sdk.messages.stream(**request) as stream:
        events = [event.model_dump(mode="json", exclude_none=True) for event in stream if event.type in ORDER]
        streamed = stream.get_final_message()
    whole = sdk.messages.create(**request)
    for message in (streamed, whole):
        calls = [block for block in message.content if block.type == "tool_use"]
        assert [(call.name, call.input) for call in calls] == [("get_weather", {"city": "Paris"})] * 3
        assert len({call.id for call in calls}) == 3 and message.stop_reason == "tool_use"
    for index in range(3):
        pieces = [
            e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta" and e["index"] == index
        ]
        assert json.loads("".join(pieces)) == {"city": "Paris"}


@pytest.mark.parametrize("model", MODELS)
async def test_async_client_streams_and_completes(gateway, model):
    sdk = async_client(gateway)
    message = await sdk.messages.create(
        model=model, max_tokens=20, messages=[{"role": "user", "content": "[[reply=async works]]"}]
    )
    assert message.content[0].text == "async works"
    async with sdk.messages.stream(
        model=model, max_tokens=20, messages=[{"role": "user", "content": "[[words=4]]"}]
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == "lorem ipsum dolor sit" and final.usage.output_tokens == 4
    await sdk.close()


def test_anthropic_model_gets_the_request_untranslated_and_its_event_bytes_relayed(gateway):
    body = {
        "model": "claude-test",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "u-1"},
        "messages": [{"role": "user", "content": "[[reply=café ☕ naïve]]"}],
    }
    reply, events = raw_events(gateway, body)
    assert reply.status_code == 200
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/messages"]
    assert sent["system"] == body["system"] and sent["metadata"] == body["metadata"]
    assert sent["model"] == "fake-claude-haiku" and sent["stream"] is True
    # The fake upstream writes compact JSON with non-ASCII escaped (`\u00e9`): every event but the first
    # (whose model name is rewritten in place) arrives in exactly those bytes, never re-encoded.
    for name, data in events:
        decoded = json.loads(data)
        assert json.dumps(decoded, separators=(",", ":")).encode() == data, name
    text = "".join(json.loads(data)["delta"].get("text", "") for name, data in events if name == "content_block_delta")
    assert text == "café ☕ naïve" and b"\\u00e9" in b"".join(data for _, data in events)
    assert json.loads(events[0][1])["message"]["model"] == "claude-test"
    assert [name for name, _ in events].count("ping") == 1


def test_openai_model_gets_a_translated_request(gateway):
    client(gateway).messages.create(
        model="gpt-test",
        max_tokens=30,
        system="Be brief.",
        extra_body={"temperature": 0.5},  # this SDK's signature no longer takes it; the API still does
        stop_sequences=["END"],
        metadata={"user_id": "u-1"},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                ],
            }
        ],
    )
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/chat/completions"]
    assert sent["model"] == "fake-gpt-4o-mini" and sent["max_tokens"] == 30 and sent["stop"] == ["END"]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    assert "metadata" not in sent and sent["temperature"] == 0.5


@pytest.mark.parametrize("stream", [False, True])
def test_the_end_user_in_metadata_reaches_a_translated_model_as_its_user(gateway, stream):
    """``metadata.user_id`` names the end user a request is made for (Anthropic's abuse tracking); OpenAI's field for
    it is ``user``. It was dropped on the way to an OpenAI-protocol model: the provider could not tell the app's users
    apart. It now goes as ``user``."""
    request = {
        "model": "gpt-test",
        "max_tokens": 20,
        "metadata": {"user_id": "end-user-7"},
        "messages": [{"role": "user", "content": "[[reply=hi]]"}],
    }
    message = message_of(gateway, request, stream=stream)
    assert message.content[0].text == "hi"
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/chat/completions"]
    assert sent["user"] == "end-user-7" and "metadata" not in sent


CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_reaches_a_translated_model_as_its_json_schema(gateway, stream):
    """Anthropic's structured outputs (``output_config.format``, what the SDK's ``messages.parse`` sends) were
    dropped on the way to an OpenAI-protocol model: it answered free text, which the client's parse then failed on.
    The schema now goes as OpenAI's ``response_format`` of type ``json_schema``, strict (Claude's output follows
    the schema it is given)."""
    request = {
        "model": "gpt-test",
        "max_tokens": 50,
        "output_config": {"format": {"type": "json_schema", "schema": CITY_SCHEMA}},
        "messages": [{"role": "user", "content": '[[reply={"city": "Lyon", "population": 522000}]]'}],
    }
    message = message_of(gateway, request, stream=stream)
    assert json.loads(message.content[0].text) == {"city": "Lyon", "population": 522000}
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/chat/completions"]
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": CITY_SCHEMA, "strict": True},
    }
    assert "output_config" not in sent


def test_a_structured_output_without_a_schema_is_refused_for_a_translated_model(gateway):
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(gateway).messages.create(
            model="gpt-test",
            max_tokens=50,
            output_config={"format": {"type": "json_schema"}},
            messages=[{"role": "user", "content": "hi"}],
        )
    assert "output_config.format.schema" in refused.value.body["error"]["message"]
    assert gateway.upstream.stats["requests"] == 0


def test_count_tokens_answers_an_estimate(gateway):
    counted = client(gateway).messages.count_tokens(
        model="gpt-test", system="Be brief.", messages=[{"role": "user", "content": "x" * 400}]
    )
    assert 100 <= counted.input_tokens <= 120
    assert gateway.upstream.stats["requests"] == 0


# A request that used tools, in the Messages API's blocks: the tools' schemas, the model's call (its input not
# ASCII) and its result, a server tool's call and an MCP tool's call and result, and a document.
TOOLS_ROUND_TRIP = {
    "system": "Answer in the city's language.",
    "tools": [{**WEATHER, "description": "Le temps qu'il fait à une ville, en degrés Celsius."}],
    "messages": [
        {"role": "user", "content": "Quel temps fait-il à Zürich et à Malmö ?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Je regarde."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Zürich"}},
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "Malmö"}},
                {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "forecast", "server_name": "s", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sonnig, 21 °C, leichter Föhn."},
                {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1", "content": [{"type": "text", "text": "Regn"}]},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Notes."}},
            ],
        },
    ],
}


def test_count_tokens_of_a_request_with_tools_is_the_ledgers_estimate_of_it(gateway):
    """``count_tokens`` had a simpler estimate of its own, which left out server and MCP tool blocks and
    documents and counted non-ASCII tool input as escaped JSON; it now answers what the ledger charges such a
    request when its provider counts nothing (``prompt_tokens``)."""
    translated = {**TOOLS_ROUND_TRIP, "messages": TOOLS_ROUND_TRIP["messages"][:1]}
    counted = client(gateway).messages.with_raw_response.count_tokens(model="gpt-test", **translated)
    assert counted.parse().input_tokens == prompt_tokens(translated, operation=Operation.MESSAGES)
    assert counted.headers["x-llmhub-token-count"] == "estimate"


def test_count_tokens_of_a_claude_model_is_its_providers_exact_count(gateway):
    """For a model on Anthropic's API, count_tokens answered llmhub's estimate (about four characters a token), though
    Anthropic counts a request exactly, as it bills it, and for free: a client fitting a prompt to the context window
    or a budget was off by as much as the estimate is. The provider is asked (the model's upstream id, the client's
    ``anthropic-beta``, none of the fields counting does not take) and its count answered, still with no ledger row;
    the answer says which it is (``x-llmhub-token-count: provider``)."""
    request = {"system": "Be brief.", "messages": [{"role": "user", "content": "x" * 400}]}
    counted = client(gateway).messages.with_raw_response.count_tokens(
        model="claude-test", **request, extra_headers={"anthropic-beta": "token-counting-2024-11-01"}
    )
    billed = client(gateway).messages.create(model="claude-test", max_tokens=5, **request)

    assert counted.parse().input_tokens == billed.usage.input_tokens == 9
    assert prompt_tokens({**request, "model": "claude-test"}, operation=Operation.MESSAGES) > 100  # not the estimate
    assert counted.headers["x-llmhub-token-count"] == "provider"
    [asked] = [entry for entry in gateway.upstream.requests if entry["path"] == "/v1/messages/count_tokens"]
    assert asked["body"] == {**request, "model": "fake-claude-haiku"}
    assert asked["headers"]["anthropic-beta"] == "token-counting-2024-11-01"
    wait_for_record(billed._request_id)
    assert UsageRecord.objects.count() == 1  # the message's: counting is not charged


def test_count_tokens_of_a_claude_model_whose_provider_fails_is_the_estimate(gateway, caplog):
    """A provider that cannot count now (down, overloaded, slow past the deadline) does not fail the count: the
    client gets the estimate, as before, told so (``x-llmhub-token-count: estimate``), and the operator an INFO line
    naming the provider and its error."""
    ModelFactory(name="claude-down", provider=Provider.objects.get(name="fake-anthropic"), upstream_id="fault-500")
    request = {"model": "claude-down", "messages": [{"role": "user", "content": "x" * 400}]}
    with caplog.at_level(logging.INFO, logger="chat.pipeline"):
        counted = client(gateway).messages.with_raw_response.count_tokens(**request)

    assert counted.parse().input_tokens == prompt_tokens(request, operation=Operation.MESSAGES)
    assert counted.headers["x-llmhub-token-count"] == "estimate"
    assert gateway.upstream.stats["by_path"].get("/v1/messages/count_tokens") == 1
    [line] = [record for record in caplog.records if "count" in record.getMessage()]
    assert line.levelname == "INFO" and "fake-anthropic" in line.getMessage()
    assert "upstream_unavailable" in line.getMessage() and "x" * 20 not in line.getMessage()


@pytest.mark.usefixtures("breakers_closed_after")
@pytest.mark.parametrize("another", [False, True], ids=["alone", "with-another"])
def test_count_tokens_skips_an_anthropic_deployment_whose_breaker_is_open(gateway, settings, another):
    """count_tokens asked the model's first Anthropic deployment even with its circuit breaker open (a provider
    known down), so the client waited out the deadline for the estimate it could have had at once. A deployment
    whose breaker is open is not asked: the next Anthropic deployment of the model is, and with none the estimate is
    answered at once, no count asked of anyone."""
    settings.LLMHUB_BREAKER_FAILURES = 1
    settings.LLMHUB_BREAKER_COOLDOWN_SECONDS = 100
    provider = Provider.objects.get(name="fake-anthropic")
    model = CatalogModel.objects.create(name="claude-pair", strategy="priority", retries=0)
    down = Deployment.objects.create(model=model, name="down", provider=provider, upstream_id="fault-503")
    if another:
        Deployment.objects.create(
            model=model, name="up", provider=provider, upstream_id="fake-claude-haiku", priority=1
        )
    request = {"model": "claude-pair", "messages": [{"role": "user", "content": "x" * 400}]}
    with pytest.raises(anthropic.APIStatusError):
        client(gateway).messages.create(max_tokens=5, **request)
    wait_until(lambda: breaker_state(down.pk).state == OPEN, "the down deployment's breaker open")

    counted = client(gateway).messages.with_raw_response.count_tokens(**request)

    asked = [entry["body"]["model"] for entry in gateway.upstream.requests if entry["path"].endswith("count_tokens")]
    if another:
        assert counted.headers["x-llmhub-token-count"] == "provider"
        assert asked == ["fake-claude-haiku"]
    else:
        assert counted.headers["x-llmhub-token-count"] == "estimate"
        assert counted.parse().input_tokens == prompt_tokens(request, operation=Operation.MESSAGES)
        assert asked == []


def test_a_translated_stream_cut_midway_is_charged_the_ledgers_estimate_of_its_prompt(gateway):
    """An OpenAI-protocol model's stream counts its prompt only at its end: ``message_start`` holds an
    estimate, which a stream cut midway is charged. It was a second estimate's (non-ASCII tool input and
    schemas counted as escaped JSON); it is now the ledger's own."""
    body = {
        **TOOLS_ROUND_TRIP,
        "model": "gpt-test",
        "max_tokens": 50,
        "messages": [
            {"role": "user", "content": "Quel temps fait-il à Zürich ? [[words=9]] [[fault=cut-3]]"},
            TOOLS_ROUND_TRIP["messages"][1] | {"content": TOOLS_ROUND_TRIP["messages"][1]["content"][:2]},
            {"role": "user", "content": TOOLS_ROUND_TRIP["messages"][2]["content"][:1]},
        ],
    }
    reply, events = raw_events(gateway, body)
    assert events[-1][0] == "error"
    [opened] = [json.loads(data)["message"]["usage"] for name, data in events if name == "message_start"]
    record = wait_for_record(reply.headers["x-request-id"])
    estimate = prompt_tokens(body, operation=Operation.MESSAGES)
    assert opened["input_tokens"] == record.prompt_tokens == estimate
    assert record.status == "upstream_error" and record.usage_estimated


FILE_SOURCE = {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}
PDF = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}}


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": [PDF, {"type": "text", "text": "Summarise it."}]}]},
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "source": FILE_SOURCE}]}]},
    ],
)
def test_count_tokens_refuses_what_a_translated_model_refuses(gateway, change):
    """A request an OpenAI-protocol model cannot take (a PDF, a server tool, an image from Anthropic's Files API)
    was counted by ``count_tokens`` (200, a number), then refused by /v1/messages: a client that checks a
    request's size first learnt nothing. It is now refused with the 400 /v1/messages answers; an Anthropic model,
    which is sent the request as written, still gets a count (its provider's)."""
    body = {"messages": [{"role": "user", "content": "hi"}], **change}
    sdk = client(gateway)
    with pytest.raises(anthropic.BadRequestError) as counted:
        sdk.messages.count_tokens(model="gpt-test", **body)
    with pytest.raises(anthropic.BadRequestError) as sent:
        sdk.messages.create(model="gpt-test", max_tokens=2000, **body)
    assert counted.value.body == sent.value.body
    assert counted.value.body["error"]["type"] == "invalid_request_error"
    assert gateway.upstream.stats["requests"] == 0
    assert sdk.messages.count_tokens(model="claude-test", **body).input_tokens > 0
    assert gateway.upstream.stats["by_path"] == {"/v1/messages/count_tokens": 1}


def test_count_tokens_refuses_a_model_the_key_may_not_use(gateway):
    from billing.services.keys import api_key_create
    from providers.models import CatalogModel

    created = api_key_create(
        user=gateway.user, name="narrow", allowed_models=[CatalogModel.objects.get(name="gpt-test")]
    )
    # As a model that does not exist, and as /v1/messages refuses it (tests/gateway/test_model_access.py).
    with pytest.raises(anthropic.NotFoundError) as failed:
        client(gateway, api_key=created.secret).messages.count_tokens(
            model="claude-test", messages=[{"role": "user", "content": "hi"}]
        )
    assert failed.value.body["error"]["type"] == "not_found_error"
    assert failed.value.body["error"]["message"] == (
        "The model `claude-test` does not exist or you do not have access to it."
    )


def test_count_tokens_refuses_a_model_the_plan_does_not_include(gateway):
    from billing.models import Plan
    from billing.services.plans import plan_assign

    # Output at most $1 a million tokens, as the Free plan: gpt-test, not claude-test.
    plan_assign(user=gateway.user, plan=Plan.objects.create(name="Cheap", max_output_price_per_mtok=Decimal(1)))
    with pytest.raises(anthropic.NotFoundError) as failed:
        client(gateway).messages.count_tokens(model="claude-test", messages=[{"role": "user", "content": "hi"}])
    assert "Cheap" not in failed.value.body["error"]["message"]
    assert client(gateway).messages.count_tokens(model="gpt-test", messages=[{"role": "user", "content": "hi"}])


def test_count_tokens_refuses_an_embedding_model(gateway):
    from providers.models import ModelMode, Provider
    from tests.factories import ModelFactory

    ModelFactory(
        name="embed-test",
        provider=Provider.objects.get(name="fake-openai"),
        upstream_id="fake-embedding-small",
        mode=ModelMode.EMBEDDING,
    )
    with pytest.raises(anthropic.BadRequestError) as failed:
        client(gateway).messages.count_tokens(model="embed-test", messages=[{"role": "user", "content": "hi"}])
    assert "embedding model" in failed.value.body["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_a_body_that_is_not_json_is_refused_in_anthropics_words(gateway, path):
    response = httpx.post(
        gateway.url + path,
        content=b'{"model": "gpt-test", ',
        headers={"x-api-key": gateway.key, "anthropic-version": "2023-06-01", "content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    assert "OpenAI" not in error["message"]  # this is Anthropic's API, whatever the model speaks upstream


def test_an_api_llmhub_does_not_serve_is_anthropics_not_found_for_the_anthropic_sdk(gateway):
    """The anthropic SDK's calls of an API llmhub does not serve (its Files API, the legacy text completions of its
    older releases) were answered in OpenAI's shape with no ``request-id``: the SDK's ``NotFoundError`` had a body
    of another protocol and no request id. They are Anthropic's ``not_found_error``, as /v1/messages/* answers; an
    OpenAI client keeps OpenAI's 404 on the same path."""
    with pytest.raises(anthropic.NotFoundError) as failed:
        client(gateway).beta.files.list()
    assert failed.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "Not found: GET /v1/files"},
    }
    assert failed.value.request_id.startswith("req_")
    headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    legacy = httpx.post(gateway.url + "/v1/complete", json={"prompt": "hi"}, headers=headers)
    assert legacy.status_code == 404 and legacy.json()["error"]["type"] == "not_found_error"
    assert legacy.headers["request-id"] == legacy.headers["x-request-id"]

    with pytest.raises(openai.NotFoundError) as refused:
        gateway.client().files.list()
    assert refused.value.code == "unknown_url" and refused.value.body["type"] == "invalid_request_error"


def test_wrong_key_is_the_sdks_authentication_error(gateway):
    with pytest.raises(anthropic.AuthenticationError) as failed:
        client(gateway, api_key="sk-llmhub-aaaaaaaa-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").messages.create(
            model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert failed.value.body["type"] == "error"
    assert failed.value.body["error"]["type"] == "authentication_error"
    assert gateway.upstream.stats["requests"] == 0


def test_bearer_header_works_too(gateway):
    response = httpx.post(
        gateway.url + "/v1/messages",
        json={"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {gateway.key}", "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 200 and response.json()["type"] == "message"


def test_unknown_model_is_not_found_with_a_rejected_row(gateway):
    with pytest.raises(anthropic.NotFoundError) as failed:
        client(gateway).messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert failed.value.body["error"]["type"] == "not_found_error"
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.operation == "messages"


@pytest.mark.parametrize(
    "change",
    [{"extra_body": {"temperature": 3}}, {"messages": []}, {"messages": [{"role": "system", "content": "x"}]}],
)
def test_invalid_request_is_the_sdks_bad_request_error(gateway, change):
    body = {"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(anthropic.BadRequestError) as failed:
        client(gateway).messages.create(**body)
    assert failed.value.body["error"]["type"] == "invalid_request_error"
    assert gateway.upstream.stats["requests"] == 0


def test_missing_max_tokens_is_a_bad_request(gateway):
    response = httpx.post(
        gateway.url + "/v1/messages",
        json={"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": gateway.key},
    )
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


def test_rate_limited_key_gets_the_sdks_rate_limit_error(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, rpm=1)
    sdk = client(gateway)
    sdk.messages.create(model="gpt-test", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.RateLimitError) as failed:
        sdk.messages.create(model="gpt-test", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert failed.value.body["error"]["type"] == "rate_limit_error"
    assert failed.value.response.headers.get("retry-after")


def test_exhausted_budget_is_a_rate_limit_error_before_any_upstream_call(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.0001"))
    with pytest.raises(anthropic.RateLimitError):
        client(gateway).messages.create(
            model="claude-test", max_tokens=4000, messages=[{"role": "user", "content": "hi"}]
        )
    assert gateway.upstream.stats["requests"] == 0


def test_upstream_failure_mid_stream_is_an_error_event_the_sdk_raises(gateway):
    with pytest.raises(anthropic.APIStatusError) as failed:
        with client(gateway).messages.stream(
            model="gpt-test", max_tokens=50, messages=[{"role": "user", "content": "[[words=9]] [[fault=cut-3]]"}]
        ) as stream:
            for _ in stream:
                pass
    assert failed.value.body["type"] == "error"


def test_model_not_allowed_for_the_key_is_not_found(gateway):
    from billing.services.keys import api_key_create
    from providers.models import CatalogModel

    created = api_key_create(
        user=gateway.user, name="narrow", allowed_models=[CatalogModel.objects.get(name="gpt-test")]
    )
    with pytest.raises(anthropic.NotFoundError):
        client(gateway, api_key=created.secret).messages.create(
            model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )


@pytest.mark.parametrize("model", MODELS)
def test_overloaded_upstream_is_the_sdks_overloaded_error(gateway, model):
    with pytest.raises(anthropic.OverloadedError) as failed:
        client(gateway).messages.create(
            model=model, max_tokens=5, messages=[{"role": "user", "content": "hi [[fault=529]]"}]
        )
    assert failed.value.status_code == 529 and failed.value.body["error"]["type"] == "overloaded_error"
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert record.status == "upstream_error" and record.operation == "messages"


@pytest.mark.parametrize("model", MODELS)
def test_an_upstream_that_times_out_is_anthropics_timeout_error(gateway, model):
    """A provider that did not answer in time: a 504, as Anthropic answers a request that timed out, but typed
    ``api_error`` where Anthropic's errors (and its SDK's ``ErrorObject``) say ``timeout_error``."""
    from providers.models import Provider

    provider = Provider.objects.get(name="fake-anthropic" if model == "claude-test" else "fake-openai")
    provider.timeout_seconds = 1
    provider.save()  # an admin save: the catalog cache of this process forgets the old config at once
    with pytest.raises(anthropic.InternalServerError) as failed:
        client(gateway).messages.create(
            model=model, max_tokens=5, messages=[{"role": "user", "content": "hi [[fault=hang]]"}]
        )
    assert failed.value.status_code == 504
    assert failed.value.body["type"] == "error" and failed.value.body["error"]["type"] == "timeout_error"
    record = wait_for_record(failed.value.response.headers["request-id"])
    assert record.status == "upstream_error" and record.operation == "messages"


def test_an_error_event_after_the_stream_began_reaches_the_sdk(gateway):
    failing = [{"role": "user", "content": "x [[fault=error-event]]"}]
    reply, events = raw_events(gateway, {"model": "claude-test", "max_tokens": 50, "messages": failing})
    assert reply.status_code == 200
    name, data = events[-1]
    assert name == "error" and json.loads(data)["type"] == "error"
    assert "message_stop" not in [name for name, _ in events]
    record = wait_for_record(reply.headers["x-request-id"])
    assert record.status == "upstream_error" and record.operation == "messages"


def test_a_claude_streams_overloaded_error_event_reaches_the_sdk_as_overloaded(gateway):
    """Anthropic reports an overload after a stream began as an in-band ``overloaded_error`` (its documented example
    of an error after a 200), which llmhub relayed as ``api_error``: a client that retries an overloaded model
    later, by the error's type, took it for a server error. The event says ``overloaded_error``, as the 529 before a
    stream does, and the ledger row says why it failed."""
    failing = {
        "model": "claude-test",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "x [[fault=error-event]]"}],
    }
    with pytest.raises(anthropic.APIStatusError) as failed:
        with client(gateway).messages.stream(**failing) as stream:
            for _ in stream:
                pass
    assert failed.value.body["type"] == "error"
    assert failed.value.body["error"]["type"] == "overloaded_error"
    assert "Overloaded" in failed.value.body["error"]["message"]
    record = wait_for_record(failed.value.request_id)
    assert (record.status, record.error_type) == ("upstream_error", "upstream_overloaded")


def test_cached_input_is_priced_at_the_cached_rate(gateway):
    from providers.models import Deployment

    Deployment.objects.filter(model__name="claude-test").update(cached_input_per_mtok=Decimal("0.08"))
    raw = client(gateway).messages.with_raw_response.create(
        model="claude-test", max_tokens=20, messages=[{"role": "user", "content": "a b c d e f [[cache=4]]"}]
    )
    message = raw.parse()
    assert message.usage.cache_read_input_tokens == 4
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.cached_tokens == 4 and record.prompt_tokens == message.usage.input_tokens + 4
    expected = (
        Decimal(message.usage.input_tokens) * Decimal("0.80")
        + 4 * Decimal("0.08")
        + Decimal(message.usage.output_tokens) * Decimal("4.00")
    ) / MILLION
    assert record.cost == expected.quantize(Decimal("0.0000000001"))


def test_plain_http_refusal_speaks_each_protocols_shape():
    from llmhub.handlers import TransportSecurity

    assert json.loads(TransportSecurity.refusal("/v1/messages").content)["error"]["type"] == "permission_error"
    assert json.loads(TransportSecurity.refusal("/v1/chat/completions").content)["error"]["code"] == "https_required"


@pytest.mark.parametrize("stream", [False, True])
def test_beta_header_reaches_an_anthropic_provider(gateway, stream):
    body = {"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    headers = {"x-api-key": gateway.key, "anthropic-beta": "interleaved-thinking-2025-05-14"}
    response = httpx.post(gateway.url + "/v1/messages", json=body, headers=headers)
    assert response.status_code == 200
    [sent] = [entry["headers"] for entry in gateway.upstream.requests if entry["path"] == "/v1/messages"]
    assert sent["anthropic-beta"] == "interleaved-thinking-2025-05-14"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]},
        {"messages": [{"role": "user", "content": ["not a block"]}]},
        {"messages": [{"role": "user"}]},
        {"system": [{"type": "text"}]},
        {"max_tokens": 0},
        {"max_tokens": "5"},
        {"tool_choice": {"type": "tool"}},
        {"tools": [{"description": "no name"}]},
        {"tools": [{"name": "lookup", "input_schema": "an object"}]},
        {"metadata": "u-1"},
        {"metadata": {"user_id": 7}},
        {"thinking": "on"},
        {"stream": "yes"},
    ],
)
def test_malformed_bodies_are_400s_in_anthropics_shape(gateway, model, change):
    body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **change}
    response = httpx.post(gateway.url + "/v1/messages", json=body, headers={"x-api-key": gateway.key})
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
    assert gateway.upstream.stats["requests"] == 0


@pytest.mark.parametrize("payload", [b"[]", b"not json", b'"text"', b"{}"])
def test_bodies_that_are_not_a_messages_object_are_400s(gateway, payload):
    response = httpx.post(
        gateway.url + "/v1/messages",
        content=payload,
        headers={"x-api-key": gateway.key, "content-type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_document_block_is_refused_for_a_translated_model_but_reaches_an_anthropic_one(gateway):
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Notes."}}
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": [document, {"type": "text", "text": "hi"}]}]}
    headers = {"x-api-key": gateway.key}
    refused = httpx.post(gateway.url + "/v1/messages", json={**body, "model": "gpt-test"}, headers=headers)
    assert refused.status_code == 400 and "document" in refused.json()["error"]["message"]
    assert httpx.post(gateway.url + "/v1/messages", json={**body, "model": "claude-test"}, headers=headers).is_success


TOOL_CALL = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}


@pytest.mark.parametrize(
    ("change", "where", "words"),
    [
        ({"messages": [{"role": "user", "content": [PDF]}]}, "messages.0.content.0.type", "'document'"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0", "client tools"),
        ({"messages": [{"role": "user", "content": [TOOL_CALL]}]}, "messages.0.content.0.type", "assistant message"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Paris"},
                    {"role": "assistant", "content": [TOOL_CALL]},
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "toolu_1",
                                "content": [{"type": "image", "source": FILE_SOURCE}],
                            }
                        ],
                    },
                ]
            },
            "messages.2.content.0.content.0.source",
            "base64 or url",
        ),
    ],
)
def test_what_a_translated_model_cannot_take_is_refused_naming_the_field(gateway, change, where, words):
    """The Messages API's errors have no ``param``: a 400 of the translation for an OpenAI-protocol model said
    "Expected text blocks only." or "Content blocks of type 'tool_use' are not supported by this model." without
    saying where (a tool_use block sent in a user turn is not a block the model cannot take). It now begins with the
    field, as Anthropic's and the validation's own 400s do (``messages.0.content.0.type: …``)."""
    body = {"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **change}
    response = httpx.post(gateway.url + "/v1/messages", json=body, headers={"x-api-key": gateway.key})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{where}: ")
    assert words in error["message"]
    assert gateway.upstream.stats["requests"] == 0
    record = wait_for_record(response.headers["request-id"])
    assert record.status == "invalid" and record.operation == "messages"


@pytest.mark.parametrize("model", MODELS)
def test_client_gone_mid_stream_writes_one_estimated_row(gateway, model):
    deltas = 0
    body = {
        "model": model,
        "max_tokens": 1000,
        "stream": True,
        "messages": [{"role": "user", "content": "[[words=400]] [[tps=40]]"}],
    }
    with (
        httpx.Client(timeout=20) as http,
        http.stream("POST", gateway.url + "/v1/messages", json=body, headers={"x-api-key": gateway.key}) as response,
    ):
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            deltas += line == "event: content_block_delta"
            if deltas >= 5:
                break
    # Leaving both context managers closes the connection mid-stream.
    record = wait_for_record(request_id, timeout=15)
    settle_quietly()
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1
    assert record.status == "client_disconnected" and record.operation == "messages"
    assert record.usage_estimated is True and 5 <= record.completion_tokens < 60
    assert record.cost == expected_cost(model, record)


async def test_async_client_gets_the_sdks_error_classes(gateway):
    sdk = async_client(gateway)
    with pytest.raises(anthropic.NotFoundError):
        await sdk.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError):
        await sdk.messages.create(model="gpt-test", max_tokens=5, messages=[])
    bad_key = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="sk-llmhub-x", max_retries=0, timeout=20)
    with pytest.raises(anthropic.AuthenticationError):
        async with bad_key.messages.stream(
            model="gpt-test", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            await stream.get_final_message()
    await sdk.close()
    await bad_key.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_translated_model_whose_upstream_reports_no_usage_is_charged_an_estimate(gateway, stream):
    """An OpenAI-compatible server that reports no usage, behind /v1/messages: the translated message said 0
    output tokens and the request was free. It is now counted (the row flagged as an estimate), and the
    client reads what it was charged."""
    sdk = client(gateway)
    messages = [{"role": "user", "content": "count me [[words=10]] [[usage=none]]"}]
    if stream:
        with sdk.messages.stream(model="gpt-test", max_tokens=50, messages=messages) as events:
            assert "".join(events.text_stream)
            final = events.get_final_message()
            request_id = events.response.headers["x-request-id"]
    else:
        raw = sdk.messages.with_raw_response.create(model="gpt-test", max_tokens=50, messages=messages)
        final, request_id = raw.parse(), raw.headers["x-request-id"]

    record = wait_for_record(request_id)
    assert record.usage_estimated and record.prompt_tokens > 0 and record.completion_tokens > 0 and record.cost > 0
    assert final.usage.output_tokens == record.completion_tokens
    if not stream:
        assert final.usage.input_tokens == record.prompt_tokens


@pytest.mark.parametrize("kind", ["server_tool_use", "mcp_tool_use"])
def test_a_message_that_only_calls_a_server_or_mcp_tool_is_estimated_at_its_input_as_a_tool_use_is(kind):
    """A whole message from an upstream that counted no output (0 output tokens) is counted from what it wrote
    (``_message_written``): a web search's query or an MCP tool's input is the model's words as a tool_use's
    input is, so it is counted the same, not taken for an empty message whose 0 is the provider's count. The
    fake upstream answers no server or MCP tool call, hence the function."""
    call = {"id": "toolu_01", "name": "web_search", "input": {"query": "weather in Paris this weekend, in detail"}}
    usage = {"input_tokens": 12, "output_tokens": 0}
    tool_use = {"role": "assistant", "content": [{"type": "tool_use", **call}]}
    message = {"role": "assistant", "content": [{"type": kind, **call, "server_name": "s"}]}

    written = _message_written(message)
    assert written == _message_written(tool_use) == json.dumps(call["input"])
    assert text_tokens(written) > 0 and _reported_usage(usage, written) == {}  # counted, not the upstream's 0


def test_a_tool_results_images_reach_a_translated_model(gateway):
    """A tool_result whose content is text and an image (a screenshot tool, a chart): the translated model was
    sent the text alone. The image now follows the tool message, in the user turn."""
    chart = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    chart_url = "image/png;base64,iVBORw0KGgo="
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    answer = client(gateway).messages.create(
        model="gpt-test",
        max_tokens=50,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Paris"},
            {"role": "assistant", "content": [call]},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "is_error": True,
                        "content": [{"type": "text", "text": "no data, see the map"}, chart],
                    }
                ],
            },
        ],
    )
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/chat/completions"]
    assert sent["messages"][2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: no data, see the map"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:" + chart_url}}]},
    ]
    assert answer.type == "message" and answer.content


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("content", "where"),
    [("", "messages.1"), ([], "messages.1"), ([{"type": "text", "text": ""}], "messages.1.content.0.text")],
)
def test_empty_content_is_refused_before_any_upstream_call(gateway, model, content, where):
    """Anthropic refuses a message without content (but a final assistant prefill) and an empty text block. A
    translated model was sent the empty turn (answered and charged), or, for an empty list, refused in OpenAI's
    words about an array the client never sent; a native one was sent it to be refused upstream."""
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": content},
        {"role": "user", "content": "again"},
    ]
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(gateway).messages.create(model=model, max_tokens=5, messages=messages)
    error = refused.value.body["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{where}: ")
    assert "empty" in error["message"]
    assert gateway.upstream.stats["requests"] == 0
    record = wait_for_record(refused.value.response.headers["request-id"])
    assert record.status == "rejected" and record.operation == "messages"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("tool_input", "problem"),
    [("Paris", "valid dictionary"), (["Paris"], "valid dictionary"), (None, "Field required")],
)
def test_a_tool_use_block_whose_input_is_not_an_object_is_refused(gateway, model, tool_input, problem):
    """A tool_use block's ``input`` is the call's arguments, an object (Anthropic refuses any other: "Input should be
    a valid dictionary"). A translated model was sent it as arguments that are no object (a missing one as ``{}``),
    and answered; a native one was sent it to be refused upstream. Both are now refused before any upstream call."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather"}
    if tool_input is not None:
        call["input"] = tool_input
    messages = [
        {"role": "user", "content": "Paris"},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"}]},
    ]
    body = {"model": model, "max_tokens": 5, "tools": [WEATHER], "messages": messages}
    response = httpx.post(gateway.url + "/v1/messages", json=body, headers={"x-api-key": gateway.key})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("messages.1.content.0.input: ") and problem in error["message"]
    assert gateway.upstream.stats["requests"] == 0
    record = wait_for_record(response.headers["request-id"])
    assert record.status == "rejected" and record.operation == "messages"


@pytest.mark.parametrize("model", MODELS)
def test_two_tools_of_one_name_are_refused(gateway, model):
    """Anthropic refuses tools of the same name ("tools: Tool names must be unique."): a call names its tool, and
    which of the two it meant no one can tell. A translated model was sent both and answered with a call to one."""
    other = {**WEATHER, "description": "Another tool of the same name."}
    body = {"model": model, "max_tokens": 5, "tools": [WEATHER, other], "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(gateway).messages.create(**body)
    assert refused.value.body["error"]["message"] == "tools: Tool names must be unique (get_weather is given twice)"
    assert gateway.upstream.stats["requests"] == 0
    record = wait_for_record(refused.value.response.headers["request-id"])
    assert record.status == "rejected" and record.operation == "messages"


@pytest.mark.parametrize("model", MODELS)
def test_an_empty_final_assistant_message_is_accepted(gateway, model):
    messages = [{"role": "user", "content": "[[reply=fine]]"}, {"role": "assistant", "content": ""}]
    assert client(gateway).messages.create(model=model, max_tokens=5, messages=messages).type == "message"


def test_a_native_stream_cut_midway_is_charged_the_prompt_the_provider_counted(gateway):
    """Anthropic counts the prompt in ``message_start`` (the tokens read from its cache apart). A stream cut
    after it was charged an estimate of the whole prompt at the input price, the cached part too; it is now
    charged the provider's count, its cached tokens at the cached price, and an estimate of what was relayed."""
    from providers.models import Deployment

    Deployment.objects.filter(model__name="claude-test").update(cached_input_per_mtok=Decimal("0.08"))
    words = " ".join(f"w{n}" for n in range(200))
    body = {
        "model": "claude-test",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": f"{words} [[words=9]] [[cache=150]] [[fault=cut-3]]"}],
    }
    reply, events = raw_events(gateway, body)
    assert events[-1][0] == "error"
    [opened] = [json.loads(data)["message"]["usage"] for name, data in events if name == "message_start"]
    relayed = "".join(json.loads(data)["delta"]["text"] for name, data in events if name == "content_block_delta")
    record = wait_for_record(reply.headers["x-request-id"])
    assert record.status == "upstream_error" and record.usage_estimated
    assert (record.prompt_tokens, record.cached_tokens) == (opened["input_tokens"] + 150, 150)
    assert record.completion_tokens == text_tokens(relayed)
    expected = (
        Decimal(opened["input_tokens"]) * Decimal("0.80")
        + 150 * Decimal("0.08")
        + Decimal(record.completion_tokens) * Decimal("4.00")
    ) / MILLION
    assert record.cost == expected.quantize(Decimal("0.0000000001"))


def test_a_host_outside_allowed_hosts_is_refused_in_anthropics_shape_with_a_request_id(gateway):
    response = httpx.post(
        gateway.url + "/v1/messages",
        json={"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": gateway.key, "Host": "evil.example"},
    )
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Invalid Host header."},
    }
    assert response.headers["request-id"].startswith("req_")
    assert gateway.upstream.stats["requests"] == 0


def refused_before_any_upstream_call(gateway, body: dict) -> str:
    """The 400's message, once it is known to be in Anthropic's shape, with nothing sent upstream and one
    ``rejected`` row written."""
    response = httpx.post(gateway.url + "/v1/messages", json=body, headers={"x-api-key": gateway.key})
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert gateway.upstream.stats["requests"] == 0
    record = wait_for_record(response.headers["request-id"])
    assert record.status == "rejected" and record.operation == "messages"
    return error["message"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_time"}},
            "tool_choice.name: Tool 'get_time' not found in provided tools",
        ),
        (
            {"tool_choice": {"type": "tool", "name": "get_weather"}},
            "tool_choice: A tool_choice of type 'tool' requires tools",
        ),
        ({"tool_choice": {"type": "any"}}, "tool_choice: A tool_choice of type 'any' requires tools"),
        ({"tools": [], "tool_choice": {"type": "any"}}, "tool_choice: A tool_choice of type 'any' requires tools"),
    ],
)
def test_a_tool_choice_no_given_tool_can_meet_is_refused(gateway, model, change, message):
    """Anthropic refuses a tool_choice naming a tool not in ``tools``, and one that forces a call (any, tool) with
    no tools, after the call; a translated model was sent the first (OpenAI-compatible servers answer it as they
    please) and had the second dropped with the tools, answering free text. Both are refused before any call."""
    body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **change}
    assert refused_before_any_upstream_call(gateway, body) == message


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("thinking", [{"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"}])
@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (
            {"temperature": 0.5},
            "temperature: `temperature` may only be set to 1 when thinking is enabled or in adaptive mode",
        ),
        ({"top_p": 0.9}, "top_p: `top_p` must be greater than or equal to 0.95 or unset when thinking is enabled"),
        ({"top_k": 40}, "top_k: `top_k` must be unset when thinking is enabled"),
    ],
)
def test_a_sampling_parameter_claude_cannot_think_with_is_refused_for_every_model(
    gateway, model, thinking, sampling, message
):
    """Anthropic's extended thinking takes no temperature but 1, no ``top_p`` under 0.95 and no ``top_k``, and
    refuses them (its 400 after the call); a translated model took them (``top_k`` dropped without a word), so the
    same request worked on one model and not the next. Refused alike before any upstream call, naming the field."""
    body = {
        "model": model,
        "max_tokens": 2048,
        "thinking": thinking,
        "messages": [{"role": "user", "content": "hi"}],
        **sampling,
    }
    assert refused_before_any_upstream_call(gateway, body) == message


@pytest.mark.parametrize("model", MODELS)
def test_the_sampling_claude_thinks_with_is_taken(gateway, model):
    """What Anthropic takes with thinking (temperature 1, ``top_p`` of 0.95 or more) goes through, and without thinking
    every sampling parameter does."""
    ask = {"model": model, "max_tokens": 2048, "messages": [{"role": "user", "content": "hi"}]}
    thinking = {"type": "enabled", "budget_tokens": 1024}
    # This SDK's signature no longer takes the sampling parameters; the API still does.
    thought = client(gateway).messages.create(**ask, thinking=thinking, extra_body={"temperature": 1, "top_p": 0.95})
    sampled = client(gateway).messages.create(**ask, extra_body={"temperature": 0.2, "top_p": 0.5, "top_k": 5})
    assert thought.type == sampled.type == "message"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("is_error", ["true", 1, {"code": 500}])
def test_a_tool_result_whose_is_error_is_not_a_boolean_is_refused(gateway, model, is_error):
    """``is_error`` is a boolean (Anthropic: "Input should be a valid boolean"); a translated model read any truthy
    value as an error, and ``"false"`` as one too."""
    messages = [
        {"role": "user", "content": "Paris"},
        {"role": "assistant", "content": [TOOL_CALL]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C", "is_error": is_error}],
        },
    ]
    body = {"model": model, "max_tokens": 5, "tools": [WEATHER], "messages": messages}
    message = refused_before_any_upstream_call(gateway, body)
    assert message == "messages.2.content.0.is_error: Input should be a valid boolean"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("system", "message"),
    [
        ([{"type": "text", "text": ""}], "system.0.text: text content blocks must be non-empty"),
        (
            [{"type": "text", "text": "Be brief."}, {"type": "image", "source": FILE_SOURCE}],
            "system.1.type: Input should be 'text'",
        ),
    ],
)
def test_an_empty_or_non_text_system_block_is_refused(gateway, model, system, message):
    """The system prompt is text blocks, none empty (Anthropic refuses others after the call); a translated model
    was sent an empty one's blank lines, and a non-text block was refused as the translation's ``invalid`` 400."""
    body = {"model": model, "max_tokens": 5, "system": system, "messages": [{"role": "user", "content": "hi"}]}
    assert refused_before_any_upstream_call(gateway, body) == message


@pytest.mark.parametrize("model", MODELS)
def test_an_empty_text_block_in_a_tool_result_is_refused(gateway, model):
    """Anthropic refuses an empty text block wherever it is, a tool_result's too ("text content blocks must be
    non-empty"). A translated model was sent the tool's empty answer (and answered, and was charged); a native one was
    sent it to be refused upstream. Both are now refused before any upstream call, naming the block."""
    messages = [
        {"role": "user", "content": "Paris"},
        {"role": "assistant", "content": [TOOL_CALL]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "18 C"}, {"type": "text", "text": ""}],
                }
            ],
        },
    ]
    body = {"model": model, "max_tokens": 5, "tools": [WEATHER], "messages": messages}
    message = refused_before_any_upstream_call(gateway, body)
    assert message == "messages.2.content.0.content.1.text: text content blocks must be non-empty"


MCP_SERVER = {"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}


@pytest.mark.parametrize(
    ("field", "create"),
    [
        (
            "mcp_servers",
            lambda sdk, **request: sdk.beta.messages.create(
                **request, mcp_servers=[MCP_SERVER], betas=["mcp-client-2025-04-04"]
            ),
        ),
        ("container", lambda sdk, **request: sdk.messages.create(**request, container="container_011CNh")),
        (
            "context_management",
            lambda sdk, **request: sdk.beta.messages.create(
                **request,
                context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
                betas=["context-management-2025-06-27"],
            ),
        ),
    ],
)
def test_an_anthropic_only_feature_is_refused_for_a_translated_model(gateway, field, create):
    """MCP servers (their tools called by Anthropic), a code-execution container and context editing are Anthropic's
    own; a translated model had them dropped without a word and answered as if they had not been asked for (no MCP
    tool, no container, the whole context). Each is now a 400 naming its field before any upstream call, with its
    ledger row, for a translated model; an Anthropic-protocol one gets them as the client wrote them."""
    request = {"model": "gpt-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.BadRequestError) as refused:
        create(client(gateway), **request)
    error = refused.value.body["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{field}: "), error
    assert gateway.upstream.stats["requests"] == 0
    record = wait_for_record(refused.value.response.headers["request-id"])
    assert record.operation == "messages" and record.status == "invalid" and record.cost == 0
    assert UsageRecord.objects.count() == 1

    counted = httpx.post(
        gateway.url + "/v1/messages/count_tokens",
        content=refused.value.response.request.content,  # what the SDK sent: count_tokens answers the same 400
        headers={"x-api-key": gateway.key},
    )
    assert counted.status_code == 400 and counted.json()["error"]["message"] == error["message"]

    create(client(gateway), **{**request, "model": "claude-test"})
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/messages"]
    assert field in sent


FIVE_STOPS = ["one", "two", "three", "four", "five"]


def test_more_stop_sequences_than_openai_takes_are_refused_naming_stop_sequences(gateway):
    """OpenAI's own API takes at most 4 stop strings (its ``stop``: "Up to 4 sequences") and answered more with its
    400 naming ``stop``, a field the /v1/messages client never sent; Anthropic takes more. A model on OpenAI's API is
    refused before any upstream call, naming ``stop_sequences`` in Anthropic's shape, with its ledger row, and
    count_tokens answers the same 400; a server that takes more (vLLM and other OpenAI-compatible ones) and a Claude
    model still get them."""
    openai_itself = ProviderFactory(
        name="openai-itself", kind=ProviderKind.OPENAI, base_url=gateway.upstream.base_url + "/v1"
    )
    ModelFactory(name="gpt-openai", provider=openai_itself, upstream_id="fake-gpt-4o-mini")
    request = {"model": "gpt-openai", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}

    with pytest.raises(anthropic.BadRequestError) as refused:
        client(gateway).messages.create(**request, stop_sequences=FIVE_STOPS)

    error = refused.value.body["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("stop_sequences: "), error
    assert "at most 4" in error["message"]
    assert gateway.upstream.stats["requests"] == 0
    record = wait_for_record(refused.value.response.headers["request-id"])
    assert record.operation == "messages" and record.status == "invalid" and record.cost == 0
    counted = httpx.post(
        gateway.url + "/v1/messages/count_tokens",
        json={key: value for key, value in {**request, "stop_sequences": FIVE_STOPS}.items() if key != "max_tokens"},
        headers={"x-api-key": gateway.key},
    )
    assert counted.status_code == 400 and counted.json()["error"]["message"] == error["message"]

    assert client(gateway).messages.create(**request, stop_sequences=FIVE_STOPS[:4]).type == "message"
    for model in ("gpt-test", "claude-test"):
        assert (
            client(gateway).messages.create(**request | {"model": model}, stop_sequences=FIVE_STOPS).type == "message"
        )
    sent = [entry["body"] for entry in gateway.upstream.requests]
    assert [body.get("stop") or body.get("stop_sequences") for body in sent] == [FIVE_STOPS[:4], FIVE_STOPS, FIVE_STOPS]


def test_a_data_residency_request_is_refused_for_a_translated_model(gateway):
    """``inference_geo`` asks for the model to run in a region (data residency). A translated model had it dropped
    without a word and was served wherever its provider runs it; it is now a 400 naming the field before any upstream
    call, with its ledger row. An Anthropic-protocol model gets it as the client wrote it."""
    request = {"model": "gpt-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(gateway).messages.create(**request, inference_geo="us")
    error = refused.value.body["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("inference_geo: "), error
    assert gateway.upstream.stats["requests"] == 0
    record = wait_for_record(refused.value.response.headers["request-id"])
    assert record.operation == "messages" and record.status == "invalid" and record.cost == 0

    client(gateway).messages.create(**{**request, "model": "claude-test"}, inference_geo="us")
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/messages"]
    assert sent["inference_geo"] == "us"


def test_no_residency_asked_global_is_served_by_a_translated_model(gateway):
    """``inference_geo: "global"`` is Anthropic's default, inference "in any available geography": no constraint, which
    some clients send on every request. A translated model refused it as a region it could not honour; it is answered,
    the field not sent to its provider (which has none), and an Anthropic-protocol model still gets it as written."""
    request = {"model": "gpt-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}

    reply = client(gateway).messages.create(**request, inference_geo="global")
    with client(gateway).messages.stream(**request, inference_geo="global") as stream:
        streamed = stream.get_final_message()

    assert reply.content[0].text == "Echo: hi" and streamed.content[0].text == "Echo: hi"
    sent = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/chat/completions"]
    assert len(sent) == 2 and not [body for body in sent if "inference_geo" in body]

    client(gateway).messages.create(**{**request, "model": "claude-test"}, inference_geo="global")
    [sent_to_claude] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/messages"]
    assert sent_to_claude["inference_geo"] == "global"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("server", "stop_reason", "stop_sequence"),
    [("vllm", "stop_sequence", "END"), ("openai", "end_turn", None)],
)
def test_a_translated_model_that_stopped_at_a_stop_sequence_says_which(
    gateway, stream, server, stop_reason, stop_sequence
):
    """A client that sends ``stop_sequences`` reads ``stop_reason: "stop_sequence"`` and the ``stop_sequence`` that
    matched. A translated model's reply never said so: OpenAI's ``finish_reason`` is ``stop`` for a stop string and
    for the model's own end alike. Servers that tell them apart (vLLM's ``stop_reason``, the stop string matched) are
    now read; from one that does not (OpenAI's), ``end_turn`` and no ``stop_sequence``, as before: which of the two it
    was cannot be told (the reply, cut before the string, holds none)."""
    marker = " [[stop_reason=vllm]]" if server == "vllm" else ""
    request = {
        "model": "gpt-test",
        "max_tokens": 50,
        "stop_sequences": ["END", "STOP"],
        "messages": [{"role": "user", "content": f"[[reply=one two END three]]{marker}"}],
    }
    message = message_of(gateway, request, stream=stream)
    assert message.content[0].text == "one two "
    assert (message.stop_reason, message.stop_sequence) == (stop_reason, stop_sequence)


def test_a_strict_tool_reaches_a_translated_model_strict(gateway):
    """A tool marked ``strict`` has its calls' input held to its schema; OpenAI's function tools take the same
    ``strict``. It was dropped on the way to an OpenAI-protocol model, whose calls were then free to stray from the
    schema the client relies on; it now goes with the function."""
    strict_weather = {
        **WEATHER,
        "strict": True,
        "input_schema": {**WEATHER["input_schema"], "additionalProperties": False},
    }
    client(gateway).messages.create(
        model="gpt-test",
        max_tokens=50,
        tools=[strict_weather, {**WEATHER, "name": "get_time"}],
        messages=[{"role": "user", "content": "Paris"}],
    )
    [sent] = [entry["body"] for entry in gateway.upstream.requests if entry["path"] == "/v1/chat/completions"]
    assert sent["tools"][0]["function"]["strict"] is True
    assert "strict" not in sent["tools"][1]["function"]


REFUSED = "I'm sorry, I can't help with that."


@pytest.mark.parametrize("stream", [False, True])
def test_a_translated_models_refusal_is_anthropics_refusal_whole_and_streamed(gateway, stream):
    """An OpenAI model that refuses (structured outputs' safety refusal) says so in ``refusal``, its ``content``
    null, with ``finish_reason`` ``stop``. A Messages client reads a refusal as ``stop_reason: "refusal"``. The whole
    reply ended ``end_turn`` (its text was the refusal's, which a client parsing the schema then failed on); streamed,
    the refusal was dropped: an empty message that ended ``end_turn``. Both now give the refusal's text and end with
    ``stop_reason: "refusal"``."""
    raw = openai_reply(
        "chatcmpl-refused",
        message={"role": "assistant", "content": None, "refusal": REFUSED},
        deltas=[
            {"role": "assistant", "content": None, "refusal": ""},
            {"refusal": "I'm sorry, "},
            {"refusal": "I can't help with that."},
        ],
        stream=stream,
    )
    request = {
        "model": "gpt-test",
        "max_tokens": 50,
        "output_config": {"format": {"type": "json_schema", "schema": CITY_SCHEMA}},
        "messages": [{"role": "user", "content": "hi " + raw_directive(raw)}],
    }
    message = message_of(gateway, request, stream=stream)
    assert [(block.type, block.text) for block in message.content] == [("text", REFUSED)]
    assert message.stop_reason == "refusal"


@pytest.mark.parametrize("stream", [False, True])
def test_a_translated_tool_call_ending_stop_is_a_tool_use_stop(gateway, stream):
    """OpenAI answers a call the request forced (``tool_choice`` a named function, as a Messages ``tool`` choice
    becomes) with ``finish_reason: "stop"``, not ``tool_calls``; vLLM too. A Messages client runs its tools while
    ``stop_reason`` is ``tool_use``: it got ``end_turn`` beside the tool_use block, and its loop ended with the call
    unanswered. A reply that calls a tool now ends ``tool_use`` whatever finish the server gave it."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    raw = openai_reply(
        "chatcmpl-forced",
        message={"role": "assistant", "content": None, "tool_calls": [call]},
        deltas=[
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call, "index": 0, "function": {**call["function"], "arguments": ""}}],
            },
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]},
        ],
        stream=stream,
    )
    request = {
        "model": "gpt-test",
        "max_tokens": 50,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [{"role": "user", "content": "Paris " + raw_directive(raw)}],
    }
    message = message_of(gateway, request, stream=stream)
    [tool_use] = message.content
    assert (tool_use.type, tool_use.name, tool_use.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert message.stop_reason == "tool_use"
