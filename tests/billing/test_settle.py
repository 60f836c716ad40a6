"""Settlement in one place (``billing.services.settlement``): the tokens a finished request is charged, its
cost at the prices of the deployment that answered, its ledger row, and its reservation's release.

``settlement_tokens`` is pure; ``request_settle`` is run as the pipeline runs it, on an event loop, with a
real admission on both counters' stores, and read back from the ledger and the counters."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from asgiref.sync import async_to_sync

from billing.models import BudgetPeriod, Endpoint, Operation, UsageRecord, UsageStatus
from billing.services.admission import admission_acquire
from billing.services.budgets import CounterRef, api_key_limits_set, ledger_spend, period_bounds
from billing.services.counters import budget_counters_reconcile, counter_state
from billing.services.keys import api_key_create
from billing.services.ledger import ledger_flush
from billing.services.settlement import Settlement, request_settle, settlement_tokens
from providers.selectors import resolved_model
from providers.tokens import prompt_tokens, text_tokens
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UserFactory

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]}
EMBED = {"model": "e", "input": ["one document", "another document"]}


def tokens(operation=Operation.CHAT, body=CHAT, status=UsageStatus.OK, usage=None, delivered=""):
    return settlement_tokens(operation=operation, body=body, status=status, usage=usage, delivered_text=delivered)


# WHAT A REQUEST IS CHARGED: pure


def test_the_providers_usage_is_charged_as_reported():
    usage = {"prompt_tokens": 120, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 100}}
    assert tokens(usage=usage, delivered="ignored when there is usage") == (120, 30, 100, 0, False)


def test_cache_writes_are_read_apart_from_the_rest_of_the_prompt_that_counts_them():
    """As ``openai_usage`` translates Anthropic's usage: ``prompt_tokens`` counts cached reads and cache writes."""
    details = {"cached_tokens": 100, "cache_write_tokens": 15}
    usage = {"prompt_tokens": 120, "completion_tokens": 30, "prompt_tokens_details": details}
    assert tokens(usage=usage) == (120, 30, 100, 15, False)


def test_without_usage_the_relayed_text_and_the_prompt_are_estimated_and_flagged():
    delivered = "Once upon a time, on a rock at sea, "
    expected = (prompt_tokens(CHAT, operation=Operation.CHAT), text_tokens(delivered), 0, 0, True)
    assert tokens(status=UsageStatus.CLIENT_DISCONNECTED, delivered=delivered) == expected


@pytest.mark.parametrize(
    "usage",
    [
        {},
        {"total_tokens": 12},
        {"prompt_tokens": "12", "completion_tokens": None},
        {"prompt_tokens": -1, "completion_tokens": True},
    ],
)
def test_a_usage_that_counts_nothing_usable_is_no_usage(usage):
    """Before, any non-empty usage was taken at face value: a usage without counts charged nothing for
    the text relayed, and a negative count made a row the ledger's constraints refuse at every retry."""
    assert tokens(usage=usage, delivered="abcdefgh")[1:] == (2, 0, 0, True)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 120},
        {"prompt_tokens": 120, "completion_tokens": None, "total_tokens": 120},
        {"completion_tokens": 2},
        {"prompt_tokens": "120", "completion_tokens": 2},
    ],
)
def test_a_usage_that_counts_one_of_the_two_has_the_other_estimated_and_flagged(usage):
    """Before, the count left out was charged as 0 (a reply billed no completion, or no prompt), not flagged."""
    delivered = "Once upon a time, on a rock at sea, "
    given = {name: count for name, count in usage.items() if type(count) is int}
    prompt = given.get("prompt_tokens", prompt_tokens(CHAT, operation=Operation.CHAT))
    completion = given.get("completion_tokens", text_tokens(delivered))
    assert tokens(usage=usage, delivered=delivered) == (prompt, completion, 0, 0, True)


def test_a_request_that_produced_nothing_costs_nothing_and_is_no_estimate():
    for status in (UsageStatus.UPSTREAM_ERROR, UsageStatus.CANCELLED, UsageStatus.CLIENT_DISCONNECTED):
        assert tokens(status=status) == (0, 0, 0, 0, False)


def test_a_reply_completed_empty_without_usage_is_charged_its_prompt_estimated():
    """The provider answered, wrote nothing (or only what llmhub does not count) and reported no usage: it billed
    the prompt. Before, the row charged nothing."""
    assert tokens(status=UsageStatus.OK) == (prompt_tokens(CHAT, operation=Operation.CHAT), 0, 0, 0, True)


def test_embeddings_are_charged_their_input_estimated_only_when_the_upstream_counted_none():
    assert tokens(Operation.EMBEDDINGS, EMBED, usage={"prompt_tokens": 7, "total_tokens": 7}) == (7, 0, 0, 0, False)
    estimate = prompt_tokens(EMBED, operation=Operation.EMBEDDINGS)
    assert tokens(Operation.EMBEDDINGS, EMBED, usage={"total_tokens": 7}) == (estimate, 0, 0, 0, True)
    assert tokens(Operation.EMBEDDINGS, EMBED, status=UsageStatus.UPSTREAM_ERROR) == (0, 0, 0, 0, False)


# THE ROW AND THE RESERVATION


@pytest.fixture
def account(store, fake_upstream, transactional_db):
    """A model served by two deployments at different prices, and a key with a budget."""
    cheap = ProviderFactory(name="cheap-provider", base_url=fake_upstream.base_url + "/v1")
    dear = ProviderFactory(name="dear-provider", base_url=fake_upstream.base_url + "/v1")
    row = ModelFactory(name="story-model", provider=cheap, input_per_mtok=Decimal(1), output_per_mtok=Decimal(2))
    DeploymentFactory(
        model=row, name="dear", provider=dear, input_per_mtok=Decimal(10), output_per_mtok=Decimal(20), priority=1
    )
    user = UserFactory(username="settled")
    created = api_key_create(user=user, name="settled")
    api_key_limits_set(api_key=created.api_key, budget_usd=Decimal(1), budget_period=BudgetPeriod.MONTHLY)
    return {"user": user, "key": created.api_key, "model": resolved_model(row)}


