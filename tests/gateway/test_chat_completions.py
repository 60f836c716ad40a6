"""/v1/chat/completions through the official openai SDK, sync and async, against a live llmhub."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from llmhub.testing.openapi import validate_openai_schema
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_non_streaming_completion_validates_against_openai_schema(gateway):
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello there"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Echo: hello there"
    assert completion.model == "gpt-test"
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens == 3
    validate_openai_schema(json.loads(raw.http_response.text), "CreateChatCompletionResponse")
    assert raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-llmhub-overhead-ms"]) >= 0


def test_streaming_relays_every_chunk_and_usage_when_asked(gateway):
    client = gateway.client()
    with client.chat.completions.with_streaming_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "stream me [[words=12]]"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"].startswith("req_")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(text.split()) == 12
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert any(c["choices"] and c["choices"][0]["finish_reason"] == "stop" for c in chunks)


def test_an_upstream_that_reports_no_usage_is_charged_an_estimate_and_the_client_reads_it(gateway):
    """Some OpenAI-compatible servers report no usage: the request is still charged (counted from the prompt
    and the reply, the row flagged as an estimate), and the response carries that count, as OpenAI's does."""
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "count me [[words=10]] [[usage=none]]"}]
    )
    body = json.loads(raw.http_response.text)
    validate_openai_schema(body, "CreateChatCompletionResponse")
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.usage_estimated and record.prompt_tokens > 0 and record.completion_tokens > 0 and record.cost > 0
    assert body["usage"] == {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.prompt_tokens + record.completion_tokens,
    }


def test_a_stream_whose_upstream_sends_no_usage_still_ends_with_the_usage_chunk_asked_for(gateway):
    """``stream_options.include_usage`` promises a last chunk with usage: when the upstream ignored the option,
    it is the estimate the request is charged."""
    client = gateway.client()
    with client.chat.completions.with_streaming_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "stream me [[words=12]] [[usage=none]]"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        lines = [line for line in response.iter_lines() if line]
        request_id = response.headers["x-request-id"]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    last = chunks[-1]
    assert last["choices"] == [] and last["id"] == chunks[0]["id"] and last["model"] == "gpt-test"
    record = wait_for_record(request_id)
    assert record.usage_estimated and record.completion_tokens > 0
    assert last["usage"] == {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.prompt_tokens + record.completion_tokens,
    }
    assert sum(1 for chunk in chunks if chunk.get("usage")) == 1


def test_a_cjk_stream_an_upstream_did_not_count_is_charged_about_a_token_a_character(gateway):
    """Without the provider's usage the row is the estimate: a CJK character is about a token in the tokenizers
    providers bill by (o200k's, Qwen's, Llama 3's; one or two in cl100k). At four characters a token a Japanese
    reply and its prompt were charged about a quarter of what the provider billed."""
    question, reply = "天気はどうですか？", "今日は晴れです。" * 10
    content = f"{question} [[reply={reply}]] [[usage=none]]"
    with gateway.client().chat.completions.with_streaming_response.create(
        model="gpt-test", messages=[{"role": "user", "content": content}], stream=True
    ) as response:
        chunks = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: {")]
        request_id = response.headers["x-request-id"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == reply
    record = wait_for_record(request_id)
    assert record.usage_estimated
    assert record.completion_tokens == len(reply) == 80
    wide = len(question) + len(reply)  # the prompt's CJK characters, a token each; its ASCII four a token
    assert record.prompt_tokens == wide + math.ceil((len(content) - wide) / 4) + 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_reply_that_is_only_a_legacy_function_call_is_estimated_at_its_arguments_as_a_tool_call_is(gateway, stream):
    """An upstream that reports no usage, answering the legacy ``functions`` with a ``function_call`` and no
    text: its arguments are what the model wrote, so the estimate counts them, as it counts a tool call's (the
    same request with ``tools``), rather than charging the reply nothing."""
    function = WEATHER_TOOL["function"]
    prompt = "what is the weather in Paris today, please, in detail [[usage=none]]"
    client = gateway.client()

    def charged(**extra) -> tuple[str, object]:
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=messages, **extra)
            message = raw.parse().choices[0].message
            call = message.function_call or message.tool_calls[0].function
            return call.arguments, wait_for_record(raw.headers["x-request-id"])
        with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=messages, stream=True, **extra
        ) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
            request_id = response.headers["x-request-id"]
        arguments = ""
        for line in lines:
            for choice in json.loads(line[len("data: ") :])["choices"]:
                delta = choice["delta"]
                for part in [delta.get("function_call")] + [c["function"] for c in delta.get("tool_calls") or []]:
                    arguments += (part or {}).get("arguments") or ""
        return arguments, wait_for_record(request_id)

    arguments, record = charged(functions=[function])
    tool_arguments, tool_record = charged(tools=[WEATHER_TOOL])
    assert arguments == tool_arguments and len(arguments) > 8
    assert record.usage_estimated and tool_record.usage_estimated
    assert record.completion_tokens == tool_record.completion_tokens == math.ceil(len(arguments) / 4)
    assert record.cost > 0


