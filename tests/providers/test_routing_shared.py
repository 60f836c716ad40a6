"""Routing statistics shared between processes through a real Redis: another process's requests in flight,
its requests this minute and its latency samples change how this one routes, and a process that dies stops
counting. The other process is this module run as a script (``python -m tests.providers.test_routing_shared
<redis url> <plan as JSON>``): it makes its calls through ``providers.routing``, sends them, says ``ready``,
and ends its held calls when told to (a line on stdin), or dies holding them when killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.redis


class OtherProcess:
    """Another llmhub process, with its own statistics, that makes the calls of ``plan``:
    ``hold`` {deployment id: n} calls left in flight, ``requests`` {id: n} calls made and ended, ``ttft``
    {id: seconds} five calls answering their first token after that long."""

    def __init__(self, redis_url: str, plan: dict) -> None:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "llmhub.settings.test", "REDIS_URL": ""}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.providers.test_routing_shared", redis_url, json.dumps(plan)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def expect(self, line: str) -> None:
        said = self.process.stdout.readline().strip()
        assert said == line, f"the other process said {said!r}"

    def release(self) -> None:
        self.process.stdin.write("release\n")
        self.process.stdin.flush()
        self.expect("done")
        self.process.wait(timeout=30)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def other_processes(redis_url) -> Iterator[list[OtherProcess]]:
    started: list[OtherProcess] = []
    yield started
    for other in started:
        if other.process.poll() is None:
            other.kill()


@pytest.fixture
def shared(settings, redis_url):
    from providers.routing.stats import stats_clear

    stats_clear()
    settings.REDIS_URL = redis_url
    yield
    stats_clear()


async def exchanged() -> None:
    """One exchange with Redis made by this test (the background one may be under way: wait for it)."""
    from providers.routing.stats import stats_flush
    from tests.waiting import wait_until_async

    await wait_until_async(stats_flush, "an exchange with Redis", interval=0.01)


async def start_other(other_processes, redis_url: str, plan: dict) -> OtherProcess:
    other = OtherProcess(redis_url, plan)
    other_processes.append(other)
    await asyncio.to_thread(other.expect, "ready")
    return other


async def test_least_busy_counts_the_requests_another_process_has_in_flight(shared, redis_url, other_processes):
    from providers.routing import Outcome, call_finished, call_started, route_candidates, router
    from providers.routing.stats import in_flight
    from providers.types import RoutingStrategy
    from tests.providers.test_routing import deployment, model

    router.rng.seed(7)
    east, west = deployment("east"), deployment("west")
    routed = model(east, west, strategy=RoutingStrategy.LEAST_BUSY)
    mine = call_started(east.id)
    await exchanged()
    assert all(route_candidates(routed)[0] == west for _ in range(20))

    other = await start_other(other_processes, redis_url, {"hold": {west.id: 3}})
    await exchanged()
    assert in_flight(west.id) == 3
    assert in_flight(east.id) == 1
    assert all(route_candidates(routed)[0] == east for _ in range(20))

    await asyncio.to_thread(other.release)
    await exchanged()
    assert in_flight(west.id) == 0
    assert all(route_candidates(routed)[0] == west for _ in range(20))
    call_finished(mine, outcome=Outcome.OK)


async def test_a_process_that_dies_stops_counting_its_requests_in_flight(shared, redis_url, other_processes):
    from providers.routing.stats import BUSY_TTL_MS, in_flight
    from tests.providers.test_routing import deployment
    from tests.waiting import wait_until_async

    d = deployment("east")
    other = await start_other(other_processes, redis_url, {"hold": {d.id: 2}})
    await exchanged()
    assert in_flight(d.id) == 2
    other.kill()

    async def none_in_flight() -> bool:
        await exchanged()
        return not in_flight(d.id)

    await wait_until_async(
        none_in_flight, "the dead process's requests no longer in flight", timeout=BUSY_TTL_MS / 1000 + 10, interval=0.1
    )
    assert in_flight(d.id) == 0


async def test_another_process_requests_count_against_the_rpm_cap(shared, redis_url, other_processes):
    from providers.routing import route_candidates
    from providers.routing.stats import current_minute
    from providers.types import RoutingStrategy
    from tests.providers.test_routing import deployment, model

    # The caps count per calendar minute, and the other processes take seconds to start on a loaded machine: a
    # round whose minute turned midway counted into two minutes, and proves nothing. It is run again, with new
    # deployments, in the next minute (each round starts with at least 30 s of its minute ahead).
    for round_ in range(3):
        if time.time() % 60 > 30:
            await asyncio.sleep(61 - time.time() % 60)
        minute = current_minute()
        capped = deployment(f"capped-{round_}", priority=0, rpm_limit=5)
        spare = deployment(f"spare-{round_}", priority=1)
        routed = model(capped, spare, strategy=RoutingStrategy.PRIORITY)
        await start_other(other_processes, redis_url, {"requests": {capped.id: 4}})
        await exchanged()
        first = route_candidates(routed)[0]
        await start_other(other_processes, redis_url, {"requests": {capped.id: 1}})
        await exchanged()
        if current_minute() != minute:
            continue
        assert first == capped  # 4 of 5 used
        assert route_candidates(routed) == [spare]
        return
    pytest.fail("the minute turned in each of three rounds")


async def test_latency_averages_are_shared(shared, redis_url, other_processes):
    from providers.routing import route_candidates, router
    from providers.routing.stats import latency_score
    from providers.types import RoutingStrategy
    from tests.providers.test_routing import deployment, model

    router.rng.seed(11)
    slow, fast = deployment("slow"), deployment("fast")
    await start_other(other_processes, redis_url, {"ttft": {slow.id: 0.050, fast.id: 0.005}})
    await exchanged()
    assert latency_score(fast.id) == pytest.approx(0.005)
    assert latency_score(slow.id) == pytest.approx(0.050)
    routed = model(slow, fast, strategy=RoutingStrategy.LOWEST_LATENCY)
    firsts = [route_candidates(routed)[0] for _ in range(400)]
    assert firsts.count(fast) / 400 >= 0.90


async def test_the_background_exchange_sends_without_being_asked(shared, redis_url):
    """No test-made exchange here: the first call on this event loop starts the loop's flusher."""
    import redis

    from providers.routing import Outcome, call_finished, call_started
    from providers.routing.stats import KEY_PREFIX, instance_id
    from tests.providers.test_routing import deployment
    from tests.waiting import wait_until_async

    d = deployment("east")
    ticket = call_started(d.id)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        # One 10 s deadline for both: the call started, then finished.
        deadline = time.monotonic() + 10
        await wait_until_async(
            lambda: client.hget(f"{KEY_PREFIX}busy:{instance_id()}", str(d.id)) == "1",
            "the call in flight sent",
            timeout=deadline - time.monotonic(),
            interval=0.05,
        )
        assert client.hget(f"{KEY_PREFIX}busy:{instance_id()}", str(d.id)) == "1"
        call_finished(ticket, outcome=Outcome.OK)
        await wait_until_async(
            lambda: client.hget(f"{KEY_PREFIX}busy:{instance_id()}", str(d.id)) is None,
            "the finished call sent",
            timeout=deadline - time.monotonic(),
            interval=0.05,
        )
        assert client.hget(f"{KEY_PREFIX}busy:{instance_id()}", str(d.id)) is None
    finally:
        client.close()