def settle_on(account: dict, deployment_name: str, *, between: Callable[[], None] | None = None, **call) -> Settlement:
    """``between``: run after the admission, before the settle (to move the clock on)."""
    model = account["model"]
    body = {**CHAT, "model": "story-alias", "max_tokens": 100}

    async def run() -> Settlement:
        admission = await admission_acquire(
            user_id=account["user"].pk,
            api_key_id=account["key"].pk,
            key_allowed_model_ids=None,
            model=model,
            body=body,
            request_id="req_settled",
            prompt_tokens_upper=prompt_tokens(body, operation=Operation.CHAT, upper_bound=True),
        )
        if between is not None:
            between()
        [deployment] = [d for d in model.deployments if d.name == deployment_name]
        settlement = request_settle(
            request_id="req_settled",
            endpoint=Endpoint.REST,
            operation=Operation.CHAT,
            body=body,
            user_id=account["user"].pk,
            api_key_id=account["key"].pk,
            model=model.on(deployment),
            admission=admission,
            **call,
        )
        await ledger_flush()
        return settlement

    return async_to_sync(run)()


def counter(account: dict) -> tuple[Decimal, Decimal] | None:
    start, _ = period_bounds(BudgetPeriod.MONTHLY, UsageRecord.objects.get().created_at)
    return counter_state(CounterRef("key", account["key"].pk, "cost", BudgetPeriod.MONTHLY, start))


def test_a_request_is_priced_at_the_deployment_that_answered_and_its_row_says_how_it_was_served(account):
    settlement = settle_on(
        account,
        "dear",
        status=UsageStatus.OK,
        usage={"prompt_tokens": 1000, "completion_tokens": 500},
        requested_model="story-alias",
        attempts=2,
        resumed=True,
        upstream_latency_ms=40,
        ttft_ms=15,
        duration_ms=55,
    )
    cost = Decimal(1000) * 10 / 1_000_000 + Decimal(500) * 20 / 1_000_000
    assert settlement == Settlement(1000, 500, 0, 0, cost, False)

    row = UsageRecord.objects.get()
    dear = next(d for d in account["model"].deployments if d.name == "dear")
    assert (row.cost, row.prompt_tokens, row.completion_tokens, row.usage_estimated) == (cost, 1000, 500, False)
    assert (row.deployment_id, row.deployment_name, row.provider_id, row.provider_name) == (
        dear.id,
        "dear",
        dear.provider.id,
        "dear-provider",
    )
    assert (row.model_name, row.requested_model, row.attempts, row.resumed) == ("story-model", "story-alias", 2, True)
    assert (row.upstream_latency_ms, row.ttft_ms, row.duration_ms) == (40, 15, 55)
    assert counter(account) == (cost, Decimal(0))  # the reservation was swapped for the cost


def test_a_failed_request_releases_its_whole_reservation(account):
    first = account["model"].deployments[0]
    settlement = settle_on(
        account, first.name, status=UsageStatus.UPSTREAM_ERROR, error_type="upstream_timeout", requested_model=""
    )
    assert settlement == Settlement(0, 0, 0, 0, Decimal(0), False)
    row = UsageRecord.objects.get()
    assert (row.status, row.error_type, row.cost, row.deployment_id) == (
        "upstream_error",
        "upstream_timeout",
        0,
        first.id,
    )
    assert row.requested_model == ""
    assert counter(account) == (Decimal(0), Decimal(0))


def test_a_request_admitted_in_the_years_last_second_counts_in_that_month_only_even_after_reconciliation(account):
    """Admitted at 23:59:59 on 31 December, its reservation held on December's counter, and finished 20 s
    into the new year: its row was dated at the settle, in January, so the next reconciliation took its
    cost off December's counter and the ledger charged it to January's budget. The row is now dated in the
    day it was admitted (its last microsecond), where every counter that paid for it is."""
    last_second = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    december = CounterRef("key", account["key"].pk, "cost", BudgetPeriod.MONTHLY, datetime(2026, 12, 1, tzinfo=UTC))
    january = CounterRef("key", account["key"].pk, "cost", BudgetPeriod.MONTHLY, datetime(2027, 1, 1, tzinfo=UTC))

    with time_machine.travel(last_second, tick=False) as clock:
        settlement = settle_on(
            account,
            "dear",
            between=lambda: clock.shift(timedelta(seconds=20)),
            status=UsageStatus.OK,
            usage={"prompt_tokens": 1000, "completion_tokens": 500},
        )
        clock.move_to(last_second + timedelta(minutes=5))
        budget_counters_reconcile()

        row = UsageRecord.objects.get()
        assert row.created_at == datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
        assert counter_state(december) == (settlement.cost, Decimal(0))
        assert (ledger_spend(december), ledger_spend(january)) == (settlement.cost, Decimal(0))


@pytest.mark.period_instants(only=["first-second-of-month"])
def test_a_request_that_ends_in_the_period_it_began_is_dated_when_it_ends(account):
    """Only a request that outlived its period is held back: the others keep the instant they settled."""
    with time_machine.travel(datetime.now(UTC), tick=False) as clock:
        started = datetime.now(UTC)
        settle_on(account, "dear", between=lambda: clock.shift(timedelta(seconds=20)), status=UsageStatus.OK)
    assert UsageRecord.objects.get().created_at == started + timedelta(seconds=20)