def test_the_legacy_functions_are_part_of_the_prompt_an_upstream_that_reports_no_usage_is_charged(gateway):
    """The functions' definitions are given to the model as tools' are: the prompt's estimate counts them (about
    four characters a token), where it used to charge the same as for a request without them."""
    function = {**WEATHER_TOOL["function"], "description": "The weather in a city, today and for a week. " * 8}
    messages = [{"role": "user", "content": "hello there [[usage=none]]"}]
    client = gateway.client()

    def prompt_charged(**extra) -> int:
        raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=messages, **extra)
        record = wait_for_record(raw.headers["x-request-id"])
        assert record.usage_estimated
        return record.prompt_tokens

    added = prompt_charged(functions=[function]) - prompt_charged()
    assert abs(added - len(json.dumps(function)) / 4) <= 1


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_reasoning_models_reply_is_estimated_with_its_reasoning(gateway, stream, field):
    """A reasoning model behind an OpenAI-compatible server that reports no usage: its reasoning
    (``reasoning_content`` or ``reasoning``) is output those servers bill, so the estimate counts it with the
    reply, and the usage the client reads is what the request was charged."""
    reasoning = "first I weigh the question, then I answer it briefly"
    marker = f"[[reasoning={reasoning}]]" + (" [[reasoning_field=reasoning]]" if field == "reasoning" else "")
    messages = [{"role": "user", "content": f"{marker} [[reply=Fine.]] [[usage=none]]"}]
    client = gateway.client()
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=messages, stream=True, stream_options={"include_usage": True}
        ) as response:
            chunks = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: {")]
            request_id = response.headers["x-request-id"]
        for chunk in chunks:
            validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
        deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
        assert "".join(delta.get(field) or "" for delta in deltas) == reasoning
        usage = chunks[-1]["usage"]
    else:
        raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=messages)
        body = json.loads(raw.http_response.text)
        validate_openai_schema(body, "CreateChatCompletionResponse")
        assert body["choices"][0]["message"][field] == reasoning
        request_id, usage = raw.headers["x-request-id"], body["usage"]
    record = wait_for_record(request_id)
    assert record.usage_estimated
    assert record.completion_tokens >= math.ceil(len(reasoning + "Fine.") / 4)
    assert usage["completion_tokens"] == record.completion_tokens


def test_an_earlier_turns_reasoning_is_part_of_the_prompt_an_upstream_that_reports_no_usage_is_charged(gateway):
    """A reasoning model's reasoning that the client sends back with its earlier turn (``reasoning_content``, as
    DeepSeek's thinking mode asks for it in a tool-call round) reaches the model: the prompt's estimate counts it
    (about four characters a token), where it used to charge the same as for a turn without it."""
    reasoning = "The user asks about the weather, so I look it up and answer briefly. " * 8
    client = gateway.client()

    def prompt_charged(earlier: dict) -> int:
        messages = [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Sunny.", **earlier},
            {"role": "user", "content": "and tomorrow? [[usage=none]]"},
        ]
        raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=messages)
        record = wait_for_record(raw.headers["x-request-id"])
        assert record.usage_estimated
        return record.prompt_tokens

    added = prompt_charged({"reasoning_content": reasoning}) - prompt_charged({})
    assert abs(added - len(reasoning) / 4) <= 1


def test_streaming_without_include_usage_sends_no_usage(gateway):
    stream = gateway.client().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "[[words=5]]"}], stream=True
    )
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split().__len__() == 5


