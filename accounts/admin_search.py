"""The admin's search of a table keyed by user: a user named whole, then their rows through the table's index of
its user column (docs/ledger.md, "The admin at scale")."""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet
from django.http import HttpRequest

from .selectors import user_ids_named


class UserSearch:
    """A user looked up whole (``user_ids_named``: username or email, any case, in the users' indexes), their rows
    then read through the index of ``user_field``, rather than Django's ``LIKE '%term%'`` on the joined username
    and email, which read every row of both tables. ``also_q`` adds a table's own whole values (an id, a key's
    prefix). Put it before ``admin.ModelAdmin`` in the bases."""

    user_field = "user"
    search_fields = ("user__username", "user__email")  # Django shows the box for a non-empty list; see below
    search_help_text = "A user's username or email, written out exactly (any case)."

    def also_q(self, term: str) -> Q | None:
        return None

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        found = Q(**{f"{self.user_field}_id__in": user_ids_named(term)})
        also: Any = self.also_q(term)
        return queryset.filter(found | also if also is not None else found), False
