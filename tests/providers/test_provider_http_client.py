"""The adapters' HTTP client: aiohttp by default (the SDKs' ``DefaultAioHttpClient``, measured faster; see
docs/performance.md), httpx2's pool when ``LLMHUB_PROVIDER_HTTP_CLIENT`` is "httpx"; the outbound policy holds
with either (docs/outbound.md). Against the real fake upstream; DNS is the only thing a test controls
(``outbound.resolver``), as in test_outbound.py."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx2
import pytest

from providers import outbound
from providers.adapters.aiohttp_client import GuardedAiohttpTransport
from providers.adapters.openai import OpenAIAdapter
from providers.exceptions import ProviderError
from providers.fields import Secret
from providers.types import ProviderConfig
from tests.connections import established_connections

CLIENTS = ("aiohttp", "httpx")
BODY = {"model": "fake-gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Resolver:
    """DNS as the test wants it: each name answers its addresses; every question is noted."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def resolve_sync(self, host: str, port: int | None = None) -> list[outbound.IPAddress]:
        self.asked.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(item) for item in self.answers[host]]

    async def resolve(self, host: str, port: int) -> list[outbound.IPAddress]:
        return self.resolve_sync(host, port)


def adapter_at(base_url: str) -> OpenAIAdapter:
    return OpenAIAdapter(
        ProviderConfig(id=1, name="client-test", kind="openai_compatible", base_url=base_url, api_key=Secret("sk-x"))
    )


def transport_of(adapter: OpenAIAdapter):
    return adapter._client._client._transport


@pytest.fixture
def production_rules(settings):
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = False
    settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = []


def test_the_default_client_is_aiohttp_under_the_guard(settings):
    del settings.LLMHUB_PROVIDER_HTTP_CLIENT  # the code's default, whatever a settings module says
    assert isinstance(transport_of(adapter_at("http://127.0.0.1:1/v1")), GuardedAiohttpTransport)


def test_httpx_stays_available(settings):
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = "httpx"
    assert isinstance(transport_of(adapter_at("http://127.0.0.1:1/v1")), outbound.OutboundTransport)


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_completion_and_a_stream_go_through(client, settings, fake_upstream):
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = client
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    adapter = adapter_at(fake_upstream.base_url + "/v1")
    try:
        answer = await adapter.complete(BODY)
        chunks = [chunk async for chunk in adapter.stream({**BODY, "stream": True})]
    finally:
        await adapter.aclose()
    assert answer["choices"][0]["message"]["content"]
    assert len(chunks) > 1
    assert fake_upstream.stats["requests"] == 2


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_loopback_literal_is_refused_before_anything_is_sent(client, settings, production_rules, fake_upstream):
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = client
    adapter = adapter_at(fake_upstream.base_url + "/v1")
    with pytest.raises(ProviderError) as excinfo:
        await adapter.complete(BODY)
    await adapter.aclose()
    assert excinfo.value.code == "upstream_destination_refused"
    assert fake_upstream.stats["requests"] == 0


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_name_is_judged_at_connect_time_for_every_new_connection(
    client, settings, production_rules, fake_upstream, monkeypatch
):
    """Allowed at the first connection, rebound to loopback for the next: the second is refused."""
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = client
    settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    resolver = Resolver({"rebind.test": ["127.0.0.1"]})
    monkeypatch.setattr(outbound, "resolver", resolver)
    adapter = adapter_at(f"http://rebind.test:{fake_upstream.port}/v1")
    try:
        assert (await adapter.complete(BODY))["choices"]
        await adapter.aclose()  # the next call needs a new connection
        adapter = adapter_at(f"http://rebind.test:{fake_upstream.port}/v1")
        settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = []
        with pytest.raises(ProviderError) as excinfo:
            await adapter.complete(BODY)
    finally:
        await adapter.aclose()
    assert excinfo.value.code == "upstream_destination_refused"
    assert resolver.asked == ["rebind.test", "rebind.test"]
    assert fake_upstream.stats["requests"] == 1


async def test_an_ip_literal_is_judged_for_every_new_connection_with_aiohttp(settings, production_rules, fake_upstream):
    """aiohttp asks no resolver about an IP literal: its connector judges it when it opens a connection. Allowed
    at the first connection; once the rules refuse it, the pooled connection is not reused past its own
    judgement by a new client, whose first connection is refused."""
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = "aiohttp"
    settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    adapter = adapter_at(fake_upstream.base_url + "/v1")
    try:
        assert (await adapter.complete(BODY))["choices"]
        assert (await adapter.complete(BODY))["choices"]  # the pooled connection: judged when it was opened
        await adapter.aclose()
        settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = []
        adapter = adapter_at(fake_upstream.base_url + "/v1")
        with pytest.raises(ProviderError) as excinfo:
            await adapter.complete(BODY)
    finally:
        await adapter.aclose()
    assert excinfo.value.code == "upstream_destination_refused"
    assert fake_upstream.stats["requests"] == 2


async def test_aiohttp_reports_a_busy_connection_while_a_stream_is_read(settings, fake_upstream):
    """What the registry asks before closing a retired client (``registry._busy``)."""
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = "aiohttp"
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    adapter = adapter_at(fake_upstream.base_url + "/v1")
    transport = transport_of(adapter)
    try:
        assert transport.connections_in_use() == []
        paced = [{"role": "user", "content": "[[words=20]] [[tps=40]] hi"}]  # half a second of chunks
        stream = adapter.stream({**BODY, "messages": paced, "stream": True})
        await anext(stream)
        busy = transport.connections_in_use()
        async for _ in stream:
            pass
        await asyncio.sleep(0)
        idle = transport.connections_in_use()
    finally:
        await adapter.aclose()
    assert len(busy) == 1 and not busy[0].is_idle()
    assert idle == []


