"""Circuit breakers through the interface the pipeline and the router use (``breaker_is_open``,
``breaker_allows``, ``breaker_record``) and the one admins use (``breaker_state``, ``breaker_force``,
``breaker_reset``), in both of their homes: a real Redis shared by every process, and this process's memory.
The clock is pinned (time_machine) wherever a cooldown matters."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import redis
import time_machine

from providers.fields import Secret
from providers.routing import breakers
from providers.routing.breaker_machine import CLOSED, HALF_OPEN, OPEN, BreakerConfig
from providers.routing.breakers import (
    breaker_allows,
    breaker_force,
    breaker_is_open,
    breaker_record,
    breaker_release_probe,
    breaker_reset,
    breaker_state,
    breakers_synced,
)
from providers.types import ProviderConfig, ResolvedDeployment
from tests.conftest import free_port
from tests.shared_redis import redis_emptied, use_redis  # noqa: F401  (use_redis: a fixture)
from tests.waiting import wait_until_async

START = datetime(2026, 12, 1, 9, 0, 0, tzinfo=UTC)
# Every test its own deployments: the view of a process outlives a test.
_ids = itertools.count(int(time.time()) % 1_000_000 * 100)


def deployment(forced_state: str = "") -> ResolvedDeployment:
    provider = ProviderConfig(id=1, name="east", kind="openai", base_url="http://127.0.0.1:9/v1", api_key=Secret(""))
    return ResolvedDeployment(
        id=next(_ids),
        name="east",
        provider=provider,
        upstream_id="gpt-test",
        input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(2),
        forced_state=forced_state,
    )


@pytest.fixture(params=["redis", "memory"])
def home(request, settings):
    """Where the breakers live: the real Redis (emptied around the test), or this process's memory."""
    if request.param == "redis":
        request.getfixturevalue("use_redis")
    else:
        settings.REDIS_URL = ""
    return request.param


@pytest.fixture
def clock():
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


# Poll until ``predicate()`` holds (a liveness deadline, not a speed requirement).
eventually = functools.partial(wait_until_async, timeout=10.0, interval=0.005)


async def fail(d: ResolvedDeployment, times: int) -> None:
    for _ in range(times):
        breaker_record(d.id, ok=False)
    await breakers_synced()


async def test_consecutive_failures_open_it_and_one_probe_closes_it(home, clock):
    d = deployment()
    await fail(d, 4)
    await eventually(lambda: breaker_state(d.id).failures == 4, "4 failures counted")
    assert not breaker_is_open(d)
    assert await breaker_allows(d)

    await fail(d, 1)
    await eventually(lambda: breaker_is_open(d), "the 5th failure opens it")
    assert not await breaker_allows(d)
    state = breaker_state(d.id)
    assert (state.state, state.cooldown_seconds, state.shared) == (OPEN, 30.0, home == "redis")
    assert state.opened_until == datetime(2026, 12, 1, 9, 0, 30, tzinfo=UTC)
    breaker_record(d.id, ok=True)  # a call that began before it opened: says nothing while open
    clock.shift(29.9)
    await asyncio.sleep(0.05)
    assert breaker_is_open(d)

    clock.shift(0.1)  # the cooldown is over: half-open, a candidate again
    assert not breaker_is_open(d)
    assert breaker_state(d.id).state == HALF_OPEN
    allowed = await asyncio.gather(*(breaker_allows(d) for _ in range(20)))
    assert allowed.count(True) == 1
    assert breaker_is_open(d)  # the probe is out: the others leave it out without asking Redis

    breaker_record(d.id, ok=True)
    await eventually(lambda: breaker_state(d.id).state == CLOSED, "the probe's success closes it")
    await eventually(lambda: not breaker_is_open(d), "this process sees it closed")
    assert await breaker_allows(d)
    assert breaker_state(d.id).failures == 0


async def test_each_failed_probe_doubles_the_cooldown_up_to_the_cap(home, clock):
    d = deployment()
    await fail(d, 5)
    await eventually(lambda: breaker_is_open(d), "open")
    seen = [breaker_state(d.id).cooldown_seconds]
    for _ in range(6):
        clock.shift(seen[-1])
        assert await breaker_allows(d)
        breaker_record(d.id, ok=False)
        await eventually(lambda: breaker_state(d.id).state == OPEN, "the failed probe re-opens it")
        await eventually(lambda: breaker_is_open(d), "this process sees it re-opened")
        seen.append(breaker_state(d.id).cooldown_seconds)
    assert seen == [30, 60, 120, 240, 480, 600, 600]

    clock.shift(600)
    assert await breaker_allows(d)
    breaker_record(d.id, ok=True)
    await eventually(lambda: breaker_state(d.id).state == CLOSED, "closed")
    await fail(d, 5)
    await eventually(lambda: breaker_is_open(d), "open again")
    assert breaker_state(d.id).cooldown_seconds == 30  # a success put the cooldown back to its base


