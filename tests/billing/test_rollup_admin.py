"""The staff and per-user rollups in the admin, as an operator uses them: read-only lists of the figures the usage
pages read, filtered by day, provider, model and operation (the staff rollup) or looked up by user (the per-user
one), each page costing the same queries however many rows it shows, and the rebuild action of the daily usage's
list (the one service that writes them). The rows come from the ledger through the rollup's own service."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
import time_machine
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.roles import Role, role_set
from billing.models import DailyStaffUsage, DailyUserUsage, UsageRecord
from billing.services.keys import api_key_create
from billing.services.rollups import daily_usage_rebuild
from tests.factories import ModelFactory, ProviderFactory, UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
TODAY, EARLIER = NOW.date(), date(2026, 2, 20)
STAFF = reverse("admin:billing_dailystaffusage_changelist")
PER_USER = reverse("admin:billing_dailyuserusage_changelist")


@pytest.fixture(autouse=True)
def _clock():
    with time_machine.travel(NOW, tick=False):
        yield


def client_of(role: Role, username: str = "night-shift") -> Client:
    user = UserFactory(username=username)
    role_set(user, role)
    client = Client()
    client.force_login(user)
    return client


def request_at(when: datetime, **fields: object) -> UsageRecord:
    return UsageRecordFactory(created_at=when, **fields)


def rolled_up(*days: date) -> None:
    for day in days:
        daily_usage_rebuild(day=day)


def shown(client: Client, url: str, **params: str) -> list:
    response = client.get(url, params)
    assert response.status_code == 200, response.status_code
    return list(response.context["cl"].result_list)


def test_an_operator_lists_and_filters_the_staff_rollup_and_changes_nothing():
    ProviderFactory(name="east")
    ModelFactory(name="served")
    ana = UserFactory(username="ana")
    for user in (ana, UserFactory()):
        request_at(NOW, user=user, provider_name="east", model_name="served", cost=Decimal("0.25"), prompt_tokens=7)
    request_at(NOW, user=ana, provider_name="west", model_name="other", operation="embeddings", cost=Decimal("1.5"))
    request_at(datetime(2026, 2, 20, 9, tzinfo=UTC), user=ana, provider_name="east", model_name="served")
    rolled_up(TODAY, EARLIER)
    operator = client_of(Role.OPERATOR)

    everything = shown(operator, STAFF)
    served_today = DailyStaffUsage.objects.get(day=TODAY, model_name="served")
    assert (served_today.requests, served_today.prompt_tokens, served_today.cost) == (2, 14, Decimal("0.5"))
    assert len(everything) == 3 and everything[0].day == TODAY and everything[-1].day == EARLIER
    page = operator.get(STAFF).content.decode()
    for choice in ('href="?provider_name=east"', 'href="?model_name=served"', 'href="?operation__exact=embeddings"'):
        assert choice in page
    assert shown(operator, STAFF, provider_name="east", day__gte="2026-03-01") == [served_today]
    assert shown(operator, STAFF, model_name="other") == [DailyStaffUsage.objects.get(model_name="other")]
    assert [row.day for row in shown(operator, STAFF, operation__exact="chat")] == [TODAY, EARLIER]

    change = reverse("admin:billing_dailystaffusage_change", args=[served_today.pk])
    assert operator.get(change).status_code == 200  # a read-only view of the row
    assert operator.post(change, {"requests": "999"}).status_code == 403
    assert operator.get(reverse("admin:billing_dailystaffusage_add")).status_code == 403
    assert operator.get(reverse("admin:billing_dailystaffusage_delete", args=[served_today.pk])).status_code == 403
    served_today.refresh_from_db()
    assert served_today.requests == 2


def test_an_operator_lists_the_per_user_rollup_and_finds_one_users_days():
    ana, bo = UserFactory(username="ana", email="ana@example.com"), UserFactory(username="bo")
    key = api_key_create(user=ana, name="ci")
    request_at(NOW, user=ana, api_key=key.api_key, cost=Decimal("0.25"))
    request_at(NOW, user=ana, model_name="other", operation="embeddings", cost=Decimal("0.5"))
    request_at(NOW, user=bo)
    request_at(datetime(2026, 2, 20, 9, tzinfo=UTC), user=ana)
    rolled_up(TODAY, EARLIER)
    operator = client_of(Role.OPERATOR)

    hers_today = DailyUserUsage.objects.get(day=TODAY, user=ana)
    assert (hers_today.requests, hers_today.cost) == (2, Decimal("0.75"))
    assert len(shown(operator, PER_USER)) == 3
    assert shown(operator, PER_USER, q="ANA@example.com", day__gte="2026-03-01") == [hers_today]
    assert [row.day for row in shown(operator, PER_USER, q="ana")] == [TODAY, EARLIER]
    assert shown(operator, PER_USER, q="an") == []  # whole names only, as the other rollup's search
    assert shown(operator, PER_USER, user__id__exact=str(bo.pk)) == [DailyUserUsage.objects.get(user=bo)]
    page = operator.get(PER_USER).content.decode()
    assert ">ana</" in page and key.secret not in page and key.api_key.prefix not in page

    change = reverse("admin:billing_dailyuserusage_change", args=[hers_today.pk])
    assert operator.get(change).status_code == 200
    assert operator.post(change, {"requests": "999"}).status_code == 403
    assert operator.get(reverse("admin:billing_dailyuserusage_add")).status_code == 403
    assert operator.get(reverse("admin:billing_dailyuserusage_delete", args=[hers_today.pk])).status_code == 403

    bo.delete()  # a deleted user's rows stay, under no user
    assert "(deleted user)" in operator.get(PER_USER, {"day__gte": "2026-03-01"}).content.decode()


@pytest.mark.parametrize("url", [STAFF, PER_USER])
def test_only_operators_and_admins_may_read_the_rollups(url):
    assert client_of(Role.ADMIN, "boss").get(url).status_code == 200
    assert client_of(Role.OPERATOR).get(url).status_code == 200
    for role in (Role.MEMBER, Role.VIEWER):
        response = client_of(role, f"a-{role}").get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


@pytest.mark.parametrize("url", [STAFF, PER_USER])
def test_a_page_costs_the_same_queries_however_many_rows_it_shows(url, django_assert_max_num_queries):
    """Every row shows its user (the per-user rollup) and the filters' choices: read with the page's query and the
    catalog, not one query a row."""
    for n in range(3):
        ProviderFactory(name=f"p{n}")
        ModelFactory(name=f"m{n}")
    operator = client_of(Role.OPERATOR)
    request_at(NOW, user=UserFactory(), provider_name="p0", model_name="m0")
    rolled_up(TODAY)
    with django_assert_max_num_queries(100) as one_row:
        assert len(shown(operator, url)) == 1
    for n in range(30):
        request_at(NOW, user=UserFactory(), provider_name=f"p{n % 3}", model_name=f"m{n % 3}", operation="chat")
        request_at(NOW, provider_name=f"x{n}", model_name=f"y{n}", operation="embeddings")
    rolled_up(TODAY)
    with django_assert_max_num_queries(len(one_row.captured_queries)):
        assert len(shown(operator, url)) > 30


@pytest.mark.parametrize("url", [STAFF, PER_USER])
def test_the_rebuild_action_rolls_the_selected_days_up_again_from_the_ledger(url):
    """A row written after its day was rolled up (a spool replayed late) is in the rollup once the operator rebuilds
    the day from the list."""
    ana = UserFactory(username="ana")
    request_at(NOW, user=ana, cost=Decimal("0.25"))
    request_at(datetime(2026, 2, 20, 9, tzinfo=UTC), user=ana, cost=Decimal("0.125"))
    rolled_up(TODAY, EARLIER)
    request_at(NOW, user=ana, cost=Decimal("0.5"))
    model = DailyStaffUsage if url == STAFF else DailyUserUsage
    today = model.objects.get(day=TODAY)

    response = client_of(Role.OPERATOR).post(url, {"action": "rebuild", "_selected_action": [today.pk]}, follow=True)

    assert response.status_code == 200 and "Rebuilt 1 day(s) from the ledger." in response.content.decode()
    rebuilt = model.objects.get(day=TODAY)
    assert (rebuilt.requests, rebuilt.cost) == (2, Decimal("0.75"))
    assert model.objects.get(day=EARLIER).cost == Decimal("0.125")


def test_the_rebuild_action_reads_the_days_selected_across_the_list_a_row_a_day():
    """All the rows of a list selected (thousands a day): the action read every one of them into memory for its
    few distinct days; it asks the database for the days, and still rebuilds each."""
    users = [UserFactory(username=f"busy-{n}") for n in range(40)]
    for user in users:
        request_at(NOW, user=user, cost=Decimal("0.25"))
        request_at(datetime(2026, 2, 20, 9, tzinfo=UTC), user=user, cost=Decimal("0.125"))
    rolled_up(TODAY, EARLIER)
    request_at(NOW, user=users[0], cost=Decimal("0.5"))  # written after its day was rolled up
    first = DailyUserUsage.objects.order_by("pk").first()
    action = {"action": "rebuild", "select_across": "1", "index": "0", "_selected_action": [first.pk]}
    operator = client_of(Role.OPERATOR)

    with CaptureQueriesContext(connection) as captured:
        response = operator.post(PER_USER, action, follow=True)

    assert response.status_code == 200 and "Rebuilt 2 day(s) from the ledger." in response.content.decode()
    days = [
        q["sql"] for q in captured if q["sql"].startswith("SELECT") and '"billing_dailyuserusage"."day"' in q["sql"]
    ]
    assert days and all("DISTINCT" in sql for sql in days[:1]), days
    assert DailyUserUsage.objects.get(day=TODAY, user=users[0]).cost == Decimal("0.75")
