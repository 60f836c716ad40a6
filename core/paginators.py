"""The admin's paginator for the tables that grow with traffic (the ledger, the audit log, chat messages, the
daily rollup)."""

from __future__ import annotations

from functools import cached_property

from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet


class EstimatedCountPaginator(Paginator):
    """On PostgreSQL, an unfiltered list of a table past ``estimate_from`` rows is counted with the planner's
    estimate (``pg_class.reltuples``, which (auto)ANALYZE keeps within a few percent): an exact ``count(*)``
    reads the whole table or its smallest index at every view of the list, 92-155 ms at 1-1.5 million rows and
    about a second at 10 million (docs/ledger.md, "The admin at scale"). A filtered or searched list, a smaller
    table and any other database are counted exactly."""

    estimate_from = 100_000

    @cached_property
    def count(self) -> int:
        estimate = self._estimate()
        return super().count if estimate is None else estimate

    def _estimate(self) -> int | None:
        rows = self.object_list
        if not isinstance(rows, QuerySet) or rows.query.where:
            return None
        connection = connections[rows.db]
        if connection.vendor != "postgresql":
            return None
        with connection.cursor() as cursor:
            cursor.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [rows.model._meta.db_table])
            found = cursor.fetchone()
        if found is None or found[0] < self.estimate_from:  # -1: never analysed
            return None
        return int(found[0])