async def test_the_error_rate_opens_it_only_over_the_minimum_volume(home, clock):
    d = deployment()
    # Two failures in every three calls (67 %), never five in a row.
    for _ in range(6):
        breaker_record(d.id, ok=False)
        breaker_record(d.id, ok=False)
        breaker_record(d.id, ok=True)
    breaker_record(d.id, ok=False)
    await breakers_synced()
    await eventually(lambda: breaker_state(d.id).window_calls == 19, "19 calls counted")
    assert breaker_state(d.id).window_failures == 13
    assert not breaker_is_open(d)  # under the minimum volume of 20

    breaker_record(d.id, ok=False)  # the 20th call: 14 of 20 failed
    await eventually(lambda: breaker_is_open(d), "the error rate opens it")
    assert breaker_state(d.id).failures == 2


async def test_half_the_calls_failing_is_not_above_the_threshold(home, clock):
    d = deployment()
    for _ in range(20):
        breaker_record(d.id, ok=True)
        breaker_record(d.id, ok=False)
    await breakers_synced()
    await eventually(lambda: breaker_state(d.id).window_calls == 40, "40 calls counted")
    assert breaker_state(d.id).state == CLOSED
    clock.shift(61)  # a minute later the window has forgotten them
    assert breaker_state(d.id).window_calls == 0


async def test_a_probe_that_says_nothing_gives_its_claim_back(home, clock):
    d = deployment()
    await fail(d, 5)
    await eventually(lambda: breaker_is_open(d), "open")
    clock.shift(30)
    assert await breaker_allows(d)  # this caller probes...
    breaker_release_probe(d.id)  # ...and its client goes away: nothing learnt
    await eventually(lambda: not breaker_is_open(d), "the probe is free again")
    assert await breaker_allows(d)  # the next caller probes at once, not after the 60 s lease
    assert not await breaker_allows(d)
    breaker_release_probe(d.id)
    breaker_release_probe(d.id)  # twice: the second is not this process's claim any more
    await eventually(lambda: not breaker_is_open(d), "free again")
    assert await breaker_allows(d)
    breaker_record(d.id, ok=True)
    await eventually(lambda: breaker_state(d.id).state == CLOSED, "its success closes it")


async def test_an_attempt_that_was_not_the_probe_leaves_the_claim_alone(shared):
    d = deployment()
    await breakers_synced()
    breaker_force(d.id, "open")
    args = breakers._args(d.id, BreakerConfig.from_settings(), breakers._now_ms() + 30_000)
    assert breakers._script(shared, "breaker_claim")(keys=breakers._keys(d.id), args=args)[1] == 1  # elsewhere
    breaker_release_probe(d.id)  # an attempt of this process that said nothing (it began before the opening)
    await asyncio.sleep(0.3)
    assert breaker_state(d.id).probe_until is not None


async def test_an_admins_override_beats_the_breaker(home, clock):
    forced_open, forced_closed = deployment(forced_state="open"), deployment(forced_state="closed")
    assert breaker_is_open(forced_open)
    assert not await breaker_allows(forced_open)

    await fail(forced_closed, 5)
    await eventually(lambda: breaker_state(forced_closed.id).state == OPEN, "its breaker opened")
    assert not breaker_is_open(forced_closed)
    assert await breaker_allows(forced_closed)


async def test_force_and_reset(home, clock):
    d = deployment()
    await breakers_synced()
    breaker_force(d.id, "open")
    assert breaker_is_open(d)
    assert breaker_state(d.id).state == OPEN
    clock.shift(30)  # half-open: forcing it open again is a failed probe
    breaker_force(d.id, "open")
    assert breaker_state(d.id).cooldown_seconds == 60
    breaker_reset(d.id)
    assert not breaker_is_open(d)
    assert (breaker_state(d.id).state, breaker_state(d.id).cooldown_seconds) == (CLOSED, 30)
    breaker_force(d.id, "open")
    breaker_force(d.id, "closed")
    assert not breaker_is_open(d)
    with pytest.raises(ValueError):
        breaker_force(d.id, "half_open")


async def test_redis_unreachable_the_process_decides_alone(settings, clock):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    d = deployment()
    for _ in range(5):
        breaker_record(d.id, ok=False)  # never raises
    await eventually(lambda: breaker_is_open(d), "opened in this process")
    state = breaker_state(d.id)
    assert (state.state, state.shared) == (OPEN, False)
    clock.shift(30)
    assert (await asyncio.gather(*(breaker_allows(d) for _ in range(5)))).count(True) == 1
    breaker_record(d.id, ok=True)
    await eventually(lambda: not breaker_is_open(d) and breaker_state(d.id).state == CLOSED, "closed")


