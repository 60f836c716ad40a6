"""``resume_on_failure`` on Anthropic's Messages API (``/v1/messages``): a stream cut after its first events
goes on from the next deployment, given the text so far as an assistant prefill, and the client sees one
message. Through the official ``anthropic`` SDK against a live llmhub and the fake upstream, whose
``fault-cut-3`` model streams three text deltas and then drops the connection."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import anthropic
import pytest

from chat.pipeline import _MessagesSplice, _prefill_for
from providers.adapters.base import WireEvent
from providers.models import CatalogModel, Deployment, ProviderKind
from tests.factories import ProviderFactory
from tests.gateway.test_messages_api import assert_anthropic_sequence, raw_events
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

PRICES = {"input_per_mtok": Decimal("1.00"), "output_per_mtok": Decimal("2.00")}
ASK = [{"role": "user", "content": "hello there [[words=8]]"}]


def resumable(fake_upstream, kind: str, *, resume: bool = True) -> CatalogModel:
    """``resumable``: ``first`` (cut after three deltas) then ``second`` (healthy), both of ``kind``."""
    base_url = fake_upstream.base_url if kind == ProviderKind.ANTHROPIC else fake_upstream.base_url + "/v1"
    upstream = "fake-claude-haiku" if kind == ProviderKind.ANTHROPIC else "fake-gpt-4o-mini"
    model = CatalogModel.objects.create(name="resumable", strategy="priority", resume_on_failure=resume)
    for priority, (name, upstream_id) in enumerate((("first", "fault-cut-3"), ("second", upstream))):
        provider = ProviderFactory(name=f"{name}-{kind}", kind=kind, base_url=base_url)
        Deployment.objects.create(
            model=model, name=name, provider=provider, upstream_id=upstream_id, priority=priority, **PRICES
        )
    return model


def sdk(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=30)


@pytest.mark.parametrize("kind", [ProviderKind.ANTHROPIC, ProviderKind.OPENAI])
def test_a_cut_message_stream_goes_on_from_the_next_deployment_as_one_message(gateway, fake_upstream, kind):
    resumable(fake_upstream, kind)

    with sdk(gateway).messages.stream(model="resumable", max_tokens=60, messages=ASK) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]

    assert len(pieces) > 3, "the first deployment's three deltas, then the second's"
    assert [block.type for block in final.content] == ["text"], "one text block: the second's continues it"
    assert final.content[0].text == "".join(pieces) and final.model == "resumable"
    resumed = fake_upstream.requests[-1]["body"]
    assert resumed["messages"][-1] == {"role": "assistant", "content": "".join(pieces[:3])}
    limit = "max_completion_tokens" if kind == ProviderKind.OPENAI else "max_tokens"  # OpenAI's own name for it
    assert resumed[limit] == 60 - math.ceil(len("".join(pieces[:3])) / 4), "only the rest of the token limit"
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed and record.usage_estimated
    assert record.deployment_name == "second" and record.attempts == 2
    delivered = math.ceil(len("".join(pieces[:3])) / 4)  # the first's three deltas, estimated as text is
    assert record.completion_tokens == final.usage.output_tokens + delivered, "the first's part is charged too"


@pytest.mark.parametrize("kind", [ProviderKind.ANTHROPIC, ProviderKind.OPENAI])
def test_a_resumed_message_stream_is_charged_the_prompt_of_each_attempt_that_answered(gateway, fake_upstream, kind):
    """Each attempt is a request the provider bills: the one cut midway its prompt, which its ``message_start``
    counted (the client's, as the stream began with it), the resumed one its prompt with the prefill. The row is
    charged both. Before, the cut attempt's prompt was charged nothing."""
    resumable(fake_upstream, kind)

    with sdk(gateway).messages.stream(model="resumable", max_tokens=60, messages=ASK) as stream:
        started = next(event for event in stream if event.type == "message_start")
        list(stream)
        request_id = stream.response.headers["x-request-id"]

    cut = started.message.usage.input_tokens
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed and record.attempts == 2 and record.usage_estimated
    # The resumed attempt's prompt is the cut one's and its prefill: charged both, more than twice the first.
    assert cut > 0 and record.prompt_tokens > 2 * cut, (cut, record.prompt_tokens)


@pytest.mark.parametrize("kind", [ProviderKind.ANTHROPIC, ProviderKind.OPENAI])
def test_a_resumed_message_stream_is_anthropics_sequence_with_one_message_start(gateway, fake_upstream, kind):
    resumable(fake_upstream, kind)

    reply, events = raw_events(gateway, {"model": "resumable", "max_tokens": 60, "messages": ASK})

    assert reply.status_code == 200
    decoded = [json.loads(data) for _, data in events]
    assert_anthropic_sequence(decoded)
    assert [event["type"] for event in decoded].count("message_start") == 1
    assert {event["index"] for event in decoded if "index" in event} == {0}
    assert decoded[-1]["type"] == "message_stop", "a clean end: no error event"


def test_without_resume_on_failure_a_cut_message_stream_ends_with_an_error_event(gateway, fake_upstream):
    resumable(fake_upstream, ProviderKind.ANTHROPIC, resume=False)

    with (
        pytest.raises(anthropic.APIStatusError),
        sdk(gateway).messages.stream(model="resumable", max_tokens=60, messages=ASK) as stream,
    ):
        list(stream.text_stream)


def test_a_stream_of_claude_thinking_is_not_resumed_though_no_thinking_block_came(gateway, fake_upstream):
    """Thinking on, Claude's stream cut in a text that no thinking block preceded (the fake thinks only what a
    marker asks) was resumed with a text prefill, which Anthropic refuses while thinking is on: the client got
    that refusal. It is not resumed: the in-band error of the cut, one attempt, one row."""
    resumable(fake_upstream, ProviderKind.ANTHROPIC)
    thinking = {"type": "enabled", "budget_tokens": 1024}

    with (
        pytest.raises(anthropic.APIStatusError) as cut,
        sdk(gateway).messages.stream(model="resumable", max_tokens=2000, messages=ASK, thinking=thinking) as stream,
    ):
        pieces = list(stream.text_stream)
    request_id = stream.response.headers["x-request-id"]

    assert "thinking" not in str(cut.value), cut.value
    assert len(fake_upstream.requests) == 1, "no deployment was asked to continue"
    record = wait_for_record(request_id)
    assert record.status == "upstream_error" and not record.resumed and record.attempts == 1, pieces


def test_a_message_stream_with_thinking_is_resumed_on_openai_though_its_fallback_is_claude(gateway, fake_upstream):
    """Thinking on, a cut stream was not resumed whenever a deployment the resume might reach was Claude (here, the
    model's fallback), though the next deployment speaks OpenAI's protocol and takes the prefill. Only Claude asked
    to think is left out of the resume."""
    model = resumable(fake_upstream, ProviderKind.OPENAI)
    model.fallbacks = ["claude-test"]
    model.save()
    thinking = {"type": "enabled", "budget_tokens": 1024}

    with sdk(gateway).messages.stream(model="resumable", max_tokens=2000, messages=ASK, thinking=thinking) as stream:
        pieces = list(stream.text_stream)
        request_id = stream.response.headers["x-request-id"]

    assert len(pieces) > 3
    assert [request["body"]["model"] for request in fake_upstream.requests] == ["fault-cut-3", "fake-gpt-4o-mini"]
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed and record.deployment_name == "second"


def _event(data: dict) -> WireEvent:
    return WireEvent(data, json.dumps(data).encode())


async def _events(*items: dict):
    for item in items:
        yield _event(item)


def _start(index: int, kind: str = "text") -> dict:
    block = {"type": "text", "text": ""}
    if kind != "text":
        block = {"type": kind, "id": "toolu_1", "name": "f", "input": {}}
    return {"type": "content_block_start", "index": index, "content_block": block}


def _text(index: int, text: str) -> dict:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}


