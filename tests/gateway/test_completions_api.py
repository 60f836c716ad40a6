"""``POST /v1/completions`` (OpenAI's legacy text completions, and code completion's fill-in-the-middle): the
official ``openai`` SDK's ``completions.create`` against a live llmhub, with the fake upstream's ``/v1/completions``
behind an OpenAI-protocol model (``gpt-test``). Answers and chunks are checked against OpenAI's published spec; every
request has its one ledger row, ``operation=completions``."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest
from django.test import override_settings

from billing.models import UsageRecord
from billing.services.budgets import api_key_limits_set
from llmhub.testing.fake_upstream import raw_directive
from llmhub.testing.openapi import validate_openai_schema
from providers.models import CatalogModel, Deployment, ModelMode, Provider, ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_moderation import policy_on
from tests.test_metrics import TOKEN, scrape, scrape_until, value
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

MILLION = Decimal(1_000_000)
INPUT, OUTPUT = Decimal("0.15"), Decimal("0.60")


def sent(gateway) -> list[dict]:
    """The bodies the fake upstream's ``/v1/completions`` received."""
    return [request["body"] for request in gateway.upstream.requests if request["path"] == "/v1/completions"]


def sse(gateway, body: dict) -> tuple[httpx.Response, list[dict | str]]:
    """A streamed completion's ``data:`` payloads as they came over the wire (``[DONE]`` as a string)."""
    headers = {"Authorization": f"Bearer {gateway.key}"}
    with httpx.stream(
        "POST", gateway.url + "/v1/completions", json={**body, "stream": True}, headers=headers, timeout=20
    ) as reply:
        payloads: list[dict | str] = [
            line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in reply.iter_lines()
            if line.startswith("data: ")
        ]
    return reply, payloads


def assert_row(request_id: str, *, prompt: int, completion: int, estimated: bool = False, **fields) -> UsageRecord:
    record = wait_for_record(request_id)
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1
    assert (record.operation, record.endpoint) == ("completions", "rest")
    assert (record.prompt_tokens, record.completion_tokens, record.usage_estimated) == (prompt, completion, estimated)
    assert record.cost == (prompt * INPUT + completion * OUTPUT) / MILLION
    for name, expected in {"status": "ok", "model_name": "gpt-test", **fields}.items():
        assert getattr(record, name) == expected, name
    return record


