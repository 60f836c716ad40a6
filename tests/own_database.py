"""The schema of a test's own PostgreSQL (``own_postgres``), migrated once per test run: ``migrate(url, env,
tmp_path_factory)`` runs ``manage.py migrate`` the first time, in a process of its own as a server's deployment
would, and keeps a ``pg_dump`` of the database it left; every later call restores that dump with ``psql`` into
its fresh, empty database, the same tables, rows (the ``django_migrations`` rows, content types, permissions, the
role groups) and sequences, without loading Django and every migration again (about 10 s of CPU each).

The dump is shared by the run's xdist workers (beside their temporary directories, behind a lock), so one of
them migrates and the others wait for it; pytest removes it with the run's temporary directories. Within a run
the migrations and the settings do not change, so what a restore gives is what a migrate would have."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmhub.testing.postgres import server_bin

ROOT = Path(__file__).resolve().parents[1]


def _shared_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base is popen-gwN inside the run's: the run's is shared by every worker.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def migrate(url: str, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """The database of ``url`` (fresh, empty) as ``manage.py migrate`` under ``env`` leaves it."""
    bindir = server_bin()
    assert bindir is not None  # own_postgres skipped the test otherwise
    directory = _shared_directory(tmp_path_factory)
    dump = directory / "llmhub-migrated-schema.sql"
    with (directory / "llmhub-migrated-schema.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dump.exists():
            migrate_command = [sys.executable, "manage.py", "migrate", "--noinput"]
            subprocess.run(migrate_command, cwd=ROOT, env=env, check=True, capture_output=True)
            partial = dump.with_suffix(".partial")
            subprocess.run(
                [str(bindir / "pg_dump"), "--no-owner", "--no-privileges", "--file", str(partial), "--dbname", url],
                check=True,
                capture_output=True,
            )
            partial.rename(dump)
            return
    subprocess.run(
        [str(bindir / "psql"), "--quiet", "--no-psqlrc", "-v", "ON_ERROR_STOP=1", "--file", str(dump), url],
        check=True,
        capture_output=True,
    )
