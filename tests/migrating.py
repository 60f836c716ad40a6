"""The database taken back to a migration and forward again, for the tests of what a migration does to the rows
it finds: ``migrated_to`` migrates to the migration before the one tested and answers the historical models there
(today's models read columns the tables do not have yet), the test writes its rows through them and migrates on
with ``migrate``, and the latest state of every app is restored however the test ends, so that the tests after it
find the schema they expect. Such a test runs with ``django_db(transaction=True)``: migrations change the schema,
which the rollback of a test's transaction would not undo on every database."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from django.apps.registry import Apps
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

# The migrations to reach, each app's (app_label, migration_name); an app left out stays where it is.
Targets = list[tuple[str, str]]


def migrate(targets: Targets) -> Apps:
    """Run the migrations, forward or back, to ``targets`` and answer the historical apps there (a fresh executor
    for each: one keeps the graph and the applied migrations it loaded)."""
    MigrationExecutor(connection).migrate(targets)
    return MigrationExecutor(connection).loader.project_state(targets).apps


def latest() -> Targets:
    """The last migration of every app: the schema today's models and the other tests expect."""
    return MigrationExecutor(connection).loader.graph.leaf_nodes()


@contextlib.contextmanager
def migrated_to(targets: Targets) -> Iterator[Apps]:
    """The database at ``targets``, with its historical apps, for the block; the latest state of every app after
    it, whether the block passed, failed or migrated elsewhere."""
    try:
        yield migrate(targets)
    finally:
        migrate(latest())
