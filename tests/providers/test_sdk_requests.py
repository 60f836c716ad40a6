"""The adapters' SDK clients build each request from a template (``providers.adapters.sdk_requests``): every
request they build is the one the SDK's own ``_build_request`` builds for the same call, on the same client,
for both SDKs, whether from a template made by an earlier call or not; calls of another shape are the SDK's."""

from __future__ import annotations

import uuid
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from anthropic._models import FinalRequestOptions as AnthropicOptions
from openai._models import FinalRequestOptions as OpenAIOptions

from providers.adapters import sdk_requests

BASE_URL = "http://upstream.test:8080/v1"
HEADERS = {"X-Extra": "from the provider row", "HTTP-Referer": "https://llmhub.example"}


def _client_options() -> dict[str, Any]:
    """What both SDKs' clients are given here, as the adapters give it (``providers.adapters.openai``,
    ``providers.adapters.anthropic``)."""
    return {
        "base_url": BASE_URL,
        "timeout": httpx2.Timeout(30.0, connect=10.0),
        "max_retries": 0,
        "default_headers": HEADERS,
        "http_client": httpx2.AsyncClient(),
    }


def openai_client() -> tuple[Any, type, type]:
    client = sdk_requests.AsyncOpenAI(api_key="sk-template-test", organization="org-1", **_client_options())
    client.project = None
    return client, openai.AsyncOpenAI, OpenAIOptions


def anthropic_client() -> tuple[Any, type, type]:
    client = sdk_requests.AsyncAnthropic(api_key="sk-ant-template-test", **_client_options())
    return client, anthropic.AsyncAnthropic, AnthropicOptions


