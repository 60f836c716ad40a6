"""Reasoning models of every provider through /v1/chat/completions: asking for reasoning with ``reasoning_effort``,
getting it back in ``reasoning_content`` (whole and streamed), and what a tool-use round needs sent back.

The fake upstream answers ``[[thinking=TEXT]]`` with a signed ``thinking`` block on the Messages API when the
request enables thinking, and checks what Anthropic checks (a budget under ``max_tokens``, temperature 1, the
signature of a thinking block sent back, the thinking first in a tool-use turn answered and in a prefill)."""

from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from billing.models import UsageRecord
from llmhub.testing.openapi import validate_openai_schema
from providers.models import CatalogModel, Deployment, ProviderKind
from providers.tokens import text_tokens
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_moderation import delivered_text, policy_on, relayed, sse_stream
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

PRICES = {"input_per_mtok": Decimal("1.00"), "output_per_mtok": Decimal("2.00")}

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
    },
}


def chunks_of(gateway, body: dict) -> list[dict]:
    events, _ = sse_stream(gateway, {**body, "stream": True})
    assert events[-1] == "[DONE]", events[-1]
    for event in events[:-1]:
        validate_openai_schema(event, "CreateChatCompletionStreamResponse")
    return events[:-1]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_claudes_thinking_comes_back_as_reasoning_content_when_reasoning_effort_asks_for_it(gateway, stream):
    body = {
        "model": "claude-test",
        "reasoning_effort": "low",
        "messages": [{"role": "user", "content": "[[thinking=first I weigh it, then I answer]] hello"}],
    }
    if stream:
        chunks = chunks_of(gateway, body)
        assert relayed(chunks, "reasoning_content") == "first I weigh it, then I answer"
        assert delivered_text(chunks) == "Echo: hello"
        blocks = [
            block for chunk in chunks for c in chunk["choices"] for block in c["delta"].get("thinking_blocks", [])
        ]
        assert [block["thinking"] for block in blocks] == ["first I weigh it, then I answer"]
        assert blocks[0]["signature"]
    else:
        raw = gateway.client().chat.completions.with_raw_response.create(**body)
        completion = json.loads(raw.http_response.text)
        validate_openai_schema(completion, "CreateChatCompletionResponse")
        message = completion["choices"][0]["message"]
        assert message["reasoning_content"] == "first I weigh it, then I answer"
        assert message["content"] == "Echo: hello"
        assert [block["type"] for block in message["thinking_blocks"]] == ["thinking"]
        assert message["thinking_blocks"][0]["signature"]


def test_a_tool_use_round_with_claudes_thinking_sends_the_signed_thinking_back(gateway):
    """Anthropic wants the thinking before a tool call again, signed, in the request that answers the call: the
    client sends back the assistant message as it came (its ``thinking_blocks`` with it), as with LiteLLM."""
    client = gateway.client()
    messages: list[dict] = [{"role": "user", "content": "[[thinking=I should look it up]] weather"}]
    first = client.chat.completions.create(
        model="claude-test", reasoning_effort="medium", tools=[LOOKUP], messages=messages
    )
    assistant = first.choices[0].message.model_dump(exclude_none=True)
    assert assistant["tool_calls"] and assistant["thinking_blocks"][0]["thinking"] == "I should look it up"

    messages += [assistant, {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "sunny"}]
    second = client.chat.completions.create(
        model="claude-test", reasoning_effort="medium", tools=[LOOKUP], tool_choice="none", messages=messages
    )

    assert second.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_high_effort_under_a_tight_output_limit_leaves_claudes_reply_room(gateway, stream):
    """The limit bounds thinking and reply together: a budget of all of it but one token (4095 of 4096) left a
    model that thinks to its budget one token of reply. The budget now gives way to keep the reply 1024 tokens."""
    body = {
        "model": "claude-test",
        "reasoning_effort": "high",
        "max_completion_tokens": 4096,
        "messages": [{"role": "user", "content": "[[thinking=" + "hmm " * 5000 + "]] hello there"}],
    }
    if stream:
        chunks = chunks_of(gateway, body)
        content = delivered_text(chunks)
        thought = relayed(chunks, "reasoning_content")
        finish = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    else:
        completion = gateway.client().chat.completions.create(**body)
        content = completion.choices[0].message.content
        thought = completion.choices[0].message.model_extra["reasoning_content"]
        finish = [completion.choices[0].finish_reason]

    assert content == "Echo: hello there" and finish == ["stop"]
    assert len(thought.split()) == 4096 - 1024
    assert gateway.upstream.requests[-1]["body"]["max_tokens"] == 4096, "the client's limit is never raised"


