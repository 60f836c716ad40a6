"""The adapter pool under bring-your-own-key traffic: one client per (provider, user credential), bounded by
``LLMHUB_ADAPTER_POOL_SIZE`` and evicted least-recently-used, so that many users' keys never open as many
connection pools; an evicted client finishes the stream running on it before it closes.

Real calls against the fake upstream; the connections are counted where the kernel keeps them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os

import pytest

from providers.adapters import adapter_for
from providers.adapters.registry import adapters_close_all, adapters_open
from providers.fields import Secret
from providers.models import ByokMode
from providers.selectors import provider_config
from tests.factories import ProviderFactory

pytestmark = pytest.mark.django_db

BOUND = 8
USERS = 1000
BODY = {"model": "fake-gpt-4o-mini", "messages": [{"role": "user", "content": "hi [[words=2]]"}]}


def established_to(port: int) -> int:
    """This process's TCP connections in state ESTABLISHED whose far end is ``port``: the client ends of the
    pooled HTTP connections to the fake upstream (its server ends have ``port`` as their local port). Read
    from the kernel's tables, matched to this process's sockets, so that other processes' traffic on the
    machine cannot count."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                ours.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[3] == "01" and remote_port == port and fields[9] in ours:
                    count += 1
    return count


def user_config(base, n: int):
    return dataclasses.replace(
        base, api_key=Secret(f"sk-user-{n:05d}-own-key-0000"), credential_id=100_000 + n, credential_hint=f"…{n:04d}"
    )


@pytest.fixture
def base_config(fake_upstream):
    provider = ProviderFactory(name="byok-pool", base_url=fake_upstream.base_url + "/v1", byok=ByokMode.OPTIONAL)
    return provider_config(provider)


async def test_a_thousand_users_keys_in_a_row_keep_open_clients_and_connections_under_the_bound(
    settings, base_config, fake_upstream
):
    settings.LLMHUB_ADAPTER_POOL_SIZE = BOUND
    await adapters_close_all()
    port = int(fake_upstream.base_url.rsplit(":", 1)[1])
    baseline = established_to(port)
    most_open = most_connections = 0
    try:
        platform = adapter_for(base_config)
        await platform.complete(BODY)
        for n in range(USERS):
            config = user_config(base_config, n)
            completion = await adapter_for(config).complete(BODY)
            assert completion["choices"][0]["message"]["content"]
            sent = fake_upstream.requests[-1]["key_sha256"]
            assert sent == hashlib.sha256(config.api_key.reveal().encode()).hexdigest()  # the user's own key
            most_open = max(most_open, adapters_open())
            if n % 10 == 0:  # reading the kernel's tables costs more than the call itself
                # A closed client's sockets go at the loop's next turns (asyncio closes a transport with
                # call_soon): let the retirements already done finish before the kernel is asked.
                await asyncio.sleep(0.02)
                most_connections = max(most_connections, established_to(port) - baseline)
        # The provider's own client was never evicted, however many users came after it.
        assert adapter_for(base_config) is platform
    finally:
        await adapters_close_all()

    # The pool holds BOUND users' clients plus the provider's own; evicted ones are closed once idle.
    assert most_open <= BOUND + 1, most_open
    assert most_connections <= BOUND + 1, most_connections
    assert fake_upstream.requests_served() >= USERS


async def test_a_recently_used_key_keeps_its_client_and_the_least_recently_used_is_evicted(settings, base_config):
    settings.LLMHUB_ADAPTER_POOL_SIZE = 3
    await adapters_close_all()
    try:
        first = adapter_for(user_config(base_config, 1))
        second = adapter_for(user_config(base_config, 2))
        adapter_for(user_config(base_config, 3))
        assert adapter_for(user_config(base_config, 1)) is first  # used again: now the most recent

        adapter_for(user_config(base_config, 4))  # over the bound: the least recently used (2) goes

        assert adapter_for(user_config(base_config, 1)) is first
        assert adapter_for(user_config(base_config, 2)) is not second
    finally:
        await adapters_close_all()


@pytest.fixture
def slow_config(fake_upstreams):
    slow = fake_upstreams("slow", tps=40)["slow"]
    provider = ProviderFactory(name="byok-slow", base_url=slow.base_url + "/v1", byok=ByokMode.OPTIONAL)
    return provider_config(provider)


async def test_an_evicted_client_finishes_its_stream_before_it_closes(settings, slow_config):
    base = slow_config
    settings.LLMHUB_ADAPTER_POOL_SIZE = 2
    await adapters_close_all()
    try:
        streaming = adapter_for(user_config(base, 0))
        body = {**BODY, "messages": [{"role": "user", "content": "long [[words=40]]"}], "stream": True}
        chunks = streaming.stream(body)
        first = await anext(chunks)
        for n in (1, 2, 3):  # three other users' keys: user 0's client is evicted mid-stream
            adapter_for(user_config(base, n))
        assert adapter_for(user_config(base, 0)) is not streaming

        rest = [chunk async for chunk in chunks]

        assert first is not None and len(rest) > 10  # the whole reply came through the evicted client
        for _ in range(100):  # then it is closed, within a few idle checks
            if streaming._client.is_closed():
                break
            await asyncio.sleep(0.1)
        assert streaming._client.is_closed()
    finally:
        await adapters_close_all()
