"""Reads of users for a caller: the admin's searches of the tables keyed by user."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db.models import Q


def users_named_q(term: str) -> Q:
    """Users whose username or email is ``term``, whole, any case: each an index of the users' table
    (``UPPER(username)``, ``UPPER(email)``: migration ``accounts.0003``), so a search is a probe, never a read of
    every user (Django's ``iexact`` compares ``UPPER(column)``, which the column's own index cannot answer)."""
    return Q(username__iexact=term) | Q(email__iexact=term)


def user_ids_named(term: str, *, at_most: int = 20) -> list[int]:
    """The users a staff search names (``users_named_q``; at most ``at_most``: users sharing one email). The admin
    lists of tables keyed by user (the ledger, the daily rollup, keys, plans, alerts) then read those users' rows
    in their (user, …) index; ``LIKE '%term%'`` on the joined username read every row (docs/ledger.md)."""
    return list(get_user_model().objects.filter(users_named_q(term)).values_list("pk", flat=True)[:at_most])