def test_a_completion_is_relayed_in_openais_shape_with_one_priced_row(gateway):
    raw = gateway.client().completions.with_raw_response.create(
        model="gpt-test", prompt="Say this is a test [[reply=This is a test]]", max_tokens=7, temperature=0
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateCompletionResponse")
    completion = raw.parse()
    assert completion.object == "text_completion" and completion.model == "gpt-test"  # the catalog's name
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [(0, "This is a test", "stop")]
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (9, 4)  # the fake counts words
    assert sent(gateway)[0]["model"] == "fake-gpt-4o-mini" and sent(gateway)[0]["max_tokens"] == 7
    assert_row(raw.headers["x-request-id"], prompt=9, completion=4)


def test_fill_in_the_middle_sends_the_suffix_upstream_as_is(gateway):
    raw = gateway.client().completions.with_raw_response.create(
        model="gpt-test", prompt="def add(a, b):\n    [[reply=return a + b]]", suffix="\n\nprint(add(1, 2))\n"
    )
    completion = raw.parse()
    assert completion.choices[0].text == "return a + b"
    assert sent(gateway)[0]["suffix"] == "\n\nprint(add(1, 2))\n"
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens == 4
    assert_row(raw.headers["x-request-id"], prompt=usage.prompt_tokens, completion=4)


def test_several_prompts_token_prompts_echo_and_logprobs(gateway):
    client = gateway.client()
    raw = client.completions.with_raw_response.create(
        model="gpt-test", prompt=["one", "two [[reply=ok]]"], n=2, logprobs=2, echo=True
    )
    completion = raw.parse()
    validate_openai_schema(json.loads(raw.http_response.text), "CreateCompletionResponse")
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.choices[3].text == "two [[reply=ok]]ok" and completion.choices[0].logprobs.tokens == ["ok"]
    assert_row(raw.headers["x-request-id"], prompt=3, completion=4)

    raw = client.completions.with_raw_response.create(model="gpt-test", prompt=[101, 102, 103], max_tokens=2)
    completion = raw.parse()
    assert sent(gateway)[-1]["prompt"] == [101, 102, 103]
    assert completion.usage.prompt_tokens == 3  # one a token
    assert_row(raw.headers["x-request-id"], prompt=3, completion=completion.usage.completion_tokens)


def test_a_stream_relays_text_completion_chunks_with_the_usage_asked_for(gateway):
    chunks = list(
        gateway.client().completions.create(
            model="gpt-test", prompt="[[reply=one two three]]", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two three"
    assert {c.model for c in chunks} == {"gpt-test"} and {c.object for c in chunks} == {"text_completion"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3

    reply, payloads = sse(gateway, {"model": "gpt-test", "prompt": "[[reply=one two]]"})
    assert payloads[-1] == "[DONE]"
    *data, _ = payloads
    for chunk in data:
        # OpenAI's own chunks say a null finish_reason until the last, and a null usage, which the schema (the
        # whole reply's, which the chunks share) does not allow: the last is checked, without its null usage.
        if chunk["choices"][0]["finish_reason"] is not None:
            validate_openai_schema({k: v for k, v in chunk.items() if v is not None}, "CreateCompletionResponse")
    assert not any(chunk.get("usage") for chunk in data)  # not asked for: the upstream's usage is not relayed
    assert_row(reply.headers["x-request-id"], prompt=2, completion=2)


def test_a_stream_without_upstream_usage_is_estimated_and_the_estimate_relayed(gateway):
    reply, payloads = sse(
        gateway,
        {
            "model": "gpt-test",
            "prompt": "[[reply=alpha beta]] [[usage=none]]",
            "stream_options": {"include_usage": True},
        },
    )
    usage = payloads[-2]["usage"]
    assert payloads[-2]["object"] == "text_completion" and payloads[-2]["choices"] == []
    record = assert_row(
        reply.headers["x-request-id"],
        prompt=usage["prompt_tokens"],
        completion=usage["completion_tokens"],
        estimated=True,
    )
    assert record.completion_tokens > 0


def test_a_stream_cut_after_its_first_chunk_ends_in_band_without_done(gateway):
    reply, payloads = sse(gateway, {"model": "gpt-test", "prompt": "[[words=8]] [[fault=cut-3]]"})
    assert reply.status_code == 200
    assert "[DONE]" not in payloads
    assert payloads[-1]["error"]["type"] in ("api_error", "server_error", "upstream_error")
    record = wait_for_record(reply.headers["x-request-id"])
    assert (record.operation, record.status) == ("completions", "upstream_error")
    assert UsageRecord.objects.filter(request_id=reply.headers["x-request-id"]).count() == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt[1]"),
        ({"prompt": [[1, 2], [3, "x"]]}, "prompt[1][1]"),
        ({"prompt": "x", "suffix": 3}, "suffix"),
        ({"prompt": "x", "suffix": "y", "echo": True}, "echo"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
        ({"prompt": "x", "best_of": 21}, "best_of"),
        ({"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
        ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter_with_a_rejected_row(gateway, body, param):
    reply = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": "gpt-test", **body},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    )
    assert reply.status_code == 400, reply.text
    validate_openai_schema(reply.json(), "ErrorResponse")
    assert reply.json()["error"]["param"] == param
    record = wait_for_record(reply.headers["x-request-id"])
    assert (record.operation, record.status) == ("completions", "rejected")
    assert sent(gateway) == []


def test_a_chat_only_model_and_an_embedding_model_are_refused_before_admission(gateway):
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="claude-test", prompt="Once upon a time")
    assert refused.value.body["param"] == "model" and refused.value.body["code"] == "model_not_supported"
    assert "/v1/chat/completions" in refused.value.body["message"]
    ModelFactory(
        name="embed-test",
        provider=Provider.objects.get(name="fake-openai"),
        upstream_id="fake-embedding-small",
        mode=ModelMode.EMBEDDING,
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="embed-test", prompt="Once upon a time")
    assert refused.value.body["code"] == "model_not_supported"
    assert gateway.upstream.requests_served() == 0


def test_a_model_with_a_chat_only_deployment_is_routed_to_the_one_that_completes(gateway):
    catalog = CatalogModel.objects.create(name="mixed", strategy="priority")
    Deployment.objects.create(
        model=catalog,
        name="chat-only",
        provider=Provider.objects.get(name="fake-anthropic"),
        upstream_id="fake-claude-haiku",
        input_per_mtok=INPUT,
        output_per_mtok=OUTPUT,
    )
    Deployment.objects.create(
        model=catalog,
        name="completes",
        provider=Provider.objects.get(name="fake-openai"),
        upstream_id="fake-gpt-4o-mini",
        priority=1,
        input_per_mtok=INPUT,
        output_per_mtok=OUTPUT,
    )
    raw = gateway.client().completions.with_raw_response.create(model="mixed", prompt="[[reply=done]]")
    assert raw.parse().choices[0].text == "done"
    assert raw.headers["x-llmhub-deployment"] == "completes" and raw.headers["x-llmhub-attempts"] == "1"


def test_an_exhausted_budget_is_a_429_before_any_upstream_call(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.0001"))
    with pytest.raises(openai.RateLimitError):
        gateway.client().completions.create(model="gpt-test", prompt="hi", max_tokens=4000, best_of=3, n=3)
    assert gateway.upstream.requests_served() == 0


def test_the_fallback_answers_when_the_model_fails_and_a_chat_only_fallback_is_skipped(gateway):
    openai_provider = Provider.objects.get(name="fake-openai")
    ModelFactory(name="chatty", provider=Provider.objects.get(name="fake-anthropic"), upstream_id="fake-claude-haiku")
    ModelFactory(name="backup", provider=openai_provider, upstream_id="fake-gpt-4o-mini")
    ModelFactory(name="failing", provider=openai_provider, upstream_id="fault-503", retries=0)
    CatalogModel.objects.filter(name="failing").update(fallbacks=["chatty", "backup"])
    raw = gateway.client().completions.with_raw_response.create(model="failing", prompt="[[reply=saved]]")
    assert raw.parse().choices[0].text == "saved" and raw.parse().model == "backup"
    assert raw.headers["x-llmhub-attempts"] == "2"
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.operation, record.model_name, record.requested_model, record.attempts) == (
        "completions",
        "backup",
        "failing",
        2,
    )


def test_moderation_reads_the_prompt_and_the_suffix_and_refuses_token_prompts(gateway):
    policy_on("gpt-test", blocklist="forbidden")
    client = gateway.client()
    for body in ({"prompt": "a forbidden word"}, {"prompt": "fine", "suffix": "the forbidden part"}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="gpt-test", **body)
        assert refused.value.body["code"] == "content_policy_violation"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="gpt-test", prompt=[1, 2, 3])
    assert refused.value.body["param"] == "prompt"
    assert sent(gateway) == []
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="gpt-test", prompt="say [[reply=something forbidden]]")
    assert refused.value.body["code"] == "content_policy_violation"  # the output, checked once it came


@pytest.mark.parametrize("kind", [ProviderKind.OLLAMA])
def test_ollama_takes_one_text_prompt_and_refuses_what_it_would_ignore(gateway, kind):
    ModelFactory(
        name="local",
        provider=ProviderFactory(name="fake-ollama", kind=kind, base_url=gateway.upstream.base_url + "/ollama/v1"),
        upstream_id="qwen2.5-coder",
    )
    client = gateway.client()
    completion = client.completions.create(model="local", prompt="x = [[reply=1]]", suffix="\n")
    assert completion.choices[0].text == "1" and completion.model == "local"
    chunks = list(client.completions.create(model="local", prompt="[[reply=a b]]", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a b"
    for body, param in (
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2]}, "prompt"),
        ({"prompt": "a", "n": 2}, "n"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="local", **body)
        assert refused.value.body["param"] == param


def test_get_is_a_405_with_its_rejected_row(gateway):
    reply = httpx.get(gateway.url + "/v1/completions", headers={"Authorization": f"Bearer {gateway.key}"})
    assert reply.status_code == 405 and reply.headers["Allow"] == "POST"
    assert wait_for_record(reply.headers["x-request-id"]).operation == "completions"


@pytest.mark.parametrize("body", [{"best_of": 3}, {"prompt": ["a", "b", "c"]}])
def test_the_reservation_covers_every_candidate_and_every_prompt(gateway, body):
    """A budget that pays for one reply of 100 tokens but not three: ``best_of`` 3 (OpenAI bills every candidate
    it generated) or three prompts (one reply each) are refused before any call; one reply goes through."""
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.0001"))
    client = gateway.client()
    client.completions.create(model="gpt-test", prompt="a", max_tokens=100)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="gpt-test", **{"prompt": "a", **body}, max_tokens=100)
    assert len(sent(gateway)) == 1


def test_metrics_count_completions_under_their_own_operation(gateway):
    labels = {"model": "gpt-test", "operation": "completions", "status": "ok"}
    with override_settings(LLMHUB_METRICS_TOKEN=TOKEN, LLMHUB_METRICS_ALLOWED_IPS=[]):
        before = value(scrape(gateway.url), "llmhub_requests_total", **labels)
        gateway.client().completions.create(model="gpt-test", prompt="hi [[reply=ok]]")
        scrape_until(gateway.url, "llmhub_requests_total", before + 1, **labels)


def test_mistral_fills_in_the_middle_through_codestrals_fim_endpoint(gateway):
    ModelFactory(
        name="codestral",
        provider=ProviderFactory(
            name="fake-mistral", kind=ProviderKind.MISTRAL, base_url=gateway.upstream.base_url + "/mistral/v1"
        ),
        upstream_id="codestral-latest",
        input_per_mtok=INPUT,
        output_per_mtok=OUTPUT,
    )
    client = gateway.client()
    raw = client.completions.with_raw_response.create(
        model="codestral", prompt="def add(a, b):\n    [[reply=return a + b]]", suffix="\n", max_tokens=20, seed=7
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateCompletionResponse")
    completion = raw.parse()
    assert (completion.object, completion.model, completion.choices[0].text) == (
        "text_completion",
        "codestral",
        "return a + b",
    )
    fim = [r["body"] for r in gateway.upstream.requests if r["path"] == "/mistral/v1/fim/completions"]
    assert fim[0]["suffix"] == "\n" and fim[0]["random_seed"] == 7 and fim[0]["model"] == "codestral-latest"
    assert_row(
        raw.headers["x-request-id"],
        prompt=completion.usage.prompt_tokens,
        completion=completion.usage.completion_tokens,
        model_name="codestral",
    )

    chunks = list(
        client.completions.create(
            model="codestral",
            prompt="[[reply=x = 1]]",
            suffix="\n",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "x = 1"
    assert {c.object for c in chunks} == {"text_completion"} and chunks[-1].usage.completion_tokens == 3

    for body, param in (
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "a", "n": 2}, "n"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "logprobs": 1}, "logprobs"),
        ({"prompt": "a", "presence_penalty": 1}, "presence_penalty"),  # Mistral's own 422, as a 400 naming it
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="codestral", **body)
        assert refused.value.body["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_too_long_for_the_model_is_a_400_naming_the_prompt(gateway, stream):
    reply = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": "gpt-test", "prompt": "long [[fault=context]]", "stream": stream},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    )
    assert reply.status_code == 400
    assert (reply.json()["error"]["code"], reply.json()["error"]["param"]) == ("context_length_exceeded", "prompt")
    record = wait_for_record(reply.headers["x-request-id"])
    assert (record.operation, record.status) == ("completions", "invalid")


def test_what_a_server_left_out_is_filled_in_and_what_is_not_text_is_a_502(gateway):
    sparse = json.dumps({"choices": [{"text": "ok"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
    raw = gateway.client().completions.with_raw_response.create(model="gpt-test", prompt=raw_directive(sparse.encode()))
    answer = json.loads(raw.http_response.text)
    validate_openai_schema(answer, "CreateCompletionResponse")
    assert (answer["object"], answer["model"], answer["choices"][0]["finish_reason"]) == (
        "text_completion",
        "gpt-test",
        "stop",
    )
    assert answer["usage"]["total_tokens"] == 3

    chunks = b"".join(
        b"data: " + json.dumps(chunk).encode() + b"\n\n"
        for chunk in ({"choices": [{"text": "a"}]}, {"choices": [{"text": " b", "finish_reason": "eos"}]})
    )
    _, payloads = sse(gateway, {"model": "gpt-test", "prompt": raw_directive(chunks + b"data: [DONE]\n\n")})
    assert payloads[-1] == "[DONE]"
    assert [(c["object"], c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in payloads[:-1]] == [
        ("text_completion", "a", None),
        ("text_completion", " b", "stop"),
    ]
    assert len({(c["id"], c["created"]) for c in payloads[:-1]}) == 1  # one id for the stream

    broken = json.dumps({"choices": [{"text": 5}]}).encode()
    with pytest.raises(openai.APIStatusError) as failed:
        gateway.client().completions.create(model="gpt-test", prompt=raw_directive(broken))
    assert failed.value.status_code == 502
    assert "text completion" in failed.value.body["message"]


def test_a_vllm_completion_with_its_nulls_is_relayed_in_openais_schema(gateway):
    """vLLM's whole text completion as its server sends it (``model_dump()``: every field left unset as null). Before,
    its ``"system_fingerprint": null`` was relayed as it came, which ``CreateCompletionResponse`` types as a string
    (a chat completion's was left out since 3d6f3f1), so every whole reply of a vLLM deployment to /v1/completions was
    out of OpenAI's schema for a client validating against it; it is left out."""
    reply = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "fake-gpt-4o-mini",
        "choices": [
            {"index": 0, "text": "ok", "logprobs": None, "finish_reason": "length", "stop_reason": None},
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": None},
        "kv_transfer_params": None,
    }
    raw = gateway.client().completions.with_raw_response.create(
        model="gpt-test", prompt=raw_directive(json.dumps(reply).encode())
    )
    answer = json.loads(raw.http_response.text)
    validate_openai_schema(answer, "CreateCompletionResponse")
    assert "system_fingerprint" not in answer
    assert (answer["choices"][0]["text"], answer["usage"]["total_tokens"]) == ("ok", 3)


def test_a_streamed_completion_the_output_check_blocks_ends_in_band(gateway):
    policy_on("gpt-test", blocklist="forbidden", check_input=False)
    reply, payloads = sse(gateway, {"model": "gpt-test", "prompt": "[[reply=one two forbidden three]]"})
    assert reply.status_code == 200
    assert "[DONE]" not in payloads
    assert payloads[-1]["error"]["code"] == "content_policy_violation"
    delivered = "".join(c["choices"][0]["text"] for c in payloads[:-1] if c.get("choices"))
    assert "forbidden" not in delivered
    record = wait_for_record(reply.headers["x-request-id"])
    assert (record.operation, record.error_type) == ("completions", "content_policy_violation")


@pytest.mark.parametrize("budgeted", [False, True])
def test_without_max_tokens_a_completion_stops_at_openais_default_of_16(gateway, budgeted):
    """OpenAI's (and vLLM's) default: a budget's clamp, sent when the request names no limit, must not lift it."""
    if budgeted:
        api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("10"))
    raw = gateway.client().completions.with_raw_response.create(model="gpt-test", prompt="[[words=40]]")
    completion = raw.parse()
    assert (completion.choices[0].finish_reason, completion.usage.completion_tokens) == ("length", 16)
    assert sent(gateway)[0]["max_tokens"] == 16
    assert_row(raw.headers["x-request-id"], prompt=completion.usage.prompt_tokens, completion=16)


# A 200 to a stream request that is no stream of the protocol: nothing, only its end, a page, a first chunk not JSON.
NOT_STREAMS = {
    "empty": b"",
    "only [DONE]": b"data: [DONE]\n\n",
    "HTML": b"<html><body>Bad gateway</body></html>\n",
    "first chunk not JSON": b"data: {not json}\n\n",
}


def lonely(gateway) -> CatalogModel:
    """A model of one OpenAI deployment that routing would ask ``1 + 3`` times for a plain failure."""
    return ModelFactory(name="lonely", provider=Provider.objects.get(name="fake-openai"), retries=3)


@pytest.mark.parametrize("body", NOT_STREAMS.values(), ids=NOT_STREAMS)
def test_a_stream_that_is_no_stream_is_malformed_and_not_asked_again(gateway, body):
    """Routing's malformed reply rule, as on chat streams: before, a plain interruption retried ``1 + retries``
    times on the one deployment; now one attempt, then the 502."""
    lonely(gateway)
    with pytest.raises(openai.APIStatusError) as failed:
        gateway.client().completions.create(model="lonely", prompt="hi " + raw_directive(body), stream=True)
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-llmhub-attempts"] == "1"
    assert len(sent(gateway)) == 1
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert (record.operation, record.status, record.attempts) == ("completions", "upstream_error", 1)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_body_that_is_not_the_gzip_it_says_is_malformed_not_unreachable(gateway, stream):
    lonely(gateway)
    prompt = "hi " + raw_directive(b"this is not gzip at all") + " [[raw_encoding=gzip]]"
    with pytest.raises(openai.APIStatusError) as failed:
        gateway.client().completions.create(model="lonely", prompt=prompt, stream=stream)
    assert failed.value.status_code == 502
    assert "could not reach" not in failed.value.message and "malformed" in failed.value.message
    assert failed.value.response.headers["x-llmhub-attempts"] == "1"
    assert len(sent(gateway)) == 1


# Whole replies that are no text completion: of types no fill can mend, with nothing to answer, not JSON.
MALFORMED_REPLIES = {
    "text not text": b'{"choices": [{"text": 5}]}',
    "no choices": b'{"choices": []}',
    "choices not a list": b'{"choices": "ok"}',
    "not JSON": b"<html>Bad gateway</html>",
}


@pytest.mark.parametrize("reply", MALFORMED_REPLIES.values(), ids=MALFORMED_REPLIES)
def test_a_malformed_whole_reply_is_a_502_after_one_attempt(gateway, reply):
    """Routing's malformed reply rule, as on chat completions: before, a reply of the wrong types was retried
    ``1 + retries`` times on the one deployment, and one with no choices answered a 200 with nothing in it."""
    lonely(gateway)
    with pytest.raises(openai.APIStatusError) as failed:
        gateway.client().completions.create(model="lonely", prompt="hi " + raw_directive(reply))
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-llmhub-attempts"] == "1"
    assert len(sent(gateway)) == 1
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert (record.operation, record.status, record.attempts) == ("completions", "upstream_error", 1)
