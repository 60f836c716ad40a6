"""A row written after its key was deleted goes to the key's heir: the key above it that stayed, which got its
earlier rows (``test_key_delete_spend.py``). A stream still running on the key when it is deleted, and a row waiting
in the spool then, are written later; before, they were written without a key, the heir's budget (summed from its
subtree's rows) missed them, and the next reconcile let the heir spend them again. A key deleted with no key left
above it (a whole tree) leaves such a row without a key, as before.

Both admission stores, SQLite and PostgreSQL, the clock pinned in mid-month."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import openai
import pytest
import time_machine
from asgiref.sync import async_to_sync

from billing.models import ApiKey, BudgetPeriod, Endpoint, Operation, UsageRecord, UsageStatus
from billing.services.admission import admission_settle
from billing.services.budgets import SETTLED_MEMORY, CounterRef, ledger_spend, period_bounds
from billing.services.counters import budget_counters_reconcile, counter_state
from billing.services.inflight import held_remove
from billing.services.keys import api_key_create, api_key_delete
from billing.services.ledger import UsageData, _spool_entries, ledger_begin_shutdown, ledger_replay_spool
from billing.services.plans import plan_assign
from billing.services.settlement import request_settle
from providers.selectors import resolved_model
from tests.billing.conftest import FLAT_TOKEN, flat_admitted
from tests.factories import UserFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

MID_MONTH = datetime(2026, 12, 15, 12, 0, tzinfo=UTC)
BUDGET = Decimal(1)
# A reply of 12 words at 6 tokens a second: the key is deleted after its first chunk, about two seconds before it ends.
SLOW = [{"role": "user", "content": "hello [[words=12]] [[tps=6]]"}]
DELIVERED = "x" * 40  # ten tokens relayed before the cut
CUT_COST = 10 * FLAT_TOKEN


@pytest.fixture
def clock():
    with time_machine.travel(MID_MONTH, tick=True) as traveller:
        yield traveller


@pytest.fixture
def tree(store, plans, catalog, clock):
    """A person's key (``top``) with a monthly budget, a key under it (``parent``) and one under that (``child``),
    each with the same budget; the child's secret."""
    user = UserFactory(username="tree")
    plan_assign(user=user, plan=plans["Enterprise"])
    top = api_key_create(user=user, name="top", budget_usd=BUDGET).api_key
    parent = api_key_create(user=user, name="parent", budget_usd=BUDGET, parent=top).api_key
    child = api_key_create(user=user, name="child", budget_usd=BUDGET, parent=parent)
    return {
        "user": user,
        "top": top,
        "parent": parent,
        "child": child.api_key,
        "secret": child.secret,
        "flat": resolved_model(catalog["flat"]),
    }


def monthly(key: ApiKey) -> CounterRef:
    start, _ = period_bounds(BudgetPeriod.MONTHLY, MID_MONTH)
    return CounterRef("key", key.pk, "cost", BudgetPeriod.MONTHLY, start)


def counts_against(key: ApiKey, cost: Decimal) -> None:
    """``key``'s budget holds ``cost``, its subtree's only spend, in the ledger and, after the reconcile puts the
    counters back on the ledger, in its counter."""
    assert ledger_spend(monthly(key)) == cost
    budget_counters_reconcile()
    spent, reserved = counter_state(monthly(key))
    assert (spent, reserved) == (cost, Decimal(0))


