"""The budget alerts' admin list at scale (a few alerts a user, key or plan and period: hundreds of thousands in a
year): it reads the page's alerts and one count, and its filters read nothing (docs/ledger.md, "The admin at
scale")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import BudgetAlert
from tests.admin_pages import changelist_page
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
CHANGELIST = reverse("admin:billing_budgetalert_changelist")


def alert(user, threshold: int, *, days_ago: int) -> BudgetAlert:
    with time_machine.travel(NOW - timedelta(days=days_ago), tick=False):
        return BudgetAlert.objects.create(
            scope_kind="user",
            scope_id=user.pk,
            user=user,
            metric="cost",
            period="monthly",
            period_start=NOW.replace(day=1),
            threshold=threshold,
            limit=Decimal("10"),
            spent=Decimal(threshold) / 10,
        )


def test_the_alerts_list_reads_the_page_and_one_count_and_its_filters_nothing(admin_client):
    """Each view counted every alert twice and read every one for the date hierarchy's bounds and days and the
    threshold filter's distinct values; the page's alerts and one count now, the thresholds named, days by the date
    filter. The filters still filter."""
    user = UserFactory(username="ada")
    old, half, over = alert(user, 50, days_ago=40), alert(user, 80, days_ago=1), alert(user, 100, days_ago=0)

    with time_machine.travel(NOW, tick=False):
        page = changelist_page(admin_client, CHANGELIST, "billing_budgetalert")

        assert page.rows == [over, half, old]
        assert len(page.reads) == 2, page.reads  # the page's rows and their one count
        assert 'href="?threshold=80"' in page.html and "80 %" in page.html
        for threshold, expected in (("50", [old]), ("80", [half]), ("100", [over]), ("nope", [over, half, old])):
            assert list(admin_client.get(CHANGELIST, {"threshold": threshold}).context["cl"].result_list) == expected
        midnight = NOW.replace(hour=0)
        week = {"created_at__gte": str(midnight - timedelta(days=7)), "created_at__lt": str(midnight + timedelta(1))}
        assert list(admin_client.get(CHANGELIST, week).context["cl"].result_list) == [over, half]


def test_sending_alerts_again_costs_a_few_queries_a_batch_of_alerts_not_a_few_an_alert(
    admin_client, settings, broker_queue
):
    """Alerts whose webhook was down past its retries, selected and sent again: each undelivered webhook is marked
    queued and its task queued, the emails made are not; a few queries a batch of alerts, where each delivery cost
    a transaction of its own (a lock, a read, a write: about 8 queries an alert)."""
    from django.contrib.messages import get_messages

    settings.LLMHUB_ALERT_WEBHOOK_URL = "https://hooks.example.com/alerts"
    user = UserFactory(username="ada")
    exhausted = {"webhook": {"state": "exhausted", "at": NOW.isoformat(), "rounds": 3, "error": "down"}}

    made = iter(range(1_000_000))

    def alerts(count: int) -> list[BudgetAlert]:
        return BudgetAlert.objects.bulk_create(
            BudgetAlert(
                scope_kind="key",
                scope_id=next(made),
                user=user,
                metric="cost",
                period="monthly",
                period_start=NOW.replace(day=1),
                threshold=80,
                limit=Decimal("10"),
                spent=Decimal("8"),
                channels=["email"],
                delivery=exhausted,
            )
            for _ in range(count)
        )

    def send_again(rows: list[BudgetAlert]) -> tuple[int, str]:
        form = {"action": "send_again", "_selected_action": [row.pk for row in rows]}
        with CaptureQueriesContext(connection) as queries:
            answer = admin_client.post(CHANGELIST, form)
        assert answer.status_code == 302
        return len(queries), [str(message) for message in get_messages(answer.wsgi_request)][-1]

    with time_machine.travel(NOW, tick=False):
        send_again(alerts(1))  # the first fills Django's caches: not counted
        few, _ = send_again(alerts(10))
        many_alerts = alerts(200)
        many, said = send_again(many_alerts)

    assert many < few + 10  # a few queries a batch of deliveries: was about 8 queries an alert more
    assert said == "Queued 200 undelivered delivery(ies) again."
    assert broker_queue.llen("celery") == 211  # a webhook task an alert, for a worker; no email again
    for row in BudgetAlert.objects.filter(pk__in=[row.pk for row in many_alerts]):
        assert row.channels == ["email"]
        assert row.delivery == {"webhook": {"state": "queued", "at": NOW.isoformat(), "rounds": 0}}
