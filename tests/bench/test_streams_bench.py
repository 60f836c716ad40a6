"""``bench/streams.py --quick`` runs end to end, so that the streams benchmark cannot rot: it starts its own
fake upstream and uvicorn on a throw-away SQLite database, and its report names every figure with its
target. Nothing timed is asserted (the machine is shared); what is asserted is what must hold at any speed:
no stream failed, every WebSocket chat completed, and every request sent has its ledger row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_the_quick_streams_benchmark_reports_every_figure_and_loses_no_ledger_row(tmp_path):
    output = tmp_path / "streams.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "streams.py"), "--quick", "--output", str(output)],
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
