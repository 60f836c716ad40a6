"""Every migration of llmhub's apps can be unapplied: each ``RunPython`` has a ``reverse_code``, each ``RunSQL`` a
``reverse_sql``, and no operation is irreversible. A migration's own test runs its reverse (``tests.migrating``),
but only the tested migration's: the others' reverses run nowhere in the suite, and a release that cannot be
rolled back is found out on the day it has to be. Read from the migration files (Django's ``MigrationLoader``,
without a database): nothing is migrated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from django.apps import apps
from django.db import migrations
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.operations.base import Operation

ROOT = Path(__file__).resolve().parent.parent
# Migrations that deliberately cannot be unapplied, (app_label, migration name) -> why; none today.
DELIBERATELY_IRREVERSIBLE: dict[tuple[str, str], str] = {}


def _our_apps() -> set[str]:
    """The installed apps that are packages of this repository (Django's and the libraries' are not ours)."""
    return {config.label for config in apps.get_app_configs() if Path(config.path).parent == ROOT}


def _database_operations(operations: list[Operation]) -> Iterator[Operation]:
    """The operations, and those a ``SeparateDatabaseAndState`` runs on the database (its state operations have
    no reverse to run)."""
    for operation in operations:
        yield operation
        if isinstance(operation, migrations.SeparateDatabaseAndState):
            yield from _database_operations(operation.database_operations)


def _without_reverse(operation: Operation) -> bool:
    if isinstance(operation, migrations.RunPython) and operation.reverse_code is None:
        return True
    if isinstance(operation, migrations.RunSQL) and operation.reverse_sql is None:
        return True
    return not operation.reversible


def irreversible_operations(loader: MigrationLoader) -> list[str]:
    ours = _our_apps()
    return [
        f"{app}.{name}: operation {index} {operation.describe()}"
        for (app, name), migration in sorted(loader.disk_migrations.items())
        if app in ours and (app, name) not in DELIBERATELY_IRREVERSIBLE
        for index, operation in enumerate(_database_operations(migration.operations))
        if _without_reverse(operation)
    ]


def test_every_migration_of_ours_can_be_unapplied() -> None:
    loader = MigrationLoader(None, ignore_no_migrations=True)
    checked = {app for app, _ in loader.disk_migrations if app in _our_apps()}
    assert {"accounts", "audit", "billing", "chat", "experiments", "prompts", "providers"} <= checked

    assert irreversible_operations(loader) == []


def test_an_operation_without_its_reverse_is_named() -> None:
    """The guard itself: a loaded migration given a ``RunPython`` without ``reverse_code``, a ``RunSQL`` without
    ``reverse_sql`` inside a ``SeparateDatabaseAndState`` and an irreversible operation of its own is named for
    each of them."""

    class Irreversible(migrations.RunPython):
        reversible = False

    loader = MigrationLoader(None, ignore_no_migrations=True)
    migration = loader.disk_migrations["billing", "0003_seed_plans"]
    migration.operations = [
        *migration.operations,
        migrations.RunPython(migrations.RunPython.noop),
        migrations.SeparateDatabaseAndState(database_operations=[migrations.RunSQL("SELECT 1")]),
        Irreversible(migrations.RunPython.noop, migrations.RunPython.noop),
    ]

    named = [line for line in irreversible_operations(loader) if line.startswith("billing.0003_seed_plans:")]

    # Not its own RunPython (0, with its reverse) nor the SeparateDatabaseAndState (2) around the RunSQL.
    assert [line.split(" operation ")[1].split()[0] for line in named] == ["1", "3", "4"]
