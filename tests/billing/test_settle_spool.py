"""A ledger row spooled at shutdown keeps its reservation's release, exactly once (issue 10, point 8).

A server that begins to shut down spools the rows of the streams it cuts instead of handing them to a
writer task that may never run; before, the row went without its admission and the reservation stayed held
until it expired (or its process was declared dead). Now the spooled line carries the admission, and the
replay settles the reservation before it writes the row, on both counters' stores (database row locks and
the real Redis). A replay run again, long after the store forgot the settle, or after the writer settled
and wrote the row itself, settles nothing twice.

Each "server" runs on an event loop of its own (``async_to_sync``), as a server process does: beginning
its shutdown marks that loop only.
"""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from asgiref.sync import async_to_sync, sync_to_async

from billing.models import BudgetPeriod, Endpoint, Operation, UsageRecord, UsageStatus
from billing.services import ledger
from billing.services.admission import Admission, admission_acquire
from billing.services.budgets import RESERVATION_TTL, SETTLED_MEMORY, CounterRef, api_key_limits_set, period_bounds
from billing.services.counters import counter_state
from billing.services.inflight import held_remove
from billing.services.keys import api_key_create
from billing.services.ledger import (
    UsageData,
    _spool_entries,
    ledger_begin_shutdown,
    ledger_flush,
    ledger_replay_spool,
)
from billing.services.settlement import Settlement, request_settle
from billing.services.spool import spool_rows
from providers.selectors import resolved_model
from providers.tokens import prompt_tokens
from tests.billing.conftest import FLAT_TOKEN, spend_settled
from tests.factories import UserFactory
from tests.waiting import wait_for_ledger_rows_async

pytestmark = pytest.mark.django_db(transaction=True)

MAX_TOKENS = 50
BODY = {
    "model": "flat-model",
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": MAX_TOKENS,
}
RESERVED = MAX_TOKENS * FLAT_TOKEN  # input is free on the flat model
DELIVERED = "x" * 40  # ten tokens relayed before the cut
CUT_COST = 10 * FLAT_TOKEN
START = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)  # mid-month: no period ends during a test


@pytest.fixture
def spool(tmp_path, settings):
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    return settings.LLMHUB_LEDGER_SPOOL


@pytest.fixture
def clock():
    with time_machine.travel(START, tick=True) as traveller:
        yield traveller


@pytest.fixture
def account(store, catalog, spool, clock):
    user = UserFactory(username="settles")
    created = api_key_create(user=user, name="settles")
    api_key_limits_set(api_key=created.api_key, budget_usd=Decimal(1), budget_period=BudgetPeriod.MONTHLY)
    start, _ = period_bounds(BudgetPeriod.MONTHLY, START)
    return {
        "user": user,
        "key": created.api_key,
        "flat": resolved_model(catalog["flat"]),
        "ref": CounterRef("key", created.api_key.pk, "cost", BudgetPeriod.MONTHLY, start),
    }


async def _admit(account: dict, request_id: str) -> Admission:
    return await admission_acquire(
        user_id=account["user"].pk,
        api_key_id=account["key"].pk,
        key_allowed_model_ids=None,
        model=account["flat"],
        body=BODY,
        request_id=request_id,
        prompt_tokens_upper=prompt_tokens(BODY, operation=Operation.CHAT, upper_bound=True),
        endpoint=Endpoint.REST,
    )


def _settle(account: dict, request_id: str, admission: Admission) -> Settlement:
    model = account["flat"]
    return request_settle(
        request_id=request_id,
        endpoint=Endpoint.REST,
        operation=Operation.CHAT,
        body=BODY,
        status=UsageStatus.SERVER_SHUTDOWN,
        user_id=account["user"].pk,
        api_key_id=account["key"].pk,
        model=model.on(model.deployments[0]),
        admission=admission,
        delivered_text=DELIVERED,
        attempts=1,
    )


def server_cuts_a_stream_while_stopping(account: dict, request_id: str) -> Settlement:
    """A server admits a stream, begins to shut down, and the stream it cut settles: its row is spooled."""

    async def serve() -> Settlement:
        admission = await _admit(account, request_id)
        ledger_begin_shutdown()
        return _settle(account, request_id, admission)

    settlement = async_to_sync(serve)()
    # The server has stopped: it holds the request no more, so this process's in-flight heartbeat must not
    # re-assert its hold into Redis (after a Redis flush between tests, it would, some of the time).
    held_remove(request_id)
    return settlement


def test_the_replay_of_a_row_spooled_at_shutdown_releases_its_reservation_at_once(account, spool):
    settlement = server_cuts_a_stream_while_stopping(account, "req_cut")
    assert settlement.cost == CUT_COST and settlement.usage_estimated
    assert counter_state(account["ref"]) == (Decimal(0), RESERVED)  # still held: nothing settled it
    [line] = spool.read_text().splitlines()
    assert json.loads(line)["admission"]["request_id"] == "req_cut"
    assert not UsageRecord.objects.exists()

    assert ledger_replay_spool() == 1  # what the next start-up does

    assert counter_state(account["ref"]) == (CUT_COST, Decimal(0))
    row = UsageRecord.objects.get(request_id="req_cut")
    assert (row.status, row.cost, row.completion_tokens, row.usage_estimated) == (
        UsageStatus.SERVER_SHUTDOWN,
        CUT_COST,
        10,
        True,
    )


