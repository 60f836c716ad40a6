"""A Mistral provider behind a live llmhub, used with the official openai SDK. Mistral speaks OpenAI's protocol
but refuses (422) every field it does not take, and names some of its own: the fake's /mistral routes are as
strict, so what passes here reaches Mistral in a shape it accepts."""

from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from billing.models import UsageRecord
from llmhub.testing.openapi import validate_openai_schema
from providers.models import ModelMode, ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.conftest import REFUSED_TURN, REFUSED_TURN_TEXTS, reply_text
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

MILLION = Decimal(1_000_000)
INPUT, OUTPUT = Decimal("0.10"), Decimal("0.30")


@pytest.fixture
def mistral(gateway):
    provider = ProviderFactory(
        name="fake-mistral", kind=ProviderKind.MISTRAL, base_url=gateway.upstream.base_url + "/mistral/v1"
    )
    ModelFactory(
        name="mistral-test",
        provider=provider,
        upstream_id="mistral-small-latest",
        input_per_mtok=INPUT,
        output_per_mtok=OUTPUT,
    )
    ModelFactory(
        name="mistral-embed-test",
        provider=provider,
        upstream_id="mistral-embed",
        mode=ModelMode.EMBEDDING,
        input_per_mtok=Decimal("0.10"),
        output_per_mtok=Decimal(0),
    )
    return gateway


def assert_priced(record: UsageRecord, prompt: int, completion: int, *, stream: bool) -> None:
    assert (record.model_name, record.provider_name, record.status, record.stream) == (
        "mistral-test",
        "fake-mistral",
        "ok",
        stream,
    )
    assert (record.prompt_tokens, record.completion_tokens) == (prompt, completion)
    assert not record.usage_estimated
    assert record.cost == (prompt * INPUT + completion * OUTPUT) / MILLION


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_stream_through_mistral_relays_chunks_and_is_priced(mistral, include_usage):
    # The gateway asks every OpenAI-protocol upstream for usage with stream_options, which Mistral refuses:
    # Mistral reports usage on its last chunk unasked.
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    with mistral.client().chat.completions.with_streaming_response.create(
        model="mistral-test", messages=[{"role": "user", "content": "stream me [[words=5]]"}], stream=True, **extra
    ) as response:
        request_id = response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "lorem ipsum dolor sit amet"
    usages = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    assert len(usages) == (1 if include_usage else 0)
    if include_usage:  # where OpenAI reports it: a last chunk of its own, with no choices
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usages[0]
    assert "stream_options" not in mistral.upstream.requests[-1]["body"]

    record = wait_for_record(request_id)
    assert record.completion_tokens == 5
    assert_priced(record, record.prompt_tokens, 5, stream=True)
    if include_usage:
        assert usages[0]["completion_tokens"] == 5 and usages[0]["prompt_tokens"] == record.prompt_tokens


