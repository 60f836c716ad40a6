"""The test databases of a pytest-xdist run, migrated once: the first worker that needs its database migrates a
template, and every worker (that one too) takes a copy of it as its own database.

Each worker ran every migration on its own database (about 5 CPU-s each, on SQLite), four at once at the start of
a run on two cores: the first test of each waited 20-27 s for its database. Now one migrates while the others wait
on a file lock, and each copies the result: a file copy on SQLite, ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL
(what Django's own parallel runner does, ``_clone_test_db``).

The template is this run's own, named for the controller's pid (``TEMPLATE_OWNER``, set by the controller before
it starts its workers): built fresh each run, it never holds an earlier run's migrations (nor the rows a data
migration or a post_migrate handler wrote with earlier code). The controller removes it when the session ends
(``templates_remove``); each worker's copy is removed by pytest-django's teardown, as its database was. A serial
run, ``--reuse-db`` or ``--nomigrations`` sets the database up as pytest-django does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from django.conf import settings
from filelock import FileLock

# The controller's pid, in the environment its workers inherit.
TEMPLATE_OWNER = "LLMHUB_TEST_DATABASE_TEMPLATE_OWNER"
VENDORS = frozenset({"sqlite", "postgresql"})


def template_owner_set(config) -> None:
    """In the controller of a run (also a serial one, where nothing reads it): the name its workers' template
    takes. Set, not defaulted: a run started from a test of another run has a template of its own."""
    if not hasattr(config, "workerinput"):
        os.environ[TEMPLATE_OWNER] = str(os.getpid())


def template_owner(config) -> str | None:
    """The run whose template this worker copies; None outside a pytest-xdist worker."""
    if not hasattr(config, "workerinput"):
        return None
    return os.environ.get(TEMPLATE_OWNER)


def _files(owner: str, alias: str) -> tuple[Path, Path]:
    """The lock the workers take in turn and the mark of a template built whole, in var/ beside the databases."""
    stem = Path(settings.BASE_DIR) / "var" / f"test-template-{owner}-{alias}"
    return stem.with_suffix(".lock"), stem.with_suffix(".ready")


def template_name(connection, owner: str) -> str:
    if connection.vendor == "sqlite":
        return str(Path(settings.BASE_DIR) / "var" / f"test-template-{owner}-{connection.alias}.sqlite3")
    from django.db.backends.base.creation import TEST_DATABASE_PREFIX

    return f"{TEST_DATABASE_PREFIX}{connection.settings_dict['NAME']}_template_{owner}"


def databases_from_template(owner: str, aliases, serialized_aliases, verbosity: int):
    """``django.test.utils.setup_databases`` for a worker: each database its own copy of the run's template, the
    template migrated by whichever worker comes first. Answers the old config ``teardown_databases`` takes, or
    None when a database is of a vendor it cannot copy (the caller then sets up as Django does)."""
    from django.db import connections

    if any(connections[alias].vendor not in VENDORS for alias in aliases):
        return None
    old_config = []
    for alias in sorted(aliases):
        connection = connections[alias]
        old_name = connection.settings_dict["NAME"]
        template = template_name(connection, owner)
        lock, ready = _files(owner, alias)
        with FileLock(lock):
            if not ready.exists():
                _template_migrate(connection, template, verbosity)
                ready.write_text(template)
            _template_copy(connection, template)
        if alias in serialized_aliases:
            connection._test_serialized_contents = connection.creation.serialize_db_to_string()
        old_config.append((connection, old_name, True))
    return old_config


def _template_migrate(connection, template: str, verbosity: int) -> None:
    """The template migrated as Django creates a test database (``create_test_db``: migrate, the cache tables),
    then closed, so that it may be copied (PostgreSQL copies no database anyone is connected to)."""
    test_settings = connection.settings_dict["TEST"]
    own_name, old_name = test_settings["NAME"], connection.settings_dict["NAME"]
    test_settings["NAME"] = template
    try:
        connection.creation.create_test_db(verbosity=verbosity, autoclobber=True, serialize=False)
    finally:
        test_settings["NAME"] = own_name
        _connection_point(connection, old_name)


def _template_copy(connection, template: str) -> None:
    """This worker's database (the name the settings and pytest-django give it) made a copy of the template, and
    the connection pointed at it."""
    target = connection.creation._get_test_db_name()
    if connection.vendor == "sqlite":
        Path(target).unlink(missing_ok=True)
        shutil.copyfile(template, target)
    else:
        quote = connection.ops.quote_name
        with connection.creation._nodb_cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {quote(target)}")
            cursor.execute(f"CREATE DATABASE {quote(target)} TEMPLATE {quote(template)}")
    _connection_point(connection, target)


def _connection_point(connection, name: str) -> None:
    connection.close()
    if connection.vendor == "postgresql":
        connection.close_pool()
    connection.settings_dict["NAME"] = name
    settings.DATABASES[connection.alias]["NAME"] = name


def templates_remove(blocker) -> None:
    """In the controller, once its workers have ended: this run's templates removed, with their lock and mark."""
    from django.db import connections

    owner = os.environ.get(TEMPLATE_OWNER)
    for alias in connections:
        lock, ready = _files(owner, alias)
        if not lock.exists():
            continue  # no worker made one
        connection = connections[alias]
        template = template_name(connection, owner)
        if connection.vendor == "sqlite":
            Path(template).unlink(missing_ok=True)
        else:
            with blocker.unblock(), connection.creation._nodb_cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {connection.ops.quote_name(template)}")
        ready.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