async def _continued(splice: _MessagesSplice, *items: dict) -> list[dict]:
    return [dict(event) async for event in splice.continued(_events(*items))]


async def test_a_resumed_attempt_whose_first_block_is_not_text_closes_the_clients_open_block_first():
    splice = _MessagesSplice()
    splice.block(_event(_start(0)))

    out = await _continued(splice, _start(0, "tool_use"), {"type": "content_block_stop", "index": 0})

    assert out == [
        {"type": "content_block_stop", "index": 0},
        {**_start(1, "tool_use")},
        {"type": "content_block_stop", "index": 1},
    ]


async def test_a_resumed_attempt_after_the_clients_block_closed_numbers_its_blocks_after_it():
    splice = _MessagesSplice()
    splice.block(_event(_start(0)))
    splice.block(_event({"type": "content_block_stop", "index": 0}))

    out = await _continued(splice, _start(0), _text(0, " more"), {"type": "content_block_stop", "index": 0})

    assert [event["index"] for event in out] == [1, 1, 1]
    assert out[0]["type"] == "content_block_start", "a new block: the client's first was closed"


def test_a_message_that_sent_a_tool_call_or_only_whitespace_is_not_resumed():
    splice = _MessagesSplice()
    assert not splice.resumable([" ", "\n"]), "a prefill of whitespace alone is no prefill"
    assert splice.resumable(["Hello", " there"])
    splice.block(_event(_start(0, "tool_use")))
    assert not splice.resumable(["Hello"])


def test_an_anthropic_deployment_is_given_the_prefill_without_trailing_whitespace():
    anthropic_target = type("T", (), {"provider": type("P", (), {"kind": ProviderKind.ANTHROPIC})()})()
    openai_target = type("T", (), {"provider": type("P", (), {"kind": ProviderKind.OPENAI})()})()
    assert _prefill_for(anthropic_target, "Hello there\n\n") == "Hello there"
    assert _prefill_for(openai_target, "Hello there\n\n") == "Hello there\n\n"
