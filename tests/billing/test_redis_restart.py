"""Redis restarts under llmhub: pooled connections that died with it are replaced, not failed on.

A redis-server of each test's own (the session's ``redis_url`` cannot be restarted under the other tests),
restarted on the same port: killed and started empty, or shut down and started again from its
append-only file when a test needs the data back.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from billing.models import BudgetPeriod, UsageRecord
from billing.services.admission import admission_acquire
from billing.services.budgets import CounterRef, api_key_limits_set, period_bounds
from billing.services.counters import counter_state
from billing.services.keys import api_key_create
from billing.services.ledger import usage_record_submit
from billing.services.ledger_rows import UsageData
from billing.services.plans import plan_assign
from providers.selectors import resolved_model
from tests.conftest import free_port, redis_start
from tests.factories import UserFactory
from tests.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = Decimal("0.0001")  # one completion token of the flat model (input is free)
MAX_TOKENS = 5
BODY = {
    "model": "flat-model",
    # The fake upstream answers exactly MAX_TOKENS words: each request costs its whole reservation.
    "messages": [{"role": "user", "content": f"[[words={MAX_TOKENS}]] count for me"}],
    "max_tokens": MAX_TOKENS,
}
POOL = 8  # connections the server's Redis pool holds once this many requests ran at once


class RedisServer:
    """A redis-server on a fixed port that can be killed and started again there."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")  # the session's redis_url fixture fails in CI
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        # The same flags as the session's server, plus an append-only file (always fsynced) in the test's
        # directory: a kill starts empty only if the test removes it.
        first = self.process is None
        for _attempt in range(5 if first else 1):
            argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)]
            process = redis_start(argv, self.port)
            if process is not None:
                self.process = process
                return
            self.port = free_port()  # taken by another worker's server in the instant after free_port
            self.url = f"redis://127.0.0.1:{self.port}/0"
        raise RuntimeError(f"another process took port {self.port} while this test's Redis was down")

    def kill(self, *, keep_data: bool = False) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        if not keep_data:
            for path in self.workdir.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()


@pytest.fixture
def restartable_redis(tmp_path, settings) -> Iterator[RedisServer]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    server.start()
    settings.REDIS_URL = server.url
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


@pytest.fixture
def account(plans, catalog):
    """An Enterprise user's key with a total budget far above what the tests spend: every request is
    budgeted (reserved at its full max_tokens, then settled) and none is refused."""
    user = UserFactory(username="restart")
    plan_assign(user=user, plan=plans["Enterprise"])
    created = api_key_create(user=user, name="restart")
    api_key_limits_set(api_key=created.api_key, budget_usd=Decimal(100), budget_period=BudgetPeriod.TOTAL)
    return {"user": user, "key": created.api_key, "secret": created.secret, "flat": catalog["flat"]}


def key_ref(api_key) -> CounterRef:
    start, _ = period_bounds(BudgetPeriod.TOTAL, timezone.now())
    return CounterRef("key", api_key.pk, "cost", BudgetPeriod.TOTAL, start)


def ledger_sum(api_key) -> Decimal:
    return sum(UsageRecord.objects.filter(api_key=api_key).values_list("cost", flat=True), Decimal(0))


async def post_all(url: str, secret: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(
            *(
                client.post(f"{url}/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {secret}"})
                for _ in range(count)
            )
        )


def test_after_a_redis_restart_no_request_fails_on_a_dead_pooled_connection(
    llmhub_server, account, fake_upstream, restartable_redis
):
    """Every pooled connection died with Redis. Before, each failed once when next used (503
    billing_unavailable, and a settle lost with it); now a dead one is replaced and the command sent again."""
    first = asyncio.run(post_all(llmhub_server.url, account["secret"], POOL))
    assert [r.status_code for r in first] == [200] * POOL, [r.text[:200] for r in first]
    wait_until(lambda: UsageRecord.objects.filter(api_key=account["key"]).count() == POOL, "the first rows")

    restartable_redis.kill()
    restartable_redis.start()
    time.sleep(1)  # well within the pool's health-check interval: the connections are found dead on use

    burst = asyncio.run(post_all(llmhub_server.url, account["secret"], 2 * POOL))

    assert [r.status_code for r in burst] == [200] * (2 * POOL), [r.text[:200] for r in burst if r.status_code != 200]
    wait_until(lambda: UsageRecord.objects.filter(api_key=account["key"]).count() == 3 * POOL, "every row")
    # Each settle landed (they run before the rows are written): nothing held, and the counter, rebuilt
    # from the ledger after the restart, moved by exactly what the burst spent.
    spent, reserved = counter_state(key_ref(account["key"]))
    assert reserved == 0
    assert spent == ledger_sum(account["key"]) == 3 * POOL * MAX_TOKENS * TOKEN


async def test_an_admission_sent_twice_reserves_once(restartable_redis, account):
    """What the client does when a reply is lost with its connection: the same script is sent again. The
    second call answers as the first did and holds nothing more."""
    flat = await sync_to_async(resolved_model)(account["flat"])

    async def admit():
        return await admission_acquire(
            user_id=account["user"].pk,
            api_key_id=account["key"].pk,
            key_allowed_model_ids=None,
            model=flat,
            body=BODY,
            request_id="req_sent_twice",
            prompt_tokens_upper=0,
        )

    first, second = await admit(), await admit()

    assert first.reserved_cost == second.reserved_cost == MAX_TOKENS * TOKEN
    spent, reserved = await sync_to_async(counter_state)(key_ref(account["key"]))
    assert (spent, reserved) == (Decimal(0), MAX_TOKENS * TOKEN)


async def test_a_settle_that_meets_redis_down_is_retried_until_it_lands(restartable_redis, account):
    """Redis is down when the request settles (longer than the client's own retries), then comes back
    with its data: the settle is not dropped, so the hold is released and the spend counted."""
    flat = await sync_to_async(resolved_model)(account["flat"])
    admission = await admission_acquire(
        user_id=account["user"].pk,
        api_key_id=account["key"].pk,
        key_allowed_model_ids=None,
        model=flat,
        body=BODY,
        request_id="req_settle_later",
        prompt_tokens_upper=0,
    )
    ref = key_ref(account["key"])
    assert await sync_to_async(counter_state)(ref) == (Decimal(0), MAX_TOKENS * TOKEN)

    restartable_redis.kill(keep_data=True)
    usage_record_submit(
        UsageData(
            request_id="req_settle_later",
            endpoint="rest",
            stream=False,
            status="ok",
            user_id=account["user"].pk,
            api_key_id=account["key"].pk,
            model_name="flat-model",
            completion_tokens=3,
            cost=3 * TOKEN,
        ),
        admission=admission,
    )
    # The row does not wait for the settle.
    await wait_until_async(
        UsageRecord.objects.filter(request_id="req_settle_later").aexists,
        "the row written before the settle",
        timeout=30,
        interval=0.1,
    )
    assert await UsageRecord.objects.filter(request_id="req_settle_later").aexists()
    await asyncio.sleep(1)  # the settle has failed by now, more than once
    restartable_redis.start()

    async def settled() -> bool:
        return await sync_to_async(counter_state)(ref) == (3 * TOKEN, Decimal(0))

    await wait_until_async(settled, "the settle landed once Redis was back", timeout=30, interval=0.1)
    state = await sync_to_async(counter_state)(ref)
    assert state == (3 * TOKEN, Decimal(0))
