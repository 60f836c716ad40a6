"""``bench/streams.py --quick`` runs end to end, so that the streams benchmark cannot rot: it starts its own
fake upstream and uvicorn on a throw-away SQLite database, and its report names every figure with its
target. Nothing timed is asserted (the machine is shared); what is asserted is what must hold at any speed:
no stream failed, every WebSocket chat completed, and every request sent has its ledger row.

In a pytest-xdist run its database is a copy of the run's migrated template (tests/database_template.py), not
migrated again (``--migrated-database``; a migration is 9 CPU-s of this 2-core machine); a serial run migrates as
``make bench`` does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def migrated_database(request) -> list[str]:
    """``--migrated-database`` and this xdist run's migrated SQLite template (which ``django_db_setup`` builds when
    any test of the run uses the database; the benchmark copies it); nothing in a serial run, on another database
    or in a run that needs none, where the benchmark migrates."""
    from django.db import connection

    from tests.database_template import template_name, template_owner

    owner = template_owner(request.config)
    if owner is None or connection.vendor != "sqlite":
        return []
    request.getfixturevalue("django_db_setup")
    template = template_name(connection, owner)
    return ["--migrated-database", template] if Path(template).exists() else []


@pytest.mark.timeout(600)
def test_the_quick_streams_benchmark_reports_every_figure_and_loses_no_ledger_row(tmp_path, migrated_database):
    output = tmp_path / "streams.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "streams.py"), "--quick", "--output", str(output), *migrated_database],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(output.read_text())
    (server,) = results["servers"]
    for point in server["steady"]:
        assert point["llmhub"]["errors"] == 0 and point["direct"]["errors"] == 0, point
        assert point["llmhub"]["timed"] > 0 and point["added_ttft_p50_ms"] is not None
        assert point["rss_per_stream_kib"] is not None
        # The ceiling beside it: the same schedule through the bare aiohttp view.
        assert point["bare"]["errors"] == 0 and point["bare"]["timed"] > 0, point
        assert point["bare_added_ttft_p50_ms"] is not None
    assert server["burst"]["llmhub"]["errors"] == 0 and server["burst"]["bare"]["errors"] == 0
    assert server["ws"]["errors"] == 0 and server["ws"]["completed"] == server["ws"]["chats"]
    assert server["cpu"]["errors"] == 0 and server["cpu"]["long_chunks"] > server["cpu"]["short_chunks"]
    assert server["rss"]["failures"] == 0
    ledger = results["ledger"]
    assert ledger["rows"] + ledger["spooled"] == ledger["sent"], ledger
    for figure in ("added TTFT p50", "added TTFT p99", "burst of", "CPU per relayed chunk", "CPU per stream start"):
        assert figure in completed.stdout
    assert "the bare aiohttp view's added TTFT" in completed.stdout
    assert "≤ 20 ms" in completed.stdout and "within 10 %" in completed.stdout
