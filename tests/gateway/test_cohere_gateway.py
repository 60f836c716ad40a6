"""A Cohere provider behind a live llmhub, used with the official openai SDK: chat (streamed and not, with
a tool round trip) and embeddings each leave one priced ledger row, whatever protocol the provider speaks."""

from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import openai
import pytest

from billing.models import UsageRecord
from llmhub.testing.openapi import validate_openai_schema
from providers.models import ModelMode, ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MILLION = Decimal(1_000_000)
INPUT, OUTPUT = Decimal("2.50"), Decimal("10.00")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def cohere_gateway(gateway):
    provider = ProviderFactory(
        name="fake-cohere", kind=ProviderKind.COHERE, base_url=gateway.upstream.base_url + "/cohere"
    )
    ModelFactory(
        name="command-test",
        provider=provider,
        upstream_id="command-a-03-2025",
        input_per_mtok=INPUT,
        output_per_mtok=OUTPUT,
    )
    ModelFactory(
        name="cohere-embed-test",
        provider=provider,
        upstream_id="embed-v4.0",
        mode=ModelMode.EMBEDDING,
        input_per_mtok=Decimal("0.12"),
        output_per_mtok=Decimal(0),
    )
    return gateway


def ledger_row(request_id: str, timeout: float = 10.0) -> UsageRecord:
    rows = wait_until(
        lambda: list(UsageRecord.objects.filter(request_id=request_id)),
        f"a ledger row for {request_id}",
        timeout=timeout,
    )
    assert len(rows) == 1
    return rows[0]


def assert_chat_row(row: UsageRecord, *, stream: bool, completion_tokens: int) -> None:
    assert (row.model_name, row.provider_name, row.status, row.stream) == ("command-test", "fake-cohere", "ok", stream)
    assert row.completion_tokens == completion_tokens and row.prompt_tokens > 0
    assert not row.usage_estimated
    assert row.cost == (row.prompt_tokens * INPUT + completion_tokens * OUTPUT) / MILLION


def test_chat_and_a_tool_round_trip(cohere_gateway):
    client = cohere_gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model="command-test", messages=[{"role": "user", "content": "hello [[words=4]]"}]
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateChatCompletionResponse")
    completion = raw.parse()
    assert completion.model == "command-test"
    assert completion.choices[0].message.content == "lorem ipsum dolor sit"
    assert_chat_row(ledger_row(raw.headers["x-request-id"]), stream=False, completion_tokens=4)

    messages = [{"role": "user", "content": "Lima"}]
    first = client.chat.completions.create(model="command-test", messages=messages, tools=[WEATHER_TOOL])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "Lima"}
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "warm"},
    ]
    final = client.chat.completions.create(model="command-test", messages=messages, tools=[WEATHER_TOOL])
    assert final.choices[0].message.content == "Tool result: warm"


