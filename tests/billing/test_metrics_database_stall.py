"""/metrics while the database does not answer its reads: the state it reads there at scrape time (the breakers of
the catalog's deployments, the background tasks) is bounded by a statement timeout (``llmhub.metrics``), so that a
scrape still answers with the request metrics the workers wrote, rather than hanging past Prometheus's timeout and
losing every metric of the server while the database is slow. PostgreSQL only: SQLite's readers are never blocked
(WAL), and only PostgreSQL holds a reader behind another transaction's lock."""

from __future__ import annotations

import httpx
import pytest
from django.db import connection, transaction

from core import metrics as core_metrics
from core.telemetry import RequestObservation
from tests.test_metrics import TOKEN, scraping, value  # noqa: F401

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="only PostgreSQL blocks a read behind a lock"),
]


def test_a_scrape_answers_while_the_tables_it_reads_are_locked(llmhub_server, scraping):  # noqa: F811
    core_metrics.request_metrics_record(
        RequestObservation(request_id="req-stall", transport="rest", operation="chat", status="ok", model="stalled")
    )
    # A migration altering them (or a VACUUM FULL) holds such a lock for as long as it runs; here, for as long as
    # the scrape takes: it can answer only by giving those reads up.
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("LOCK TABLE billing_taskrun, providers_deployment IN ACCESS EXCLUSIVE MODE")
        response = httpx.get(llmhub_server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    assert response.status_code == 200, response.text
    assert value(response.text, "llmhub_requests_total", model="stalled", status="ok") == 1
    # What could not be read is absent, not made up.
    assert "llmhub_breaker_state{" not in response.text
    assert "llmhub_periodic_task_overdue{" not in response.text
