"""A date hierarchy's year in an admin list's address is one the list can bound, else the list's "bad address" answer.

Django's changelist turns ``?started_at__year=2026&started_at__month=5`` into the bounds ``[2026-05-01, 2026-06-01)``:
it catches the ``ValueError`` of a date that does not exist (a month 13, a 30 February), but not the bounds past
Python's last date, year 9999: ``?…__year=9999`` (its end, year 10000: ``ValueError`` out of its ``try``),
``?…__year=9999&…__month=12`` or its 31st (``OverflowError``), or a year of 20 digits (``OverflowError`` in
``datetime``). Each was a server error on every list with a date hierarchy (incidents, ops alert incidents, scheduled
tasks). A year past 9998 is refused as such a date is, ``IncorrectLookupParameters``, which the admin answers as it
answers any filter it cannot read (a redirect to ``?e=1``). ``tests/test_admin_changelist_params.py``."""

from __future__ import annotations

from typing import Any

from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.http import HttpRequest

# The last year whose every bound (its end, its December's end, its last day's end) Python's datetime can hold.
LAST_YEAR = 9998


class DateBoundedChangeList(ChangeList):
    def get_filters(self, request: HttpRequest) -> Any:
        if self.date_hierarchy:
            years = self.filter_params.get(f"{self.date_hierarchy}__year") or []
            for year in years:
                try:
                    out_of_range = int(year) > LAST_YEAR
                except ValueError:
                    continue  # Django's own check refuses it
                if out_of_range:
                    raise IncorrectLookupParameters(f"The year {year[:20]} is past {LAST_YEAR}.")
        return super().get_filters(request)


class DateHierarchyBounded:
    """For a ``ModelAdmin`` with a ``date_hierarchy``: its list refuses a year it cannot bound."""

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return DateBoundedChangeList
