"""An experiment's results are read from the ledger's covering index alone (billing/models.py,
docs/ledger.md): on PostgreSQL, every query ``experiment_results`` runs on the ledger can be answered by an
index-only scan of ``billing_usage_experiment_cover``. Without it each query read a heap page per row of
the experiment, 250 ms a query for 78,000 rows in a 10-million-row ledger (3.5 s for the page).

PostgreSQL only (the test suite's PostgreSQL phase runs tests/billing); SQLite has no index-only plan to
check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import UsageRecord, UsageStatus
from billing.services.rollups import experiment_usage_fold
from experiments.models import Experiment, ExperimentStatus, Feedback, Variant
from experiments.results import experiment_results
from tests.factories import ModelFactory, UserFactory

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's plans"),
]

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("folded", [False, True])
def test_every_ledger_query_of_the_results_is_an_index_only_scan_of_the_covering_index(folded):
    """Before the experiments' rollup holds any row, and after: then the sums read only the rows above its
    mark, which the primary key's range finds (the rows written since the last fold) as well as the
    covering index does."""
    model = ModelFactory(name="cover-model")
    experiment = Experiment.objects.create(name="cover", model=model, status=ExperimentStatus.RUNNING)
    variants = [
        Variant.objects.create(
            experiment=experiment, name=name, is_control=position == 0, allocation=Decimal(50), position=position
        )
        for position, name in enumerate(("control", "treatment"))
    ]
    user = UserFactory()
    rows = []
    for n in range(200):
        variant = variants[n % 2]
        rows.append(
            UsageRecord(
                request_id=f"req_cover_{n}",
                endpoint="chat",
                stream=n % 3 == 0,
                status=UsageStatus.OK if n % 10 else UsageStatus.UPSTREAM_ERROR,
                user=user,
                cost=Decimal("0.001"),
                duration_ms=100 + n,
                ttft_ms=20 + n if n % 3 == 0 else None,
                experiment_id=experiment.pk,
                experiment_variant_id=variant.pk,
                created_at=NOW - timedelta(hours=n),
            )
        )
    UsageRecord.objects.bulk_create(rows)
    for n in range(0, 200, 4):
        Feedback.objects.create(request_id=f"req_cover_{n}", metric="thumbs", value=1 if n % 8 else -1)
    if folded:
        experiment_usage_fold(through_id=rows[150].pk)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE billing_usagerecord")

    with CaptureQueriesContext(connection) as captured:
        results = experiment_results(experiment, now=NOW)
    assert results["variants"][0]["requests"] == 100

    # The queries that read every row of the experiment; those that join the feedback may be driven from it
    # instead (a few rated requests looked up by request id), as the planner sees fit.
    ledger_queries = [
        q["sql"]
        for q in captured.captured_queries
        if 'FROM "billing_usagerecord"' in q["sql"] and "experiments_feedback" not in q["sql"]
    ]
    assert len(ledger_queries) >= 7
    with connection.cursor() as cursor:
        # A table this small would be read whole: the planner is told not to, so that the plan says whether
        # the index can answer the query alone (an index-only scan) rather than what is cheapest today.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        for sql in ledger_queries:
            cursor.execute(f"EXPLAIN {sql}")
            plan = "\n".join(line for (line,) in cursor.fetchall())
            ledger_scans = [line for line in plan.splitlines() if " on billing_usagerecord" in line and "Scan" in line]
            assert ledger_scans, plan
            # The time-to-first-token percentiles read their own small index, in ttft order.
            ttft_percentile = sql.startswith('SELECT "billing_usagerecord"."ttft_ms"') and "ORDER BY" in sql
            index = "billing_usage_experiment_ttft" if ttft_percentile else "billing_usage_experiment_cover"
            above_mark = folded and '"billing_usagerecord"."id" >' in sql
            for line in ledger_scans:
                if above_mark and "Index Scan using billing_usagerecord_pkey" in line:
                    continue
                assert "Index Only Scan using billing_usage_experiment_" in line and index in line, f"{sql}\n{plan}"
            if "ORDER BY" in sql:  # a percentile: read off the index in order, never sorted
                assert "Sort" not in plan, f"{sql}\n{plan}"
    percentiles = [sql for sql in ledger_queries if "ORDER BY" in sql]
    assert len(percentiles) == 6  # p50 and p95 of latency, p50 of time to first token, per variant


def test_the_ledger_is_vacuumed_after_every_100000_rows_inserted():
    """An index-only scan reads the heap for every row on a page the visibility map does not mark, and only
    VACUUM marks pages: migration 0019 has autovacuum run after 100,000 inserts instead of a fifth of the
    table, so a running experiment's recent rows are read from the index (docs/ledger.md)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT reloptions FROM pg_class WHERE relname = %s", [UsageRecord._meta.db_table])
        (options,) = cursor.fetchone()
    assert sorted(options) == [
        "autovacuum_vacuum_insert_scale_factor=0",
        "autovacuum_vacuum_insert_threshold=100000",
    ]