@pytest.mark.parametrize(
    ("fields", "tool_choice"),
    [
        ({"reasoning_effort": "low"}, "required"),
        ({"reasoning_effort": "high"}, {"type": "function", "function": {"name": "lookup"}}),
        ({"extra_body": {"thinking": {"type": "enabled", "budget_tokens": 1024}}}, "required"),
    ],
    ids=["effort-required", "effort-named", "thinking-required"],
)
def test_a_forced_tool_choice_with_claudes_thinking_is_our_clear_400_before_any_upstream_call(
    gateway, fields, tool_choice
):
    """Anthropic takes thinking with ``tool_choice`` auto or none only: its own 400 was passed on, after a call."""
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="claude-test",
            max_completion_tokens=3000,
            tools=[LOOKUP],
            tool_choice=tool_choice,
            messages=[{"role": "user", "content": "weather"}],
            **fields,
        )

    assert refused.value.status_code == 400
    assert refused.value.body["param"] == "tool_choice" and refused.value.body["code"] == "unsupported_value"
    assert "auto" in refused.value.body["message"] and "reasoning_effort" in refused.value.body["message"]
    assert gateway.upstream.stats["requests"] == 0


@pytest.mark.parametrize("model", ["claude-test", "gpt-test"])
@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "lookup"}], ids=["any", "tool"])
def test_a_forced_tool_choice_with_thinking_on_messages_is_our_clear_400_before_any_upstream_call(
    gateway, model, tool_choice
):
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    tool = {"name": "lookup", "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}}}

    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(
            model=model,
            max_tokens=3000,
            thinking={"type": "enabled", "budget_tokens": 1024},
            tools=[tool],
            tool_choice=tool_choice,
            messages=[{"role": "user", "content": "weather"}],
        )

    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert refused.value.body["error"]["message"].startswith("tool_choice: ")
    assert "auto" in refused.value.body["error"]["message"]
    assert gateway.upstream.stats["requests"] == 0


def test_thinking_with_tool_choice_auto_or_none_still_goes(gateway):
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    tool = {"name": "lookup", "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}}}
    for choice in ({"type": "auto"}, {"type": "none"}):
        message = sdk.messages.create(
            model="claude-test",
            max_tokens=3000,
            thinking={"type": "enabled", "budget_tokens": 1024},
            tools=[tool],
            tool_choice=choice,
            messages=[{"role": "user", "content": "[[thinking=hmm]] weather"}],
        )
        assert message.content[0].type == "thinking"
    completion = gateway.client().chat.completions.create(
        model="claude-test",
        reasoning_effort="low",
        tools=[LOOKUP],
        tool_choice="auto",
        messages=[{"role": "user", "content": "weather"}],
    )
    assert completion.choices[0].message.tool_calls


def claude_writing_at_most(gateway, tokens: int) -> str:
    """A Claude model whose catalog entry says it writes at most ``tokens`` (``max_output_tokens``)."""
    ModelFactory(
        name="claude-capped",
        max_output_tokens=tokens,
        provider=ProviderFactory(name="capped", kind=ProviderKind.ANTHROPIC, base_url=gateway.upstream.base_url),
        upstream_id="fake-claude-haiku",
        **PRICES,
    )
    return "claude-capped"


@pytest.mark.parametrize(("effort", "budget"), [("high", 4096 - 1024), ("low", 1024)])
def test_without_a_client_limit_claudes_thinking_and_reply_fit_under_the_catalogs_output_limit(gateway, effort, budget):
    """With no limit of the client's, the budget and the reply's usual 4096 tokens (8192 for high) went upstream
    past what the model writes at most (Anthropic refuses it): the limit is the catalog's, and the budget gives way
    so that the reply keeps 1024 tokens of it."""
    model = claude_writing_at_most(gateway, 4096)

    completion = gateway.client().chat.completions.create(
        model=model, reasoning_effort=effort, messages=[{"role": "user", "content": "[[thinking=hmm]] hello"}]
    )

    assert completion.choices[0].message.content == "Echo: hello"
    sent = gateway.upstream.requests[-1]["body"]
    assert sent["max_tokens"] == 4096 and sent["thinking"] == {"type": "enabled", "budget_tokens": budget}


def test_a_model_that_writes_too_little_to_think_and_answer_refuses_reasoning_effort_with_a_clear_400(gateway):
    """Anthropic's least budget (1024) and the reply's 1024 do not fit under 2000: no limit was left to give way."""
    model = claude_writing_at_most(gateway, 2000)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model=model, reasoning_effort="low", messages=[{"role": "user", "content": "hello"}]
        )

    assert refused.value.body["param"] == "reasoning_effort" and "2000" in refused.value.body["message"]
    assert gateway.upstream.stats["requests"] == 0
    answered = gateway.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}])
    assert answered.choices[0].message.content == "Echo: hello"
    assert gateway.upstream.requests[-1]["body"]["max_tokens"] == 2000, "nor is a reply without thinking past it"


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("kind", [ProviderKind.ANTHROPIC, ProviderKind.OPENAI])
def test_a_client_limit_past_what_the_model_writes_is_our_clear_400_before_any_call(gateway, kind, name):
    """A client limit past the catalog's ``max_output_tokens`` went upstream as it was and the provider's 400 came
    back (Anthropic's ``max_tokens: 100000 > 64000``): it is our 400 naming the parameter and the model's limit,
    before any upstream call, with its rejected row; one rule whatever protocol the model speaks."""
    ModelFactory(
        name="capped",
        max_output_tokens=64_000,
        provider=ProviderFactory(
            name="capped",
            kind=kind,
            base_url=gateway.upstream.base_url + ("" if kind == ProviderKind.ANTHROPIC else "/v1"),
        ),
        # fake-o3-mini writes at most 100000, as o3-mini does (gpt-4o: 16384, under the catalog limit here).
        upstream_id="fake-claude-haiku" if kind == ProviderKind.ANTHROPIC else "fake-o3-mini",
        **PRICES,
    )

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="capped", messages=[{"role": "user", "content": "hello"}], **{name: 100_000}
        )

    body = refused.value.body
    assert body["param"] == name and "64000" in body["message"] and "capped" in body["message"], body
    assert gateway.upstream.stats["requests"] == 0
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.model_name == "capped"
    answered = gateway.client().chat.completions.create(
        model="capped", messages=[{"role": "user", "content": "hello"}], **{name: 64_000}
    )
    assert answered.choices[0].message.content == "Echo: hello", "the model's own limit still goes"


