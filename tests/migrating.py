"""A database taken to a migration, for the tests of what a migration does to the rows it finds: ``migrated_to``
answers the historical apps at the migration before the one tested (today's models read columns the tables do
not have yet), the test writes its rows through them and migrates on (or back) with ``migrate``, and the test's
own database is at the latest state of every app however the test ends, as the tests after it expect.

The database is mostly an empty one of the block's own, migrated forward: the test's database is at the latest
state, and taking it back to an early migration unapplied every migration that depends on it in every app (82 for
providers 0004 and billing 0007, 85 for providers 0001), each unapply rendering the models of its state again,
and restoring it applied them all once more: 15 CPU-s for providers 0001, where an empty database runs the one
migration it depends on. A target that few migrations depend on (providers 0029: 2) is still reached by taking
the test's own database back and forward again, which runs fewer.

Such a test runs with ``django_db(transaction=True)``: migrations change the schema, which the rollback of a
test's transaction would not undo on every database; and the block's database is another one."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

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


def _fewer_going_back(targets: Targets) -> bool:
    """Whether taking the test's database back to ``targets`` and forward again runs fewer migrations than taking
    an empty one forward to them: the migrations undone run twice, and an unapply costs more than an apply."""
    executor = MigrationExecutor(connection)
    undone = len(executor.migration_plan(targets))
    from_empty = {node for target in targets for node in executor.loader.graph.forwards_plan(target)}
    return 2 * undone < len(from_empty)


@contextlib.contextmanager
def _database_of_its_own() -> Iterator[None]:
    """This thread's default connection on an empty database for the block (a file beside the test database on
    SQLite, a database of the same cluster on PostgreSQL), dropped after it. Only this thread's connection is
    pointed there: its ``settings_dict`` is replaced, not changed, so the other threads' stay on the test's."""
    own = connection.settings_dict
    token = f"migrating_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    if connection.vendor == "postgresql":
        name = f"{own['NAME'][: 62 - len(token)]}_{token}"  # within PostgreSQL's 63 characters
        with connection._nodb_cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    else:
        assert connection.vendor == "sqlite", connection.vendor
        name = str(Path(own["NAME"]).with_suffix(f".{token}.sqlite3"))
    connection.close()
    connection.settings_dict = {**own, "NAME": name}
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict = own
        if connection.vendor == "postgresql":
            with connection._nodb_cursor() as cursor:
                cursor.execute(f'DROP DATABASE "{name}"')
        else:
            for path in (Path(name), Path(f"{name}-journal")):
                path.unlink(missing_ok=True)


def _next_in_their_apps(targets: Targets) -> Targets:
    """The migrations right after ``targets`` in their apps: the ones their tests are about."""
    graph = MigrationExecutor(connection).loader.graph
    return sorted(
        {child.key for app, name in targets for child in graph.node_map[app, name].children if child.key[0] == app}
    )


@contextlib.contextmanager
def migrated_to(targets: Targets) -> Iterator[Apps]:
    """A database at ``targets``, with its historical apps, for the block; the test's own database at the latest
    state of every app after it, whether the block passed, failed or migrated elsewhere.

    The database is an empty one of its own, taken forward over the migrations right after ``targets`` and back, so
    that the reverse of the migration tested runs, as it did on the way back from the latest state (it runs on
    tables without rows; the test runs it on its rows when it migrates back); or the test's own database taken back,
    when that runs fewer migrations (a target that few migrations depend on). Rows are written and read in the
    block: after it they are gone, or on the test's database."""
    if _fewer_going_back(targets):
        try:
            yield migrate(targets)
        finally:
            migrate(latest())
    else:
        with _database_of_its_own():
            if tested := _next_in_their_apps(targets):
                migrate(tested)
            yield migrate(targets)
