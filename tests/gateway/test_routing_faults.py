"""Retries and fallbacks, through the official openai SDK against a live llmhub and the fake upstream.

A model ``routed`` has two deployments tried in priority order: ``first`` (made to fail in each test's own
way) and ``second`` (healthy, at other prices). Whatever the first does, the request succeeds on the next
candidate or on a fallback, says who answered, and has exactly one ledger row priced at the deployment that
answered."""

from __future__ import annotations

import concurrent.futures
import json
import math
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal

import httpx
import openai
import pytest
import time_machine
from django.conf import settings

from billing.models import Plan, UsageRecord
from billing.pricing import cost_for
from billing.services.budgets import api_key_limits_set
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from llmhub.testing.fake_upstream import raw_directive, split_tokens
from providers.models import CatalogModel, Deployment, ProviderKind
from providers.routing.breaker_machine import OPEN
from providers.routing.breakers import breaker_state
from providers.selectors import model_resolve_sync
from providers.tokens import prompt_tokens
from tests.conftest import free_port
from tests.factories import ProviderFactory, UserFactory
from tests.providers.health_probes import breakers_closed_after  # noqa: F401  (a fixture)
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "hello there [[words=6]]"}]
LOREM_6 = "lorem ipsum dolor sit amet consectetur"  # the fake's reply to MESSAGES, whole
CHEAP = {"input_per_mtok": Decimal("0.15"), "output_per_mtok": Decimal("0.60")}
DEAR = {"input_per_mtok": Decimal("3.00"), "output_per_mtok": Decimal("15.00")}


@pytest.fixture
def client(llmhub_server):
    user = UserFactory(username="router-user")
    created = api_key_create(user=user, name="routing")
    client = openai.OpenAI(base_url=llmhub_server.url + "/v1", api_key=created.secret, max_retries=0, timeout=30)
    client.key = created  # type: ignore[attr-defined]
    return client


def routed(fake_upstream, first_upstream: str, *, first_base_url: str | None = None, timeout: float = 10, **model):
    """``routed``: ``first`` (priority 0, cheap, failing as asked) then ``second`` (priority 1, dearer, healthy)."""
    first = ProviderFactory(
        name="first", base_url=first_base_url or fake_upstream.base_url + "/v1", timeout_seconds=Decimal(timeout)
    )
    second = ProviderFactory(name="second", base_url=fake_upstream.base_url + "/v1")
    catalog = CatalogModel.objects.create(name="routed", strategy="priority", **model)
    Deployment.objects.create(model=catalog, name="first", provider=first, upstream_id=first_upstream, **CHEAP)
    Deployment.objects.create(
        model=catalog, name="second", provider=second, upstream_id="fake-gpt-4o-mini", priority=1, **DEAR
    )
    return catalog


def single(name: str, provider, upstream: str, prices: dict, **model) -> CatalogModel:
    catalog = CatalogModel.objects.create(name=name, **model)
    Deployment.objects.create(model=catalog, provider=provider, upstream_id=upstream, **prices)
    return catalog