def test_on_responses_a_max_output_tokens_past_what_claude_writes_is_our_400_naming_it(gateway):
    model = claude_writing_at_most(gateway, 64_000)

    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(model=model, input="hello", max_output_tokens=100_000)

    assert refused.value.body["param"] == "max_output_tokens" and "64000" in refused.value.body["message"]
    assert gateway.upstream.stats["requests"] == 0


def test_on_messages_a_max_tokens_past_what_claude_writes_is_our_400_in_anthropics_shape(gateway):
    model = claude_writing_at_most(gateway, 64_000)
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)

    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(model=model, max_tokens=100_000, messages=[{"role": "user", "content": "hello"}])

    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in refused.value.message and "64000" in refused.value.message
    assert gateway.upstream.stats["requests"] == 0
    assert wait_for_record(refused.value.response.headers["x-request-id"]).status == "rejected"


def test_a_temperature_claude_cannot_think_at_is_a_clear_400(gateway):
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="claude-test", reasoning_effort="high", temperature=0.2, messages=[{"role": "user", "content": "hi"}]
        )

    assert refused.value.body["param"] == "temperature"
    assert "temperature" in refused.value.body["message"]


def test_a_blocked_word_in_claudes_thinking_on_chat_completions_is_checked_as_output_whole(gateway):
    policy_on("claude-test", blocklist="forbidden", check_input=False)

    with pytest.raises(openai.BadRequestError) as withheld:
        gateway.client().chat.completions.create(
            model="claude-test",
            reasoning_effort="low",
            messages=[{"role": "user", "content": "[[thinking=the forbidden word]] hi"}],
        )

    assert withheld.value.code == "content_policy_violation"
    record = wait_for_record(withheld.value.response.headers["x-request-id"])
    assert record.status == "invalid" and record.moderation.startswith("blocked output")


