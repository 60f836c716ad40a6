"""The admin's lists of the tables that grow with the users (users, their plans, keys and budget counters: hundreds
of thousands of rows) count them once a view (docs/ledger.md, "The admin at scale")."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import ApiKey, BudgetCounter, Plan, UserPlan
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def rows():
    users = [UserFactory(username=f"u{n}") for n in range(3)]
    plan = Plan.objects.create(name="free")
    for user in users:
        UserPlan.objects.create(user=user, plan=plan)
        ApiKey.objects.create(user=user, prefix=f"p{user.pk}", secret_hash=f"h{user.pk}")
        BudgetCounter.objects.create(
            key=f"user:{user.pk}",
            scope_kind="user",
            scope_id=user.pk,
            metric="cost",
            period="monthly",
            period_start=datetime(2026, 12, 1, tzinfo=UTC),
        )
    return users


@pytest.mark.parametrize(
    ("changelist", "table"),
    [
        ("auth_user", "auth_user"),
        ("billing_userplan", "billing_userplan"),
        ("billing_apikey", "billing_apikey"),
        ("billing_budgetcounter", "billing_budgetcounter"),
    ],
)
@pytest.mark.usefixtures("rows")
def test_the_list_counts_its_table_once_a_view(admin_client, changelist, table):
    """Django counts a list's rows, then all of the table again for "N total" (``show_full_result_count``): a
    second count of hundreds of thousands of rows at every view, for a figure the first one gives unfiltered."""
    with CaptureQueriesContext(connection) as captured:
        page = admin_client.get(reverse(f"admin:{changelist}_changelist"))
    assert page.status_code == 200 and len(page.context["cl"].result_list) >= 3
    counts = [query["sql"] for query in captured if "COUNT(" in query["sql"] and f'FROM "{table}"' in query["sql"]]
    assert len(counts) == 1, counts


def test_the_keys_list_shows_the_newest_first_off_the_primary_key(admin_client, rows):
    """Ordered by ``created_at`` (no index), the list sorted every key at each view."""
    with CaptureQueriesContext(connection) as captured:
        page = admin_client.get(reverse("admin:billing_apikey_changelist"))
    listing = next(
        query["sql"] for query in captured if 'FROM "billing_apikey"' in query["sql"] and "ORDER BY" in query["sql"]
    )
    assert 'ORDER BY "billing_apikey"."id" DESC' in listing
    assert [key.user for key in page.context["cl"].result_list] == rows[::-1]


def test_the_counters_list_shows_the_newest_first_off_the_primary_key(admin_client, rows):
    """Ordered by ``-period_start, key`` (no index leads with the period), the list sorted every counter at each
    view; the same queries for 3 counters as for 40."""

    def view():
        with CaptureQueriesContext(connection) as captured:
            page = admin_client.get(reverse("admin:billing_budgetcounter_changelist"))
        assert page.status_code == 200
        return [query["sql"] for query in captured], page.context["cl"].result_list

    view()  # the first fills Django's caches: not counted
    few, _ = view()
    BudgetCounter.objects.bulk_create(
        BudgetCounter(
            key=f"key:{n}",
            scope_kind="key",
            scope_id=n,
            metric="cost",
            period="monthly",
            period_start=datetime(2026, 11, 1, tzinfo=UTC),
        )
        for n in range(37)
    )
    many, shown = view()
    assert len(many) == len(few)
    listing = next(sql for sql in many if 'FROM "billing_budgetcounter"' in sql and "ORDER BY" in sql)
    assert 'ORDER BY "billing_budgetcounter"."id" DESC' in listing, listing
    assert shown[0].key == "key:36"
