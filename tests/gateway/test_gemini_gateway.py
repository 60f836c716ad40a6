"""A catalog model on a Gemini provider, through a live llmhub with the openai SDK: the gateway speaks OpenAI,
the adapter Gemini (to the fake upstream's Gemini routes), and the ledger prices what Gemini reported."""

from __future__ import annotations

import base64
import json
import math
from decimal import Decimal

import anthropic
import openai
import pytest

from billing.models import UsageRecord
from llmhub.testing.openapi import validate_openai_schema
from providers.models import ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.conftest import REFUSED_TURN, REFUSED_TURN_TEXTS
from tests.gateway.test_moderation import policy_on, sse_stream
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

MILLION = Decimal(1_000_000)
INPUT, CACHED, OUTPUT = Decimal("0.30"), Decimal("0.075"), Decimal("2.50")


@pytest.fixture
def gemini(gateway):
    provider = ProviderFactory(name="fake-gemini", kind=ProviderKind.GEMINI, base_url=gateway.upstream.base_url)
    ModelFactory(
        name="gemini-test",
        provider=provider,
        upstream_id="gemini-2.5-flash",
        input_per_mtok=INPUT,
        output_per_mtok=OUTPUT,
        cached_input_per_mtok=CACHED,
    )
    return gateway


def assert_priced(record: UsageRecord, prompt: int, cached: int, completion: int, *, stream: bool) -> None:
    assert (record.model_name, record.provider_name, record.status, record.stream) == (
        "gemini-test",
        "fake-gemini",
        "ok",
        stream,
    )
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (prompt, cached, completion)
    assert not record.usage_estimated
    expected = ((prompt - cached) * INPUT + cached * CACHED + completion * OUTPUT) / MILLION
    assert record.cost == expected