@pytest.mark.parametrize(
    "thinking", ["the forbidden word, then more", "it ends ｆｏｒｂｉｄｄｅｎ"], ids=["inside", "at-end"]
)
def test_a_blocked_word_in_claudes_streamed_thinking_is_checked_and_its_signed_block_withheld(gateway, thinking):
    policy_on("claude-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    body = {
        "model": "claude-test",
        "stream": True,
        "reasoning_effort": "low",
        "messages": [{"role": "user", "content": f"[[thinking={thinking}]] hi"}],
    }

    events, request_id = sse_stream(gateway, body)

    assert "[DONE]" not in events and events[-1]["error"]["code"] == "content_policy_violation"
    relayed_json = json.dumps(events[:-1], ensure_ascii=False)
    assert "forbidden" not in relayed_json and "ｆｏｒｂｉｄｄｅｎ" not in relayed_json
    assert delivered_text(events) == ""
    record = wait_for_record(request_id)
    assert record.error_type == "content_policy_violation"


def test_without_reasoning_effort_claude_answers_without_thinking(gateway):
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "claude-test", "messages": [{"role": "user", "content": "[[thinking=hmm]] hi"}]},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    ).json()

    assert "reasoning_content" not in response["choices"][0]["message"]


@pytest.mark.parametrize(("budget", "effort"), [(1024, "low"), (3000, "medium"), (8000, "high")])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_thinking_on_messages_reaches_an_openai_protocol_model_as_reasoning_effort_and_comes_back_as_thinking(
    gateway, budget, effort, stream
):
    """``/v1/messages`` to a model that speaks OpenAI's protocol dropped ``thinking``: the model was not asked to
    reason. Its budget is now a ``reasoning_effort``, and the reasoning comes back as a ``thinking`` block (unsigned:
    no provider signed it) that the official SDK parses, whole and streamed."""
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    request = {
        "model": "gpt-test",
        "max_tokens": 9000,
        "thinking": {"type": "enabled", "budget_tokens": budget},
        "messages": [{"role": "user", "content": "[[reasoning=first I weigh it]] hello"}],
    }
    if stream:
        with sdk.messages.stream(**request) as events:
            kinds = [event.type for event in events]
            message = events.get_final_message()
        assert "thinking" in kinds and "signature" in kinds
    else:
        message = sdk.messages.create(**request)

    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "first I weigh it" and message.content[0].signature == ""
    assert message.content[1].text == "Echo: hello"
    assert gateway.upstream.requests[-1]["body"]["reasoning_effort"] == effort


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_reasoning_tokens_of_an_openai_protocol_model_are_its_thinking_tokens_on_messages(gateway, stream):
    """The SDK reads how many of the output tokens went to thinking in ``usage.output_tokens_details.thinking_tokens``;
    OpenAI counts them in ``completion_tokens_details.reasoning_tokens``. A translated reply reported none: the
    client could not tell the thinking's cost from the answer's. It now reports the upstream's count."""
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    request = {
        "model": "gpt-test",
        "max_tokens": 2000,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "[[reasoning=first I weigh it]] [[reply=done]]"}],
    }
    if stream:
        with sdk.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = sdk.messages.create(**request)
    assert message.usage.output_tokens == 5
    assert message.usage.output_tokens_details is not None
    assert message.usage.output_tokens_details.thinking_tokens == 4


