"""The budget counters' "Reconcile every budget counter" action hands the recompute to the reconcile task, which
a worker runs (docs/ledger.md, "The admin at scale"): the admin's request costs the same few queries however many
counters there are, and says it was queued."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import BudgetCounter, BudgetMetric, BudgetPeriod, ScopeKind
from billing.services.budgets import CounterRef
from billing.tasks import reservations_reconcile

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
MONTH = datetime(2026, 12, 1, tzinfo=UTC)


def counters_off(count: int, *, start: int) -> list[BudgetCounter]:
    """``count`` users' monthly counters that say 5 dollars were spent, where the ledger has nothing."""
    refs = [CounterRef(ScopeKind.USER, start + n, BudgetMetric.COST, BudgetPeriod.MONTHLY, MONTH) for n in range(count)]
    return BudgetCounter.objects.bulk_create(ref.row(spent=Decimal(5)) for ref in refs)


def reconcile(admin_client, counters: list[BudgetCounter]):
    form = {"action": "reconcile", "_selected_action": [counters[0].pk]}
    with CaptureQueriesContext(connection) as queries:
        answer = admin_client.post(reverse("admin:billing_budgetcounter_changelist"), form)
    assert answer.status_code == 302
    return queries, [str(message) for message in get_messages(answer.wsgi_request)][-1]


@time_machine.travel(NOW, tick=False)
def test_reconciling_every_counter_is_queued_for_a_worker_at_a_few_queries(admin_client, broker_queue):
    reconcile(admin_client, counters_off(1, start=1))  # the first fills Django's caches: not counted
    few, _ = reconcile(admin_client, counters_off(10, start=100))
    many, said = reconcile(admin_client, counters_off(200, start=1_000))

    assert len(many) == len(few)
    assert said == (
        "Queued: a worker reconciles every budget counter with the ledger in a moment (the reconcile task, which "
        "also runs every 5 minutes); refresh this page to see the counters put back."
    )
    assert broker_queue.llen("celery") == 3  # one task a click, none run in the request
    assert set(BudgetCounter.objects.values_list("spent", flat=True)) == {Decimal(5)}

    assert reservations_reconcile() == 211  # what the worker runs
    assert set(BudgetCounter.objects.values_list("spent", flat=True)) == {Decimal(0)}


def test_a_reconcile_the_broker_cannot_take_is_said_so(admin_client, broker):
    broker.down()
    _, said = reconcile(admin_client, counters_off(1, start=1))
    assert said == (
        "The reconcile could not be queued (the task broker did not answer: OperationalError); it runs every "
        "5 minutes once the broker answers."
    )
