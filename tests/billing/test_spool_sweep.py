"""The lost-request sweep and reconciliation over a big ledger spool: the spool is read once per run (it was
read once per lost request and once per counter), and what they find is what it was.

A dead process's requests are its ``RequestReservation`` rows, as it leaves them in the database store (no
heartbeat); the spool is written by the ledger's own ``spool_append`` of ``_spool_line``s
(``tests.factories.spooled_line``), as an outage leaves it: thousands of rows over several keys, rows of the
previous month, rows spooled twice (a replay that appended its file back) and a torn line. The figures are checked
against sums made here from the lines written, then against the ledger once the spool is replayed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.db.models import Sum

from billing.models import (
    BudgetCounter,
    BudgetMetric,
    BudgetPeriod,
    RequestReservation,
    ScopeKind,
    UsageRecord,
    UsageStatus,
)
from billing.services.budgets import CounterRef, api_key_limits_set, period_bounds
from billing.services.counters import budget_counters_reconcile, counter_state
from billing.services.keys import api_key_create
from billing.services.ledger import ledger_replay_spool
from billing.services.spool import spool_append
from tests.factories import UserFactory, spooled_line

pytestmark = pytest.mark.django_db(transaction=True)  # the replay commits on connections of its own

START = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)  # mid-month
ROWS = 3000
RESERVED = Decimal("0.02")


TOKENS = {"prompt_tokens": 10, "completion_tokens": 20}  # each row's, 30 on a token counter


def row_of(key, request_id: str, cost: Decimal, created_at: datetime) -> str:
    return spooled_line(
        request_id=request_id, user_id=key.user_id, api_key_id=key.pk, cost=cost, created_at=created_at, **TOKENS
    )


def test_a_sweep_and_a_reconciliation_over_a_big_spool_count_each_spooled_row_once(tmp_path, settings, caplog):
    settings.REDIS_URL = ""
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    with time_machine.travel(START, tick=False):
        keys = [api_key_create(user=UserFactory(username=f"spool-{n}"), name="k").api_key for n in range(3)]
        for key in keys:
            api_key_limits_set(api_key=key, budget_usd=Decimal(100), budget_period=BudgetPeriod.MONTHLY)
        start, _ = period_bounds(BudgetPeriod.MONTHLY, START)
        refs = [CounterRef(ScopeKind.KEY, key.pk, BudgetMetric.COST, BudgetPeriod.MONTHLY, start) for key in keys]
        refs.append(CounterRef(ScopeKind.USER, keys[0].user_id, BudgetMetric.TOKENS, BudgetPeriod.MONTHLY, start))
        BudgetCounter.objects.bulk_create(ref.row() for ref in refs)
        expected = {ref.key: Decimal(0) for ref in refs}

        def counts(key, amount: Decimal) -> None:
            expected[refs[keys.index(key)].key] += amount
            if key == keys[0]:
                expected[refs[3].key] += 30  # tokens

        lines = []
        for n in range(ROWS):
            key, cost = keys[n % 3], Decimal("0.0001") * (n % 11 + 1)
            last_month = n % 10 == 0
            lines.append(row_of(key, f"req-{n}", cost, START - timedelta(days=15 if last_month else 0, hours=1)))
            if not last_month:
                counts(key, cost)
        # Three requests of a dead process whose rows wait in the spool, three whose rows were never written.
        lost = [f"lost-{n}" for n in range(6)]
        for n, request_id in enumerate(lost[:3]):
            lines.append(row_of(keys[n], request_id, Decimal("0.05"), START - timedelta(hours=1)))
            counts(keys[n], Decimal("0.05"))
        for n in range(3, 6):
            expected[refs[n % 3].key] += RESERVED
            if n % 3 == 0:
                expected[refs[3].key] += 100 + 200  # the reserved tokens
        spool_append(lines[: ROWS // 2])
        spool_append(['{"request_id": "torn", "cost": "0.'])  # a writer killed mid-line
        spool_append(lines[ROWS // 2 :])
        spool_append(lines[:100])  # spooled twice
        RequestReservation.objects.bulk_create(
            RequestReservation(
                request_id=request_id,
                instance="dead-process",
                user_id=keys[n % 3].user_id,
                api_key_id=keys[n % 3].pk,
                endpoint="rest",
                counters=[refs[n % 3].key] + ([refs[3].key] if n % 3 == 0 else []),
                reserved_cost=RESERVED,
                prompt_tokens=100,
                reserved_tokens=300,
                admitted_at=START - timedelta(hours=1),
            )
            for n, request_id in enumerate(lost)
        )
        RequestReservation.objects.update(recorded_at=START - timedelta(hours=1))

        for _ in range(2):  # twice: the second run finds nothing off
            budget_counters_reconcile()
            assert not RequestReservation.objects.exists()
            written = dict(UsageRecord.objects.values_list("request_id", "status"))
            assert written == {request_id: UsageStatus.LOST for request_id in lost[3:]}
            assert UsageRecord.objects.aggregate(total=Sum("cost"))["total"] == 3 * RESERVED
            assert {ref.key: counter_state(ref)[0] for ref in refs} == expected

        assert ledger_replay_spool() == ROWS + 3 + 100
        assert UsageRecord.objects.count() == ROWS + 6
        budget_counters_reconcile()
        assert {ref.key: counter_state(ref)[0] for ref in refs} == expected