def test_thinking_disabled_or_adaptive_on_messages_sends_an_openai_protocol_model_no_reasoning_effort(gateway):
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    for thinking in ({"type": "disabled"}, {"type": "adaptive"}):
        sdk.messages.create(
            model="gpt-test", max_tokens=50, thinking=thinking, messages=[{"role": "user", "content": "hi"}]
        )
        assert "reasoning_effort" not in gateway.upstream.requests[-1]["body"]


@pytest.mark.parametrize(
    ("fields", "effort"),
    [
        ({"output_config": {"effort": "high"}}, "high"),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, "low"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "output_config": {"effort": "max"}}, "max"),
        ({"output_config": {"effort": "xhigh", "format": None}}, "xhigh"),
    ],
    ids=["effort", "adaptive", "budget", "xhigh"],
)
def test_the_effort_asked_on_messages_reaches_an_openai_protocol_model_as_its_reasoning_effort(gateway, fields, effort):
    """``output_config.effort`` is how much effort the client asks of the model (with adaptive thinking, the way to
    set how much it thinks); OpenAI's word for it is ``reasoning_effort``, of the same values. It was dropped on the way
    to an OpenAI-protocol model: a reasoning model reasoned at its default whatever the client asked. It now goes as
    ``reasoning_effort``; given beside an enabled thinking budget, it is the effort the client named."""
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    message = sdk.messages.create(
        model="gpt-test", max_tokens=2000, messages=[{"role": "user", "content": "[[reply=done]]"}], **fields
    )
    assert message.content[-1].text == "done"
    assert gateway.upstream.requests[-1]["body"]["reasoning_effort"] == effort


def test_an_effort_an_openai_protocol_model_has_no_level_for_is_refused_naming_it(gateway):
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(
            model="gpt-test",
            max_tokens=50,
            output_config={"effort": "extreme"},
            messages=[{"role": "user", "content": "hi"}],
        )
    assert refused.value.body["error"]["message"].startswith("output_config.effort: ")
    assert gateway.upstream.stats["requests"] == 0


