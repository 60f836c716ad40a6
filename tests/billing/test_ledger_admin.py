"""The ledger's admin list at production size: what it may ask of a table of millions of rows. The timings behind
each rule are in docs/ledger.md ("The admin at scale"); here each is pinned by what the page asks the database."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
import time_machine
from django.db import connection
from django.test import Client
from django.urls import reverse

from billing.models import DailyUsage
from core.paginators import EstimatedCountPaginator
from tests.admin_pages import changelist_page
from tests.factories import ModelFactory, ProviderFactory, UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:billing_usagerecord_changelist")


def ledger_page(client: Client, **params: str) -> tuple[list, list[str]]:
    """The rows the list shows and the SQL of every query that read the ledger for it."""
    page = changelist_page(client, CHANGELIST, "billing_usagerecord", params)
    return page.rows, page.reads


def test_the_model_and_provider_filters_list_the_catalog_and_filter_on_its_keys(admin_client):
    east = ProviderFactory(name="east")
    served = ModelFactory(name="served", provider=east)
    idle = ModelFactory(name="idle")  # in the catalog, no request yet: still offered
    mine = UsageRecordFactory(model=served, model_name="served", provider=east, provider_name="east")
    UsageRecordFactory(model=None, model_name="deleted-since", provider=None, provider_name="gone")

    shown, reads = ledger_page(admin_client)
    page = admin_client.get(CHANGELIST).content.decode()

    assert len(shown) == 2
    # The choices come from the catalog: no pass over the whole ledger for its distinct names.
    assert not [sql for sql in reads if 'DISTINCT "billing_usagerecord"' in sql], reads
    for name in ("served", "idle", "east"):
        assert f">{name}</a>" in page
    assert ledger_page(admin_client, model__id__exact=str(served.pk))[0] == [mine]
    assert ledger_page(admin_client, model__id__exact=str(idle.pk))[0] == []
    assert ledger_page(admin_client, provider__id__exact=str(east.pk))[0] == [mine]


def test_the_list_shows_and_filters_what_each_request_asked_for(admin_client):
    """Chat completions, Anthropic messages, OpenAI responses and embeddings all come over REST: the endpoint
    cannot tell them apart, the operation can; its choices are fixed, so the filter reads nothing to list them."""
    chat = UsageRecordFactory(operation="chat")
    responses = UsageRecordFactory(operation="responses")

    shown, reads = ledger_page(admin_client)
    page = admin_client.get(CHANGELIST).content.decode()

    assert set(shown) == {chat, responses}
    assert not [sql for sql in reads if "DISTINCT" in sql], reads
    assert ">OpenAI responses</a>" in page and ">OpenAI responses</td>" in page
    assert ledger_page(admin_client, operation__exact="responses")[0] == [responses]
    assert ledger_page(admin_client, operation__exact="chat")[0] == [chat]


def test_the_list_is_narrowed_by_date_without_reading_the_ledgers_dates(admin_client):
    """No date hierarchy: its first level reads the distinct months of the whole ledger, its second the distinct
    days of a month. The date filter's ranges (today, the past 7 days, this month, this year) need no query."""
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    today = UsageRecordFactory(created_at=now - timedelta(hours=1))
    last_week = UsageRecordFactory(created_at=now - timedelta(days=5))
    last_month = UsageRecordFactory(created_at=now - timedelta(days=20))
    UsageRecordFactory(created_at=now - timedelta(days=400))

    with time_machine.travel(now, tick=False):
        shown, reads = ledger_page(admin_client)
        page = admin_client.get(CHANGELIST).content.decode()
        assert len(shown) == 4
        assert not [sql for sql in reads if "DISTINCT" in sql], reads
        assert "Past 7 days" in page

        def since(days: int) -> list:
            start = (now - timedelta(days=days)).date()
            tomorrow = (now + timedelta(days=1)).date()
            return ledger_page(
                admin_client, created_at__gte=f"{start} 00:00:00+00:00", created_at__lt=f"{tomorrow} 00:00:00+00:00"
            )[0]

        assert since(0) == [today]
        assert since(7) == [today, last_week]
        assert ledger_page(admin_client, created_at__gte="2026-03-01 00:00:00+00:00")[0] == [today, last_week]
        assert last_month in ledger_page(admin_client, created_at__gte="2026-01-01 00:00:00+00:00")[0]