def sse_lines(server, client, model: str, messages: list) -> tuple[list[str], str]:
    """A streamed completion's ``data:`` lines as the client got them, to the last one, and its request id."""
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {client.key.secret}"},
        json={"model": model, "messages": messages, "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        return lines, response.headers["x-request-id"]


# The one deployment of the model ``lonely``, which a test makes fail, by its provider's kind: the provider's name,
# kind and path on the fake upstream, and the upstream model asked.
LONELY = {
    "openai": ("odd", ProviderKind.OPENAI_COMPATIBLE, "/v1", "fake-gpt-4o-mini"),
    "anthropic": ("claude", ProviderKind.ANTHROPIC, "", "fake-claude-haiku"),
    "gemini": ("gem", ProviderKind.GEMINI, "", "gemini-2.0-flash"),
    "cohere": ("co", ProviderKind.COHERE, "/cohere", "command-r"),
}


@pytest.fixture
def lonely(fake_upstream):
    """``lonely(kind, prices, **model)``: the model ``lonely``, one deployment on a provider of ``kind``
    (``LONELY``) at the fake upstream; returns that provider."""

    def make(kind: str = "openai", prices: dict = CHEAP, **model):
        name, provider_kind, path, upstream = LONELY[kind]
        provider = ProviderFactory(name=name, kind=provider_kind, base_url=fake_upstream.base_url + path)
        single("lonely", provider, upstream, prices, **model)
        return provider

    return make


@pytest.fixture
def spare_backup(fake_upstream) -> None:
    """The model ``backup`` on the Anthropic deployment ``spare``: another protocol than the raw markers' of the
    other adapters, so it answers what made the first deployment fail."""
    claude = ProviderFactory(name="spare", kind=ProviderKind.ANTHROPIC, base_url=fake_upstream.base_url)
    single("backup", claude, "fake-claude-haiku", DEAR)


def refused_after_one_attempt(client, fake_upstream, messages: list, *, stream: bool) -> openai.APIStatusError:
    """Ask ``lonely`` for ``messages``: the 502, after one attempt, with one request upstream."""
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.chat.completions.create(model="lonely", messages=messages, stream=stream)
    assert excinfo.value.status_code == 502
    assert excinfo.value.response.headers["x-llmhub-attempts"] == "1"
    assert len(fake_upstream.requests) == 1
    return excinfo.value


def assert_answered_by(raw, *, deployment: str, attempts: int, model: str = "routed", price: dict = DEAR):
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["x-llmhub-deployment"] == deployment
    assert raw.headers["x-llmhub-attempts"] == str(attempts)
    record = wait_for_record(raw.headers["x-request-id"])
    assert UsageRecord.objects.count() == 1, "exactly one ledger row for the request, whatever the attempts"
    assert record.status == "ok"
    assert record.deployment_name == deployment and record.deployment_id is not None
    assert record.attempts == attempts
    assert record.model_name == model
    answered = model_resolve_sync(model)
    bound = answered.on(next(d for d in answered.deployments if d.name == deployment))
    assert bound.input_per_mtok == price["input_per_mtok"]
    assert record.cost == cost_for(
        model=bound,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cached_tokens=record.cached_tokens,
    )
    assert record.cost > 0
    return record


@pytest.mark.parametrize("fault", ["fault-429", "fault-500", "fault-503", "fault-529"])
def test_a_retryable_status_on_the_first_deployment_is_answered_by_the_next(client, fake_upstream, fault):
    routed(fake_upstream, fault)

    raw = client.chat.completions.with_raw_response.create(model="routed", messages=MESSAGES)

    record = assert_answered_by(raw, deployment="second", attempts=2)
    assert raw.headers["x-llmhub-provider"] == "second"
    assert record.requested_model == ""  # the model asked for answered, on another deployment


def test_a_hanging_deployment_times_out_and_the_next_answers(client, fake_upstream):
    routed(fake_upstream, "fault-hang", timeout=1)

    raw = client.chat.completions.with_raw_response.create(model="routed", messages=MESSAGES)

    assert_answered_by(raw, deployment="second", attempts=2)


def test_a_refused_connection_moves_to_the_next_deployment(client, fake_upstream):
    routed(fake_upstream, "fake-gpt-4o-mini", first_base_url=f"http://127.0.0.1:{free_port()}/v1")

    raw = client.chat.completions.with_raw_response.create(model="routed", messages=MESSAGES)

    assert_answered_by(raw, deployment="second", attempts=2)


def test_context_length_exceeded_goes_to_the_context_window_fallback(client, fake_upstream):
    provider = ProviderFactory(name="only", base_url=fake_upstream.base_url + "/v1")
    single("short", provider, "fault-context", CHEAP, context_window_fallbacks=["long"], fallbacks=["unrelated"])
    single("long", provider, "fake-gpt-4o-mini", DEAR, context_window=1_000_000)
    single("unrelated", provider, "fault-500", CHEAP)

    raw = client.chat.completions.with_raw_response.create(model="short", messages=MESSAGES)

    record = assert_answered_by(raw, deployment="only", attempts=2, model="long")
    assert raw.parse().model == "long"
    assert raw.headers["x-llmhub-model"] == "long"
    assert record.requested_model == "short"


def test_the_fallback_model_answers_when_every_deployment_failed(client, fake_upstream):
    routed(fake_upstream, "fault-503", retries=0, fallbacks=["backup"])
    Deployment.objects.filter(name="second").update(upstream_id="fault-503")
    single("backup", ProviderFactory(name="spare", base_url=fake_upstream.base_url + "/v1"), "fake-gpt-4o-mini", DEAR)

    raw = client.chat.completions.with_raw_response.create(model="routed", messages=MESSAGES)

    # retries=0: one attempt on the routed model, then the fallback's.
    record = assert_answered_by(raw, deployment="spare", attempts=2, model="backup")
    assert record.requested_model == "routed"
    assert raw.headers["x-llmhub-provider"] == "spare"


def test_a_fallback_outside_the_callers_plan_is_not_tried(client, fake_upstream):
    routed(fake_upstream, "fault-503", retries=0, fallbacks=["backup"])
    Deployment.objects.filter(name="second").update(upstream_id="fault-503")
    backup = single("backup", ProviderFactory(name="spare", base_url=fake_upstream.base_url + "/v1"), "x", DEAR)
    restricted = api_key_create(
        user=UserFactory(username="narrow"), name="narrow", allowed_models=[CatalogModel.objects.get(name="routed")]
    )
    assert backup.pk not in {m.pk for m in restricted.api_key.allowed_models.all()}
    narrow = openai.OpenAI(base_url=str(client.base_url), api_key=restricted.secret, max_retries=0, timeout=30)

    with pytest.raises(openai.APIStatusError) as excinfo:
        narrow.chat.completions.create(model="routed", messages=MESSAGES)

    assert excinfo.value.status_code == 503
    record = wait_for_record(excinfo.value.response.headers["x-request-id"])
    assert record.attempts == 1 and record.model_name == "routed"


def test_a_400_from_upstream_is_not_retried(client, fake_upstream):
    """The request itself is wrong: every deployment would say so."""
    routed(fake_upstream, "fault-400")

    with pytest.raises(openai.APIStatusError) as excinfo:
        client.chat.completions.create(model="routed", messages=MESSAGES)

    assert excinfo.value.status_code == 400
    headers = excinfo.value.response.headers
    assert headers["x-llmhub-attempts"] == "1" and headers["x-llmhub-deployment"] == "first"
    record = wait_for_record(headers["x-request-id"])
    assert record.attempts == 1 and record.status == "invalid" and record.cost == 0


@pytest.mark.parametrize("fault", ["fault-401", "fault-403", "fault-404"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_deployment_whose_key_or_model_id_the_provider_refuses_falls_over_to_the_next(
    client, fake_upstream, fault, stream
):
    """A key revoked or rotated at the provider (401), one without access to the model (403), or a model id
    the provider does not know (404) is that deployment's set-up, not the request: the next deployment, with
    its own key and id, answers, at once (no backoff is waited for)."""
    routed(fake_upstream, fault)

    if not stream:
        raw = client.chat.completions.with_raw_response.create(model="routed", messages=MESSAGES)
        assert_answered_by(raw, deployment="second", attempts=2)
        return
    with client.chat.completions.with_streaming_response.create(
        model="routed", messages=MESSAGES, stream=True
    ) as response:
        assert "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        assert response.headers["x-llmhub-deployment"] == "second"
        request_id = response.headers["x-request-id"]
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.deployment_name == "second" and record.attempts == 2


def test_a_refused_key_is_not_tried_again_on_the_same_deployment(client, fake_upstream):
    """A single deployment with retries: a 401 is the answer after one attempt (no wait makes the key good),
    a 502 that says the gateway's credentials were refused."""
    provider = ProviderFactory(name="revoked", base_url=fake_upstream.base_url + "/v1")
    single("lonely", provider, "fault-401", CHEAP, retries=3)

    with pytest.raises(openai.APIStatusError) as excinfo:
        client.chat.completions.create(model="lonely", messages=MESSAGES)

    assert excinfo.value.status_code == 502 and excinfo.value.code == "upstream_authentication_failed"
    assert excinfo.value.response.headers["x-llmhub-attempts"] == "1"
    assert sum(1 for entry in fake_upstream.requests if entry["body"].get("model") == "fault-401") == 1


# What a deployment answered that is no reply of its protocol: no choices, a body that is not JSON; and a stream whose
# first chunk is not JSON.
MALFORMED_REPLIES = {"no choices": b'{"choices": []}', "not JSON": b"<html>Bad gateway</html>"}


@pytest.mark.parametrize("reply", MALFORMED_REPLIES.values(), ids=MALFORMED_REPLIES)
def test_a_malformed_reply_is_not_asked_again_of_the_same_deployment(client, fake_upstream, lonely, reply):
    """Before: retried like any 502, up to ``1 + retries`` times on the one deployment (its breaker counting each),
    though a deployment that answered nonsense answers it again at once; now the next deployment (here the
    fallback model's, at once) or, with none, the 502 after one attempt."""
    lonely(retries=3)
    messages = [{"role": "user", "content": "hello " + raw_directive(reply)}]

    error = refused_after_one_attempt(client, fake_upstream, messages, stream=False)

    assert error.code == "upstream_error"
    record = wait_for_record(error.response.headers["x-request-id"])
    assert (record.status, record.attempts) == ("upstream_error", 1)


@pytest.mark.parametrize("reply", MALFORMED_REPLIES.values(), ids=MALFORMED_REPLIES)
def test_a_malformed_reply_moves_on_at_once(client, fake_upstream, lonely, spare_backup, reply):
    lonely(retries=3, fallbacks=["backup"])
    messages = [{"role": "user", "content": "hello " + raw_directive(reply)}]

    raw = client.chat.completions.with_raw_response.create(model="lonely", messages=messages)

    assert_answered_by(raw, deployment="spare", attempts=2, model="backup")
    assert [entry["path"] for entry in fake_upstream.requests] == ["/v1/chat/completions", "/v1/messages"]


def test_a_stream_whose_first_chunk_is_malformed_is_not_asked_again_of_the_same_deployment(
    client, fake_upstream, lonely
):
    lonely(retries=3)
    messages = [{"role": "user", "content": "hello " + raw_directive(b"data: {not json}\n\n")}]

    error = refused_after_one_attempt(client, fake_upstream, messages, stream=True)

    assert error.code == "upstream_stream_interrupted"
    record = wait_for_record(error.response.headers["x-request-id"])
    assert (record.status, record.attempts) == ("upstream_error", 1)


# A 200 to a stream request that holds no stream: nothing, only its end, a page, a whole reply it was not asked for.
NOT_STREAMS = {
    "empty": b"",
    "only [DONE]": b"data: [DONE]\n\n",
    "HTML": b"<html><body>Bad gateway</body></html>\n",
    "a whole reply": b'{"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": []}\n',
}


@pytest.mark.parametrize("body", NOT_STREAMS.values(), ids=NOT_STREAMS)
def test_a_stream_request_answered_with_no_stream_is_malformed_and_not_asked_again(client, fake_upstream, lonely, body):
    """Before: taken for a stream cut before the model finished and retried ``1 + retries`` times on the one
    deployment; now malformed: one attempt, then the 502."""
    lonely(retries=3)
    messages = [{"role": "user", "content": "hello " + raw_directive(body)}]

    error = refused_after_one_attempt(client, fake_upstream, messages, stream=True)

    assert "answered no stream" in error.message
    record = wait_for_record(error.response.headers["x-request-id"])
    assert (record.status, record.attempts) == ("upstream_error", 1)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_body_that_is_not_the_gzip_it_says_is_a_malformed_reply(client, fake_upstream, lonely, stream):
    """Before: a 503 saying the gateway could not reach the provider (which answered), retried on the same
    deployment; now a malformed reply: one attempt, a 502 that says what came."""
    lonely(retries=3)
    text = "hello " + raw_directive(b"this is not gzip at all") + " [[raw_encoding=gzip]]"

    error = refused_after_one_attempt(client, fake_upstream, [{"role": "user", "content": text}], stream=stream)

    assert "could not reach" not in error.message
    assert "malformed" in error.message


@pytest.mark.usefixtures("breakers_closed_after")
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_malformed_replies_open_the_deployments_breaker_and_each_fallback_answer_is_one_row(
    client, fake_upstream, lonely, spare_backup, stream
):
    """Each malformed reply counts against the deployment's breaker (``LLMHUB_BREAKER_FAILURES`` of them open it)
    while the fallback answers every request, with one ledger row each; the breaker open, the deployment is no
    longer asked."""
    odd = Deployment.objects.get(provider=lonely(retries=3, fallbacks=["backup"]))
    messages = [{"role": "user", "content": "hello " + raw_directive(b"<html>Bad gateway</html>")}]

    for asked in range(1, settings.LLMHUB_BREAKER_FAILURES + 2):
        raw = client.chat.completions.with_raw_response.create(model="lonely", messages=messages, stream=stream)
        if stream:
            assert "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        else:
            assert raw.parse().choices[0].message.content
        assert raw.headers["x-llmhub-deployment"] == "spare"
        record = wait_for_record(raw.headers["x-request-id"])
        assert (record.status, record.deployment_name, record.model_name) == ("ok", "spare", "backup")
        assert record.cost > 0
        assert UsageRecord.objects.count() == asked, "one ledger row a request, whatever the attempts"
        if asked == settings.LLMHUB_BREAKER_FAILURES:
            assert breaker_state(odd.pk).state == OPEN

    paths = [entry["path"] for entry in fake_upstream.requests]
    # The last request, its breaker open, went to the fallback alone.
    assert paths.count("/v1/chat/completions") == settings.LLMHUB_BREAKER_FAILURES
    assert paths[-1] == "/v1/messages" and paths[-2] == "/v1/messages"


# What an Anthropic deployment might stream that is no stream of its protocol: an event that is not JSON, nothing.
ANTHROPIC_NOT_STREAMS = {
    "not JSON": b"event: message_start\ndata: {not json}\n\n",
    "empty": b"",
    "HTML": b"<html><body>Bad gateway</body></html>\n",
}


@pytest.mark.parametrize("body", ANTHROPIC_NOT_STREAMS.values(), ids=ANTHROPIC_NOT_STREAMS)
@pytest.mark.parametrize("route", ["chat", "messages"])
def test_an_anthropic_stream_that_is_malformed_is_not_asked_again(
    llmhub_server, client, fake_upstream, lonely, body, route
):
    """Before: retried ``1 + retries`` times on the one deployment as a plain interruption; now, as on an OpenAI
    deployment, malformed: one attempt, then the 502 (chat completions' and Messages' own error shapes)."""
    import anthropic

    lonely("anthropic", DEAR, retries=3)
    messages = [{"role": "user", "content": "hello " + raw_directive(body, marker="raw_anthropic")}]

    if route == "chat":
        with pytest.raises(openai.APIStatusError) as excinfo:
            client.chat.completions.create(model="lonely", messages=messages, stream=True)
        response = excinfo.value.response
    else:
        sdk = anthropic.Anthropic(base_url=llmhub_server.url, api_key=client.key.secret, max_retries=0, timeout=30)
        with pytest.raises(anthropic.APIStatusError) as excinfo:
            with sdk.messages.stream(model="lonely", max_tokens=32, messages=messages) as stream:
                list(stream.text_stream)
        response = excinfo.value.response

    assert response.status_code == 502
    assert response.headers["x-llmhub-attempts"] == "1"
    assert len(fake_upstream.requests) == 1
    record = wait_for_record(response.headers["x-request-id"])
    assert (record.status, record.attempts) == ("upstream_error", 1)


GEMINI_NOT_STREAMS = {
    "not JSON": b"data: {not json}\n\n",
    "empty": b"",
    "a list": b"data: [1, 2]\n\n",
    "a content a number": b'data: {"candidates": [{"content": 5}]}\n\n',
}


@pytest.mark.parametrize("body", GEMINI_NOT_STREAMS.values(), ids=GEMINI_NOT_STREAMS)
def test_a_gemini_stream_that_is_malformed_is_not_asked_again(client, fake_upstream, lonely, body):
    """Before, an empty stream was retried ``1 + retries`` times on the one deployment as a plain interruption;
    now, as on the other adapters, a stream with no chunk or a first chunk not JSON is malformed: one attempt."""
    lonely("gemini", DEAR, retries=3)
    messages = [{"role": "user", "content": "hello " + raw_directive(body, marker="raw_gemini")}]

    refused_after_one_attempt(client, fake_upstream, messages, stream=True)


GEMINI_HELLO = {"candidates": [{"content": {"parts": [{"text": "Hello"}], "role": "model"}, "index": 0}]}
GEMINI_END = {
    "candidates": [{"content": {"parts": [{"text": " world"}], "role": "model"}, "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5},
}
# What may come after a stream's first chunk that is no chunk of its protocol: not JSON, or JSON of another shape.
GEMINI_LATER_MALFORMED = {
    "not JSON": b"{not json}",
    "a list": b"[1, 2]",
    "no field of Gemini's": b'{"greeting": "hi"}',
    "candidates not a list": b'{"candidates": "x"}',
    "a candidate a number": b'{"candidates": [5]}',
    "a content a number": b'{"candidates": [{"content": 5}]}',
}


def assert_ended_as_malformed(llmhub_server, client, body: bytes, marker: str) -> None:
    """Stream ``body`` (a first chunk, the malformed one, then a finish): what a malformed chunk after the first is
    on an OpenAI deployment (``test_odd_upstream_shapes``), the in-band error saying so and no ``[DONE]``, what was
    relayed before it billed."""
    messages = [{"role": "user", "content": "hello " + raw_directive(body, marker=marker)}]
    lines, request_id = sse_lines(llmhub_server, client, "lonely", messages)

    assert lines[-1] != "data: [DONE]", "a malformed chunk never ends in a clean [DONE]"
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_stream_interrupted" and "malformed" in error["message"], error
    relayed = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in relayed if c["choices"]) == "Hello"
    record = wait_for_record(request_id)
    assert (record.status, record.error_type) == ("upstream_error", "upstream_stream_interrupted")
    assert record.attempts == 1 and record.completion_tokens > 0


@pytest.mark.parametrize("odd", GEMINI_LATER_MALFORMED.values(), ids=GEMINI_LATER_MALFORMED)
def test_a_gemini_chunk_after_the_first_that_is_malformed_ends_the_stream_as_malformed(
    llmhub_server, client, fake_upstream, lonely, odd
):
    """Before: JSON of another shape was left out by the SDK (the client got a clean [DONE], the reply with a hole in
    it), a candidate that was a number ended the stream with our internal_error, and a chunk not JSON was a plain
    interruption; now each is a malformed chunk, as on an OpenAI deployment."""
    lonely("gemini", DEAR)
    body = b"".join(b"data: " + part + b"\n\n" for part in (json.dumps(GEMINI_HELLO).encode(), odd))
    body += b"data: " + json.dumps(GEMINI_END).encode() + b"\n\n"

    assert_ended_as_malformed(llmhub_server, client, body, "raw_gemini")


def test_a_gemini_chunk_that_holds_only_its_id_and_model_version_is_not_malformed(
    llmhub_server, client, fake_upstream, lonely
):
    """A chunk with nothing to relay but fields of Gemini's own (its response id, its model version) is Gemini's,
    not JSON of another shape: the stream goes on to its end, whole."""
    lonely("gemini", DEAR)
    bare = {"responseId": "r1", "modelVersion": "gemini-2.0-flash-001"}
    parts = (json.dumps(GEMINI_HELLO).encode(), json.dumps(bare).encode(), json.dumps(GEMINI_END).encode())
    body = b"".join(b"data: " + part + b"\n\n" for part in parts)
    messages = [{"role": "user", "content": "hello " + raw_directive(body, marker="raw_gemini")}]

    lines, request_id = sse_lines(llmhub_server, client, "lonely", messages)

    assert lines[-1] == "data: [DONE]"
    relayed = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in relayed if c["choices"]) == "Hello world"
    assert wait_for_record(request_id).status == "ok"


COHERE_HELLO = [
    {"type": "message-start", "id": "r1", "delta": {"message": {"role": "assistant"}}},
    {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": "Hello"}}}},
]
COHERE_END = [
    {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": " world"}}}},
    {"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": {"billed_units": {"output_tokens": 2}}}},
]
COHERE_LATER_MALFORMED = {
    "not JSON": b"{not json}",
    "not UTF-8": b'{"type": "content-delta", "index": 0, "text": "\xff\xfe"}',
    "a list": b"[1, 2]",
    "no type": b'{"delta": {"message": {"content": {"text": "x"}}}}',
    "a delta not an object": b'{"type": "content-delta", "index": 0, "delta": 5}',
    "a text not text": b'{"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": 5}}}}',
}


@pytest.mark.parametrize("odd", COHERE_LATER_MALFORMED.values(), ids=COHERE_LATER_MALFORMED)
def test_a_cohere_event_after_the_first_that_is_malformed_ends_the_stream_as_malformed(
    llmhub_server, client, fake_upstream, lonely, odd
):
    """Before: the SDK left out, with a warning in the log, an event that was not JSON (nor UTF-8) or not of its
    types, and the client got a clean [DONE] with a hole in the reply. Now each is a malformed event, as a chunk
    is on an OpenAI deployment."""
    lonely("cohere", DEAR)
    events = [json.dumps(event).encode() for event in COHERE_HELLO] + [odd]
    events += [json.dumps(event).encode() for event in COHERE_END]
    body = b"".join(b"data: " + event + b"\n\n" for event in events)

    assert_ended_as_malformed(llmhub_server, client, body, "raw_cohere")


def test_a_cohere_stream_with_no_event_is_malformed_and_not_asked_again(client, fake_upstream, lonely):
    """Before: retried ``1 + retries`` times on the one deployment as a plain interruption; now one attempt."""
    lonely("cohere", DEAR, retries=3)
    messages = [{"role": "user", "content": "hello " + raw_directive(b"", marker="raw_cohere")}]

    refused_after_one_attempt(client, fake_upstream, messages, stream=True)


# What a Cohere deployment might answer a chat with that is no reply of Cohere's: not JSON (nor UTF-8), another shape.
COHERE_NOT_REPLIES = {
    "not JSON": b"<html>Bad gateway</html>",
    "not UTF-8": b'{"id": "r", "finish_reason": "COMPLETE", "message": {"role": "assistant", "x": "\xff\xfe"}}',
    "a list": b"[1, 2]",
    "text": b'"hello"',
    "a message a number": b'{"id": "r", "finish_reason": "COMPLETE", "message": 5}',
    "a content not a list": b'{"id": "r", "finish_reason": "COMPLETE", "message": {"content": 5}}',
    "a text not text": b'{"id": "r", "message": {"content": [{"type": "text", "text": 5}]}}',
    "usage not counts": b'{"id": "r", "message": {"content": []}, "usage": {"billed_units": {"input_tokens": "x"}}}',
}


@pytest.mark.parametrize("reply", COHERE_NOT_REPLIES.values(), ids=COHERE_NOT_REPLIES)
def test_a_cohere_reply_that_is_malformed_moves_on_at_once(client, fake_upstream, lonely, spare_backup, reply):
    """Before: JSON of another shape was our 500 internal_error (the SDK passes it on unread, and reading it
    failed), and a body not JSON a 502 quoting it, the fallback never asked; now, as on an OpenAI deployment, a
    malformed reply: the next deployment (here the fallback model's) at once."""
    lonely("cohere", retries=3, fallbacks=["backup"])
    messages = [{"role": "user", "content": "hello " + raw_directive(reply, marker="raw_cohere")}]

    raw = client.chat.completions.with_raw_response.create(model="lonely", messages=messages)

    assert_answered_by(raw, deployment="spare", attempts=2, model="backup")
    assert [entry["path"] for entry in fake_upstream.requests] == ["/cohere/v2/chat", "/v1/messages"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_cohere_body_that_is_not_the_gzip_it_says_is_a_malformed_reply(client, fake_upstream, lonely, stream):
    """Before: "failed unexpectedly (DecodingError)", retried ``1 + retries`` times on the one deployment; now, as on
    an OpenAI deployment, a malformed reply: one attempt, a 502 that says what came."""
    lonely("cohere", retries=3)
    text = "hello " + raw_directive(b"this is not gzip at all", marker="raw_cohere") + " [[raw_encoding=gzip]]"

    error = refused_after_one_attempt(client, fake_upstream, [{"role": "user", "content": text}], stream=stream)

    assert "malformed" in error.message and "DecodingError" not in error.message


def test_a_stream_that_fails_before_its_first_chunk_falls_over_cleanly(client, fake_upstream):
    routed(fake_upstream, "fault-503")

    with client.chat.completions.with_streaming_response.create(
        model="routed", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as response:
        assert response.headers["x-llmhub-deployment"] == "second"
        assert response.headers["x-llmhub-attempts"] == "2"
        chunks = list(response.parse())
        request_id = response.headers["x-request-id"]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.deployment_name == "second" and record.attempts == 2


def test_a_stream_cut_after_three_chunks_ends_with_an_in_band_error_and_no_done(llmhub_server, client, fake_upstream):
    provider = ProviderFactory(name="cutting", base_url=fake_upstream.base_url + "/v1")
    single("cut", provider, "fault-cut-3", CHEAP, fallbacks=["never"])
    single("never", provider, "fake-gpt-4o-mini", DEAR)

    lines, request_id = sse_lines(llmhub_server, client, "cut", MESSAGES)

    assert lines[-1] != "data: [DONE]" and '"error"' in lines[-1], lines[-3:]
    content_chunks = [line for line in lines[:-1] if '"content"' in line]
    assert len(content_chunks) >= 3
    record = wait_for_record(request_id)
    assert record.status == "upstream_error"
    assert record.model_name == "cut" and record.attempts == 1, "after the first byte, no fail-over"
    assert record.completion_tokens > 0 and record.usage_estimated, "the delivered tokens are charged"

    # Through the SDK: the in-band error is raised, never a clean end.
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="cut", messages=MESSAGES, stream=True):
            pass


@pytest.fixture
def mid_month():
    """A monthly budget's window: mid-month, so that no request of the test falls in another month."""
    with time_machine.travel(datetime(2026, 11, 10, 12, 0, tzinfo=UTC), tick=True):
        yield


@pytest.mark.parametrize("requests_paid", [10, 100])
def test_a_budget_holds_when_every_request_ends_on_a_fallback_ten_times_dearer(
    mid_month, client, fake_upstream, requests_paid
):
    """The key's budget pays for exactly 10 requests on the model asked for (and, second case, for 10 on the
    fallback); its deployment fails, so each request is answered by the fallback at 10x the price. The
    reservation covers the fallback: the key ends within its budget, however many requests try at once.
    (Reserved at the primary's prices, as before deployments, 10 requests would have spent 10 budgets.)"""
    # $0.0001 a token: a request's cost has the four decimals a budget is set in.
    base = {"input_per_mtok": Decimal("100"), "output_per_mtok": Decimal("100")}
    tenfold = {"input_per_mtok": Decimal("1000"), "output_per_mtok": Decimal("1000")}
    provider = ProviderFactory(name="only", base_url=fake_upstream.base_url + "/v1")
    single("probe", provider, "fake-gpt-4o-mini", base)
    single("primary", provider, "fault-503", base, retries=0, fallbacks=["dear"])
    single("dear", provider, "fake-gpt-4o-mini", tenfold)
    body = {"messages": MESSAGES, "max_tokens": 16}

    probe = client.chat.completions.with_raw_response.create(model="probe", **body)
    one_request = wait_for_record(probe.headers["x-request-id"]).cost
    budget = (one_request * requests_paid).quantize(Decimal("0.0001"))
    assert budget == one_request * requests_paid
    spender = api_key_create(user=client.key.api_key.user, name="budgeted")
    api_key_limits_set(api_key=spender.api_key, budget_usd=budget)
    spending = openai.OpenAI(base_url=str(client.base_url), api_key=spender.secret, max_retries=0, timeout=30)

    def attempt(_: int) -> str:
        try:
            raw = spending.chat.completions.with_raw_response.create(model="primary", **body)
        except openai.RateLimitError as exc:
            return exc.code or "429"
        return raw.headers["x-request-id"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(attempt, range(24)))

    answered = [outcome for outcome in outcomes if outcome.startswith("req_")]
    assert len(answered) < 24, "the budget ends it"
    if requests_paid == 100:
        assert answered, "the fallback answers while the budget lasts"
    for request_id in answered:
        record = wait_for_record(request_id)
        assert record.model_name == "dear" and record.requested_model == "primary"
    spent = sum(r.cost for r in UsageRecord.objects.filter(api_key=spender.api_key))
    assert spent == one_request * 10 * len(answered)
    assert spent <= budget, (spent, budget)


def test_a_fallback_that_writes_less_than_the_clients_max_tokens_is_skipped(client, fake_upstream):
    """The client's limit fits the model asked for, not its first fallback (gpt-4o-mini writes at most 16384): that
    fallback was sent it, refused it with a 400 and the client got that provider error. It is left out, as one that
    cannot stream is; the next fallback answers, and the limit the client set is never lowered behind its back."""
    provider = ProviderFactory(name="only", base_url=fake_upstream.base_url + "/v1")
    single("primary", provider, "fault-503", CHEAP, retries=0, max_output_tokens=100_000, fallbacks=["small", "large"])
    single("small", provider, "fake-gpt-4o-mini", CHEAP, max_output_tokens=16_384)
    single("large", provider, "fake-o3-mini", DEAR, max_output_tokens=100_000)

    raw = client.chat.completions.with_raw_response.create(model="primary", messages=MESSAGES, max_tokens=50_000)

    record = assert_answered_by(raw, deployment="only", attempts=2, model="large")
    assert record.requested_model == "primary"
    sent = [(request["body"]["model"], request["body"]["max_tokens"]) for request in fake_upstream.requests]
    assert sent == [("fault-503", 50_000), ("fake-o3-mini", 50_000)]


def test_with_no_fallback_that_writes_the_clients_max_tokens_the_models_own_failure_is_the_answer(
    client, fake_upstream
):
    provider = ProviderFactory(name="only", base_url=fake_upstream.base_url + "/v1")
    single("primary", provider, "fault-503", CHEAP, retries=0, max_output_tokens=100_000, fallbacks=["small"])
    single("small", provider, "fake-gpt-4o-mini", CHEAP, max_output_tokens=16_384)

    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="primary", messages=MESSAGES, max_completion_tokens=50_000)

    assert failed.value.status_code == 503, failed.value.body
    assert [request["body"]["model"] for request in fake_upstream.requests] == ["fault-503"]
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert record.status == "upstream_error" and record.attempts == 1
    assert UsageRecord.objects.count() == 1


def test_the_output_limit_a_budget_picks_is_fitted_to_each_fallback(mid_month, client, fake_upstream, settings):
    """Under a budget, a request without max_tokens gets the most the budget pays for, up to the largest limit of
    the model and its fallbacks (the reservation's): that was sent to a fallback that writes less (gpt-4o-mini,
    16384), which refused it with a 400. Each attempt is sent at most what its model writes; the reservation
    covers the largest of them."""
    settings.LLMHUB_BUDGET_MAX_TOKENS_CAP = 50_000
    provider = ProviderFactory(name="only", base_url=fake_upstream.base_url + "/v1")
    single("primary", provider, "fault-503", CHEAP, retries=0, max_output_tokens=100_000, fallbacks=["small"])
    single("small", provider, "fake-gpt-4o-mini", DEAR, max_output_tokens=16_384)
    spender = api_key_create(user=client.key.api_key.user, name="budgeted")
    api_key_limits_set(api_key=spender.api_key, budget_usd=Decimal("100"))
    spending = openai.OpenAI(base_url=str(client.base_url), api_key=spender.secret, max_retries=0, timeout=30)

    raw = spending.chat.completions.with_raw_response.create(model="primary", messages=MESSAGES)

    record = assert_answered_by(raw, deployment="only", attempts=2, model="small")
    assert record.requested_model == "primary"
    sent = [(request["body"]["model"], request["body"]["max_tokens"]) for request in fake_upstream.requests]
    assert sent == [("fault-503", 50_000), ("fake-gpt-4o-mini", 16_384)]


def test_a_stream_that_stalls_past_the_models_idle_timeout_ends_with_an_in_band_error(
    llmhub_server, client, fake_upstream
):
    provider = ProviderFactory(name="slow", base_url=fake_upstream.base_url + "/v1")
    single("stalling", provider, "fake-gpt-4o-mini", CHEAP, stream_idle_timeout_seconds=Decimal("0.3"))
    stalled = [{"role": "user", "content": "slow now [[tps=1]] [[words=5]]"}]

    lines, request_id = sse_lines(llmhub_server, client, "stalling", stalled)

    assert lines[-1] != "data: [DONE]"
    assert "upstream_stream_interrupted" in lines[-1] and "0.3 seconds" in lines[-1], lines[-1]
    record = wait_for_record(request_id)
    assert record.status == "upstream_error" and record.error_type == "upstream_stream_interrupted"


def test_a_model_that_resumes_on_failure_continues_a_cut_stream_on_the_next_deployment(client, fake_upstream):
    """Opt-in: the stream cut after three chunks goes on from the next deployment, given the partial reply as
    an assistant prefill; the client sees one stream that ends with [DONE] and no error. The provider bills each
    attempt as a request of its own: the row is charged both prompts (the cut one's estimated: it reported no usage
    before the cut), at the answering deployment's prices (until 7 December the cut one's was charged nothing)."""
    routed(fake_upstream, "fault-cut-3", resume_on_failure=True)

    with client.chat.completions.with_streaming_response.create(
        model="routed", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as response:
        chunks = list(response.parse())
        request_id = response.headers["x-request-id"]
        assert response.headers["x-llmhub-deployment"] == "first", "headers name who began the stream"

    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 3, "the first three chunks, then the next deployment's"
    assert {c.model for c in chunks} == {"routed"}
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"], "one stream: the resumed attempt's opening chunk is not relayed"
    assert chunks[-1].usage is not None
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed
    assert record.deployment_name == "second" and record.attempts == 2
    assert record.usage_estimated and record.completion_tokens > chunks[-1].usage.completion_tokens
    prefill = fake_upstream.requests[-1]["body"]["messages"][-1]
    assert prefill["role"] == "assistant" and prefill["content"] == "".join(texts[:4])
    resumed = chunks[-1].usage.prompt_tokens  # the answering attempt's own count, its prefill in it
    cut = prompt_tokens({"model": "routed", "messages": MESSAGES}, operation="chat")
    assert cut > 0 and record.prompt_tokens == resumed + cut
    answered = model_resolve_sync("routed")
    second = answered.on(next(d for d in answered.deployments if d.name == "second"))
    charged = cost_for(model=second, prompt_tokens=resumed + cut, completion_tokens=record.completion_tokens)
    assert record.cost == charged


def test_admission_reserves_the_prompt_of_each_attempt_a_resumed_stream_may_make(mid_month, client, fake_upstream):
    """A model resuming on failure may answer a stream twice here (two deployments), each attempt billed its
    prompt, the second's with the reply so far as its prefill (at most the output limit). A key whose budget pays
    for one attempt's prompt and the reply, but not for the second prompt, is refused before the provider is
    called; with enough for both it is answered, resumed, and spends within its budget. Before, one prompt was
    reserved and the key could spend past its budget by the second."""
    routed(fake_upstream, "fault-cut-3", resume_on_failure=True)
    body = {"model": "routed", "messages": MESSAGES, "stream": True, "max_tokens": 4000}
    upper = prompt_tokens(body, operation="chat", upper_bound=True)
    # At the dearest deployment's prices (DEAR: $3 and $15 per million): one attempt, and two (budgets keep 4 places).
    once = (Decimal(upper) * 3 + 4000 * 15) / 1_000_000
    twice = ((Decimal(upper * 2 + 4000) * 3 + 4000 * 15) / 1_000_000).quantize(Decimal("0.0001"), ROUND_CEILING)
    spender = api_key_create(user=client.key.api_key.user, name="budgeted")
    spending = openai.OpenAI(base_url=str(client.base_url), api_key=spender.secret, max_retries=0, timeout=30)
    api_key_limits_set(api_key=spender.api_key, budget_usd=((once + twice) / 2).quantize(Decimal("0.0001")))
    requests = len(fake_upstream.requests)

    with pytest.raises(openai.RateLimitError) as refused:
        spending.chat.completions.create(**body)
    assert "this request could need up to" in refused.value.message
    assert len(fake_upstream.requests) == requests, "refused before any upstream call"

    api_key_limits_set(api_key=spender.api_key, budget_usd=twice)
    with spending.chat.completions.with_streaming_response.create(**body) as response:
        list(response.iter_lines())
        request_id = response.headers["x-request-id"]
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed
    assert record.prompt_tokens > 2 * prompt_tokens(body, operation="chat"), "both attempts' prompts charged"
    assert record.cost <= twice


def test_a_token_quota_holds_the_prompt_and_reply_of_each_attempt_a_resumed_stream_may_make(
    mid_month, client, fake_upstream
):
    """A user's daily token quota counts what the row counts: a resumed stream's row the prompt of each attempt and
    the prefill in the resumed one's. Admission holds the prompt and the reply once for each attempt that may answer
    (two here), as the cost budgets do: a user whose quota holds one attempt and not two is refused before any
    upstream call, and with enough for both is answered, resumed, within the quota. Before, the quota held one
    attempt's and the user could go past it by the other."""
    routed(fake_upstream, "fault-cut-3", resume_on_failure=True)
    body = {"model": "routed", "messages": MESSAGES, "stream": True, "max_tokens": 400}
    once = prompt_tokens(body, operation="chat", upper_bound=True) + 400
    plan = Plan.objects.create(name="Tokens", allow_all_models=True, daily_token_quota=once + once // 2)
    user = UserFactory(username="quota-holder")
    plan_assign(user=user, plan=plan)
    spending = openai.OpenAI(
        base_url=str(client.base_url), api_key=api_key_create(user=user, name="q").secret, max_retries=0, timeout=30
    )
    requests = len(fake_upstream.requests)

    with pytest.raises(openai.RateLimitError):
        spending.chat.completions.create(**body)
    assert len(fake_upstream.requests) == requests, "refused before any upstream call"

    plan.daily_token_quota = 2 * once
    plan.save()  # its signal clears the server's copy of the plan
    with spending.chat.completions.with_streaming_response.create(**body) as response:
        list(response.iter_lines())
        request_id = response.headers["x-request-id"]
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed
    assert record.prompt_tokens > 2 * prompt_tokens(body, operation="chat"), "both attempts' prompts counted"
    assert record.prompt_tokens + record.completion_tokens <= 2 * once


def test_a_cut_stream_resumes_on_a_mistral_deployment_with_the_prefill_marked_as_its_prefix(client, fake_upstream):
    """Mistral takes a last assistant message only with ``"prefix": true`` (else its 400, as the fake answers):
    before, the resumed attempt on a Mistral deployment was refused and the client's stream ended in an error; the
    Mistral adapter now marks the prefill, and the client reads one whole stream. Mistral's reply begins with the
    prefix (as the fake's does): the client read the text it had twice; the echo is dropped."""
    catalog = routed(fake_upstream, "fault-cut-3", resume_on_failure=True)
    mistral = ProviderFactory(
        name="mistral", kind=ProviderKind.MISTRAL, base_url=fake_upstream.base_url + "/mistral/v1"
    )
    Deployment.objects.filter(model=catalog, name="second").update(provider=mistral, upstream_id="mistral-small-latest")

    with client.chat.completions.with_streaming_response.create(
        model="routed", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as response:
        chunks = list(response.parse())
        request_id = response.headers["x-request-id"]

    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 3, "the first three chunks, then Mistral's"
    assert chunks[-1].usage is not None
    prefill = fake_upstream.requests[-1]["body"]["messages"][-1]
    assert fake_upstream.requests[-1]["path"] == "/mistral/v1/chat/completions"
    assert prefill == {"role": "assistant", "content": "".join(texts[:4]), "prefix": True}
    # Mistral's reply begins with the prefix (the fake's does, as Mistral's): the client reads it once.
    assert "".join(texts) == prefill["content"] + LOREM_6, texts
    assert len(split_tokens(prefill["content"])) == 3, "its echo comes in three chunks, held back then dropped"
    assert [text for text in texts[4:] if text] == split_tokens(LOREM_6), "after it, each chunk as it came"
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed and record.deployment_name == "second" and record.attempts == 2
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1


def test_a_resumed_stream_asks_the_next_deployment_only_for_the_rest_of_the_token_limit(client, fake_upstream):
    """The reservation covers max_tokens for the whole reply: the resumed attempt may not add a second one."""
    routed(fake_upstream, "fault-cut-3", resume_on_failure=True)

    with client.chat.completions.with_streaming_response.create(
        model="routed", messages=MESSAGES, stream=True, max_tokens=40
    ) as response:
        texts = [c.choices[0].delta.content or "" for c in response.parse() if c.choices]

    first, resumed = fake_upstream.requests[-2]["body"], fake_upstream.requests[-1]["body"]
    delivered = "".join(texts[:4])
    assert first["max_tokens"] == 40
    assert resumed["messages"][-1]["content"] == delivered
    assert resumed["max_tokens"] == 40 - math.ceil(len(delivered) / 4)


CALL_TOOL = {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}


@pytest.mark.parametrize(
    "call",
    [{"functions": [CALL_TOOL]}, {"tools": [{"type": "function", "function": CALL_TOOL}]}],
    ids=["function", "tool"],
)
def test_a_stream_cut_inside_a_call_after_some_text_is_not_resumed(llmhub_server, client, fake_upstream, call):
    """A reply that said something, then began a call (a legacy ``function_call`` as much as ``tool_calls``), and
    was cut inside its arguments: the next deployment, given the text as a prefill, cannot finish the call the
    client holds half of. The stream ends with the in-band error, as without ``resume_on_failure``."""
    # The fake upstream streams the five words of the preamble, opens the call, sends a piece of its arguments: cut.
    routed(fake_upstream, "fault-cut-7", resume_on_failure=True)
    body = {
        "model": "routed",
        "messages": [{"role": "user", "content": "[[preamble=Let me look it up.]] Paris"}],
        "stream": True,
        **call,
    }

    with httpx.stream(
        "POST",
        llmhub_server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {client.key.secret}"},
        json=body,
        timeout=30,
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        request_id = response.headers["x-request-id"]

    assert lines[-1] != "data: [DONE]" and "upstream_stream_interrupted" in lines[-1], lines[-1]
    deltas = [choice["delta"] for line in lines[:-1] for choice in json.loads(line[len("data: ") :])["choices"]]
    assert "".join(delta.get("content") or "" for delta in deltas) == "Let me look it up."
    assert not any(choice.get("finish_reason") for line in lines[:-1] for choice in json.loads(line[6:])["choices"])
    record = wait_for_record(request_id)
    assert record.status == "upstream_error" and not record.resumed and record.attempts == 1
    assert len(fake_upstream.requests) == 1, "no second deployment was asked to continue"


def test_a_stream_of_several_choices_cut_midway_is_not_resumed(llmhub_server, client, fake_upstream):
    """``n`` = 2: each choice had written its first three words when the stream was cut. Until 7 December the next
    deployment was asked to go on from both choices' texts run together as one prefill, and each of its two choices
    continued that, which neither choice had said. The stream now ends with the in-band error, as a model without
    ``resume_on_failure`` does: one attempt, one row."""
    routed(fake_upstream, "fault-cut-3", resume_on_failure=True)
    body = {"model": "routed", "messages": MESSAGES, "stream": True, "n": 2}

    with httpx.stream(
        "POST",
        llmhub_server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {client.key.secret}"},
        json=body,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        request_id = response.headers["x-request-id"]

    assert lines[-1] != "data: [DONE]" and "upstream_stream_interrupted" in lines[-1], lines[-1]
    choices = [choice for line in lines[:-1] for choice in json.loads(line[len("data: ") :])["choices"]]
    for index in (0, 1):
        text = "".join(choice["delta"].get("content") or "" for choice in choices if choice["index"] == index)
        assert text.split() == LOREM_6.split()[:3]
    assert len(fake_upstream.requests) == 1, "no deployment was asked to continue the choices' texts run together"
    record = wait_for_record(request_id)
    assert record.status == "upstream_error" and record.error_type == "upstream_stream_interrupted"
    assert not record.resumed and record.attempts == 1
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1


def test_admission_reserves_no_resume_for_a_stream_of_several_choices(mid_month, client, fake_upstream):
    """A stream of two choices is not resumed, so admission holds one attempt's prompt and replies, not a second
    attempt's: a key whose budget pays for one is answered. Until 7 December it was refused (it held a resume that
    could not happen, and with it a prompt and a prefill more)."""
    routed(fake_upstream, "fake-gpt-4o-mini", resume_on_failure=True)
    body = {"model": "routed", "messages": MESSAGES, "stream": True, "n": 2, "max_tokens": 4000}
    upper = prompt_tokens(body, operation="chat", upper_bound=True)
    # At the dearest deployment's prices (DEAR: $3 and $15 per million): one attempt with its two replies; two.
    once = ((Decimal(upper) * 3 + 2 * 4000 * 15) / 1_000_000).quantize(Decimal("0.0001"), ROUND_CEILING)
    twice = (Decimal(upper * 2 + 4000) * 3 + 2 * 4000 * 15) / 1_000_000
    assert once < twice
    spender = api_key_create(user=client.key.api_key.user, name="budgeted")
    spending = openai.OpenAI(base_url=str(client.base_url), api_key=spender.secret, max_retries=0, timeout=30)
    api_key_limits_set(api_key=spender.api_key, budget_usd=once)

    with spending.chat.completions.with_streaming_response.create(**body) as response:
        chunks = list(response.parse())
        request_id = response.headers["x-request-id"]
    assert {choice.index for chunk in chunks for choice in chunk.choices} == {0, 1}
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.cost <= once


@pytest.mark.parametrize(
    "call",
    [{"functions": [CALL_TOOL]}, {"tools": [{"type": "function", "function": CALL_TOOL}]}],
    ids=["function", "tool"],
)
def test_a_call_the_resumed_attempt_makes_reaches_the_client(client, fake_upstream, call):
    """Cut while it was still writing its text, the reply is resumed; the next deployment finishes the text and
    then calls the function (or the tool): the client gets the whole call, not only its finish reason."""
    routed(fake_upstream, "fault-cut-3", resume_on_failure=True)
    messages = [{"role": "user", "content": "[[preamble=Let me look it up.]] Paris"}]

    with client.chat.completions.with_streaming_response.create(
        model="routed", messages=messages, stream=True, **call
    ) as response:
        deltas = [chunk.choices[0].delta for chunk in response.parse() if chunk.choices]
        request_id = response.headers["x-request-id"]

    assert "".join(delta.content or "" for delta in deltas) == "Let me look it up."
    calls = [delta.function_call for delta in deltas if delta.function_call]
    calls += [call.function for delta in deltas for call in delta.tool_calls or ()]
    assert [made.name for made in calls if made.name] == ["lookup"]
    assert json.loads("".join(made.arguments or "" for made in calls)) == {"q": "Paris"}
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.resumed and record.attempts == 2


def test_messages_and_embeddings_run_the_same_call_loop(llmhub_server, client, fake_upstream):
    import anthropic

    routed(fake_upstream, "fault-503")
    messages = anthropic.Anthropic(base_url=llmhub_server.url, api_key=client.key.secret, max_retries=0, timeout=30)

    raw = messages.messages.with_raw_response.create(
        model="routed", max_tokens=32, messages=[{"role": "user", "content": "hi there"}]
    )
    assert raw.headers["x-llmhub-deployment"] == "second" and raw.headers["x-llmhub-attempts"] == "2"
    assert wait_for_record(raw.headers["x-request-id"]).attempts == 2

    with messages.messages.stream(
        model="routed", max_tokens=32, messages=[{"role": "user", "content": "hi there"}]
    ) as stream:
        assert "".join(stream.text_stream)
        assert stream.response.headers["x-llmhub-deployment"] == "second"

    first = ProviderFactory(name="embed-first", base_url=fake_upstream.base_url + "/v1")
    second = ProviderFactory(name="embed-second", base_url=fake_upstream.base_url + "/v1")
    embedder = CatalogModel.objects.create(name="embedder", mode="embedding", strategy="priority")
    Deployment.objects.create(model=embedder, name="a", provider=first, upstream_id="fault-500", **CHEAP)
    Deployment.objects.create(model=embedder, name="b", provider=second, upstream_id="emb", priority=1, **CHEAP)
    raw = client.embeddings.with_raw_response.create(model="embedder", input="hello")
    assert raw.headers["x-llmhub-deployment"] == "b" and len(raw.parse().data) == 1
