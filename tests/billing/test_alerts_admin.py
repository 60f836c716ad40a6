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
        with CaptureQueriesContext(connection) as captured:
            page = admin_client.get(CHANGELIST)
        reads = [query["sql"] for query in captured if '"billing_budgetalert"' in query["sql"]]

        assert page.status_code == 200 and list(page.context["cl"].result_list) == [over, half, old]
        assert len(reads) == 2, reads  # the page's rows and their one count
        html = page.content.decode()
        assert 'href="?threshold=80"' in html and "80 %" in html
        for threshold, expected in (("50", [old]), ("80", [half]), ("100", [over]), ("nope", [over, half, old])):
            assert list(admin_client.get(CHANGELIST, {"threshold": threshold}).context["cl"].result_list) == expected
        midnight = NOW.replace(hour=0)
        week = {"created_at__gte": str(midnight - timedelta(days=7)), "created_at__lt": str(midnight + timedelta(1))}
        assert list(admin_client.get(CHANGELIST, week).context["cl"].result_list) == [over, half]