def test_a_flush_sent_twice_counts_once(redis_url):
    """The client sends a command again when its connection died before the reply: the script must not add
    the batch's requests, tokens and samples twice."""
    import redis

    from providers.routing.stats import KEY_PREFIX, SCRIPTS_DIR
    from tests.providers.test_routing import deployment

    d = deployment("east")
    instance = f"test-{d.id}"
    keys = [
        KEY_PREFIX + "instances",
        f"{KEY_PREFIX}busy:{instance}",
        f"{KEY_PREFIX}minute:test-{d.id}",
        KEY_PREFIX + "latency",
        f"{KEY_PREFIX}batch:{instance}",
    ]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        flush = client.register_script((SCRIPTS_DIR / "routing_stats_flush.lua").read_text())

        def send(batch: int, requests: int, ttft: float) -> list:
            args = [instance, KEY_PREFIX + "busy:", 3000, 120_000, 60_000, "0.5", batch]
            return flush(keys=keys, args=[*args, 1, d.id, 2, 1, d.id, requests, 10 * requests, 1, d.id, "f", 1, ttft])

        send(1, 3, 0.1)
        _, counts, averages = send(1, 3, 0.1)  # the same batch again
        assert dict(zip(counts[::2], counts[1::2], strict=True)) == {f"r:{d.id}": "3", f"t:{d.id}": "30"}
        assert float(dict(zip(averages[::2], averages[1::2], strict=True))[f"f:{d.id}"]) == pytest.approx(0.1)
        _, counts, averages = send(2, 1, 0.3)  # the next one
        assert dict(zip(counts[::2], counts[1::2], strict=True))[f"r:{d.id}"] == "4"
        assert float(dict(zip(averages[::2], averages[1::2], strict=True))[f"f:{d.id}"]) == pytest.approx(0.2)
    finally:
        client.delete(*keys[1:3], keys[4])
        client.hdel(keys[3], f"f:{d.id}")
        client.srem(keys[0], instance)
        client.close()


async def test_with_redis_unreachable_routing_works_on_this_process_view(settings):
    from providers.routing import Outcome, call_finished, call_started, route_candidates
    from providers.routing.stats import in_flight, stats_clear, stats_flush
    from providers.types import RoutingStrategy
    from tests.conftest import free_port
    from tests.providers.test_routing import deployment, model

    stats_clear()
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    east, west = deployment("east"), deployment("west")
    routed = model(east, west, strategy=RoutingStrategy.LEAST_BUSY)
    ticket = call_started(east.id)
    assert await stats_flush() is False
    assert in_flight(east.id) == 1
    assert route_candidates(routed)[0] == west
    call_finished(ticket, outcome=Outcome.OK)
    assert in_flight(east.id) == 0
    stats_clear()


# THE OTHER PROCESS


async def _other_process(redis_url: str, plan: dict) -> None:
    from django.conf import settings

    from providers.routing import Outcome, call_finished, call_started
    from providers.routing.stats import stats_flush

    settings.REDIS_URL = redis_url
    held = [call_started(int(d)) for d, n in plan.get("hold", {}).items() for _ in range(n)]
    for d, n in plan.get("requests", {}).items():
        for _ in range(n):
            call_finished(call_started(int(d)), outcome=Outcome.OK)
    for d, seconds in plan.get("ttft", {}).items():
        for _ in range(5):
            call_finished(call_started(int(d)), outcome=Outcome.OK, ttft_s=seconds)
    while not await stats_flush():
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    if not held:
        return
    await asyncio.to_thread(sys.stdin.readline)
    for ticket in held:
        call_finished(ticket, outcome=Outcome.OK)
    while not await stats_flush():
        await asyncio.sleep(0.01)
    print("done", flush=True)


if __name__ == "__main__":
    import django

    django.setup()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_other_process(sys.argv[1], json.loads(sys.argv[2])))
