"""The ledger writer settles its batch's reservations together (``admission_settle_many``): in Redis one pipeline
of the settle script, one call a request, not a round trip each. Each request is settled, once, as it is alone:
the same counters, the same records, its own refusal, and the scripts loaded again if Redis lost them."""

from __future__ import annotations

from decimal import Decimal

import pytest
import redis
from asgiref.sync import sync_to_async

from billing.models import BudgetPeriod, UsageRecord
from billing.services.admission import admission_settle_many
from billing.services.budgets import api_key_limits_set
from billing.services.counters import counter_state
from billing.services.keys import api_key_create
from tests.billing.test_concurrency import RESERVATION, key_ref
from tests.billing.test_inflight_reservations import RedisServer, admitted, admitted_row, budget_key, records

pytestmark = pytest.mark.django_db(transaction=True)

__all__ = ["budget_key"]  # a fixture of these tests


def settle_of(admission) -> dict:
    """``admission_settle``'s arguments for a request that cost its reservation, its record dropped."""
    return {"admission": admission, "cost": RESERVATION, "prompt_tokens": 0, "completion_tokens": 5, "ok": True}


@pytest.mark.parametrize("store_kind", ["redis", "database"])
async def test_the_writers_batch_settles_each_request_once_as_alone(request, store_kind, budget_key, settings):
    """Three rows lingering in one batch: their settles go together, each moves the counter by its cost and
    keeps its record, settled, until the batch's commit removes it."""
    from billing.services import ledger
    from billing.services.ledger import ledger_flush, usage_record_submit

    redis_url = request.getfixturevalue("use_redis") if store_kind == "redis" else ""
    settings.REDIS_URL = redis_url
    settings.LLMHUB_LEDGER_LINGER_MS = 600_000
    await ledger_flush()
    batches: list[int] = []
    many = ledger.admission_settle_many

    async def counted(settles):
        batches.append(len(settles))
        return await many(settles)

    request.getfixturevalue("monkeypatch").setattr(ledger, "admission_settle_many", counted)
    entries = [await admitted_row(budget_key, f"batched-{i}") for i in range(3)]
    for row, admission in entries:  # submitted before the writer runs: one batch
        usage_record_submit(row, admission=admission)
    ref = key_ref(budget_key["key"])
    await ledger_flush()

    assert batches == [3]
    assert await sync_to_async(counter_state)(ref) == (3 * RESERVATION, Decimal(0))
    assert sorted([r async for r in UsageRecord.objects.values_list("request_id", flat=True)]) == [
        "batched-0",
        "batched-1",
        "batched-2",
    ]
    assert await sync_to_async(records)(redis_url) == {}


async def test_a_batch_settles_after_redis_lost_its_scripts(use_redis, budget_key):
    """Redis restarted between the admissions and their settles, keeping its data but not its scripts: the
    pipeline's calls are refused (NOSCRIPT), the script is loaded, and each is settled once."""
    held = [await admitted(budget_key, f"noscript-{i}") for i in range(3)]
    client = redis.Redis.from_url(use_redis)
    try:
        client.script_flush()
        assert await admission_settle_many([settle_of(admission) for admission in held]) == [None, None, None]
        assert await admission_settle_many([settle_of(admission) for admission in held]) == [None, None, None]
    finally:
        client.close()
    assert await sync_to_async(counter_state)(key_ref(budget_key["key"])) == (3 * RESERVATION, Decimal(0))
    assert await sync_to_async(records)(use_redis) == {}


async def test_a_settle_refused_in_a_batch_is_refused_alone(use_redis, budget_key):
    """One request's counter is broken (not a hash): its settle fails with Redis's error, as it would alone,
    and the others of the batch settle."""
    other = await sync_to_async(api_key_create)(user=budget_key["user"], name="other")
    await sync_to_async(api_key_limits_set)(
        api_key=other.api_key, budget_usd=4 * RESERVATION, budget_period=BudgetPeriod.MONTHLY
    )
    held = [
        await admitted(budget_key, "fine-1"),
        await admitted({**budget_key, "key": other.api_key}, "broken"),
        await admitted(budget_key, "fine-2"),
    ]
    client = redis.Redis.from_url(use_redis)
    try:
        client.delete(key_ref(other.api_key).key)
        client.set(key_ref(other.api_key).key, "not a hash")
    finally:
        client.close()

    outcomes = await admission_settle_many([settle_of(admission) for admission in held])

    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], redis.ResponseError) and "WRONGTYPE" in str(outcomes[1])
    assert await sync_to_async(counter_state)(key_ref(budget_key["key"])) == (2 * RESERVATION, Decimal(0))


async def test_a_batch_meets_redis_down_with_an_error_for_each_settle(settings, budget_key):
    """Redis is gone after the admissions: every settle of the batch gets the connection's error (the writer
    then retries each until it lands), none is taken for settled."""
    server = RedisServer().start()
    settings.REDIS_URL = server.url
    try:
        held = [await admitted(budget_key, f"down-{i}") for i in range(2)]
    finally:
        server.kill()

    outcomes = await admission_settle_many([settle_of(admission) for admission in held])

    assert [type(outcome) for outcome in outcomes] == [redis.ConnectionError, redis.ConnectionError]