def test_the_search_finds_a_request_id_or_a_users_rows_through_the_indexes(admin_client):
    """A search looks a request id up in its unique index, and a user (username or email, any case) in the users'
    table, then their rows in the (user, created_at) index; a ``LIKE '%…%'`` on the ledger (joined to the users)
    read every row of it."""
    ana = UserFactory(username="ana", email="ana@example.com")
    hers = [UsageRecordFactory(user=ana, request_id=f"req-ana-{n}") for n in range(2)]
    other = UsageRecordFactory(request_id="req-other-1", model_name="ana-model")

    def search(term: str) -> set[str]:
        shown, reads = ledger_page(admin_client, q=term)
        assert not [sql for sql in reads if "LIKE" in sql], reads
        return {row.request_id for row in shown}

    assert search("req-other-1") == {other.request_id}
    assert search("  req-other-1 ") == {other.request_id}
    assert search("ANA") == {row.request_id for row in hers}
    assert search("Ana@Example.com") == {row.request_id for row in hers}
    assert search("req-ana") == set()  # a part of an id is not looked up: it would read the whole ledger
    assert search("nobody") == set()
    assert "exactly" in admin_client.get(CHANGELIST).content.decode()  # the search box says so


def test_the_daily_rollups_list_reads_no_distinct_values_counts_once_and_searches_users_by_index(admin_client):
    """The rollup grows by thousands of rows a day: the same rules as the ledger's list."""
    ProviderFactory(name="east")
    ModelFactory(name="served")
    ana = UserFactory(username="ana")
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    hers = DailyUsage.objects.create(day=now.date(), user=ana, provider_name="east", model_name="served")
    old = DailyUsage.objects.create(day=date(2025, 6, 1), user=UserFactory(), provider_name="gone", model_name="old")
    url = reverse("admin:billing_dailyusage_changelist")

    def rollups(**params: str) -> tuple[list, list[str], str]:
        page = changelist_page(admin_client, url, "billing_dailyusage", params)
        return page.rows, page.reads, page.html

    with time_machine.travel(now, tick=False):
        shown, reads, page = rollups()
        assert shown == [hers, old]
        assert not [sql for sql in reads if "DISTINCT" in sql or "LIKE" in sql], reads
        assert len([sql for sql in reads if "COUNT(" in sql]) == 1
        assert 'href="?model_name=served"' in page and 'href="?provider_name=east"' in page
        assert rollups(model_name="old")[0] == [old]
        assert rollups(provider_name="east")[0] == [hers]
        assert rollups(day__gte="2026-03-01")[0] == [hers]
        shown, reads, _ = rollups(q="ANA")
        assert shown == [hers]
        assert not [sql for sql in reads if "LIKE" in sql], reads


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's statistics")
def test_on_postgresql_the_unfiltered_list_of_a_large_ledger_is_counted_from_the_planners_estimate(
    admin_client, monkeypatch
):
    """``count(*)`` read the whole ledger at every view of the list; a filtered list is still counted exactly."""
    monkeypatch.setattr(EstimatedCountPaginator, "estimate_from", 10)  # "large": 30 rows, not 100,000
    for _ in range(30):
        UsageRecordFactory()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE billing_usagerecord")
    for _ in range(5):
        UsageRecordFactory(status="rejected")  # written since the statistics were taken

    def counted(**params: str) -> tuple[int, list[str]]:
        page = changelist_page(admin_client, CHANGELIST, "billing_usagerecord", params)
        return page.response.context["cl"].result_count, [sql for sql in page.reads if "COUNT(" in sql]

    assert counted() == (30, [])
    assert counted(status="rejected")[0] == 5
    assert len(counted(status="rejected")[1]) == 1