def test_a_streamed_chat_relays_chunks_and_bills_the_reported_usage(cohere_gateway):
    client = cohere_gateway.client()
    with client.chat.completions.with_streaming_response.create(
        model="command-test",
        messages=[{"role": "user", "content": "[[words=6]]"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split() == [
        "lorem",
        "ipsum",
        "dolor",
        "sit",
        "amet",
        "consectetur",
    ]
    assert chunks[-1].usage.completion_tokens == 6
    assert_chat_row(ledger_row(request_id), stream=True, completion_tokens=6)


def test_embeddings_leave_one_row_priced_on_input(cohere_gateway):
    client = cohere_gateway.client()
    raw = client.embeddings.with_raw_response.create(model="cohere-embed-test", input="one two three four")
    response = raw.parse()  # the SDK asked for base64 and decoded the vectors
    assert len(response.data[0].embedding) == 256
    assert response.usage.prompt_tokens == 4
    row = ledger_row(raw.headers["x-request-id"])
    assert (row.operation, row.provider_name, row.prompt_tokens, row.status) == ("embeddings", "fake-cohere", 4, "ok")
    assert row.cost == 4 * Decimal("0.12") / MILLION


def test_an_upstream_fault_is_the_clients_error_with_its_row(cohere_gateway):
    client = cohere_gateway.client()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="command-test", messages=[{"role": "user", "content": "[[fault=429]]"}])
    row = ledger_row(caught.value.response.headers["x-request-id"])
    assert row.status != "ok" and row.provider_name == "fake-cohere"


def test_n_above_one_is_refused_rather_than_answered_with_one_choice(cohere_gateway):
    # Cohere's chat API has no `n`: answering one choice to a request for two would break a client that
    # indexes choices[1]; the request is refused, as for Anthropic.
    client = cohere_gateway.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="command-test", messages=[{"role": "user", "content": "hi"}], n=2)
    error = caught.value.body
    assert (error["param"], error["code"]) == ("n", "unsupported_value")
    assert cohere_gateway.upstream.requests == []
    # n=1 is what Cohere does anyway.
    completion = client.chat.completions.create(model="command-test", messages=[{"role": "user", "content": "hi"}], n=1)
    assert len(completion.choices) == 1


def test_embeddings_honour_dimensions(cohere_gateway):
    # embed-v4.0 takes `output_dimension`; without it a client asking for 256 numbers got Cohere's default.
    client = cohere_gateway.client()
    response = client.embeddings.create(
        model="cohere-embed-test", input=["one two", "three"], dimensions=64, encoding_format="float"
    )
    assert [len(item.embedding) for item in response.data] == [64, 64]
    assert cohere_gateway.upstream.requests[-1]["body"]["output_dimension"] == 64


SIX_STOPS = ["one", "two", "three", "four", "five", "six"]


def test_more_stop_sequences_than_cohere_takes_are_refused_naming_stop_sequences(cohere_gateway):
    """Cohere's chat takes a list of up to 5 stop_sequences; a /v1/messages request with more was sent on for
    Cohere's own 400. It is refused before any upstream call, naming ``stop_sequences``; 5 reach Cohere, every one."""
    served = cohere_gateway.upstream.requests_served()
    sdk = anthropic.Anthropic(base_url=cohere_gateway.url, api_key=cohere_gateway.key, max_retries=0, timeout=20)
    request = {"model": "command-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(**request, stop_sequences=SIX_STOPS)
    message = caught.value.body["error"]["message"]
    assert message.startswith("stop_sequences: ") and "at most 5" in message
    assert cohere_gateway.upstream.requests_served() == served

    assert sdk.messages.create(**request, stop_sequences=SIX_STOPS[:5]).type == "message"
    assert cohere_gateway.upstream.requests[-1]["body"]["stop_sequences"] == SIX_STOPS[:5]


@pytest.mark.parametrize("named", [False, True], ids=["offered", "named-by-tool-choice"])
def test_a_custom_tool_cohere_cannot_offer_is_a_400_naming_it(cohere_gateway, named):
    """Chat completions' free-form ``custom`` tools have no Cohere form: until 6 December they were left out unsaid (the
    model answered without the tool it was given, and a ``tool_choice`` naming one required a call of no tool); they
    are refused before any upstream call, as Claude's and Gemini's translations refuse them."""
    served = cohere_gateway.upstream.requests_served()
    patch = {"type": "custom", "custom": {"name": "apply_patch", "description": "Apply a patch."}}
    extra = {"tool_choice": {"type": "custom", "custom": {"name": "apply_patch"}}} if named else {}
    with pytest.raises(openai.BadRequestError) as refused:
        cohere_gateway.client().chat.completions.create(
            model="command-test",
            messages=[{"role": "user", "content": "patch it"}],
            tools=[WEATHER_TOOL, patch],
            **extra,
        )
    assert (refused.value.param, refused.value.code) == ("tools[1]", "unsupported_value")
    assert cohere_gateway.upstream.requests_served() == served
    assert ledger_row(refused.value.response.headers["x-request-id"]).status == "invalid"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_no_parallel_tool_calls_through_cohere_gets_one_call_a_turn(cohere_gateway, stream):
    """Cohere cannot be told to call one tool a turn: a client that said ``parallel_tool_calls: false`` runs one call
    a turn, and got every call the model asked for at once (until 6 December); each answer carries its first call
    only, as Gemini's and Ollama's do. Without it, every call comes."""
    client = cohere_gateway.client()
    messages = [{"role": "user", "content": "Oslo [[tool_calls=3]]"}]

    def calls(**extra) -> list:
        if not stream:
            reply = client.chat.completions.create(
                model="command-test", messages=messages, tools=[WEATHER_TOOL], **extra
            )
            return [call.id for call in reply.choices[0].message.tool_calls]
        chunks = client.chat.completions.create(
            model="command-test", messages=messages, tools=[WEATHER_TOOL], stream=True, **extra
        )
        return [
            call.id for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or () if call.id
        ]

    assert len(calls()) == 3
    assert len(calls(parallel_tool_calls=False)) == 1


@pytest.mark.parametrize(
    ("effort", "limit", "thinking"),
    [
        ("none", None, {"type": "disabled"}),
        ("minimal", None, {"type": "enabled", "token_budget": 1024}),
        ("low", None, {"type": "enabled", "token_budget": 1024}),
        ("medium", None, {"type": "enabled", "token_budget": 2048}),
        ("high", None, {"type": "enabled", "token_budget": 4096}),
        # The output limit bounds the thinking and the reply together, and is not raised: the budget gives way so
        # that the reply keeps 1,024 tokens of it, as Cohere recommends, down to a token.
        ("high", 3000, {"type": "enabled", "token_budget": 3000 - 1024}),
        ("low", 500, {"type": "enabled", "token_budget": 1}),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_reasoning_effort_is_cohere_s_thinking_budget(cohere_gateway, effort, limit, thinking, stream):
    """Cohere's reasoning models think by default, within ``thinking.token_budget`` (or not at all, ``disabled``):
    until 7 December ``reasoning_effort`` was dropped unsaid, so ``none`` still thought, and was billed for it, and
    ``high`` thought as long as the model chose. It is their budget, as Claude's translation makes it its own."""
    client = cohere_gateway.client()
    extra = {"max_completion_tokens": limit} if limit else {}
    messages = [{"role": "user", "content": "why? [[reply=because]]"}]
    reply = client.chat.completions.create(
        model="command-test", messages=messages, reasoning_effort=effort, stream=stream, **extra
    )
    if stream:
        assert "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices) == "because"
    else:
        assert reply.choices[0].message.content == "because"
    sent = cohere_gateway.upstream.requests[-1]["body"]
    assert sent["thinking"] == thinking
    if limit:
        assert sent["max_tokens"] == limit
    # The Responses API's reasoning.effort, as the chat completion it is.
    limited = {"max_output_tokens": limit} if limit else {}
    response = client.responses.create(
        model="command-test", input="why? [[reply=because]]", reasoning={"effort": effort}, **limited
    )
    assert response.output_text == "because"
    assert cohere_gateway.upstream.requests[-1]["body"]["thinking"] == thinking


def test_a_reasoning_effort_cohere_has_no_budget_for_is_a_400_naming_it(cohere_gateway):
    """As Claude's translation answers it: ``xhigh`` (OpenAI's newest models') has no Cohere budget, refused before
    any upstream call, naming ``reasoning_effort`` (``reasoning.effort`` on /v1/responses)."""
    served = cohere_gateway.upstream.requests_served()
    client = cohere_gateway.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="command-test", messages=[{"role": "user", "content": "hi"}], reasoning_effort="xhigh"
        )
    assert (refused.value.param, refused.value.code) == ("reasoning_effort", "unsupported_value")
    assert ledger_row(refused.value.response.headers["x-request-id"]).status == "invalid"
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="command-test", input="hi", reasoning={"effort": "xhigh"})
    assert (refused.value.param, refused.value.code) == ("reasoning.effort", "unsupported_value")
    assert cohere_gateway.upstream.requests_served() == served


def test_a_messages_effort_is_cohere_s_thinking_and_one_without_a_budget_names_the_clients_field(cohere_gateway):
    """A /v1/messages client's ``output_config.effort`` is the thinking budget of its ``reasoning_effort``; one Cohere
    has none for (``xhigh``, ``max``) is refused before any upstream call naming ``output_config.effort``, as
    Gemini's is."""
    sdk = anthropic.Anthropic(base_url=cohere_gateway.url, api_key=cohere_gateway.key, max_retries=0, timeout=20)
    request = {"model": "command-test", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}
    assert sdk.messages.create(**request, output_config={"effort": "medium"}).type == "message"
    assert cohere_gateway.upstream.requests[-1]["body"]["thinking"] == {"type": "enabled", "token_budget": 2048}
    served = cohere_gateway.upstream.requests_served()
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(**request, output_config={"effort": "max"})
    message = caught.value.body["error"]["message"]
    assert message.startswith("output_config.effort: ") and "'max'" in message and "'high'" in message
    assert cohere_gateway.upstream.requests_served() == served


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_cohere_models_thinking_comes_back_as_its_reasoning(cohere_gateway, stream):
    """Cohere's reasoning models write ``thinking`` content before the reply (streamed: ``content.thinking`` deltas):
    until 7 December it was left out, though billed, so a client that asked to see the reasoning saw none. It is the
    reply's ``reasoning_content`` (streamed: ``delta.reasoning_content``), as other providers' reasoning is, and on
    /v1/responses a ``reasoning`` item before the message; with thinking off (``none``) there is none."""
    client = cohere_gateway.client()
    messages = [{"role": "user", "content": "why? [[thinking=first I weigh it]] [[reply=because]]"}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="command-test", messages=messages, reasoning_effort="high", stream=True
            )
        )
        deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
        reasoning = "".join((delta.model_extra or {}).get("reasoning_content") or "" for delta in deltas)
        text = "".join(delta.content or "" for delta in deltas)
    else:
        message = (
            client.chat.completions.create(model="command-test", messages=messages, reasoning_effort="high")
            .choices[0]
            .message
        )
        reasoning, text = (message.model_extra or {}).get("reasoning_content"), message.content
    assert (reasoning, text) == ("first I weigh it", "because")
    response = client.responses.create(
        model="command-test", input=messages[0]["content"], reasoning={"effort": "high"}, stream=False
    )
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "first I weigh it" and response.output_text == "because"
    assert response.usage.output_tokens == 5  # the thinking's four words and the reply's one, as Cohere bills them
    off = client.chat.completions.create(model="command-test", messages=messages, reasoning_effort="none")
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
    assert off.usage.completion_tokens == 1


def test_a_cohere_models_reasoning_given_back_is_its_thinking_on_the_next_turn(cohere_gateway):
    """The reply's ``reasoning_content`` sent back with its assistant turn (on /v1/responses, its ``reasoning``
    item given back before the message) was dropped, so on the next turn the model had lost what it thought; it goes
    to Cohere as the turn's ``thinking`` content item, before the text, as Cohere's assistant messages take it."""
    client = cohere_gateway.client()
    asked = "why? [[thinking=first I weigh it]] [[reply=because]]"
    first = client.chat.completions.create(
        model="command-test", messages=[{"role": "user", "content": asked}], reasoning_effort="high"
    )
    turn = first.choices[0].message.model_dump(exclude_none=True)
    assert turn["reasoning_content"] == "first I weigh it"
    client.chat.completions.create(
        model="command-test",
        messages=[{"role": "user", "content": asked}, turn, {"role": "user", "content": "and then?"}],
        reasoning_effort="high",
    )
    thinking_then_text = [{"type": "thinking", "thinking": "first I weigh it"}, {"type": "text", "text": "because"}]
    sent = cohere_gateway.upstream.requests[-1]["body"]["messages"]
    assert sent[1] == {"role": "assistant", "content": thinking_then_text}

    response = client.responses.create(model="command-test", input=asked, reasoning={"effort": "high"})
    items = [item.model_dump(exclude_none=True) for item in response.output]
    client.responses.create(
        model="command-test",
        input=[{"role": "user", "content": asked}, *items, {"role": "user", "content": "and then?"}],
        reasoning={"effort": "high"},
    )
    sent = cohere_gateway.upstream.requests[-1]["body"]["messages"]
    assert [message["role"] for message in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == thinking_then_text


def test_a_tool_messages_image_part_is_refused_for_cohere_before_any_call(cohere_gateway):
    """A screenshot tool's result (an image part in the tool message) reached Cohere as its text alone, the image
    dropped without a word; Cohere's tool content takes no image, so it is a 400 naming the part before any call."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "see the map"}, image]},
    ]
    served = cohere_gateway.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        cohere_gateway.client().chat.completions.create(model="command-test", messages=messages, tools=[WEATHER_TOOL])
    assert caught.value.body["param"] == "messages[2].content[1].type"
    assert "'image_url'" in caught.value.body["message"]
    assert cohere_gateway.upstream.requests_served() == served


def test_a_system_messages_image_part_is_refused_for_cohere_before_any_call(cohere_gateway):
    """Cohere's system message is text alone: an image part there was dropped without a word, the model answering
    without the picture it was told to go by. It is a 400 naming the part before any call."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer in the style of this picture."}, image]},
        {"role": "user", "content": "hi"},
    ]
    served = cohere_gateway.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        cohere_gateway.client().chat.completions.create(model="command-test", messages=messages)
    assert caught.value.body["param"] == "messages[0].content[1].type"
    assert "'image_url'" in caught.value.body["message"]
    assert cohere_gateway.upstream.requests_served() == served


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ([{"type": "refusal", "refusal": "I can't help with that."}], "I can't help with that."),
        (
            [{"type": "text", "text": "Here is the first half. "}, {"type": "refusal", "refusal": "Not the second."}],
            "Here is the first half. Not the second.",
        ),
    ],
    ids=["refusal", "text-then-refusal"],
)
def test_an_assistant_turns_refusal_part_reaches_cohere_as_its_text(cohere_gateway, content, text):
    """OpenAI's spec types an assistant message's parts as text or ``refusal``; a refusal part sent to Cohere was
    dropped without a word, so the model did not see that it had refused. Its text is the turn's text, in its place
    among the text parts, as Claude's translation sends it."""
    messages = [
        {"role": "user", "content": "Write me something bad."},
        {"role": "assistant", "content": content},
        {"role": "user", "content": "Why not?"},
    ]
    cohere_gateway.client().chat.completions.create(model="command-test", messages=messages)
    sent = cohere_gateway.upstream.requests[-1]["body"]["messages"]
    assert sent[1] == {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"filename": "notes.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
    ],
    ids=["audio", "file"],
)
def test_a_user_part_cohere_cannot_take_is_a_400_naming_the_part(cohere_gateway, part):
    """Cohere's user message takes text and images: a sound or a file was refused naming only ``messages``, where the
    other translations name the part's path. The 400 names ``messages[N].content[M].type`` and the part's type,
    before any call."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "What is in this?"}, part]},
    ]
    served = cohere_gateway.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        cohere_gateway.client().chat.completions.create(model="command-test", messages=messages)
    assert caught.value.body["param"] == "messages[1].content[1].type"
    assert repr(part["type"]) in caught.value.body["message"]
    assert "messages[1].content[1]" in caught.value.body["message"]
    assert cohere_gateway.upstream.requests_served() == served


def test_an_assistant_messages_image_part_is_refused_for_cohere_before_any_call(cohere_gateway):
    """Cohere's assistant message is text (and thinking): an image part there, which chat validation takes, was
    dropped without a word, the model shown a turn other than the one the client sent. It is a 400 naming the part
    before any call, as a system or tool message's is."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [
        {"role": "user", "content": "Draw me a cat."},
        {"role": "assistant", "content": [{"type": "text", "text": "Here it is:"}, image]},
        {"role": "user", "content": "Make it bigger."},
    ]
    served = cohere_gateway.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        cohere_gateway.client().chat.completions.create(model="command-test", messages=messages)
    assert caught.value.body["param"] == "messages[1].content[1].type"
    assert "'image_url'" in caught.value.body["message"]
    assert cohere_gateway.upstream.requests_served() == served