def test_a_row_replayed_again_after_the_store_forgot_its_settle_is_not_settled_twice(account, spool, clock):
    """The store remembers a settle for SETTLED_MEMORY only; the replay must not rely on that memory (a
    spool file left by a replayer that died after its settles, replayed again much later)."""
    server_cuts_a_stream_while_stopping(account, "req_cut")
    line = spool.read_text()
    assert ledger_replay_spool() == 1
    spool.write_text(line)  # the same row waits in the spool again

    clock.shift(SETTLED_MEMORY + timedelta(minutes=1))
    async_to_sync(spend_settled)(account, "req_later", 3)  # a settle that prunes what the store remembers
    assert ledger_replay_spool() == 1

    assert counter_state(account["ref"]) == (CUT_COST + 3 * FLAT_TOKEN, Decimal(0))
    assert UsageRecord.objects.filter(request_id="req_cut").count() == 1


def test_a_row_the_writer_settled_and_wrote_settles_nothing_when_replayed(account, spool, clock):
    """A writer cancelled after its batch committed spools that batch too, admissions and all."""
    kept: dict[str, object] = {}

    async def serve() -> None:
        kept["admission"] = admission = await _admit(account, "req_written")
        kept["settlement"] = _settle(account, "req_written", admission)
        await ledger_flush()

    async_to_sync(serve)()
    settlement = kept["settlement"]
    assert counter_state(account["ref"]) == (settlement.cost, Decimal(0))
    row = UsageData(
        request_id="req_written",
        endpoint=Endpoint.REST,
        stream=True,
        status=UsageStatus.SERVER_SHUTDOWN,
        user_id=account["user"].pk,
        api_key_id=account["key"].pk,
        completion_tokens=settlement.completion_tokens,
        cost=settlement.cost,
    )
    _spool_entries([(row, kept["admission"])])

    clock.shift(SETTLED_MEMORY + timedelta(minutes=1))
    async_to_sync(spend_settled)(account, "req_later", 3)
    assert ledger_replay_spool() == 1

    assert counter_state(account["ref"]) == (settlement.cost + 3 * FLAT_TOKEN, Decimal(0))
    assert UsageRecord.objects.filter(request_id="req_written").count() == 1


def test_a_reservation_that_expired_while_its_row_waited_is_charged_once(account, spool, clock):
    """The database was down longer than a reservation lives: the hold was given back when it expired, and
    the replay adds the row's cost to the spend, once, however often it runs."""
    server_cuts_a_stream_while_stopping(account, "req_cut")
    line = spool.read_text()
    clock.shift(RESERVATION_TTL + timedelta(minutes=1))
    async_to_sync(spend_settled)(account, "req_later", 3)  # its admission gives the expired hold back
    assert counter_state(account["ref"]) == (3 * FLAT_TOKEN, Decimal(0))

    assert ledger_replay_spool() == 1
    spool.write_text(line)
    assert ledger_replay_spool() == 1

    assert counter_state(account["ref"]) == (CUT_COST + 3 * FLAT_TOKEN, Decimal(0))


def test_rows_spilled_from_a_full_queue_release_their_holds_once_when_replayed(account, spool, settings, monkeypatch):
    """A database slower than the requests: the writer's queue passes its bound (``LLMHUB_LEDGER_QUEUE_MAX``),
    and the newest rows go to the spool unsettled, their holds still held, with their admissions. The spool
    watcher's replay settles each of them once and writes it; the rows the writer kept it settles itself."""
    settings.LLMHUB_LEDGER_QUEUE_MAX = 2
    settings.LLMHUB_LEDGER_LINGER_MS = 0
    settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS = 3600  # the watcher replays (and settles) once woken below
    slow = threading.Event()  # every ledger write waits for it: the slow database
    writing = threading.Event()
    write_rows = ledger._write_rows

    def gated(rows, settled=()):
        writing.set()
        slow.wait(timeout=30)
        return write_rows(rows, settled)

    monkeypatch.setattr(ledger, "_write_rows", gated)
    request_ids = [f"req_{n}" for n in range(8)]

    async def serve() -> None:
        for request_id in request_ids:
            _settle(account, request_id, await _admit(account, request_id))
            await asyncio.to_thread(writing.wait, 10)  # the writer's first batch is on its way, and waits
            writer = ledger._writers[asyncio.get_running_loop()]
            if writer.spill is not None:
                await writer.spill
        spooled = await sync_to_async(spool_rows)()  # the spool, or the file the watcher is replaying
        assert spooled and all(line["admission"]["request_id"] == line["request_id"] for line in spooled)
        _, reserved = await sync_to_async(counter_state)(account["ref"])
        assert reserved >= len(spooled) * RESERVED  # the spilled rows' holds wait for the replay
        slow.set()
        await ledger_flush()
        settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS = 0.05
        ledger.ledger_spool_watch()  # as the next spill would: the watcher probes now
        await wait_for_ledger_rows_async(len(request_ids), timeout=10, interval=0.01, request_id__in=request_ids)

    async_to_sync(serve)()
    written = UsageRecord.objects.filter(request_id__in=request_ids).values_list("request_id", flat=True)
    assert sorted(written) == sorted(request_ids)
    assert counter_state(account["ref"]) == (len(request_ids) * CUT_COST, Decimal(0))
    assert ledger_replay_spool() == 0  # nothing left in the spool
