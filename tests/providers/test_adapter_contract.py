"""The contract every adapter keeps, run against each one over real HTTP to the fake upstream.

Like Django's cache backend tests (one suite, every backend), a new provider proves itself by adding one
``ContractAdapter`` to ``CONTRACT_ADAPTERS``: the provider kind (the adapter is looked up through
``LLMHUB_ADAPTERS``, so the registration is proven too) and how to build a ``ProviderConfig`` that points
at the fake upstream's routes for its wire format. Adapter-specific behaviour (translation details,
pass-through fields) stays in ``test_adapter_<name>.py``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmhub.testing.openapi import validate_openai_schema
from providers.adapters.base import BaseAdapter
from providers.adapters.registry import adapter_class_for_kind
from providers.exceptions import (
    ProviderAuthenticationError,
    ProviderBadRequestError,
    ProviderContextLengthError,
    ProviderError,
    ProviderNotFoundError,
    ProviderOverloadedError,
    ProviderRateLimitError,
    ProviderStreamInterruptedError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from providers.fields import Secret
from providers.types import ProviderConfig

API_KEY = "sk-contract-test-key-0123456789abcdef"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@dataclass(frozen=True)
class ContractAdapter:
    """One adapter under the contract.

    ``base_url`` builds the provider's base URL from the fake upstream's (``http://127.0.0.1:PORT``);
    ``config`` holds any other ``ProviderConfig`` field the kind needs (``api_version`` for Azure).
    ``model`` is the upstream model id sent (a deployment name for Azure); ``listed_model`` one id the
    fake's model list must contain.
    ``embeddings`` says whether the provider has an embeddings API (``adapter.embed``)."""

    kind: str
    base_url: Callable[[str], str]
    model: str = "fake-gpt-4o-mini"
    listed_model: str = "fake-gpt-4o-mini"
    config: dict[str, Any] = field(default_factory=dict)
    embeddings: bool = True
    # False: the provider reports no usage for embeddings, so the adapter leaves it out and the pipeline
    # estimates it (the ledger row says so).
    embedding_usage: bool = True
    # True: the request goes to an OpenAI-protocol server as it came, ``modalities`` and ``audio`` included, for
    # the model to answer in audio or refuse them itself. False: the provider answers in text only.
    audio_output: bool = False
    # True: the provider answers ``logprobs: true`` with the tokens' log probabilities. False: it has none to give,
    # and the adapter refuses the request rather than answer it with ``logprobs: null``.
    logprobs: bool = False
    # True: ``logit_bias`` goes up as it came (OpenAI's protocol, whose servers apply it). False: the provider has
    # none, and the adapter refuses a bias rather than answer with the tokens it bans.
    logit_bias: bool = False
    # True: ``moderation`` (OpenAI's moderation of the input and the reply) goes up as it came, for the server to run
    # or refuse. False: the provider has no such thing, and the adapter refuses it rather than answer unmoderated.
    moderation: bool = False

    def make_config(self, upstream_url: str, **overrides: Any) -> ProviderConfig:
        values: dict[str, Any] = {
            "id": 9900,
            "name": f"contract-{self.kind}",
            "kind": self.kind,
            "base_url": self.base_url(upstream_url),
            "api_key": Secret(API_KEY),
            "timeout": 5.0,
            **self.config,
        }
        values.update(overrides)
        return ProviderConfig(**values)

    def __str__(self) -> str:
        return self.kind


# Append an entry here to put a new adapter under the contract.
CONTRACT_ADAPTERS: list[ContractAdapter] = [
    ContractAdapter(
        kind="openai_compatible",
        base_url=lambda url: url + "/v1",
        audio_output=True,
        logprobs=True,
        logit_bias=True,
        moderation=True,
    ),
    # Mistral speaks OpenAI's chat and embeddings API, refusing the fields it does not take: the fake serves
    # it, as strict, under /mistral.
    ContractAdapter(kind="mistral", base_url=lambda url: url + "/mistral/v1"),
    # Ollama's OpenAI compatibility, which ignores what it does not read (n): served under /ollama.
    ContractAdapter(kind="ollama", base_url=lambda url: url + "/ollama/v1", logprobs=True),
    # The model is the Azure deployment's name; the SDK puts it in the path, the fake answers as that model.
    ContractAdapter(
        kind="azure_openai",
        base_url=lambda url: url,
        config={"api_version": "2024-10-21"},
        audio_output=True,
        logprobs=True,
        logit_bias=True,
        moderation=True,
    ),
    ContractAdapter(
        kind="anthropic",
        base_url=lambda url: url,  # the SDK's paths carry /v1
        model="fake-claude-haiku",
        listed_model="fake-claude-haiku",
        embeddings=False,
    ),
    ContractAdapter(
        kind="cohere",
        base_url=lambda url: url + "/cohere",  # the fake serves Cohere's v2 API under /cohere
        model="command-a-03-2025",
        listed_model="command-a-03-2025",
    ),
    ContractAdapter(
        kind="gemini",
        base_url=lambda url: url,  # the SDK adds the API version (v1beta) and the /models paths
        model="gemini-2.5-flash",
        embedding_usage=False,  # batchEmbedContents reports no token counts
        logprobs=True,  # responseLogprobs
    ),
]


@pytest.fixture(params=CONTRACT_ADAPTERS, ids=str)
def entry(request) -> ContractAdapter:
    return request.param


def build(entry: ContractAdapter, upstream, **overrides: Any) -> BaseAdapter:
    return adapter_class_for_kind(entry.kind)(entry.make_config(upstream.base_url, **overrides))


@pytest.fixture
async def adapter(entry, fake_upstream):
    adapter = build(entry, fake_upstream)
    yield adapter
    await adapter.aclose()


def chat(entry: ContractAdapter, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": entry.model, "messages": [{"role": "user", "content": text}], **extra}


async def collect(stream) -> list[dict]:
    return [chunk async for chunk in stream]


def streamed_text(chunks: list[dict]) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


def assert_clean(error: ProviderError, entry: ContractAdapter) -> None:
    """Our error, naming the provider, with no SDK exception chained to it and no credential in it."""
    assert error.provider == f"contract-{entry.kind}"
    assert error.__cause__ is None and error.__suppress_context__
    for text in (str(error), repr(error), error.message):
        assert API_KEY not in text


# Completions and streams ---------------------------------------------------------------------------


async def test_complete_answers_an_openai_chat_completion(adapter, entry):
    completion = await adapter.complete(chat(entry, "hello there"))

    validate_openai_schema(completion, "CreateChatCompletionResponse")
    message = completion["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == "Echo: hello there"
    assert completion["choices"][0]["finish_reason"] == "stop"


async def test_usage_counts_prompt_completion_and_cached_tokens(adapter, entry):
    completion = await adapter.complete(chat(entry, "hello there [[cache=3]] [[words=5]]"))

    usage = completion["usage"]
    assert usage["completion_tokens"] == 5
    # Cached tokens are inside prompt_tokens, as OpenAI counts them, whatever the provider's own convention.
    assert usage["prompt_tokens_details"]["cached_tokens"] == 3
    assert usage["prompt_tokens"] >= 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_stream_yields_chunks_in_order_and_ends_with_usage(adapter, entry):
    chunks = await collect(adapter.stream(chat(entry, "[[words=12]] [[cache=2]]")))

    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    words = streamed_text(chunks).split()
    assert len(words) == 12
    assert words[:3] == ["lorem", "ipsum", "dolor"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["prompt_tokens_details"]["cached_tokens"] == 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


async def test_tool_call_round_trip(adapter, entry):
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Paris"}]
    first = await adapter.complete({"model": entry.model, "messages": messages, "tools": [WEATHER_TOOL]})

    validate_openai_schema(first, "CreateChatCompletionResponse")
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] == "Paris"

    messages += [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees, sunny"}]
    final = await adapter.complete({"model": entry.model, "messages": messages, "tools": [WEATHER_TOOL]})

    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["choices"][0]["message"]["content"] == "Tool result: 18 degrees, sunny"


async def test_streamed_tool_call_adds_up_to_the_arguments(adapter, entry):
    body = {"model": entry.model, "messages": [{"role": "user", "content": "Oslo"}], "tools": [WEATHER_TOOL]}

    chunks = await collect(adapter.stream(body))

    for chunk in chunks:
        validate_openai_schema(chunk, "CreateChatCompletionStreamResponse")
    calls = [
        call for chunk in chunks for choice in chunk["choices"] for call in choice["delta"].get("tool_calls") or ()
    ]
    assert calls[0]["function"]["name"] == "get_weather"
    arguments = "".join(call["function"].get("arguments") or "" for call in calls)
    assert json.loads(arguments)["city"] == "Oslo"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_a_request_for_audio_output_is_refused_by_a_provider_that_answers_in_text_only(adapter, entry):
    """``modalities`` with ``"audio"`` asks for a spoken answer (``message.audio``): a provider that answers in text
    only refuses it, naming the parameter, rather than answering text the client did not ask for alone."""
    body = chat(entry, "hi", modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    if entry.audio_output:
        await adapter.complete(body)  # it went up as it came: the model answers in audio or refuses it
        assert set(body) >= {"modalities", "audio"}
        return
    for call in (adapter.complete, lambda body: collect(adapter.stream(body))):
        with pytest.raises(ProviderBadRequestError) as caught:
            await call(body)
        assert caught.value.status_code == 400 and caught.value.param == "modalities", caught.value
    assert (await adapter.complete(chat(entry, "hi", modalities=["text"])))["choices"][0]["message"]["content"]


async def test_logprobs_are_returned_or_refused_by_a_provider_that_has_none(adapter, entry):
    """``logprobs: true`` asks for each token's log probability: a provider that has none to give (Claude, Cohere,
    Mistral) refuses it, naming the parameter, as OpenAI's reasoning models do, rather than answer with ``logprobs:
    null`` (Claude's did); ``false`` asks for nothing and is accepted by every one."""
    body = chat(entry, "hi", logprobs=True)
    if entry.logprobs:
        completion = await adapter.complete(body)
        assert completion["choices"][0]["logprobs"]["content"], completion
    else:
        for call in (adapter.complete, lambda body: collect(adapter.stream(body))):
            with pytest.raises(ProviderBadRequestError) as caught:
                await call(body)
            error = caught.value
            assert (error.status_code, error.param, error.code) == (400, "logprobs", "unsupported_parameter"), error
    assert (await adapter.complete(chat(entry, "hi", logprobs=False)))["choices"][0]["message"]["content"]
    assert streamed_text(await collect(adapter.stream(chat(entry, "hi", logprobs=False))))


async def test_a_logit_bias_is_sent_on_or_refused_by_a_provider_that_has_none(adapter, entry, fake_upstream):
    """``logit_bias`` bans or favours tokens (-100 bans one): a provider without it (Claude, Cohere, Gemini, Mistral,
    Ollama) refuses it before any call, naming it, rather than answer with the tokens it bans (until 6 December only
    Gemini's did; Claude, Cohere and Ollama dropped it unsaid, and Mistral refused it with its 422 after the call); an
    empty one asks for nothing and is answered by every one."""
    body = chat(entry, "hi", logit_bias={"50256": -100})
    served = fake_upstream.requests_served()
    if entry.logit_bias:
        await adapter.complete(body)
        assert fake_upstream.requests[-1]["body"]["logit_bias"] == {"50256": -100}
    else:
        for call in (adapter.complete, lambda body: collect(adapter.stream(body))):
            with pytest.raises(ProviderBadRequestError) as caught:
                await call(body)
            error = caught.value
            assert (error.status_code, error.param, error.code) == (400, "logit_bias", "unsupported_parameter"), error
            assert error.provider == f"contract-{entry.kind}"
        assert fake_upstream.requests_served() == served
    assert (await adapter.complete(chat(entry, "hi", logit_bias={})))["choices"][0]["message"]["content"]


async def test_a_moderation_asked_for_is_sent_on_or_refused_by_a_provider_that_has_none(adapter, entry, fake_upstream):
    """``moderation`` asks OpenAI to moderate the input and the reply with its model: a provider that has no such thing
    (Claude, Cohere, Gemini, Mistral, Ollama) refuses it before any call, naming it, rather than answer unmoderated
    (until 6 December they dropped it unsaid, and Mistral refused it with its 422 after the call); a null one asks for
    nothing."""
    body = chat(entry, "hi", moderation={"model": "omni-moderation-latest"})
    served = fake_upstream.requests_served()
    if entry.moderation:
        await adapter.complete(body)
        assert fake_upstream.requests[-1]["body"]["moderation"] == {"model": "omni-moderation-latest"}
    else:
        for call in (adapter.complete, lambda body: collect(adapter.stream(body))):
            with pytest.raises(ProviderBadRequestError) as caught:
                await call(body)
            error = caught.value
            assert (error.status_code, error.param, error.code) == (400, "moderation", "unsupported_parameter"), error
        assert fake_upstream.requests_served() == served
    assert (await adapter.complete(chat(entry, "hi", moderation=None)))["choices"][0]["message"]["content"]


async def test_the_legacy_functions_are_sent_on_or_refused_by_a_provider_that_has_none(adapter, entry, fake_upstream):
    """The legacy ``functions`` (and ``function_call``) offer the model functions it answers in
    ``message.function_call``: a provider without them (every one but OpenAI's protocol, whose servers answer them)
    refuses them before any call, naming ``functions``, rather than answer as if no function had been offered (until
    6 December Claude, Gemini, Cohere and Ollama dropped them unsaid, and Mistral refused them with its 422 after the
    call); an empty list asks for nothing."""
    weather = WEATHER_TOOL["function"]
    body = chat(entry, "Oslo", functions=[weather], function_call={"name": weather["name"]})
    served = fake_upstream.requests_served()
    if entry.moderation:  # the OpenAI-protocol kinds, which send OpenAI's own fields on
        completion = await adapter.complete(body)
        assert completion["choices"][0]["message"]["function_call"]["name"] == weather["name"]
    else:
        for call in (adapter.complete, lambda body: collect(adapter.stream(body))):
            with pytest.raises(ProviderBadRequestError) as caught:
                await call(body)
            error = caught.value
            assert (error.status_code, error.param, error.code) == (400, "functions", "unsupported_parameter"), error
        assert fake_upstream.requests_served() == served
    assert (await adapter.complete(chat(entry, "hi", functions=[])))["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "unhonoured",
    [
        {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
        {"logprobs": True},
        {"n": 2},
        {"tool_choice": "required", "tools": [WEATHER_TOOL]},
    ],
    ids=["audio-output", "logprobs", "several-choices", "forced-tool-call"],
)
async def test_a_refusal_before_the_call_names_the_provider(adapter, entry, unhonoured):
    """A request the adapter refuses before any upstream call names the provider that refused it, as an upstream's
    refusal does: the log line and the routing report of the attempt say whose it was (Mistral's and Ollama's
    refusals named none)."""
    for call in (adapter.complete, lambda body: collect(adapter.stream(body))):
        try:
            await call(chat(entry, "hi", **unhonoured))
        except ProviderBadRequestError as error:
            assert error.provider == f"contract-{entry.kind}", error


async def test_a_text_completion_refused_before_the_call_names_the_provider(adapter, entry):
    """As a chat request's: several prompts, which Ollama and Mistral's fill-in-the-middle refuse."""
    if not adapter.serves_completions:
        pytest.skip(f"{entry.kind} serves no text completions")
    body = {"model": entry.model, "prompt": ["one", "two"], "max_tokens": 5}
    for call in (adapter.text_complete, lambda body: collect(adapter.text_stream(body))):
        try:
            await call(body)
        except ProviderBadRequestError as error:
            assert error.provider == f"contract-{entry.kind}", error


async def test_embeddings(adapter, entry):
    if not entry.embeddings:
        pytest.skip(f"{entry.kind} has no embeddings API")
    response = await adapter.embed({"model": entry.model, "input": ["one two three", "four"]})

    assert [item["index"] for item in response["data"]] == [0, 1]
    assert all(len(item["embedding"]) == 256 for item in response["data"])
    if entry.embedding_usage:
        assert response["usage"]["prompt_tokens"] == 4
    else:
        assert "usage" not in response


# Failures: every fault of the fake upstream -----------------------------------------------------------

STATUS_FAULTS = [
    ("401", ProviderAuthenticationError, 401),
    ("403", ProviderAuthenticationError, 403),
    ("404", ProviderNotFoundError, 404),
    ("400", ProviderBadRequestError, 400),
    ("context", ProviderContextLengthError, 400),
    ("429", ProviderRateLimitError, 429),
    ("500", ProviderUnavailableError, 500),
    ("502", ProviderUnavailableError, 502),
    ("503", ProviderUnavailableError, 503),
    ("529", ProviderOverloadedError, 529),
]


@pytest.mark.parametrize(("fault", "error_class", "status"), STATUS_FAULTS)
async def test_status_faults_map_to_provider_errors(adapter, entry, fault, error_class, status):
    for call in (adapter.complete, lambda body: collect(adapter.stream(body))):
        with pytest.raises(ProviderError) as caught:
            await call(chat(entry, f"hi [[fault={fault}]]"))
        error = caught.value
        assert type(error) is error_class, (call, error)
        assert error.upstream_status == status
        assert_clean(error, entry)
        if fault == "429":
            assert error.retry_after == 2.0
            assert error.status_code == 429
        if fault in ("401", "403"):
            assert "refused the gateway's credentials" in error.message
        if fault == "context":
            assert error.code == "context_length_exceeded"


async def test_a_hanging_upstream_times_out(entry, fake_upstream):
    adapter = build(entry, fake_upstream, timeout=0.3)
    try:
        with pytest.raises(ProviderTimeoutError) as caught:
            await adapter.complete(chat(entry, "[[fault=hang]]"))
        assert_clean(caught.value, entry)
        with pytest.raises(ProviderTimeoutError):
            await collect(adapter.stream(chat(entry, "[[fault=hang]]")))
    finally:
        await adapter.aclose()


async def test_a_refused_connection_is_unavailable(entry, fake_upstream):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    adapter = build(entry, fake_upstream, base_url=entry.base_url(f"http://127.0.0.1:{closed_port}"))
    try:
        for call in (adapter.complete, lambda body: collect(adapter.stream(body))):
            with pytest.raises(ProviderUnavailableError) as caught:
                await call(chat(entry, "hi"))
            assert type(caught.value) is ProviderUnavailableError
            assert_clean(caught.value, entry)
    finally:
        await adapter.aclose()


@pytest.mark.parametrize("cut", [0, 3])
async def test_a_cut_stream_is_interrupted_after_the_chunks_it_sent(adapter, entry, cut):
    received = []
    with pytest.raises(ProviderStreamInterruptedError) as caught:
        async for chunk in adapter.stream(chat(entry, f"[[words=20]] [[fault=cut-{cut}]]")):
            received.append(chunk)

    assert len([c for c in received if c["choices"] and c["choices"][0]["delta"].get("content")]) == cut
    assert caught.value.status_code == 502
    assert_clean(caught.value, entry)


async def test_a_cut_completion_is_unavailable(adapter, entry):
    with pytest.raises(ProviderUnavailableError) as caught:
        await adapter.complete(chat(entry, "[[fault=cut-2]]"))
    assert_clean(caught.value, entry)


async def test_an_error_event_interrupts_the_stream(adapter, entry):
    received = []
    with pytest.raises(ProviderStreamInterruptedError) as caught:
        async for chunk in adapter.stream(chat(entry, "[[words=20]] [[fault=error-event]]")):
            received.append(chunk)

    assert streamed_text(received).split() == ["lorem", "ipsum"]
    assert_clean(caught.value, entry)


async def test_an_upstream_message_quoting_the_key_is_scrubbed(adapter, entry):
    # The fake quotes an unknown fault name back in its 400 message.
    with pytest.raises(ProviderBadRequestError) as caught:
        await adapter.complete(chat(entry, f"[[fault={API_KEY}]]"))

    assert "Unknown fake fault" in caught.value.message
    assert_clean(caught.value, entry)


async def test_the_adapter_never_shows_its_key(adapter, entry):
    for text in (repr(adapter), str(adapter), repr(adapter.config), str(adapter.config)):
        assert API_KEY not in text


# Models and health ---------------------------------------------------------------------------------


async def test_list_models_and_health_check(adapter, entry):
    models = await adapter.list_models()
    assert entry.listed_model in {model.id for model in models}

    health = await adapter.health_check()
    assert health.ok
    assert health.models_seen == len(models)


async def test_health_check_reports_a_failing_provider(entry, fake_upstream):
    adapter = build(entry, fake_upstream, extra_headers=(("x-fake-fault", "503"),))
    try:
        health = await adapter.health_check()
    finally:
        await adapter.aclose()

    assert not health.ok
    assert "unavailable" in health.error
    assert API_KEY not in health.error