def test_thinking_disabled_with_an_effort_sends_an_openai_protocol_model_no_reasoning_effort(gateway):
    """Thinking off is the client's word that the model does not reason: an effort beside it (which on Claude sets
    how thorough the reply is) does not turn reasoning on."""
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    sdk.messages.create(
        model="gpt-test",
        max_tokens=50,
        thinking={"type": "disabled"},
        output_config={"effort": "high"},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert "reasoning_effort" not in gateway.upstream.requests[-1]["body"]


def test_a_resumed_streams_reasoning_is_relayed_after_a_break(gateway):
    """A stream cut in its reply goes on from the next deployment (``resume_on_failure``), which reasons again
    before it goes on: that reasoning, billed in its usage, was dropped; it is relayed now, set off from the
    reasoning before it by a blank line."""
    model = CatalogModel.objects.create(name="resumable", strategy="priority", resume_on_failure=True)
    for priority, upstream_id in enumerate(("fault-cut-5", "fake-gpt-4o-mini")):
        provider = ProviderFactory(name=f"reasoner-{priority}", base_url=gateway.upstream.base_url + "/v1")
        Deployment.objects.create(
            model=model, name=f"d{priority}", provider=provider, upstream_id=upstream_id, priority=priority, **PRICES
        )
    body = {"model": "resumable", "messages": [{"role": "user", "content": "[[reasoning=weigh it]] hello [[words=6]]"}]}

    events, request_id = sse_stream(gateway, {**body, "stream": True})

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert relayed(chunks, "reasoning_content") == "weigh it\n\nweigh it"
    roles = [c["delta"]["role"] for chunk in chunks for c in chunk["choices"] if c["delta"].get("role")]
    assert roles == ["assistant"], "one stream: the resumed attempt's opening is not relayed"
    record = wait_for_record(request_id)
    assert record.resumed and record.status == "ok"


@pytest.mark.parametrize(
    "fields",
    [{"reasoning_effort": "low"}, {"thinking": {"type": "enabled", "budget_tokens": 1024}}],
    ids=["reasoning_effort", "thinking"],
)
def test_a_stream_where_claude_thought_is_not_resumed_as_on_messages(gateway, fields):
    """Thinking on, Anthropic wants a final assistant message (a resume's prefill) to begin with the thinking,
    signed by the model that wrote it: a text prefill failed upstream. As on ``/v1/messages``, a stream that sent
    a thinking block is not resumed: it ends with the in-band error, one row charged what was relayed."""
    model = CatalogModel.objects.create(name="claude-resumable", strategy="priority", resume_on_failure=True)
    for priority, upstream_id in enumerate(("fault-cut-3", "fake-claude-haiku")):
        provider = ProviderFactory(
            name=f"claude-{priority}", kind=ProviderKind.ANTHROPIC, base_url=gateway.upstream.base_url
        )
        Deployment.objects.create(
            model=model, name=f"d{priority}", provider=provider, upstream_id=upstream_id, priority=priority, **PRICES
        )
    body = {
        "model": "claude-resumable",
        "stream": True,
        "messages": [{"role": "user", "content": "[[thinking=weigh it first]] hello there [[words=8]]"}],
        **fields,
    }

    events, request_id = sse_stream(gateway, body)

    assert events[-1] != "[DONE]" and events[-1]["error"]["code"] == "upstream_stream_interrupted", events[-1]
    chunks = events[:-1]
    thought, text = relayed(chunks, "reasoning_content"), delivered_text(chunks)
    assert thought == "weigh it first" and text
    assert len(gateway.upstream.requests) == 1, "no second deployment was asked to continue"
    record = wait_for_record(request_id)
    assert record.status == "upstream_error" and not record.resumed and record.attempts == 1
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1
    assert record.usage_estimated and record.completion_tokens == text_tokens(thought + text)


@pytest.mark.parametrize(
    ("first", "fields"),
    [
        (ProviderKind.ANTHROPIC, {"reasoning_effort": "low"}),
        (ProviderKind.ANTHROPIC, {"thinking": {"type": "enabled", "budget_tokens": 1024}}),
        (ProviderKind.OPENAI, {"reasoning_effort": "low"}),
    ],
    ids=["claude-reasoning_effort", "claude-thinking", "openai-then-claude"],
)
def test_a_stream_is_not_resumed_on_claude_thinking_though_no_thinking_block_came(gateway, first, fields):
    """A stream cut in a text no thinking block preceded (the cut attempt thought nothing the client saw, or spoke
    OpenAI's protocol) was resumed on a Claude deployment with thinking on, given a text prefill, which Anthropic
    refuses: the client got that refusal. It is not resumed: the in-band error of the cut, one attempt."""
    model = CatalogModel.objects.create(name="claude-resumable", strategy="priority", resume_on_failure=True)
    for priority, (kind, upstream_id) in enumerate(
        ((first, "fault-cut-3"), (ProviderKind.ANTHROPIC, "fake-claude-haiku"))
    ):
        base_url = gateway.upstream.base_url + ("" if kind == ProviderKind.ANTHROPIC else "/v1")
        provider = ProviderFactory(name=f"resumable-{priority}", kind=kind, base_url=base_url)
        Deployment.objects.create(
            model=model, name=f"d{priority}", provider=provider, upstream_id=upstream_id, priority=priority, **PRICES
        )
    body = {
        "model": "claude-resumable",
        "stream": True,
        "messages": [{"role": "user", "content": "hello there [[words=8]]"}],
        **fields,
    }

    events, request_id = sse_stream(gateway, body)

    assert events[-1] != "[DONE]" and events[-1]["error"]["code"] == "upstream_stream_interrupted", events[-1]
    assert delivered_text(events[:-1])
    assert len(gateway.upstream.requests) == 1, "no Claude was asked to continue with a prefill"
    record = wait_for_record(request_id)
    assert record.status == "upstream_error" and not record.resumed and record.attempts == 1


@pytest.mark.parametrize("claude", ["deployment", "fallback"])
def test_a_stream_asked_to_reason_is_resumed_on_a_deployment_that_takes_the_prefill_though_claude_is_reachable(
    gateway, claude
):
    """A cut stream with ``reasoning_effort`` was not resumed whenever any deployment the resume might reach was
    Claude (one of the model's, or its fallback's), though another of OpenAI's protocol takes the prefill: the
    client got the in-band error. Only Claude asked to think is left out of the resume; the OpenAI deployment
    continues the reply, one row."""
    model = CatalogModel.objects.create(
        name="mixed",
        strategy="priority",
        resume_on_failure=True,
        fallbacks=["claude-test"] if claude == "fallback" else [],
    )
    deployments = [(ProviderKind.OPENAI, "fault-cut-3"), (ProviderKind.OPENAI, "fake-gpt-4o-mini")]
    if claude == "deployment":
        deployments.insert(1, (ProviderKind.ANTHROPIC, "fake-claude-haiku"))
    for priority, (kind, upstream_id) in enumerate(deployments):
        base_url = gateway.upstream.base_url + ("" if kind == ProviderKind.ANTHROPIC else "/v1")
        provider = ProviderFactory(name=f"mixed-{priority}", kind=kind, base_url=base_url)
        Deployment.objects.create(
            model=model, name=f"d{priority}", provider=provider, upstream_id=upstream_id, priority=priority, **PRICES
        )
    body = {
        "model": "mixed",
        "stream": True,
        "reasoning_effort": "low",
        "messages": [{"role": "user", "content": "hello there [[words=8]]"}],
    }

    events, request_id = sse_stream(gateway, body)

    assert events[-1] == "[DONE]", events[-1]
    sent = [request["body"]["model"] for request in gateway.upstream.requests]
    assert sent == ["fault-cut-3", "fake-gpt-4o-mini"], "no Claude was asked to continue with a prefill"
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed and record.deployment_name == f"d{len(deployments) - 1}"
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1


@pytest.mark.parametrize("kind", [ProviderKind.MISTRAL, ProviderKind.OPENAI])
def test_claudes_signed_thinking_sent_back_to_a_model_of_openais_protocol_is_left_out(gateway, kind):
    """A tool-use round begun on Claude and answered on another model (the client switched, or a fallback) sends the
    assistant message back as it came, its ``thinking_blocks`` with it: they went upstream as they were, a field of
    no OpenAI-compatible server, signed for Anthropic alone, and Mistral (strict, as the fake is) refused the request
    (422): the client got a 400. They are left out for a model of OpenAI's protocol, kept for Claude."""
    path = "/mistral/v1" if kind == ProviderKind.MISTRAL else "/v1"
    upstream_id = "mistral-small-latest" if kind == ProviderKind.MISTRAL else "fake-gpt-4o-mini"
    ModelFactory(
        name="other",
        provider=ProviderFactory(name="other", kind=kind, base_url=gateway.upstream.base_url + path),
        upstream_id=upstream_id,
        **PRICES,
    )
    client = gateway.client()
    messages: list[dict] = [{"role": "user", "content": "[[thinking=I should look it up]] weather"}]
    first = client.chat.completions.create(
        model="claude-test", reasoning_effort="medium", tools=[LOOKUP], messages=messages
    )
    assistant = first.choices[0].message.model_dump(exclude_none=True)
    assert assistant["thinking_blocks"] and assistant["tool_calls"]
    messages += [assistant, {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "sunny"}]

    second = client.chat.completions.create(model="other", tools=[LOOKUP], tool_choice="none", messages=messages)

    assert second.choices[0].message.content == "Tool result: sunny"
    sent = gateway.upstream.requests[-1]["body"]["messages"][1]
    assert sent["role"] == "assistant" and sent["tool_calls"] and "thinking_blocks" not in sent