@pytest.fixture
def shared(settings, redis_url):
    settings.REDIS_URL = redis_url
    settings.LLMHUB_BREAKER_RESYNC_SECONDS = 0.2
    with redis_emptied(redis_url, decode_responses=True) as client:
        yield client


def _transition_unannounced(client: redis.Redis, deployment_id: int, name: str) -> None:
    """A transition whose change message this process does not hear (published on another channel)."""
    args = breakers._args(deployment_id, BreakerConfig.from_settings(), breakers._now_ms())
    args[10] = "llmhub:breakers:elsewhere"
    breakers._script(client, name)(keys=breakers._keys(deployment_id), args=args)


async def test_a_missed_message_is_healed_by_the_resync(shared):
    d = deployment()
    await breakers_synced()
    _transition_unannounced(shared, d.id, "breaker_trip")
    await eventually(lambda: breaker_is_open(d), "the resync finds it open")
    _transition_unannounced(shared, d.id, "breaker_reset")
    await eventually(lambda: not breaker_is_open(d), "the resync finds it closed")


async def test_redis_losing_its_data_closes_what_it_forgot(shared):
    """Opened unannounced and learned by the resync: a change message still in flight when Redis loses its data
    (``breaker_force`` publishes one) could be read after the snapshot that saw the loss, and open it again."""
    d = deployment()
    await breakers_synced()
    _transition_unannounced(shared, d.id, "breaker_trip")
    await eventually(lambda: breaker_is_open(d), "the resync finds it open")
    shared.flushdb()  # as a Redis restarted without persistence
    await eventually(lambda: not breaker_is_open(d), "the breaker Redis forgot is closed here too")


async def test_a_change_message_of_the_data_redis_lost_does_not_reopen_the_breaker(shared):
    """A change published just before Redis lost its data and read after the resync that saw the loss: its version
    (of the old counter, far above the new one) would beat the view rebuilt from what Redis holds, and keep the
    breaker open in this process until its cooldown. The message carries the epoch of its data: an old one is
    ignored."""
    d, marker = deployment(), deployment()
    await breakers_synced()
    shared.set(breakers.VERSION_KEY, 1000)  # a Redis that has run a while
    elsewhere = shared.pubsub(ignore_subscribe_messages=True)
    elsewhere.subscribe("llmhub:breakers:elsewhere")
    _transition_unannounced(shared, d.id, "breaker_trip")  # its message kept, not heard here
    published: list[str] = []

    def caught() -> bool:
        message = elsewhere.get_message(timeout=0.05)
        if message is not None:
            published.append(message["data"])
        return bool(published)

    await eventually(caught, "the trip's change message")
    elsewhere.close()
    await eventually(lambda: breaker_is_open(d), "the resync finds it open")
    shared.flushdb()  # as a Redis restarted without persistence
    await eventually(lambda: not breaker_is_open(d), "the resync saw the loss and closed it")

    shared.publish(breakers.CHANNEL, published[0])  # the old message, read after the resync
    args = breakers._args(marker.id, BreakerConfig.from_settings(), breakers._now_ms())
    breakers._script(shared, "breaker_trip")(keys=breakers._keys(marker.id), args=args)  # a message of the new data
    await eventually(lambda: breaker_is_open(marker), "the message after it is heard")
    assert not breaker_is_open(d)
    assert breaker_state(d.id).state == CLOSED


async def test_a_redis_restart_costs_the_breakers_only_what_redis_forgot(tmp_path, settings):
    from tests.billing.test_redis_restart import RedisServer

    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    server.start()
    settings.REDIS_URL = server.url
    settings.LLMHUB_BREAKER_RESYNC_SECONDS = 0.2
    try:
        d = deployment()
        await fail(d, 5)
        await eventually(lambda: breaker_is_open(d), "open")

        server.kill()  # and its data with it
        breaker_record(d.id, ok=False)  # Redis away: never raises, decided in this process
        await asyncio.sleep(0.3)
        assert breaker_is_open(d)
        server.start()
        await eventually(lambda: not breaker_is_open(d), "Redis came back empty: closed, as it says")

        other = deployment()
        for _ in range(5):
            breaker_record(other.id, ok=False)  # the scripts Redis forgot are loaded again
        await eventually(lambda: breaker_is_open(other), "a breaker opens again")
        assert breaker_state(other.id).shared
    finally:
        server.process.kill()
        server.process.wait(timeout=10)
