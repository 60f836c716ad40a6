"""Fixtures for the billing tests: the standard plans, a catalog on the fake upstream, Redis as the admission
store (each test gets an empty Redis database), and the ledger the rollup tests roll up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.db import OperationalError, connection
from django.utils import timezone

from billing.models import BudgetCounter, BudgetMetric, BudgetPeriod, Plan, ScopeKind
from billing.services.admission import admission_acquire, admission_settle
from billing.services.budgets import KEY_PREFIX, CounterRef, period_bounds
from billing.services.counters import INDEX_KEY
from billing.services.keys import api_key_create
from tests.billing.rollup_ledger import TODAY, YESTERDAY, at
from tests.factories import ModelFactory, ProviderFactory, UsageRecordFactory, UserFactory
from tests.shared_redis import use_redis  # noqa: F401  (a fixture)

STANDARD_PLANS = {
    "Free": {
        "allow_all_models": False,
        "max_output_price_per_mtok": Decimal("1.00"),
        "daily_token_quota": 1_000,
        "rpm": 20,
    },
    "Pro": {"allow_all_models": True, "daily_token_quota": 100_000, "rpm": 600},
    "Enterprise": {"allow_all_models": True},
}


@pytest.fixture
def plans(db) -> dict[str, Plan]:
    """The three plans the data migration seeds (a flush by an earlier transactional test removes them)."""
    return {name: Plan.objects.get_or_create(name=name, defaults=fields)[0] for name, fields in STANDARD_PLANS.items()}


@pytest.fixture
def catalog(db, fake_upstream) -> dict:
    provider = ProviderFactory(name="fake-openai", base_url=fake_upstream.base_url + "/v1")
    return {
        "cheap": ModelFactory(
            name="cheap-model", provider=provider, input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60")
        ),
        "premium": ModelFactory(
            name="premium-model", provider=provider, input_per_mtok=Decimal("2.50"), output_per_mtok=Decimal("10.00")
        ),
        # Output only, $0.0001 a token: its cost is exactly completion tokens × $0.0001, so budgets are easy to size.
        "flat": ModelFactory(
            name="flat-model", provider=provider, input_per_mtok=Decimal("0"), output_per_mtok=Decimal("100.00")
        ),
    }


@pytest.fixture(params=["database", "redis"])
def store(request, settings):
    """Run a test against both admission stores: database row locks, then Redis."""
    if request.param == "redis":
        request.getfixturevalue("use_redis")
    else:
        settings.REDIS_URL = ""
    return request.param


# One completion token of the `flat` model of ``catalog``.
FLAT_TOKEN = Decimal("0.0001")


async def flat_admitted(account: dict, request_id: str, tokens: int, *, api_key: Any = None) -> Any:
    """The admission of a request of at most ``tokens`` completion tokens on ``account["flat"]`` (``account``:
    ``user``, ``key``, ``flat``), on ``api_key`` (default ``account["key"]``)."""
    return await admission_acquire(
        user_id=account["user"].pk,
        api_key_id=(api_key if api_key is not None else account["key"]).pk,
        key_allowed_model_ids=None,
        model=account["flat"],
        body={"model": "flat-model", "messages": [], "max_tokens": tokens},
        request_id=request_id,
        prompt_tokens_upper=0,
    )


async def spend_settled(account: dict, request_id: str, tokens: int) -> None:
    """A request of ``tokens`` completion tokens on ``account["flat"]``, admitted and settled as ok
    (``account``: ``user``, ``key``, ``flat``)."""
    admission = await flat_admitted(account, request_id, tokens)
    await admission_settle(
        admission=admission, cost=tokens * FLAT_TOKEN, prompt_tokens=0, completion_tokens=tokens, ok=True
    )


@pytest.fixture
def rollup_ledger(db) -> dict:
    """Two users (alice, bob) and their keys (work, home), with ledger rows yesterday and today over
    providers, models and operations, a row of no user and one of a model that matched none."""
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    work = api_key_create(user=alice, name="work").api_key
    home = api_key_create(user=bob, name="home").api_key
    rows = [
        # Two users and keys on one (provider, model, operation): one staff row.
        dict(user=alice, api_key=work, created_at=at(YESTERDAY, 1), cost=Decimal("0.0015000001"), prompt_tokens=7),
        dict(user=bob, api_key=home, created_at=at(YESTERDAY, 2), cost=Decimal("0.25"), completion_tokens=9),
        dict(user=bob, api_key=None, created_at=at(YESTERDAY, 3), operation="responses", cost=Decimal("1.5")),
        dict(
            user=alice,
            api_key=None,
            created_at=at(YESTERDAY, 4),
            operation="messages",
            model_name="claude-test",
            provider_name="fake-anthropic",
            cost=Decimal("1.1"),
            cached_tokens=4,
            cache_write_tokens=6,
            cache_write_1h_tokens=4,
            web_search_requests=3,
        ),
        dict(user=alice, api_key=work, created_at=at(TODAY, 1), operation="embeddings", cost=Decimal("0.0000000003")),
        # A chat completion that searched the web once.
        dict(
            user=bob,
            api_key=home,
            created_at=at(TODAY, 2),
            cost=Decimal("2"),
            prompt_tokens=1000,
            web_search_requests=1,
        ),
        dict(user=None, api_key=None, created_at=at(TODAY, 3), cost=Decimal("0.5")),
        # A model name that matched no model: no provider, $0.
        dict(user=bob, api_key=None, created_at=at(TODAY, 4), provider_name="", model_name="nope", cost=Decimal(0)),
    ]
    for row in rows:
        UsageRecordFactory(**row)
    return {"alice": alice, "bob": bob, "work": work, "home": home}


@contextmanager
def counter_unreconcilable(user_id: int) -> Iterator[str]:
    """Within the block, a budget counter the reconcile cannot put back on the ledger's figure, in the store in use:
    in Redis a malformed key (a hash in the counters' index whose name is no counter's), removed after; in the
    database ``user_id``'s daily cost counter, off the ledger, whose write the database refuses (on this thread).
    Yields its key; a run reaches it before the other counters (Redis: by name; the database: newest period first)."""
    if django_settings.REDIS_URL:
        key = KEY_PREFIX + "junk"
        client = redis.Redis.from_url(django_settings.REDIS_URL)
        client.hset(key, "spent", 1)
        client.sadd(INDEX_KEY, key)
        try:
            yield key
        finally:
            client.srem(INDEX_KEY, key)
            client.delete(key)
            client.close()
        return
    start, _ = period_bounds(BudgetPeriod.DAILY, timezone.now())
    ref = CounterRef(ScopeKind.USER, user_id, BudgetMetric.COST, BudgetPeriod.DAILY, start)
    row = ref.row(spent=Decimal(5))
    row.save(force_insert=True)

    def refuse(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("UPDATE") and BudgetCounter._meta.db_table in sql and params:
            if params[-1] == row.pk:
                raise OperationalError("the database refused the counter")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse):
        yield ref.key
