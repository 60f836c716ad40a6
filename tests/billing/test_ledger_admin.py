"""The ledger's admin list at production size: what it may ask of a table of millions of rows. The timings behind
each rule are in docs/ledger.md ("The admin at scale"); here each is pinned by what the page asks the database."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tests.factories import ModelFactory, ProviderFactory, UsageRecordFactory

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:billing_usagerecord_changelist")


def ledger_page(client: Client, **params: str) -> tuple[list, list[str]]:
    """The rows the list shows and the SQL of every query that read the ledger for it."""
    with CaptureQueriesContext(connection) as captured:
        response = client.get(CHANGELIST, params)
    assert response.status_code == 200
    ledger_reads = [query["sql"] for query in captured if '"billing_usagerecord"' in query["sql"]]
    return list(response.context["cl"].result_list), ledger_reads


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
