"""The experiments' daily rollup (``DailyExperimentUsage``) and its mark (``ExperimentUsageMark``).

An experiment's results add its sums across days from the rollup, plus the raw rows above the mark
(``billing.selectors.experiment_usage_window``). These tests pin that the figures stay the ledger's:
every row folded exactly once whatever the order of folds, writes and reads; a fold committing in the
middle of a read not counted twice; and retention never deleting a row the rollup does not hold yet, so
that an experiment's counts and money outlive its raw rows.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.db import connection
from django.db.models import Sum

from billing import selectors
from billing.models import DailyExperimentUsage, ExperimentUsageMark, UsageRecord, UsageStatus
from billing.services import retention
from billing.services.retention import usage_records_purge
from billing.services.rollups import daily_usage_rebuild_recent, experiment_usage_fold, ledger_high_water
from experiments.models import Experiment, ExperimentStatus, Variant
from experiments.results import experiment_results
from tests.factories import ModelFactory, UserFactory
from tests.transactions import transaction_held_open

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
_sequence = iter(range(10**9))


@pytest.fixture
def experiment():
    found = Experiment.objects.create(
        name="tone", model=ModelFactory(name="tone-model"), status=ExperimentStatus.RUNNING
    )
    Variant.objects.create(experiment=found, name="control", is_control=True, allocation=Decimal(50), position=0)
    Variant.objects.create(experiment=found, name="b", allocation=Decimal(50), position=1)
    return found


def write(experiment, variant_name: str, n: int, *, when: datetime, user=None, status=UsageStatus.OK, **extra):
    variant = experiment.variants.get(name=variant_name)
    UsageRecord.objects.bulk_create(
        UsageRecord(
            request_id=f"rollup-{next(_sequence):09d}",
            user=user,
            endpoint="rest",
            status=status,
            duration_ms=100 + i,
            cost=Decimal("0.0012345678"),
            experiment_id=experiment.pk,
            experiment_variant_id=variant.pk,
            created_at=when,
            **extra,
        )
        for i in range(n)
    )


def figures(experiment):
    """What the results page shows that adds across days, per variant, and the series."""
    with time_machine.travel(NOW, tick=False):
        results = experiment_results(experiment)
    per_variant = {
        v["name"]: (v["requests"], v["statuses"], v["metrics"]["cost"]["total"], v["metrics"]["latency_ms"]["value"])
        for v in results["variants"]
    }
    series = (results["series"]["days"], [s["requests"] for s in results["series"]["variants"]])
    return per_variant, series


def rolled_requests() -> int:
    return DailyExperimentUsage.objects.aggregate(n=Sum("requests"))["n"] or 0


def test_folds_hold_every_experiment_row_once_whatever_their_order(experiment):
    alice = UserFactory()
    write(experiment, "control", 5, when=NOW - timedelta(days=2), user=alice)
    write(experiment, "b", 3, when=NOW - timedelta(days=1), user=alice, status=UsageStatus.UPSTREAM_ERROR)
    UsageRecord.objects.create(request_id="outside", endpoint="rest", status="ok", created_at=NOW)  # no experiment
    raw = figures(experiment)

    first = min(UsageRecord.objects.values_list("pk", flat=True))
    assert experiment_usage_fold(through_id=first + 2) == 3
    assert figures(experiment) == raw  # three rows from the rollup, five raw
    assert experiment_usage_fold() == 5
    assert experiment_usage_fold() == 0  # nothing new: a second fold adds nothing
    assert experiment_usage_fold(through_id=first) == 0  # a fold behind the mark (it lost a race) adds nothing
    assert ExperimentUsageMark.objects.get().through_id == ledger_high_water()
    assert rolled_requests() == 8
    assert figures(experiment) == raw

    write(experiment, "control", 4, when=NOW - timedelta(days=2), user=alice)  # late rows of a rolled day
    write(experiment, "b", 2, when=NOW, user=alice)
    expected = figures(experiment)
    assert expected[0]["control"][0] == 9 and expected[1][1] == [[9, 0, 0], [0, 3, 2]]
    experiment_usage_fold()
    assert rolled_requests() == 14
    assert figures(experiment) == expected
    # the rollup is per day, variant and status: the late rows went into their day's existing row
    assert DailyExperimentUsage.objects.filter(status="ok", experiment_variant_id__isnull=False).count() == 2


def test_rows_at_or_below_the_mark_are_read_from_the_rollup_not_the_ledger(experiment):
    write(experiment, "control", 4, when=NOW - timedelta(days=1))
    experiment_usage_fold()
    # Were the ledger read for them, this would show: change the rows the rollup already holds.
    UsageRecord.objects.filter(experiment_id=experiment.pk).update(cost=Decimal(1))
    assert figures(experiment)[0]["control"][2] == "0.0049382712"


def test_the_rollup_task_folds_up_to_the_same_mark_as_the_daily_rollup(experiment):
    write(experiment, "control", 3, when=NOW - timedelta(hours=1))
    with time_machine.travel(NOW, tick=False):
        daily_usage_rebuild_recent()
    assert ExperimentUsageMark.objects.get().through_id == ledger_high_water()
    assert rolled_requests() == 3


def test_a_fold_committing_between_the_reads_is_not_counted_twice(experiment, monkeypatch):
    write(experiment, "control", 6, when=NOW - timedelta(days=1))
    expected = figures(experiment)
    real = selectors._experiment_mark
    reads = []

    def mark_then_fold() -> int:
        found = real()
        if not reads:  # right after the first read of the mark, the fold task commits
            experiment_usage_fold()
        reads.append(found)
        return found

    monkeypatch.setattr(selectors, "_experiment_mark", mark_then_fold)
    assert figures(experiment) == expected
    assert reads[0] != reads[1]  # the window was read again


def test_a_mark_that_keeps_moving_is_read_under_its_lock_with_the_rows_retention_deleted(experiment, monkeypatch):
    write(experiment, "control", 6, when=NOW - timedelta(days=1))
    write(experiment, "b", 2, when=NOW - timedelta(days=1))
    expected = figures(experiment)
    experiment_usage_fold()
    # Retention deletes folded rows only: these are in the rollup alone now, which the raw rows would miss.
    UsageRecord.objects.filter(experiment_variant_id=experiment.variants.get(name="control").pk).delete()
    moves = iter(range(100))
    monkeypatch.setattr(selectors, "_experiment_mark", lambda: next(moves))
    found = figures(experiment)
    assert {name: shown[:3] for name, shown in found[0].items()} == {n: e[:3] for n, e in expected[0].items()}
    assert found[1] == expected[1]
    assert next(moves) == 6  # three reads of the window, then the locked one (which reads no moving mark)


@pytest.fixture
def keep_ten_days(settings):
    settings.LLMHUB_LEDGER_RETENTION_DAYS = 10


def test_results_count_the_rows_retention_deleted_once_folded(experiment, keep_ten_days):
    old = NOW - timedelta(days=40)
    write(experiment, "control", 5, when=old)
    write(experiment, "control", 2, when=NOW - timedelta(days=1))
    before = figures(experiment)
    with time_machine.travel(NOW, tick=False):
        assert retention.ledger_retention_apply() == 5  # folded first, then deleted
    assert UsageRecord.objects.filter(experiment_id=experiment.pk).count() == 2
    after = figures(experiment)
    assert after[0]["control"][:3] == before[0]["control"][:3]  # requests, statuses, money
    assert after[1] == before[1]
    with time_machine.travel(NOW, tick=False):
        results = experiment_results(experiment)
    control = results["variants"][0]
    assert control["metrics"]["latency_ms"]["n"] == 7
    assert control["metrics"]["latency_ms"]["p50"] in (100, 101)  # ranked over the two rows left


def test_retention_keeps_an_experiment_row_the_rollup_does_not_hold_yet(experiment, monkeypatch):
    old = NOW - timedelta(days=40)
    write(experiment, "control", 3, when=old)
    experiment_usage_fold()
    write(experiment, "control", 2, when=old)  # a spool replayed after the last fold: above the mark
    UsageRecord.objects.create(request_id="plain-old", endpoint="rest", status="ok", created_at=old)
    monkeypatch.setattr(retention, "experiment_usage_fold", lambda: 0)  # as if written right after the fold
    before = figures(experiment)

    assert usage_records_purge(before=(NOW - timedelta(days=10)).date()) == 4  # 3 folded + the plain row
    assert UsageRecord.objects.filter(experiment_id=experiment.pk).count() == 2
    assert figures(experiment)[0] == before[0]

    monkeypatch.undo()
    assert usage_records_purge(before=(NOW - timedelta(days=10)).date()) == 2  # folded now, then deleted
    assert not UsageRecord.objects.exists()
    assert figures(experiment)[0]["control"][:3] == before[0]["control"][:3]


@pytest.mark.django_db(transaction=True)
def test_two_folds_at_once_run_one_after_the_other(experiment):
    """A second fold waits for the first's lock on the mark, then finds nothing left: nothing twice."""
    write(experiment, "control", 5, when=NOW - timedelta(hours=1))
    high_water = ledger_high_water()
    counts: list[int] = []

    def second():
        try:
            counts.append(experiment_usage_fold(through_id=high_water))
        finally:
            connection.close()

    with transaction_held_open(lambda: experiment_usage_fold(through_id=high_water)) as first:
        two = threading.Thread(target=second)
        two.start()
        two.join(0.5)
        if connection.vendor == "postgresql":  # SQLite: the second waits on the database's write lock instead
            assert two.is_alive(), "the second fold did not wait for the first"
    two.join(10)
    assert (first, counts) == (5, [0])  # the second found nothing left
    assert rolled_requests() == 5
