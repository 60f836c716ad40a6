"""One deadline per request: ``Provider.timeout_seconds`` bounds a request's whole time upstream, the SDK's
retries and the waits between them included, on REST and on the WebSocket.

A provider that hangs (the fake upstream's ``hang`` fault) with a timeout of 1 s and 2 SDK retries used to
keep a client waiting for three attempts of 1 s each plus the backoff between them, while the message said
"within 1 seconds". The attempts the fake upstream counts show it, without timing the test.
"""

from __future__ import annotations

import openai
import pytest
from asgiref.sync import sync_to_async

from billing.services.keys import api_key_create
from tests.chat.conftest import ends, events_until, socket_for  # noqa: F401  (the fixture)
from tests.chat.test_consumer import send
from tests.factories import ModelFactory, ProviderFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def request_deadline(settings):
    """One deadline per request, across attempts: 1 s here, as the provider's own timeout."""
    settings.LLMHUB_REQUEST_DEADLINE_SECONDS = 1
    return settings


def slow_provider(fake_upstream, *, timeout: float = 1, kind: str = "openai_compatible"):
    base_url = fake_upstream.base_url + ("/v1" if kind != "anthropic" else "")
    return ProviderFactory(base_url=base_url, kind=kind, timeout_seconds=timeout)


def client_for(server) -> openai.OpenAI:
    secret = api_key_create(user=UserFactory(), name="deadline").secret
    return openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=30)


@pytest.mark.parametrize(("kind", "upstream_id"), [("openai_compatible", "fault-hang"), ("anthropic", "fault-hang")])
def test_a_hanging_provider_times_out_once_not_once_per_retry(
    kind, upstream_id, llmhub_server, fake_upstream, request_deadline
):
    provider = slow_provider(fake_upstream, kind=kind)
    ModelFactory(name="hanging", provider=provider, upstream_id=upstream_id)
    ModelFactory(name="warm", provider=provider, upstream_id="fake-model")
    client = client_for(llmhub_server)
    # The deadline counts from the first attempt, the SDK client's creation (and its imports) included:
    # made once beforehand, under a roomier deadline.
    request_deadline.LLMHUB_REQUEST_DEADLINE_SECONDS = 30
    client.chat.completions.create(model="warm", messages=MESSAGES)
    request_deadline.LLMHUB_REQUEST_DEADLINE_SECONDS = 1
    before = fake_upstream.stats["requests"]

    with pytest.raises(openai.APIStatusError) as excinfo:
        client.chat.completions.create(model="hanging", messages=MESSAGES)

    assert excinfo.value.status_code == 504
    assert excinfo.value.code == "upstream_timeout"
    assert "within 1 seconds" in excinfo.value.message
    assert fake_upstream.stats["requests"] - before == 1, "the deadline passed during the first attempt: no retry"
    assert excinfo.value.response.headers["x-llmhub-attempts"] == "1"


def test_a_hanging_stream_times_out_once(llmhub_server, fake_upstream):
    ModelFactory(name="hanging", provider=slow_provider(fake_upstream), upstream_id="fault-hang")

    with pytest.raises(openai.APIStatusError) as excinfo:
        for _ in client_for(llmhub_server).chat.completions.create(model="hanging", messages=MESSAGES, stream=True):
            pass

    assert excinfo.value.status_code == 504
    assert fake_upstream.stats["requests"] == 1


def test_retry_after_beyond_the_deadline_is_not_waited_for(llmhub_server, fake_upstream):
    # The fake upstream's 429 says Retry-After: 2, more than the whole 1 s this request may take.
    ModelFactory(name="limited", provider=slow_provider(fake_upstream), upstream_id="fault-429")

    with pytest.raises(openai.RateLimitError) as excinfo:
        client_for(llmhub_server).chat.completions.create(model="limited", messages=MESSAGES)

    assert excinfo.value.code == "upstream_rate_limited"
    assert excinfo.value.response.headers.get("retry-after")
    assert fake_upstream.stats["requests"] == 1


def test_retries_that_fit_in_the_deadline_still_happen(llmhub_server, fake_upstream, request_deadline):
    # 3 s: the first Retry-After (2 s) fits, the second would reach past the deadline.
    request_deadline.LLMHUB_REQUEST_DEADLINE_SECONDS = 3
    ModelFactory(name="limited", provider=slow_provider(fake_upstream, timeout=3), upstream_id="fault-429")

    with pytest.raises(openai.RateLimitError):
        client_for(llmhub_server).chat.completions.create(model="limited", messages=MESSAGES)

    assert fake_upstream.stats["requests"] == 2


async def test_the_websocket_gets_an_error_event_when_the_deadline_passes(
    transactional_db,
    fake_upstream,
    socket_for,  # noqa: F811
):
    model = await sync_to_async(ModelFactory)(
        name="hanging",
        provider=await sync_to_async(slow_provider)(fake_upstream),
        upstream_id="fake-gpt-4o-mini",
        context_window=16_000,
    )
    user = await sync_to_async(UserFactory)()
    ws = await socket_for(user)

    await send(ws, content="hello [[fault=hang]]", model=model)
    events = await events_until(ws, ends("r1"))

    assert events[-1]["type"] == "error", events
    assert events[-1]["code"] == "upstream_timeout"
    assert "within 1 seconds" in events[-1]["message"]
    assert fake_upstream.stats["requests"] == 1