def test_openai_names_reach_mistral_as_its_own(mistral):
    raw = mistral.client().chat.completions.with_raw_response.create(
        model="mistral-test",
        messages=[{"role": "user", "content": "[[words=5]]"}],
        max_completion_tokens=2,
        seed=7,
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateChatCompletionResponse")
    completion = raw.parse()
    assert (completion.choices[0].message.content, completion.choices[0].finish_reason) == ("lorem ipsum", "length")
    sent = mistral.upstream.requests[-1]["body"]
    assert (sent["max_tokens"], sent["random_seed"]) == (2, 7)
    assert_priced(wait_for_record(raw.headers["x-request-id"]), completion.usage.prompt_tokens, 2, stream=False)


def test_mistral_embeddings_take_dimensions_as_output_dimension(mistral):
    client = mistral.client()
    raw = client.embeddings.with_raw_response.create(
        model="mistral-embed-test", input=["one two", "three"], dimensions=8, encoding_format="float"
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateEmbeddingResponse")
    floats = raw.parse()
    assert [len(item.embedding) for item in floats.data] == [8, 8]
    assert mistral.upstream.requests[-1]["body"]["output_dimension"] == 8
    # The SDK's default: base64, which it decodes to the same floats.
    decoded = client.embeddings.create(model="mistral-embed-test", input=["one two", "three"], dimensions=8)
    assert [item.embedding for item in decoded.data] == [item.embedding for item in floats.data]


def test_a_field_mistral_does_not_take_is_a_400_naming_it(mistral):
    with pytest.raises(openai.BadRequestError) as caught:
        mistral.client().chat.completions.create(
            model="mistral-test", messages=[{"role": "user", "content": "hi"}], user="end-user-7"
        )
    error = caught.value.body
    assert error["param"] == "user"
    assert "user" in error["message"] and "Extra inputs are not permitted" in error["message"]


@pytest.mark.parametrize("effort", ["none", "high"])
def test_reasoning_effort_reaches_mistral_as_the_client_sent_it(mistral, effort):
    """Mistral's chat completions take ``reasoning_effort`` under OpenAI's name, ``none`` or ``high`` (its adjustable
    reasoning), which the fake upstream's Mistral route refused with the 422 of a field Mistral does not take: the
    adapter sends it as it came, neither dropped nor renamed."""
    completion = mistral.client().chat.completions.create(
        model="mistral-test", messages=[{"role": "user", "content": "hi"}], reasoning_effort=effort
    )
    assert completion.choices[0].message.content == "Echo: hi"
    assert mistral.upstream.requests[-1]["body"]["reasoning_effort"] == effort


@pytest.mark.parametrize("effort", ["minimal", "low", "medium", "xhigh"])
def test_a_reasoning_effort_mistral_has_not_is_a_400_naming_it(mistral, effort):
    """Mistral's reasoning is on (``high``) or off (``none``): another level goes up as asked, not made one of those
    (which would think more, or less, than asked), and Mistral's 422 reaches the client as a 400 naming it."""
    with pytest.raises(openai.BadRequestError) as caught:
        mistral.client().chat.completions.create(
            model="mistral-test", messages=[{"role": "user", "content": "hi"}], reasoning_effort=effort
        )
    assert caught.value.body["param"] == "reasoning_effort"
    assert "Input should be 'none' or 'high'" in caught.value.body["message"]
    assert mistral.upstream.requests[-1]["body"]["reasoning_effort"] == effort


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_mistral_reasoning_models_thinking_chunks_reach_the_client_as_reasoning_content(mistral, stream):
    """Mistral's reasoning models (Magistral) write ``content`` as a list of ``thinking`` and ``text`` chunks, which
    OpenAI's schema does not allow: the client gets the thinking in ``reasoning_content`` and the text in
    ``content``, as other OpenAI-compatible servers of reasoning models send them, and the request is priced."""
    body = {
        "model": "mistral-test",
        "messages": [{"role": "user", "content": "[[reasoning=let me think it over]] [[reply=Fine then.]]"}],
    }
    headers = {"Authorization": f"Bearer {mistral.key}"}
    url = mistral.url + "/v1/chat/completions"
    if stream:
        with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers, timeout=20) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
            request_id = response.headers["x-request-id"]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
        for chunk in chunks:
            validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
        deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
        reasoning = "".join(delta.get("reasoning_content") or "" for delta in deltas)
        text = "".join(delta.get("content") or "" for delta in deltas)
    else:
        response = httpx.post(url, json=body, headers=headers, timeout=20)
        assert response.status_code == 200
        validate_openai_schema(response.json(), "CreateChatCompletionResponse")
        message = response.json()["choices"][0]["message"]
        reasoning, text, request_id = message["reasoning_content"], message["content"], response.headers["x-request-id"]
    assert (reasoning, text) == ("let me think it over", "Fine then.")
    assert_priced(wait_for_record(request_id), 3 + 7, 5 + 2, stream=stream)


def test_an_assistant_message_sent_back_as_llmhub_answered_it_is_taken_by_mistral(mistral):
    """The next turn of a conversation sends the reply's message back as it came: with its ``refusal`` (null: OpenAI's
    schema requires it, and llmhub fills it in), its ``annotations`` and a reasoning model's ``reasoning_content``,
    which Mistral's assistant message lacks: Mistral refused the request (422, extra inputs are not permitted) and
    the client got a 400. Those fields are left out; what the message says reaches Mistral."""
    client = mistral.client()
    messages: list[dict] = [{"role": "user", "content": "[[reasoning=let me think it over]] [[reply=Fine then.]]"}]
    raw = client.chat.completions.with_raw_response.create(model="mistral-test", messages=messages)
    assistant = json.loads(raw.http_response.text)["choices"][0]["message"]
    assert {"refusal", "annotations", "reasoning_content"} <= assistant.keys(), assistant
    messages += [assistant, {"role": "user", "content": "and then?"}]

    answered = client.chat.completions.create(model="mistral-test", messages=messages)

    assert answered.choices[0].message.content == "Echo: and then?"
    sent = mistral.upstream.requests[-1]["body"]["messages"]
    assert sent[1] == {"role": "assistant", "content": "Fine then."}
    assert sent[2] == messages[2]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_assistant_turns_refusal_part_reaches_mistral_as_its_text(mistral, stream):
    """OpenAI's spec types an assistant message's parts as text or ``refusal``; Mistral's chunks are text, images,
    documents, references, thinking..., no refusal (a 422, a 400 to the client, so a conversation in which the model
    had refused could not go on there). The refusal's text is a text chunk of the turn, in its place among the others,
    as Claude's, Cohere's and Gemini's translations send it on."""
    messages = REFUSED_TURN
    response = mistral.client().chat.completions.create(model="mistral-test", messages=messages, stream=stream)
    assert reply_text(response, stream) == "Echo: Why not?"
    sent = mistral.upstream.requests[-1]["body"]["messages"]
    chunks = [{"type": "text", "text": text} for text in REFUSED_TURN_TEXTS]
    assert sent[1] == {"role": "assistant", "content": chunks}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("prefix", "echoed"),
    [
        ("Well, ", True),  # Mistral's echo: dropped
        ("Echo: hi there", True),  # a prefix of several tokens, so its echo is split over several chunks
        ("Echo: zz", False),  # a server that only continues: the reply begins as the prefix does, then differs
        ("Echo: hi there", False),  # ... or ends inside it: the text held back goes on with the finish
    ],
)
def test_a_reply_to_a_prefill_does_not_repeat_it_whether_mistral_echoes_it_or_not(mistral, stream, prefix, echoed):
    """Mistral's reply to a last assistant message (sent as its prefix) begins with the prefix itself: relayed as it
    came, the client read the text it sent (or, on a resumed stream, had already read) twice. The echo is left out,
    and a reply that does not begin with it reaches the client untouched; the row is priced at Mistral's usage."""
    marker = "" if echoed else " [[prefix_echo=off]]"
    messages = [{"role": "user", "content": "hi" + marker}, {"role": "assistant", "content": prefix}]
    client = mistral.client()
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="mistral-test", messages=messages, stream=True, stream_options={"include_usage": True}
        ) as response:
            request_id = response.headers["x-request-id"]
            chunks = list(response.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        raw = client.chat.completions.with_raw_response.create(model="mistral-test", messages=messages)
        request_id = raw.headers["x-request-id"]
        text, usage = raw.parse().choices[0].message.content, raw.parse().usage

    assert text == "Echo: hi"
    assert mistral.upstream.requests[-1]["body"]["messages"][-1] == {**messages[-1], "prefix": True}
    record = wait_for_record(request_id)
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1
    assert usage is not None and record.completion_tokens == usage.completion_tokens
    assert_priced(record, usage.prompt_tokens, usage.completion_tokens, stream=stream)


def test_the_end_user_of_a_messages_request_is_not_sent_to_mistral(mistral):
    """``metadata.user_id`` of a ``/v1/messages`` request goes to an OpenAI-protocol model as ``user``, a field Mistral
    refuses (422): the request is answered, without it, rather than refused for a field the client never sent."""
    answer = httpx.post(
        mistral.url + "/v1/messages",
        json={
            "model": "mistral-test",
            "max_tokens": 20,
            "metadata": {"user_id": "end-user-7"},
            "messages": [{"role": "user", "content": "[[reply=hi]]"}],
        },
        headers={"x-api-key": mistral.key},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"] == [{"type": "text", "text": "hi"}]
    assert "user" not in mistral.upstream.requests[-1]["body"]


@pytest.mark.parametrize("effort", ["low", "medium", "xhigh", "max"])
def test_an_effort_mistral_has_not_on_messages_is_a_400_naming_the_clients_field(mistral, effort):
    """A /v1/messages client asks for effort in ``output_config.effort``, which goes to Mistral as ``reasoning_effort``:
    one Mistral has not (it takes ``high``, or ``none``, which Anthropic's levels do not name) got Mistral's 422, a 400
    naming ``reasoning_effort``, a field the client never sent. It names the client's field, with the level Mistral
    has, before any upstream call."""
    served = mistral.upstream.requests_served()
    sdk = anthropic.Anthropic(base_url=mistral.url, api_key=mistral.key, max_retries=0, timeout=20)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(
            model="mistral-test",
            max_tokens=50,
            output_config={"effort": effort},
            messages=[{"role": "user", "content": "hi"}],
        )
    message = caught.value.body["error"]["message"]
    assert message == f"output_config.effort: this model has no effort level {effort!r}: use 'high'"
    assert mistral.upstream.requests_served() == served


@pytest.mark.parametrize("budget", [1024, 2048, 4095])
def test_a_thinking_budget_below_mistrals_effort_on_messages_is_a_400_naming_it(mistral, budget):
    """An enabled thinking budget becomes the ``reasoning_effort`` it reaches (``low`` under 2048, ``medium`` under
    4096), which Mistral has not: Mistral's 422 came back as a 400 naming ``reasoning_effort``, a field the client never
    sent. It names the client's ``thinking.budget_tokens`` and the least budget of the level Mistral has, before any
    upstream call; 4096 or more is Mistral's ``high``."""
    served = mistral.upstream.requests_served()
    sdk = anthropic.Anthropic(base_url=mistral.url, api_key=mistral.key, max_retries=0, timeout=20)
    thinking = {"type": "enabled", "budget_tokens": budget}
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(
            model="mistral-test", max_tokens=8192, thinking=thinking, messages=[{"role": "user", "content": "hi"}]
        )
    message = caught.value.body["error"]["message"]
    assert message.startswith("thinking.budget_tokens: ") and "4096" in message and "'high'" in message
    assert "reasoning_effort" not in message
    assert mistral.upstream.requests_served() == served

    thinking["budget_tokens"] = 4096
    reply = sdk.messages.create(
        model="mistral-test", max_tokens=8192, thinking=thinking, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.content[-1].text == "Echo: hi"
    assert mistral.upstream.requests[-1]["body"]["reasoning_effort"] == "high"


def test_an_effort_of_high_on_messages_reaches_mistral_as_its_reasoning_effort(mistral):
    sdk = anthropic.Anthropic(base_url=mistral.url, api_key=mistral.key, max_retries=0, timeout=20)
    reply = sdk.messages.create(
        model="mistral-test",
        max_tokens=50,
        output_config={"effort": "high"},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert reply.content[0].text == "Echo: hi"
    assert mistral.upstream.requests[-1]["body"]["reasoning_effort"] == "high"


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def _tool_call_ids(body: dict) -> tuple[list[str], list[str]]:
    """The ids of the calls in a request's assistant messages, and those its tool messages answer."""
    calls = [call["id"] for message in body["messages"] for call in message.get("tool_calls") or ()]
    answers = [message["tool_call_id"] for message in body["messages"] if message["role"] == "tool"]
    return calls, answers


def test_a_tool_round_trip_with_another_providers_call_id_is_taken_by_mistral(mistral):
    """Mistral takes a tool call's id only as 9 letters and digits, and refuses any other (400 ``Tool call id was …
    but must be a-z, A-Z, 0-9, with a length of 9``): a conversation begun on another model (OpenAI's ``call_…``)
    could not go on on Mistral. Each id goes in Mistral's form, the same for the call and the answer to it."""
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_Zx81kPq0", "type": "function", "function": {"name": "weather", "arguments": "{}"}},
                {"id": "D681PevKs", "type": "function", "function": {"name": "weather", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_Zx81kPq0", "content": "18 C"},
        {"role": "tool", "tool_call_id": "D681PevKs", "content": "light wind"},
    ]
    answer = mistral.client().chat.completions.create(model="mistral-test", messages=messages, tools=[WEATHER_TOOL])
    assert answer.choices[0].message.content == "Tool result: light wind"
    calls, answers = _tool_call_ids(mistral.upstream.requests[-1]["body"])
    assert calls == answers
    assert calls[1] == "D681PevKs"  # already Mistral's: as it came
    assert calls[0] != "call_Zx81kPq0" and len(calls[0]) == 9 and calls[0].isalnum() and calls[0].isascii()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_mistrals_own_tool_call_ids_reach_the_client_and_go_back_to_mistral_as_they_came(mistral, stream):
    """Mistral names its calls with 9 letters and digits (the fake made OpenAI's ``call_…`` ids, so no test saw one
    of Mistral's own go through): the client gets each id as Mistral gave it, and a conversation that answers the
    calls sends them back to Mistral unchanged, the call and the tool message alike."""
    client = mistral.client()
    ask = [{"role": "user", "content": "weather in Paris? [[tool_calls=2]]"}]
    if stream:
        chunks = list(
            client.chat.completions.create(model="mistral-test", messages=ask, tools=[WEATHER_TOOL], stream=True)
        )
        deltas = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
        given = [call.id for call in deltas if call.id]
    else:
        reply = client.chat.completions.create(model="mistral-test", messages=ask, tools=[WEATHER_TOOL])
        given = [call.id for call in reply.choices[0].message.tool_calls]
    assert len(given) == 2 and len(set(given)) == 2
    assert all(len(call_id) == 9 and call_id.isalnum() and call_id.isascii() for call_id in given)

    calls = [{"id": i, "type": "function", "function": {"name": "weather", "arguments": "{}"}} for i in given]
    answers = [{"role": "tool", "tool_call_id": i, "content": f"{n} C"} for n, i in enumerate(given)]
    messages = [*ask, {"role": "assistant", "content": None, "tool_calls": calls}, *answers]
    answer = client.chat.completions.create(model="mistral-test", messages=messages, tools=[WEATHER_TOOL])
    assert answer.choices[0].message.content == "Tool result: 1 C"
    assert _tool_call_ids(mistral.upstream.requests[-1]["body"]) == (given, given)


def test_a_messages_tool_round_trip_with_claudes_tool_use_id_is_taken_by_mistral(mistral):
    answer = httpx.post(
        mistral.url + "/v1/messages",
        json={
            "model": "mistral-test",
            "max_tokens": 50,
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "weather", "input": {}}
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9", "content": "18 C"}
                    ],
                },
            ],
        },
        headers={"x-api-key": mistral.key},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"] == [{"type": "text", "text": "Tool result: 18 C"}]
    calls, answers = _tool_call_ids(mistral.upstream.requests[-1]["body"])
    assert calls == answers and len(calls) == 1
    assert len(calls[0]) == 9 and calls[0].isalnum() and calls[0].isascii()