async def test_async_client_streams_and_completes(gateway):
    client = gateway.async_client()
    completion = await client.chat.completions.create(
        model="claude-test", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "Echo: hi"
    stream = await client.chat.completions.create(
        model="claude-test",
        messages=[{"role": "user", "content": "[[words=7]]"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        validate_openai_schema(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert len("".join(pieces).split()) == 7
    assert usage is not None and usage.completion_tokens == 7
    await client.close()


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
def test_tool_call_round_trip(gateway, model):
    client = gateway.client()
    messages = [{"role": "user", "content": "Paris"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    second = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "Tool result: sunny, 21C"


def test_streamed_tool_call_arrives_in_fragments(gateway):
    stream = gateway.client().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "Oslo"}], tools=[WEATHER_TOOL], stream=True
    )
    arguments, name, finish = "", None, None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                name = call.function.name or name
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert name == "get_weather" and json.loads(arguments) == {"city": "Oslo"} and finish == "tool_calls"


def test_unknown_fields_and_logprobs_pass_through(gateway):
    completion = gateway.client().chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "abc def"}],
        logprobs=True,
        seed=7,
        extra_body={"custom_vendor_field": {"x": 1}},
    )
    assert completion.choices[0].logprobs.content[0].token
    sent = gateway.upstream.requests[-1]["body"]
    assert sent["custom_vendor_field"] == {"x": 1} and sent["seed"] == 7 and sent["model"] == "fake-gpt-4o-mini"


def test_sdk_sees_its_own_exception_classes(gateway):
    client = gateway.client()
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        gateway.client(api_key="sk-llmhub-wrongwrongwrongwrongwrongwrongwrongwrong").chat.completions.create(
            model="gpt-test", messages=messages
        )
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=messages)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="disabled-model", messages=messages)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="gpt-test", messages=messages, temperature=3)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="limited", messages=messages)
    assert limited.value.response.headers["retry-after"] == "2"
    with pytest.raises(openai.APIStatusError) as broken:
        client.chat.completions.create(model="broken", messages=messages)
    assert broken.value.status_code == 503


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "gpt-test"}, "messages"),
        ({"model": "gpt-test", "messages": []}, "messages"),
        ({"model": "gpt-test", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "gpt-test", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
        (
            {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools[0].function.name",
        ),
        ({"model": "gpt-test", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "stream_options": {}}, "stream_options"),
    ],
)
def test_bad_input_answers_400_with_the_offending_param(gateway, body, param):
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {gateway.key}"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert gateway.upstream.stats["requests"] == 0


def test_malformed_json_and_wrong_method(gateway):
    headers = {"Authorization": f"Bearer {gateway.key}", "content-type": "application/json"}
    response = httpx.post(gateway.url + "/v1/chat/completions", content=b"{nope", headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = httpx.get(gateway.url + "/v1/chat/completions", headers=headers)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    response = httpx.get(gateway.url + "/v1/nothing/here", headers=headers)
    assert response.status_code == 404 and "error" in response.json()


def test_upstream_auth_failure_is_a_502_without_the_upstream_key(gateway, fake_upstream):
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "[[fault=401]]"}]},
        headers={"Authorization": f"Bearer {gateway.key}"},
    )
    assert response.status_code == 502
    assert "sk-fake-upstream-key" not in response.text
    assert response.json()["error"]["code"] == "upstream_authentication_failed"


def test_upstream_timeout_is_a_504(gateway):
    from providers.models import Provider

    provider = Provider.objects.get(name="fake-openai")
    provider.timeout_seconds = 1
    provider.save()  # an admin save: the catalog cache of this process forgets the old config at once
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "[[fault=hang]]"}]},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_models_endpoint_lists_enabled_models_in_openai_shape(gateway):
    raw = gateway.client().models.with_raw_response.list()
    payload = json.loads(raw.http_response.text)
    validate_openai_schema(payload, "ListModelsResponse")
    ids = {m["id"]: m["owned_by"] for m in payload["data"]}
    assert ids["gpt-test"] == "fake-openai" and ids["claude-test"] == "fake-anthropic"
    assert "disabled-model" not in ids
    assert gateway.client().models.retrieve("gpt-test").owned_by == "fake-openai"
    with pytest.raises(openai.NotFoundError):
        gateway.client().models.retrieve("disabled-model")


def test_a_host_outside_allowed_hosts_is_refused_in_openai_shape(gateway):
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {gateway.key}", "Host": "evil.example"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_host"
    assert gateway.upstream.stats["requests"] == 0


