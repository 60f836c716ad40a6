"""The adapter pool under bring-your-own-key traffic: one client per (provider, user credential), bounded by
``LLMHUB_ADAPTER_POOL_SIZE`` and evicted least-recently-used, so that many users' keys never open as many
connection pools; an evicted client finishes the stream running on it before it closes.

Real calls against the fake upstream; the connections are counted by asking each socket its TCP state."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os

import pytest
from asgiref.sync import sync_to_async

from providers.adapters import adapter_for, registry
from providers.adapters.registry import adapters_close_all, adapters_open
from providers.fields import Secret
from providers.models import ByokMode, CredentialStatus, Provider, ProviderCredential
from providers.selectors import provider_config
from providers.services.credentials import provider_credential_delete, provider_credential_save
from tests.connections import established_connections
from tests.factories import ProviderFactory, UserFactory
from tests.waiting import wait_until_async

pytestmark = pytest.mark.django_db

BOUND = 8
USERS = 1000
ALICE_KEY = "sk-alice-own-key-7f3a9c1e5b2d4a68"
BODY = {"model": "fake-gpt-4o-mini", "messages": [{"role": "user", "content": "hi [[words=2]]"}]}


def sockets_of(adapter) -> set[str]:
    """The kernel's inodes of the sockets ``adapter``'s HTTP client holds now, pooled or in use (aiohttp's
    connector, the adapters' default client)."""
    session = adapter._client._client._transport.client
    protocols = [protocol for pooled in session.connector._conns.values() for protocol, _ in pooled]
    protocols += list(session.connector._acquired)
    inodes = set()
    for protocol in protocols:
        sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
        if sock is not None:
            inodes.add(str(os.fstat(sock.fileno()).st_ino))
    return inodes


async def retirements_done() -> None:
    """Let the retirements already begun finish before the kernel is asked: the closing tasks, then the
    loop's next turns, where asyncio closes a transport's socket (``call_soon``). Waited for by what they
    are rather than by a pause: on a loaded machine a 20 ms pause can pass in a single turn of the loop."""
    loop = asyncio.get_running_loop()
    pool = registry._pools.get(loop)
    closing = list(pool.closing) if pool is not None else []
    if closing:
        await asyncio.wait(closing, timeout=10)
    for _ in range(3):
        await asyncio.sleep(0)


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
    opened: set[str] = set()  # every socket the test's clients opened, closed since or not
    # Every client is kept referenced, so that its sockets close only when the pool closes it: a client
    # nothing refers to any more is collected at once, and aiohttp's connector closes its sockets then.
    adapters = []
    most_open = most_connections = 0
    try:
        platform = adapter_for(base_config)
        await platform.complete(BODY)
        opened |= sockets_of(platform)
        for n in range(USERS):
            config = user_config(base_config, n)
            adapter = adapter_for(config)
            adapters.append(adapter)
            completion = await adapter.complete(BODY)
            opened |= sockets_of(adapter)
            assert completion["choices"][0]["message"]["content"]
            sent = fake_upstream.requests[-1]["key_sha256"]
            assert sent == hashlib.sha256(config.api_key.reveal().encode()).hexdigest()  # the user's own key
            most_open = max(most_open, adapters_open())
            if n % 10 == 0:  # asking every socket of the process costs more than the call itself
                await retirements_done()
                most_connections = max(most_connections, established_connections(inodes=opened))
        # The provider's own client was never evicted, however many users came after it.
        assert adapter_for(base_config) is platform
    finally:
        await adapters_close_all()

    # The pool holds BOUND users' clients plus the provider's own; evicted ones are closed once idle.
    assert most_open <= BOUND + 1, most_open
    assert most_connections <= BOUND + 1, most_connections
    assert fake_upstream.requests_served() >= USERS
    assert len(opened) >= USERS  # a client of its own for every user, each with its connection


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
        # Then it is closed, within a few idle checks.
        await wait_until_async(streaming._client.is_closed, "the evicted client closed", timeout=10, interval=0.1)
        assert streaming._client.is_closed()
    finally:
        await adapters_close_all()


@pytest.fixture
def alices_key(base_config):
    alice = UserFactory(username="alice")
    provider = Provider.objects.get(pk=base_config.id)
    credential = ProviderCredential.objects.create(
        owner=alice, provider=provider, api_key=ALICE_KEY, hint=Secret(ALICE_KEY).hint, status=CredentialStatus.VALID
    )
    return credential


def on_key(base, credential: ProviderCredential):
    return dataclasses.replace(
        base, api_key=Secret(credential.api_key.reveal()), credential_id=credential.pk, credential_hint=credential.hint
    )


async def client_used(config):
    """The pooled adapter for ``config``, after a real call on it (its connection open and kept alive)."""
    adapter = adapter_for(config)
    await adapter.complete(BODY)
    assert not adapter._client.is_closed()
    return adapter


@pytest.mark.django_db(transaction=True)
async def test_deleting_an_own_key_closes_its_pooled_client_at_once(base_config, alices_key):
    await adapters_close_all()
    try:
        used = await client_used(on_key(base_config, alices_key))

        await sync_to_async(provider_credential_delete)(credential=alices_key)

        # Nothing holds the deleted key any more: its client (and the connection it kept) is closed, though
        # no other key pushed it out of the pool.
        await wait_until_async(used._client.is_closed, "the deleted key's client closed", timeout=5, interval=0.05)
        # Its client says closed from the start of its close; the pool lets it go when the close has returned.
        await retirements_done()
        assert adapters_open() == 0
    finally:
        await adapters_close_all()


@pytest.mark.django_db(transaction=True)
async def test_replacing_an_own_key_closes_the_old_keys_pooled_client_at_once(base_config, alices_key):
    await adapters_close_all()
    try:
        used = await client_used(on_key(base_config, alices_key))

        replaced = await sync_to_async(provider_credential_save)(
            owner=alices_key.owner, provider=alices_key.provider, api_key="sk-alice-new-key-0000000000000001"
        )

        await wait_until_async(used._client.is_closed, "the replaced key's client closed", timeout=5, interval=0.05)
        assert adapter_for(on_key(base_config, replaced)) is not used
    finally:
        await adapters_close_all()
