"""A pytest-xdist run migrates one database and gives each worker a copy (tests/database_template.py): checked in a
run of its own, whose workers each record the database they were given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.database_template import TEMPLATE_OWNER

ROOT = Path(__file__).resolve().parent.parent
# Where the workers of the run started below record their database; unset, the probe has nothing to do.
PROBE = "LLMHUB_TEST_DATABASE_PROBE"
UNUSED_PLUGINS = ("schemathesis", "hypothesispytest", "faker", "anyio")


@pytest.mark.django_db
def test_probe_records_this_workers_database() -> None:
    """Not a test of its own: each worker of the run started by the test below records its database here."""
    if not os.environ.get(PROBE):
        pytest.skip("a probe of the run that test_the_workers_of_a_run_copy_one_database_migrated_once starts")
    from django.db import connection
    from django.db.migrations.recorder import MigrationRecorder

    rows = MigrationRecorder.Migration.objects.order_by("id").values_list("app", "name", "applied")
    record = {
        "name": connection.settings_dict["NAME"],
        "owner": os.environ.get(TEMPLATE_OWNER),
        "migrations": [[app, name, applied.isoformat()] for app, name, applied in rows],
    }
    Path(os.environ[PROBE], os.environ["PYTEST_XDIST_WORKER"] + ".json").write_text(json.dumps(record))


@pytest.mark.timeout(300)  # a pytest run of its own, two workers and the migrations, on a loaded CI
def test_the_workers_of_a_run_copy_one_database_migrated_once(tmp_path) -> None:
    from django.db.migrations.loader import MigrationLoader

    left_out = {"TEST_DATABASE_URL", TEMPLATE_OWNER, "LLMHUB_TEST_METRICS_OWNER"}
    env = {name: value for name, value in os.environ.items() if name not in left_out and not name.startswith("PYTEST_")}
    env[PROBE] = str(tmp_path)
    probe = f"{Path(__file__).relative_to(ROOT)}::test_probe_records_this_workers_database"
    # Without the plugins the probe has no use for (schemathesis's, hypothesis's, faker's, anyio's): each imports
    # its library in the controller and in both workers, about 1 CPU-s of the run's 3 starts together.
    unused = [option for plugin in UNUSED_PLUGINS for option in ("-p", f"no:{plugin}")]
    argv = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "each", "-q", "-p", "no:cacheprovider", *unused, probe]
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280, check=False)
    assert run.returncode == 0, run.stdout + run.stderr

    records = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("gw*.json"))]
    assert len(records) == 2, run.stdout
    first, second = records
    # Each worker has a database of its own, with every migration on disk applied ...
    assert first["name"] != second["name"]
    on_disk = set(MigrationLoader(None, ignore_no_migrations=True).disk_migrations)
    assert {(app, name) for app, name, _ in first["migrations"]} == on_disk
    # ... by one migration of the run: the same rows, down to the instant each was applied.
    assert first["migrations"] == second["migrations"]
    # When the run ends, neither the workers' databases nor the template they copied are left behind.
    assert not [record["name"] for record in records if Path(record["name"]).exists()]
    assert not list((ROOT / "var").glob(f"test-template-{first['owner']}-*"))