def body(n: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": f"héllo {n} " * n}], "stream": n % 2 == 0}


# Calls as the adapters make them: a JSON body, or none; the raw-stream header; another path.
TEMPLATED = [
    {"method": "post", "url": "/chat/completions"},
    {"method": "post", "url": "/chat/completions", "headers": {"X-Stainless-Raw-Response": "stream"}},
    {"method": "post", "url": "/messages", "headers": {"anthropic-beta": "token-counting-2024-11-01"}},
    {"method": "get", "url": "/models", "no_body": True},
]
# Calls of other shapes: built by the SDK itself.
NOT_TEMPLATED = [
    {"method": "post", "url": "/embeddings", "extra_json": {"extra": [1, 2]}},
    {"method": "get", "url": "/models", "params": {"limit": 5}, "no_body": True},
    {"method": "post", "url": "/chat/completions", "timeout": 3.0},
    {"method": "post", "url": "/chat/completions", "headers": {"X-Extra": "omit"}},  # the SDK's Omit()
]


def options(options_class: type, call: dict[str, Any], n: int) -> Any:
    fields = {key: value for key, value in call.items() if key != "no_body"}
    if fields.get("headers", {}).get("X-Extra") == "omit":
        omit = openai.Omit if options_class is OpenAIOptions else anthropic.Omit
        fields["headers"] = {"X-Extra": omit()}
    if not call.get("no_body"):
        fields["json_data"] = body(n)
    return options_class.construct(**fields)


def described(request: httpx2.Request) -> dict[str, Any]:
    return {
        "method": request.method,
        "url": str(request.url),
        "headers": sorted((name.lower(), value) for name, value in request.headers.multi_items()),
        "content": request.read(),
        "extensions": request.extensions,
    }


@pytest.mark.parametrize("make", [openai_client, anthropic_client], ids=["openai", "anthropic"])
@pytest.mark.parametrize("retries_taken", [0, 1])
def test_every_templated_request_is_the_one_the_sdk_builds(make, retries_taken):
    client, sdk_class, options_class = make()
    # The client holds a cookie (as from a provider behind Cloudflare) when the templates are made; it changes.
    client._client.cookies.set("__cf_bm", "old", domain="upstream.test")
    for n in range(1, 4):  # the first call makes the template, the next ones use it, each with its own body
        if n == 3:
            client._client.cookies.set("__cf_bm", "abc", domain="upstream.test")
        for call in TEMPLATED:
            ours = client._build_request(options(options_class, call, n), retries_taken=retries_taken)
            theirs = sdk_class._build_request(client, options(options_class, call, n), retries_taken=retries_taken)
            assert described(ours) == described(theirs), call
    assert len(client.__dict__["_request_templates"]) == len(TEMPLATED)
    assert ("cookie", "__cf_bm=abc") in described(ours)["headers"]  # the cookie the client holds now
    posted = client._build_request(options(options_class, TEMPLATED[0], 5), retries_taken=retries_taken)
    assert posted.headers["cookie"] == "__cf_bm=abc"
    assert posted.headers["content-length"] == str(len(posted.content))


@pytest.mark.parametrize("make", [openai_client, anthropic_client], ids=["openai", "anthropic"])
def test_calls_of_other_shapes_are_built_by_the_sdk(make):
    client, sdk_class, options_class = make()
    for call in NOT_TEMPLATED:
        for n in (1, 2):
            ours = client._build_request(options(options_class, call, n))
            theirs = sdk_class._build_request(client, options(options_class, call, n))
            assert described(ours) == described(theirs), call
    assert not client.__dict__.get("_request_templates")


def test_a_client_called_in_too_many_ways_stops_making_templates():
    client, sdk_class, options_class = openai_client()
    for n in range(sdk_requests._TEMPLATES_MAX + 5):
        call = {"method": "post", "url": f"/path/{n}"}
        ours = client._build_request(options(options_class, call, n))
        assert described(ours) == described(sdk_class._build_request(client, options(options_class, call, n)))
    assert len(client.__dict__["_request_templates"]) == sdk_requests._TEMPLATES_MAX


def fields(options: Any) -> dict[str, Any]:
    """An options object's fields, a "not given" as such (each is its own instance)."""
    return {
        name: "NOT_GIVEN" if isinstance(value, (openai.NotGiven, anthropic.NotGiven)) else value
        for name, value in options.__dict__.items()
    }


@pytest.mark.parametrize("make", [openai_client, anthropic_client], ids=["openai", "anthropic"])
async def test_posted_options_are_the_ones_the_sdk_constructs(make, monkeypatch):
    client, sdk_class, _ = make()
    sent: list[Any] = []

    async def request(cast_to, options, *, stream=False, stream_cls=None):
        sent.append((cast_to, options, stream, stream_cls))

    monkeypatch.setattr(client, "request", request)
    calls = [
        {"options": {}},
        {"options": {"headers": {"X-Stainless-Raw-Response": "stream"}}, "stream": True},
        {"options": {"headers": {"anthropic-beta": "a"}}},
        {"options": {"timeout": 3.0}},  # not templated
    ]
    for n in range(1, 4):  # the first call makes the template, the next ones use it
        for call in calls:
            for post in (client.post, lambda *args, **kwargs: sdk_class.post(client, *args, **kwargs)):
                await post("/chat/completions", cast_to=object, body=body(n), **call)
            (_, ours, *rest), (_, theirs, *their_rest) = sent[-2:]
            assert fields(ours) == fields(theirs) and rest == their_rest, call
            assert ours.model_fields_set == theirs.model_fields_set
            # Nothing mutable is shared between two calls' options.
            for name, value in ours.__dict__.items():
                if isinstance(value, (dict, list)) and name != "json_data":
                    assert all(value is not other.__dict__[name] for _, other, *_ in sent[:-2]), name
    assert len(client.__dict__["_options_templates"]) == 3


@pytest.mark.parametrize("make", [openai_client, anthropic_client], ids=["openai", "anthropic"])
def test_no_idempotency_key_is_made_for_a_client_that_sends_none(make, monkeypatch):
    """The SDKs make a key for every request but a GET and send it only from a client with an idempotency header,
    which neither has: no key is made for those (a UUID4 each, docs/performance.md, 7 December). A client with such
    a header gets the SDK's own, a fresh one each time, and its request carries it."""
    client, _, options_class = make()
    made: list[uuid.UUID] = []
    real_uuid4 = uuid.uuid4
    monkeypatch.setattr(uuid, "uuid4", lambda: made.append(real_uuid4()) or made[-1])
    assert client._idempotency_header is None
    assert client._idempotency_key() == sdk_requests._IDEMPOTENCY_KEY_UNSENT
    assert made == []
    client._idempotency_header = "Idempotency-Key"
    first, second = client._idempotency_key(), client._idempotency_key()
    assert (first, second) == tuple(f"stainless-python-retry-{key}" for key in made)
    call = options(options_class, TEMPLATED[0], 1)
    call.idempotency_key = first
    assert client._build_request(call).headers["Idempotency-Key"] == first