def test_api_responses_are_not_sniffable(gateway):
    response = httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {gateway.key}"})
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_asking_a_text_only_model_for_audio_is_a_400_naming_modalities(gateway, stream):
    """``modalities: ["text", "audio"]`` asks for a spoken answer in ``message.audio``: Claude answers in text
    only, so the request is refused before any upstream call, with its ledger row (until 6 December it was
    answered in text alone, ``message.audio`` null). An OpenAI model gets the request as it came."""
    client = gateway.client()
    audio = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
    messages = [{"role": "user", "content": "say hi"}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="claude-test", messages=messages, stream=stream, **audio)
    assert refused.value.param == "modalities" and refused.value.code == "unsupported_value"
    assert "text only" in refused.value.message
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "invalid" and record.cost == 0
    assert gateway.upstream.requests_served() == 0
    client.chat.completions.create(model="gpt-test", messages=messages, **audio)
    assert {"modalities", "audio"} <= set(gateway.upstream.requests[-1]["body"])
    text_only = client.chat.completions.create(model="claude-test", messages=messages, modalities=["text"])
    assert text_only.choices[0].message.content == "Echo: say hi"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_asking_claude_for_logprobs_is_a_400_naming_logprobs(gateway, stream):
    """Claude returns no log probabilities: ``logprobs: true`` was answered with ``logprobs: null`` (the field
    dropped); it is refused before any upstream call, as OpenAI's reasoning models refuse it, with its ledger row.
    ``false`` asks for nothing and is answered."""
    client = gateway.client()
    messages = [{"role": "user", "content": "say hi"}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="claude-test", messages=messages, stream=stream, logprobs=True)
    assert refused.value.param == "logprobs" and refused.value.code == "unsupported_parameter"
    assert refused.value.body["message"] == (
        "This model does not return log probabilities: `logprobs` is not supported with it."
    )
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "invalid" and record.cost == 0
    assert gateway.upstream.requests_served() == 0
    answered = client.chat.completions.create(model="claude-test", messages=messages, logprobs=False)
    assert answered.choices[0].message.content == "Echo: say hi"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_logit_bias_claude_cannot_apply_is_a_400_naming_it(gateway, stream):
    """Claude has no logit bias: a bias that bans a token was dropped and the token written (until 6 December); it is
    refused before any upstream call, with its ledger row, as Gemini's is. GPT models get it as it came, and an empty
    one asks for nothing."""
    client = gateway.client()
    messages = [{"role": "user", "content": "say hi"}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="claude-test", messages=messages, stream=stream, logit_bias={"50256": -100}
        )
    assert (refused.value.param, refused.value.code) == ("logit_bias", "unsupported_parameter")
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "invalid" and record.cost == 0
    assert gateway.upstream.requests_served() == 0
    answered = client.chat.completions.create(model="claude-test", messages=messages, logit_bias={})
    assert answered.choices[0].message.content == "Echo: say hi"
    client.chat.completions.create(model="gpt-test", messages=messages, logit_bias={"50256": -100})
    assert gateway.upstream.requests[-1]["body"]["logit_bias"] == {"50256": -100}


def test_a_moderation_claude_cannot_run_is_a_400_naming_it(gateway):
    """``moderation`` asks OpenAI to moderate the input and the reply with its model: Claude has none, and the reply
    went unmoderated, unsaid (until 6 December); it is refused before any upstream call, with its ledger row, while a
    GPT model gets it as it came. (llmhub's own moderation is an admin's policy, ``moderation.md``.)"""
    client = gateway.client()
    messages = [{"role": "user", "content": "say hi"}]
    asked = {"moderation": {"model": "omni-moderation-latest"}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="claude-test", messages=messages, extra_body=asked)
    assert (refused.value.param, refused.value.code) == ("moderation", "unsupported_parameter")
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.status == "invalid" and record.cost == 0
    assert gateway.upstream.requests_served() == 0
    client.chat.completions.create(model="gpt-test", messages=messages, extra_body=asked)
    assert gateway.upstream.requests[-1]["body"]["moderation"] == asked["moderation"]


def test_a_jpg_data_url_reaches_claude_as_a_jpeg_in_a_user_and_a_tool_message(gateway):
    """Many clients write ``data:image/jpg;base64,...`` for a JPEG (no registered type, but OpenAI and Ollama read it).
    Before: a 400 invalid_image_format (Claude's base64 source takes image/jpeg); it goes up as image/jpeg, the same
    bytes."""
    url = "data:image/jpg;base64,/9j/4AAQSkZJRg=="
    image = {"type": "image_url", "image_url": {"url": url}}
    call = {"id": "call_1", "type": "function", "function": {"name": "snap", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "shot:"}, image]},
    ]
    tools = [{"type": "function", "function": {"name": "snap", "parameters": {"type": "object", "properties": {}}}}]
    gateway.client().chat.completions.create(model="claude-test", messages=messages, tools=tools)
    sent = gateway.upstream.requests[-1]["body"]["messages"]
    sources = [block["source"] for block in sent[0]["content"] if block["type"] == "image"]
    [result] = [block for block in sent[2]["content"] if block["type"] == "tool_result"]
    sources += [block["source"] for block in result["content"] if block["type"] == "image"]
    assert sources == [{"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRg=="}] * 2


@pytest.mark.parametrize(
    "url",
    [
        "data:text/html;base64,PGI+aGk8L2I+",
        "data:image/heic;base64,AAAAGGZ0eXBoZWlj",
        "data:application/pdf;base64,JVBE",
    ],
    ids=["html", "heic", "pdf"],
)
def test_an_image_of_a_type_claude_does_not_read_is_a_400_naming_its_url_before_any_call(gateway, url):
    """Claude reads images of type image/jpeg, png, gif and webp (Anthropic's base64 image source): a data URL of
    another type went up as the image block's media_type for Anthropic's own 400 after the call."""
    image = {"type": "image_url", "image_url": {"url": url}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(model="claude-test", messages=messages)
    assert (refused.value.param, refused.value.code) == ("messages[0].content[1].image_url.url", "invalid_image_format")
    assert url.partition(";")[0].removeprefix("data:") in refused.value.message
    assert gateway.upstream.requests_served() == 0