def test_a_stream_whose_key_is_deleted_midway_is_written_on_the_key_above_it(tree, llmhub_server):
    """The child's key is deleted (as its owner deletes it) after the stream's first chunk; the stream goes on to its
    end, and its row is the parent's, which the parent's budget and its own parent's count. Before, the row had no
    key, and the reconcile put the parent's counter back to 0."""
    client = openai.OpenAI(base_url=llmhub_server.url + "/v1", api_key=tree["secret"], max_retries=0, timeout=30)
    with client.chat.completions.with_streaming_response.create(
        model="flat-model", messages=SLOW, stream=True, stream_options={"include_usage": True}, max_tokens=100
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        api_key_delete(api_key=tree["child"])
        assert "data: [DONE]" in list(lines)
        request_id = response.headers["x-request-id"]

    row = wait_for_record(request_id)
    assert not ApiKey.objects.filter(pk=tree["child"].pk).exists()
    assert row.status == UsageStatus.OK and row.cost == row.completion_tokens * FLAT_TOKEN > 0
    assert row.api_key_id == tree["parent"].pk
    counts_against(tree["parent"], row.cost)
    counts_against(tree["top"], row.cost)


def spooled_on_the_child(tree, request_id: str) -> None:
    """A stream on the child, cut by its server's shutdown: its row waits in the spool with its admission."""

    async def serve() -> None:
        admission = await flat_admitted(tree, request_id, 50, api_key=tree["child"])
        ledger_begin_shutdown()
        model = tree["flat"]
        request_settle(
            request_id=request_id,
            endpoint=Endpoint.REST,
            operation=Operation.CHAT,
            body={"model": "flat-model", "stream": True, "messages": [], "max_tokens": 50},
            status=UsageStatus.SERVER_SHUTDOWN,
            user_id=tree["user"].pk,
            api_key_id=tree["child"].pk,
            model=model.on(model.deployments[0]),
            admission=admission,
            delivered_text=DELIVERED,
            attempts=1,
        )

    async_to_sync(serve)()
    held_remove(request_id)  # that server has stopped


@pytest.fixture
def spool(tmp_path, settings):
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    return settings.LLMHUB_LEDGER_SPOOL


def test_a_spooled_row_of_a_key_deleted_since_is_replayed_on_the_key_above_it(tree, spool):
    spooled_on_the_child(tree, "req_cut")
    api_key_delete(api_key=tree["child"])

    assert ledger_replay_spool() == 1

    row = UsageRecord.objects.get(request_id="req_cut")
    assert (row.cost, row.api_key_id) == (CUT_COST, tree["parent"].pk)
    counts_against(tree["parent"], CUT_COST)


def test_the_reconcile_counts_a_settled_row_waiting_in_the_spool_on_the_heir(tree, spool, clock):
    """The writer settled a request on the child and the database refused its batch: its row waits in the spool, the
    child is deleted, and the settle is forgotten (``SETTLED_MEMORY``). The reconcile reads the spool's row as the
    parent's, as the replay will write it: the parent's counter keeps the cost (0 before, and the parent could spend
    it again until the replay). The replay then writes it on the parent, and the counter stays."""
    admission = async_to_sync(flat_admitted)(tree, "req_settled", 50, api_key=tree["child"])
    async_to_sync(admission_settle)(admission=admission, cost=CUT_COST, prompt_tokens=0, completion_tokens=10, ok=True)
    held_remove("req_settled")
    row = UsageData(
        request_id="req_settled",
        endpoint=Endpoint.REST,
        stream=True,
        status=UsageStatus.OK,
        user_id=tree["user"].pk,
        api_key_id=tree["child"].pk,
        completion_tokens=10,
        cost=CUT_COST,
    )
    _spool_entries([(row, admission)])  # as the writer spools a batch the database refused
    api_key_delete(api_key=tree["child"])
    clock.shift(SETTLED_MEMORY + timedelta(minutes=1))

    budget_counters_reconcile()
    assert counter_state(monthly(tree["parent"])) == (CUT_COST, Decimal(0))
    assert ledger_replay_spool() == 1
    assert UsageRecord.objects.get(request_id="req_settled").api_key_id == tree["parent"].pk
    counts_against(tree["parent"], CUT_COST)


@pytest.mark.parametrize(
    "deleted",
    [lambda tree: api_key_delete(api_key=tree["parent"]), lambda tree: tree["parent"].delete()],
    ids=["service", "shell"],
)
def test_the_heir_of_a_deleted_key_deleted_in_turn_passes_its_rows_on(tree, spool, deleted):
    """The child deleted (its heir the parent), then the parent (its heir the top key): the child's late row is the
    top key's."""
    spooled_on_the_child(tree, "req_cut")
    api_key_delete(api_key=tree["child"])
    deleted(tree)

    assert ledger_replay_spool() == 1

    assert UsageRecord.objects.get(request_id="req_cut").api_key_id == tree["top"].pk
    counts_against(tree["top"], CUT_COST)


@pytest.mark.parametrize(
    "deleted",
    [
        lambda tree: api_key_delete(api_key=tree["top"]),
        lambda tree: (api_key_delete(api_key=tree["child"]), tree["top"].delete()),
        lambda tree: tree["user"].delete(),
    ],
    ids=["whole-tree", "child-then-tree", "owner-deleted"],
)
def test_a_late_row_of_a_whole_tree_deleted_keeps_no_key_as_before(tree, spool, deleted):
    spooled_on_the_child(tree, "req_cut")
    deleted(tree)

    assert ledger_replay_spool() == 1

    row = UsageRecord.objects.get(request_id="req_cut")
    assert row.api_key_id is None and row.cost == CUT_COST