def test_a_completion_through_gemini_is_answered_and_priced(gemini):
    raw = gemini.client().chat.completions.with_raw_response.create(
        model="gemini-test",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there [[cache=2]]"}],
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateChatCompletionResponse")
    completion = raw.parse()
    assert completion.model == "gemini-test"
    assert completion.choices[0].message.content == "Echo: hello there"
    usage = completion.usage
    assert usage.prompt_tokens_details.cached_tokens == 2
    assert gemini.upstream.requests[-1]["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"

    record = wait_for_record(raw.headers["x-request-id"])
    assert_priced(record, usage.prompt_tokens, 2, usage.completion_tokens, stream=False)


def test_a_stream_through_gemini_relays_chunks_and_is_priced(gemini):
    with gemini.client().chat.completions.with_streaming_response.create(
        model="gemini-test",
        messages=[{"role": "user", "content": "stream me [[words=9]]"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(text.split()) == 9
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 9
    assert gemini.upstream.requests[-1]["path"] == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"

    record = wait_for_record(request_id)
    assert_priced(record, usage["prompt_tokens"], 0, 9, stream=True)


def test_a_gemini_rate_limit_tells_the_client_when_to_retry(gemini):
    # Gemini says how long to wait in its error body (RetryInfo.retryDelay), not in a Retry-After header.
    with pytest.raises(openai.RateLimitError) as caught:
        gemini.client().chat.completions.create(
            model="gemini-test", messages=[{"role": "user", "content": "hi [[fault=status=429,retry_after=7]]"}]
        )
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.body["code"] == "upstream_rate_limited"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_n_candidates_through_gemini_come_back_as_n_choices_and_are_priced(gemini):
    raw = gemini.client().chat.completions.with_raw_response.create(
        model="gemini-test", messages=[{"role": "user", "content": "[[words=4]]"}], n=2
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateChatCompletionResponse")
    completion = raw.parse()
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert [choice.message.content for choice in completion.choices] == ["lorem ipsum dolor sit"] * 2
    assert completion.usage.completion_tokens == 8
    assert gemini.upstream.requests[-1]["body"]["generationConfig"]["candidateCount"] == 2

    record = wait_for_record(raw.headers["x-request-id"])
    assert_priced(record, completion.usage.prompt_tokens, 0, 8, stream=False)


def test_n_candidates_streamed_through_gemini_keep_their_choice_index(gemini):
    with gemini.client().chat.completions.with_streaming_response.create(
        model="gemini-test",
        messages=[{"role": "user", "content": "[[words=4]]"}],
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    for index in (0, 1):
        choices = [c for chunk in chunks for c in chunk["choices"] if c["index"] == index]
        assert "".join(c["delta"].get("content") or "" for c in choices) == "lorem ipsum dolor sit"
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == 8

    record = wait_for_record(request_id)
    assert_priced(record, chunks[-1]["usage"]["prompt_tokens"], 0, 8, stream=True)


def test_n_tool_calls_streamed_through_gemini_are_each_their_choices_first(gemini):
    # OpenAI numbers a streamed tool call within its choice: each choice's first call is index 0, which is
    # how the SDK's stream helper puts the pieces of a call back together.
    with gemini.client().chat.completions.stream(
        model="gemini-test",
        messages=[{"role": "user", "content": "Paris"}],
        tools=[WEATHER_TOOL],
        n=2,
    ) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        completion = stream.get_final_completion()
    indexes = [
        (choice.index, call.index)
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or ()
    ]
    assert indexes == [(0, 0), (1, 0)]
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert completion.choices[0].message.tool_calls[0].id != completion.choices[1].message.tool_calls[0].id


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_through_gemini_come_back_as_openai_logprobs(gemini, stream):
    # Gemini gives them when generationConfig asks (responseLogprobs, and logprobs for the alternatives): left
    # out of the request, the client that asked for logprobs got null, as if the model had none.
    response = gemini.client().chat.completions.with_raw_response.create(
        model="gemini-test",
        messages=[{"role": "user", "content": "[[words=3]]"}],
        logprobs=True,
        top_logprobs=2,
        stream=stream,
    )
    if stream:
        chunks = list(response.parse())
        for chunk in chunks:
            wire = chunk.model_dump(mode="json", exclude_unset=True)
            validate_openai_schema(wire, "CreateChatCompletionStreamResponse")
        logprobs = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        entries = [entry for each in logprobs for entry in each.content]
    else:
        validate_openai_schema(json.loads(response.http_response.text), "CreateChatCompletionResponse")
        entries = response.parse().choices[0].logprobs.content
    assert [entry.token for entry in entries] == ["lorem", " ipsum", " dolor"]
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token


@pytest.mark.parametrize(("effort", "budget"), [("none", 0), ("minimal", 1024), ("low", 1024), ("high", 24576)])
def test_reasoning_effort_reaches_gemini_as_a_thinking_budget(gemini, effort, budget):
    # Gemini 2.5 thinks by default, and its thinking is billed as output: a client that asked for no reasoning
    # must not pay for it because the setting was dropped on the way.
    completion = gemini.client().chat.completions.create(
        model="gemini-test", messages=[{"role": "user", "content": "hi"}], reasoning_effort=effort
    )
    assert completion.choices[0].message.content == "Echo: hi"
    thinking = gemini.upstream.requests[-1]["body"]["generationConfig"]["thinkingConfig"]
    # google-genai sends this object's fields in the proto's own spelling, which Google's JSON reads as well;
    # asked to reason, the model's thoughts are asked for too.
    expected = {"thinkingBudget": budget, "includeThoughts": True} if budget else {"thinkingBudget": 0}
    assert thinking in (
        expected,
        {"thinking_budget": budget, "include_thoughts": True} if budget else {"thinking_budget": 0},
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_geminis_thoughts_come_back_as_reasoning_content_when_reasoning_effort_asks_for_them(gemini, stream):
    thought = "first I weigh the question, then I answer it"
    body = {
        "model": "gemini-test",
        "reasoning_effort": "low",
        "messages": [{"role": "user", "content": f"[[thinking={thought}]] hi"}],
    }
    client = gemini.client()
    if stream:
        with client.chat.completions.with_streaming_response.create(
            **body, stream=True, stream_options={"include_usage": True}
        ) as response:
            chunks = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: {")]
        for chunk in chunks:
            validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
        deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
        assert "".join(delta.get("reasoning_content") or "" for delta in deltas) == thought
        assert "".join(delta.get("content") or "" for delta in deltas) == "Echo: hi"
        usage = chunks[-1]["usage"]
    else:
        raw = client.chat.completions.with_raw_response.create(**body)
        completion = json.loads(raw.http_response.text)
        validate_openai_schema(completion, "CreateChatCompletionResponse")
        message = completion["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == (thought, "Echo: hi")
        usage = completion["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == len(thought.split())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_geminis_thoughts_are_charged_when_gemini_reports_no_usage(gemini, stream):
    thought = ("first I weigh the question at some length, then I answer it briefly " * 4).strip()
    messages = [{"role": "user", "content": f"[[thinking={thought}]] [[reply=Fine.]] [[usage=none]]"}]
    client = gemini.client()
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="gemini-test", messages=messages, reasoning_effort="low", stream=True
        ) as response:
            for _ in response.iter_lines():
                pass
            request_id = response.headers["x-request-id"]
    else:
        raw = client.chat.completions.with_raw_response.create(
            model="gemini-test", messages=messages, reasoning_effort="low"
        )
        request_id = raw.headers["x-request-id"]
    record = wait_for_record(request_id)
    assert record.usage_estimated
    assert record.completion_tokens >= math.ceil(len(thought + "Fine.") / 4)


def test_a_reasoning_effort_gemini_has_no_budget_for_is_a_400_naming_it(gemini):
    served = gemini.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        gemini.client().chat.completions.create(
            model="gemini-test", messages=[{"role": "user", "content": "hi"}], reasoning_effort="xhigh"
        )
    assert (caught.value.body["param"], caught.value.body["code"]) == ("reasoning_effort", "unsupported_value")
    assert "xhigh" in caught.value.body["message"]
    assert gemini.upstream.requests_served() == served


@pytest.mark.parametrize("effort", ["xhigh", "max"])
def test_an_effort_gemini_has_no_budget_for_on_messages_is_a_400_naming_the_clients_field(gemini, effort):
    """A /v1/messages client asks for effort in ``output_config.effort``; the 400 named ``reasoning_effort``, a field
    it never sent. It names the client's field, with the levels Gemini has, before any upstream call."""
    served = gemini.upstream.requests_served()
    sdk = anthropic.Anthropic(base_url=gemini.url, api_key=gemini.key, max_retries=0, timeout=20)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(
            model="gemini-test",
            max_tokens=50,
            output_config={"effort": effort},
            messages=[{"role": "user", "content": "hi"}],
        )
    message = caught.value.body["error"]["message"]
    assert message.startswith("output_config.effort: ")
    assert repr(effort) in message and "'high'" in message
    assert "reasoning_effort" not in message
    assert gemini.upstream.requests_served() == served


def test_a_logit_bias_gemini_cannot_apply_is_a_400_naming_it(gemini):
    """Gemini has no logit bias: a bias that bans a token would otherwise be dropped and the token written."""
    served = gemini.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        gemini.client().chat.completions.create(
            model="gemini-test", messages=[{"role": "user", "content": "hi"}], logit_bias={"50256": -100}
        )
    assert (caught.value.body["param"], caught.value.body["code"]) == ("logit_bias", "unsupported_parameter")
    assert gemini.upstream.requests_served() == served
    record = wait_for_record(caught.value.response.headers["x-request-id"])
    assert (record.status, record.error_type) == ("invalid", "unsupported_parameter")  # not the provider's failure


@pytest.mark.parametrize("stream", [False, True])
def test_no_parallel_tool_calls_through_gemini_gets_one_call_a_turn(gemini, stream):
    """Gemini asks for several calls at once (here three, ``[[tool_calls=3]]``) and cannot be told not to: a
    client that sent ``parallel_tool_calls: false`` gets the first; one that did not gets them all."""

    def calls(**extra):
        request = {
            "model": "gemini-test",
            "messages": [{"role": "user", "content": "Paris [[tool_calls=3]]"}],
            "tools": [WEATHER_TOOL],
            **extra,
        }
        if not stream:
            completion = gemini.client().chat.completions.create(**request)
        else:
            with gemini.client().chat.completions.stream(**request) as events:
                completion = events.get_final_completion()
        assert completion.choices[0].finish_reason == "tool_calls"
        return completion.choices[0].message.tool_calls

    [call] = calls(parallel_tool_calls=False)
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert len({call.id for call in calls()}) == 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_blocked_word_in_geminis_thoughts_is_checked_as_output(gemini, stream):
    policy_on("gemini-test", blocklist="forbidden", check_input=False, stream_interval_chars=1)
    body = {
        "model": "gemini-test",
        "reasoning_effort": "low",
        "messages": [{"role": "user", "content": "[[thinking=it ends ｆｏｒｂｉｄｄｅｎ]] hi"}],
    }
    if stream:
        events, request_id = sse_stream(gemini, {**body, "stream": True})
        assert events[-1]["error"]["code"] == "content_policy_violation"
        assert "ｆｏｒｂｉｄｄｅｎ" not in json.dumps(events, ensure_ascii=False)
    else:
        with pytest.raises(openai.BadRequestError) as withheld:
            gemini.client().chat.completions.create(**body)
        assert withheld.value.code == "content_policy_violation"
        request_id = withheld.value.response.headers["x-request-id"]
    record = wait_for_record(request_id)
    assert record.error_type == "content_policy_violation" and record.moderation.startswith("blocked output")


SIX_STOPS = ["one", "two", "three", "four", "five", "six"]


def test_more_stop_sequences_than_gemini_takes_are_refused_naming_stop_sequences(gemini):
    """Gemini's generationConfig.stopSequences takes up to 5 strings; a /v1/messages request with more was sent on
    for Gemini's own 400 naming a field the client never sent. It is refused before any upstream call, naming
    ``stop_sequences``; 5 reach Gemini, every one."""
    served = gemini.upstream.requests_served()
    sdk = anthropic.Anthropic(base_url=gemini.url, api_key=gemini.key, max_retries=0, timeout=20)
    request = {"model": "gemini-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(**request, stop_sequences=SIX_STOPS)
    message = caught.value.body["error"]["message"]
    assert message.startswith("stop_sequences: ") and "at most 5" in message
    assert gemini.upstream.requests_served() == served

    assert sdk.messages.create(**request, stop_sequences=SIX_STOPS[:5]).type == "message"
    assert gemini.upstream.requests[-1]["body"]["generationConfig"]["stopSequences"] == SIX_STOPS[:5]


@pytest.mark.parametrize("upstream_id", ["gemini-2.5-pro", "gemini-2.5-pro-preview-06-05", "gemini-3-pro-preview"])
@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_reasoning_effort_none_is_refused_for_a_gemini_pro_model_before_any_call(gemini, upstream_id, endpoint):
    """Gemini's Pro models cannot turn their thinking off (2.5 Pro's budget is 128 to 32768, 3 Pro's thinking is always
    on): ``none`` became ``thinkingBudget`` 0 and Google's 400 came back after the call. It is refused before any call,
    naming the client's field (``reasoning.effort`` on /v1/responses), the levels the model takes and the model by
    the name the client sent: until 7 December it named the deployment's upstream id, which the client never sent
    and an admin may keep to itself."""
    ModelFactory(
        name="gemini-pro-test",
        provider=ProviderFactory(name="fake-gemini-pro", kind=ProviderKind.GEMINI, base_url=gemini.upstream.base_url),
        upstream_id=upstream_id,
    )
    served = gemini.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == "chat":
            gemini.client().chat.completions.create(
                model="gemini-pro-test", messages=[{"role": "user", "content": "hi"}], reasoning_effort="none"
            )
        else:
            gemini.client().responses.create(model="gemini-pro-test", input="hi", reasoning={"effort": "none"})
    error = caught.value.body
    param = "reasoning_effort" if endpoint == "chat" else "reasoning.effort"
    assert (error["param"], error["code"]) == (param, "unsupported_value")
    assert "cannot turn its thinking off" in error["message"] and "'low'" in error["message"]
    assert error["message"].startswith("gemini-pro-test ") and upstream_id not in error["message"]
    assert gemini.upstream.requests_served() == served


@pytest.mark.parametrize("upstream_id", ["gemini-2.5-flash", "gemini-2.5-flash-lite"])
def test_reasoning_effort_none_turns_a_gemini_flash_models_thinking_off(gemini, upstream_id):
    """A model that can stop thinking (2.5 Flash, Flash-Lite) is sent ``thinkingBudget`` 0 for ``none``, as before."""
    ModelFactory(
        name="gemini-flash-test",
        provider=ProviderFactory(name="fake-gemini-flash", kind=ProviderKind.GEMINI, base_url=gemini.upstream.base_url),
        upstream_id=upstream_id,
    )
    gemini.client().chat.completions.create(
        model="gemini-flash-test", messages=[{"role": "user", "content": "hi"}], reasoning_effort="none"
    )
    thinking = gemini.upstream.requests[-1]["body"]["generationConfig"]["thinkingConfig"]
    assert thinking in ({"thinkingBudget": 0}, {"thinking_budget": 0})


@pytest.mark.parametrize(
    ("url", "mime_type"),
    [
        ("data:image/png;base64,iVBORw0KGgo=", "image/png"),
        ("data:image/jpeg;base64,/9j/4AAQ", "image/jpeg"),
        ("data:IMAGE/JPEG;base64,/9j/4AAQ", "image/jpeg"),
        # no registered type, but many clients write it for a JPEG (OpenAI and Ollama read it): sent as image/jpeg
        ("data:image/jpg;base64,/9j/4AAQ", "image/jpeg"),
        ("data:Image/JPG;base64,/9j/4AAQ", "image/jpeg"),
        ("data:image/webp;base64,UklGRg==", "image/webp"),
        ("data:image/heic;base64,AAAAGGZ0eXBoZWlj", "image/heic"),
        ("data:image/heif;base64,AAAAGGZ0eXBoZWlm", "image/heif"),
        ("data:;base64,iVBORw0KGgo=", "image/png"),
    ],
)
def test_an_image_of_a_type_gemini_reads_reaches_it_as_inline_data_of_that_type(gemini, url, mime_type):
    image = {"type": "image_url", "image_url": {"url": url}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
    gemini.client().chat.completions.create(model="gemini-test", messages=messages)
    [_, inline] = gemini.upstream.requests[-1]["body"]["contents"][0]["parts"]
    # google-genai writes the blob's type in snake case, which Google's JSON reads as its camel case, and its bytes in
    # URL-safe base64
    sent = inline["inlineData"]
    assert sent.get("mimeType", sent.get("mime_type")) == mime_type
    assert base64.urlsafe_b64decode(sent["data"]) == base64.b64decode(url.partition(",")[2])


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ],
    ids=["image", "audio"],
)
def test_a_tool_messages_part_that_is_not_text_is_refused_for_gemini_not_dropped(gemini, part):
    """A tool message's result reaches Gemini as its function response's text: an image part in it (a screenshot
    tool's) was dropped without a word, the model answering as if the tool had shown nothing. It is refused before any
    call, naming the part's type (Claude's translation takes it, in its tool_result, so chat validation does not)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "see the map"}, part]},
    ]
    served = gemini.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        gemini.client().chat.completions.create(model="gemini-test", messages=messages, tools=[tool])
    assert caught.value.body["param"] == "messages[2].content[1].type"
    assert repr(part["type"]) in caught.value.body["message"]
    assert gemini.upstream.requests_served() == served


@pytest.mark.parametrize("role", ["system", "developer"])
@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ],
    ids=["image", "audio"],
)
def test_a_system_messages_part_that_is_not_text_is_refused_for_gemini_not_dropped(gemini, role, part):
    """Gemini's ``systemInstruction`` takes text only (Google: "only text should be used in parts"): an image part
    of a system or developer message was dropped without a word, the model answering without the picture it was
    told to go by. It is refused before any call, naming the part's type, as a tool message's is."""
    messages = [
        {"role": role, "content": [{"type": "text", "text": "Answer in the style of this picture."}, part]},
        {"role": "user", "content": "hi"},
    ]
    served = gemini.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        gemini.client().chat.completions.create(model="gemini-test", messages=messages)
    assert caught.value.body["param"] == "messages[0].content[1].type"
    assert repr(part["type"]) in caught.value.body["message"]
    assert gemini.upstream.requests_served() == served


@pytest.mark.parametrize(
    "asked",
    [
        {"thinking": {"type": "disabled"}},
        {"thinking": {"type": "adaptive"}},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        {"output_config": {"effort": "low"}},
        {"thinking": {"type": "disabled"}, "output_config": {"effort": "high"}},
    ],
    ids=["disabled", "adaptive", "enabled", "effort", "disabled-with-effort"],
)
def test_a_messages_request_to_a_gemini_pro_model_never_sends_a_thinking_budget_of_0(gemini, asked):
    """Google refuses ``thinkingBudget`` 0 for a Pro model (it only thinks), as the fake upstream does: ``none``
    is refused first (``translate_gemini.always_thinks``), and no other way a client asks (the Messages API's
    thinking disabled, adaptive or enabled, or an effort) comes to 0: thinking disabled sends no budget, the
    model thinking as it does, and the others a budget it takes."""
    ModelFactory(
        name="gemini-pro-test",
        provider=ProviderFactory(name="fake-gemini-pro", kind=ProviderKind.GEMINI, base_url=gemini.upstream.base_url),
        upstream_id="gemini-2.5-pro",
    )
    sdk = anthropic.Anthropic(base_url=gemini.url, api_key=gemini.key, max_retries=0, timeout=20)
    request = {"model": "gemini-pro-test", "max_tokens": 2048, "messages": [{"role": "user", "content": "hi"}]}
    assert sdk.messages.create(**request, **asked).type == "message"
    config = gemini.upstream.requests[-1]["body"].get("generationConfig") or {}
    thinking = config.get("thinkingConfig") or {}
    assert thinking.get("thinkingBudget", thinking.get("thinking_budget")) != 0


def test_a_system_messages_text_parts_reach_gemini_each_as_written(gemini):
    """A system message's text parts were joined with a blank line between them, where OpenAI concatenates a message's
    parts with nothing between (a client that split a text mid-word meant it whole). Each text part is one part of
    Gemini's ``systemInstruction``, exactly as written, in order, a developer message's after it; an empty one says
    nothing and is not sent."""
    messages = [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "Answer in Fre"},
                {"type": "text", "text": "nch, "},
                {"type": "text", "text": ""},
                {"type": "text", "text": "briefly."},
            ],
        },
        {"role": "developer", "content": "Sign off as Bot."},
        {"role": "user", "content": "hi"},
    ]
    gemini.client().chat.completions.create(model="gemini-test", messages=messages)
    instruction = gemini.upstream.requests[-1]["body"]["systemInstruction"]
    assert instruction["parts"] == [
        {"text": "Answer in Fre"},
        {"text": "nch, "},
        {"text": "briefly."},
        {"text": "Sign off as Bot."},
    ]


def test_an_assistant_turns_refusal_part_reaches_gemini_as_its_text(gemini):
    """OpenAI's spec types an assistant message's parts as text or ``refusal``; a conversation given back with one was
    refused for Gemini (a part it "cannot take"), where Claude's translation sends it on as text. It is a text part of
    the model's turn, in its place among the others."""
    messages = REFUSED_TURN
    gemini.client().chat.completions.create(model="gemini-test", messages=messages)
    contents = gemini.upstream.requests[-1]["body"]["contents"]
    parts = [{"text": text} for text in REFUSED_TURN_TEXTS]
    assert contents[1] == {"role": "model", "parts": parts}


@pytest.mark.parametrize(
    ("role", "part"),
    [
        ("user", {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}),
        (
            "user",
            {"type": "file", "file": {"filename": "notes.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
        ),
        ("user", {"type": "refusal", "refusal": "no"}),
    ],
    ids=["audio", "file", "user-refusal"],
)
def test_a_part_gemini_cannot_take_is_a_400_naming_the_part(gemini, role, part):
    """A part the translation has no Gemini form for was refused naming the whole ``messages[N].content``, where the
    other translations name the part. The 400 names ``messages[N].content[M].type`` and the part's type, before any
    call."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": role, "content": [{"type": "text", "text": "What is in this?"}, part]},
    ]
    served = gemini.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        gemini.client().chat.completions.create(model="gemini-test", messages=messages)
    assert caught.value.body["param"] == "messages[1].content[1].type"
    assert repr(part["type"]) in caught.value.body["message"]
    assert gemini.upstream.requests_served() == served


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://example.com/cat.png", "image_url_not_supported"),
        ("data:image/png;base64,not base64!", "invalid_value"),
        ("data:text/html;base64,PGI+aGk8L2I+", "invalid_image_format"),
        ("data:application/x-msdownload;base64,TVqQAAMAAAAEAAAA", "invalid_image_format"),
        ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "invalid_image_format"),
    ],
    ids=["remote", "bad-base64", "html", "executable", "gif"],
)
def test_an_image_gemini_cannot_take_is_a_400_naming_its_url(gemini, url, code):
    """An image URL Gemini cannot take (one it would have to fetch: it takes data URLs only; a data URL that is not
    base64) was refused naming the whole ``messages[N].content``, where the other parts Gemini refuses, and Claude's
    translation a refused image, name the part. The 400 names ``messages[N].content[M].image_url.url``, before any
    call. (An assistant message's image, which this test sent too, is chat validation's 400 since 7 December:
    test_content_parts_by_role.py.) A data URL of a type Gemini does not read as an image (HTML, an executable, a GIF:
    Google's image types are PNG, JPEG, WEBP, HEIC and HEIF) went up as its inlineData's mimeType for Google's own 400
    after the call: it is refused before it, with OpenAI's code for an image of a format it does not read."""
    image = {"type": "image_url", "image_url": {"url": url}}
    messages = [
        {"role": "user", "content": "Look."},
        {"role": "user", "content": [{"type": "text", "text": "This one:"}, image]},
        {"role": "user", "content": "What is it?"},
    ]
    served = gemini.upstream.requests_served()
    with pytest.raises(openai.BadRequestError) as caught:
        gemini.client().chat.completions.create(model="gemini-test", messages=messages)
    assert (caught.value.body["param"], caught.value.body["code"]) == ("messages[1].content[1].image_url.url", code)
    assert "messages[1].content[1].image_url.url" in caught.value.body["message"]
    assert gemini.upstream.requests_served() == served