@pytest.mark.parametrize("name", CLIENTS)
async def test_no_more_idle_connections_are_kept_than_the_limits_say(name, settings, private_upstream):
    """After a burst, a client keeps ``max_keepalive_connections`` of its connections for reuse and closes the
    rest: aiohttp alone would keep every one (``aiohttp_client._IdleBoundedConnector``)."""
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    limits = httpx2.Limits(max_connections=64, max_keepalive_connections=3, keepalive_expiry=30.0)
    base_url = private_upstream.base_url + "/v1"
    transport_class = GuardedAiohttpTransport if name == "aiohttp" else outbound.OutboundTransport
    client = outbound.outbound_client(url=base_url, timeout=10.0, limits=limits, transport_class=transport_class)
    slow = {**BODY, "messages": [{"role": "user", "content": "[[words=5]] [[tps=20]] hi"}]}  # a quarter second
    try:
        responses = await asyncio.gather(*(client.post(base_url + "/chat/completions", json=slow) for _ in range(10)))
        assert all(response.status_code == 200 for response in responses)
        during = established_connections(peer_port=private_upstream.port)
        for _ in range(5):  # the closes asked for run on the loop's next turns
            await asyncio.sleep(0)
        kept = established_connections(peer_port=private_upstream.port)
        again = await client.post(base_url + "/chat/completions", json=BODY)  # the capped pool still serves
        assert again.status_code == 200
    finally:
        await client.aclose()
    assert during <= 10
    assert kept == 3


async def test_aiohttp_keeps_one_read_timer_through_a_stream_and_still_times_out_a_silence(settings, fake_upstream):
    """``sock_read`` with aiohttp: a stream's reads move the end of the quiet spell instead of starting a timer
    each (``aiohttp_client._QuietTimerProtocol``); chunks that come more often than the timeout never trip
    it, and a silence as long as the timeout still ends the stream as a read timeout."""
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = "aiohttp"
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    adapter = OpenAIAdapter(
        ProviderConfig(
            id=1,
            name="client-test",
            kind="openai_compatible",
            base_url=fake_upstream.base_url + "/v1",
            api_key=Secret("sk-x"),
            timeout=0.6,
        )
    )
    transport = transport_of(adapter)
    try:
        # 16 chunks at 10 a second: 1.6 s of reads, each gap a sixth of the timeout.
        steady = [{"role": "user", "content": "[[words=15]] [[tps=10]] hi"}]
        stream = adapter.stream({**BODY, "messages": steady, "stream": True})
        await anext(stream)
        (protocol,) = transport.client.connector._acquired
        timers = [protocol._read_timeout_handle]  # held, so that no two timers seen share an id
        chunks = 1
        async for _ in stream:
            chunks += 1
            if protocol._read_timeout_handle is not None:
                timers.append(protocol._read_timeout_handle)
        assert chunks >= 15
        # aiohttp's own protocol makes a timer per read, one per chunk here; this one a timer per 0.6 s at most.
        assert len({id(timer) for timer in timers}) <= 5
        # A token a second: the gap after the first chunks is longer than the timeout.
        silent = [{"role": "user", "content": "[[words=5]] [[tps=1]] hi"}]
        with pytest.raises(ProviderError) as caught:
            async for _ in adapter.stream({**BODY, "messages": silent, "stream": True}):
                pass
    finally:
        await adapter.aclose()
    assert "in time" in caught.value.message


async def test_aiohttp_sends_each_request_the_headers_httpx_sends(settings, fake_upstream):
    """The aiohttp transport decodes a client's shared headers once (``GuardedAiohttpTransport._aiohttp_headers``):
    each request still goes out with its own length and the headers its call adds (the raw stream's), the provider's
    extra header among the shared ones, as through httpx2's own pool."""
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    calls = [
        ("complete", "hi"),
        ("stream", "a longer question, so that the body's length differs"),
        ("complete", "a third, longer again than the two before it"),
        ("stream", "?"),
    ]
    received = {}
    for extra in ((), (("X-Team", "growth"),)):
        for client in CLIENTS:
            settings.LLMHUB_PROVIDER_HTTP_CLIENT = client
            fake_upstream.reset()
            adapter = OpenAIAdapter(
                ProviderConfig(
                    id=1,
                    name="client-test",
                    kind="openai_compatible",
                    base_url=fake_upstream.base_url + "/v1",
                    api_key=Secret("sk-x"),
                    extra_headers=extra,
                )
            )
            try:
                for method, content in calls:
                    body = {**BODY, "messages": [{"role": "user", "content": content}]}
                    if method == "complete":
                        assert (await adapter.complete(body))["choices"]
                    else:
                        assert [chunk async for chunk in adapter.stream({**body, "stream": True})]
            finally:
                await adapter.aclose()
            transport_only = {"host", "accept-encoding", "connection"}
            received[extra, client] = [
                ({name: value for name, value in entry["headers"].items() if name not in transport_only}, entry["body"])
                for entry in fake_upstream.requests
            ]
        assert len(received[extra, "aiohttp"]) == len(calls)
        assert received[extra, "aiohttp"] == received[extra, "httpx"]
        lengths = {headers["content-length"] for headers, _ in received[extra, "aiohttp"]}
        assert len(lengths) == len(calls)
        raw_stream = [headers.get("x-stainless-raw-response") for headers, _ in received[extra, "aiohttp"]]
        assert raw_stream == [None, "stream", None, "stream"]
