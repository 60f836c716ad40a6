"""An admin list as the tests of its cost read it (docs/ledger.md, "The admin at scale": the page's rows and one
count, no pass over the table for a filter's choices): the page, the rows it shows, and the SQL of every query
that read the listed table for it."""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection
from django.http import HttpResponse
from django.test import Client
from django.test.utils import CaptureQueriesContext


@dataclass(frozen=True)
class ChangelistPage:
    response: HttpResponse
    rows: list  # the changelist's result_list: the rows the page shows
    reads: list[str]  # the SQL of every query that named the listed table

    @property
    def html(self) -> str:
        return self.response.content.decode()


def changelist_page(client: Client, url: str, table: str, params: dict[str, str] | None = None) -> ChangelistPage:
    """The changelist at ``url`` asked with ``params`` (it must answer 200), with the queries that read ``table``
    (its database name, as quoted in the SQL: ``"billing_usagerecord"``)."""
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, params or {})
    assert response.status_code == 200
    reads = [query["sql"] for query in captured if f'"{table}"' in query["sql"]]
    return ChangelistPage(response, list(response.context["cl"].result_list), reads)
