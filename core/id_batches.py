"""Lists of primary keys too long for one statement, named a batch at a time.

A statement names at most so many values: SQLite's build limits its variables (999 before 3.32, 32,766 upstream
since, 250,000 in Debian's), PostgreSQL's protocol 65,535 parameters. An ``IN`` of every row an admin selected
across a list (a year of one user's data) is past all of them; Django's own deletion batches what it collects, but
a ``filter(pk__in=…)`` of ours does not."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# Under Django's own assumption for SQLite (``max_query_params``, 999), leaving room for a statement's other values.
IDS_A_STATEMENT = 900


def id_batches(ids: Iterable[T], size: int = IDS_A_STATEMENT) -> Iterator[list[T]]:
    """``ids`` in lists of at most ``size``, in their order."""
    batch: list[T] = []
    for value in ids:
        batch.append(value)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
