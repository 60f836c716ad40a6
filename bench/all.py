#!/usr/bin/env python
"""`make bench`: every figure of issue 14, each beside its target, in one run and one summary.

It runs the benchmark's parts one after another, each in its own process with the machine to itself:

* ``postgres``: the served hot path (``bench/run.py``) on a throw-away PostgreSQL, production's database;
* ``sqlite``: the same on SQLite, the embedded default (uvicorn only, unless ``--servers`` says otherwise);
* ``streams``: hundreds of open streams, bursts, WebSocket chats, memory and CPU per stream (``bench/streams.py``);
* ``ledger``: the ledger at 10 million rows on PostgreSQL (``bench/ledger_scale.py``).

Each part keeps its own detailed report in ``bench/results/`` (``served-postgres.md``, ``served-sqlite.md``,
``streams.json``, ``ledger-scale.json``); this script then writes ``bench/results/summary.md`` (and
``.json``): every target of the issue with its figure and met/MISSED (``bench/summary.py``). A part that
cannot run here (no PostgreSQL server installed) is listed as not run, with the reason.

``--quick`` runs every part with small numbers (a few minutes; its files get a ``-quick`` suffix);
``--parts`` picks parts; any other option goes to ``bench/run.py`` for the served parts (``--servers``,
``--duration``, ``--profile``, ``--settings``, ``--no-redis``...). ``--routing-only`` runs only the routing
scenarios, as ``bench/run.py --routing-only``. The full run takes about an hour on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import summary
from llmhub.testing import postgres

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PARTS = ("postgres", "sqlite", "streams", "ledger")
NEEDS_POSTGRES = ("postgres", "ledger")
# The ledger part's size: the 10 million rows; --quick builds a small ledger over fewer days, the smoke
# test's size (tests/bench/test_bench_summary.py runs it end to end): every step and query runs, on 5,000 rows a day.
LEDGER_ROWS, LEDGER_QUICK = ("--rows", "10000000"), ("--rows", "50000", "--insert-rows", "5000", "--days", "10")
# Options of bench/run.py that this script decides for each part.
_OWNED = ("--database", "--output")


def _part_command(part: str, output: Path, *, quick: bool, run_args: list[str]) -> list[str]:
    py = sys.executable
    if part in ("postgres", "sqlite"):
        argv = [py, "bench/run.py", "--database", part, "--output", str(output), *run_args]
        if quick:
            argv.append("--quick")
        if part == "sqlite" and "--servers" not in run_args:
            argv += ["--servers", "uvicorn"]  # the targets are uvicorn's; daphne is measured on PostgreSQL
        return argv
    if part == "streams":
        return [py, "bench/streams.py", "--output", str(output), *(["--quick"] if quick else [])]
    return [py, "-m", "bench.ledger_scale", "--output", str(output), *(LEDGER_QUICK if quick else LEDGER_ROWS)]


_OUTPUT_NAMES = {
    "postgres": "served-postgres",
    "sqlite": "served-sqlite",
    "streams": "streams",
    "ledger": "ledger-scale",
}


def _output(part: str, *, quick: bool, directory: Path) -> Path:
    """Where the part writes its results (and a later summary finds them)."""
    return directory / f"{_OUTPUT_NAMES[part]}{'-quick' if quick else ''}.json"


def run_part(part: str, *, quick: bool, run_args: list[str], directory: Path = RESULTS) -> dict[str, Any]:
    """The part's results, or ``{"not_run": why}`` / ``{"failed": why}``."""
    if part in NEEDS_POSTGRES and postgres.server_bin() is None:
        return {"not_run": "no PostgreSQL server installed here (apt-get install postgresql)"}
    output = _output(part, quick=quick, directory=directory)
    output.unlink(missing_ok=True)  # a file of an earlier run must not pass for this one's
    argv = _part_command(part, output, quick=quick, run_args=run_args)
    print(f"\n== make bench, part {part}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    # The child's output goes straight to ours: each part prints its progress and its own report.
    code = subprocess.call(argv, cwd=ROOT)
    took = time.monotonic() - started
    # A part exits 1 when one of its own targets is missed (the ledger's, say): what counts is its figures.
    if not output.exists():
        return {"failed": f"exited {code} after {took:.0f} s without its results (its output above says why)"}
    results = json.loads(output.read_text())
    results["_exit_code"] = code
    results["_seconds"] = round(took)
    return results


def earlier_part(part: str, *, quick: bool, directory: Path = RESULTS) -> dict[str, Any]:
    """A part not asked for this time: the results its last run left in ``directory``, marked ``_earlier``
    with when (or on which code) that run was, so that rerunning one part keeps the others' figures in the
    summary, said as older; ``{"not_run": why}`` if there are none."""
    output = _output(part, quick=quick, directory=directory)
    try:
        results = json.loads(output.read_text())
    except (OSError, ValueError):
        return {"not_run": "not asked for (--parts), and no earlier results"}
    when = results.get("when") or (f"code {results['code']}" if results.get("code") else "date not recorded")
    results["_earlier"] = when
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every part with small numbers (a few minutes)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from %(default)s")
    parser.add_argument(
        "--routing-only", action="store_true", help="only bench/run.py's routing scenarios (bench/results/routing.md)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where every file goes (default: %(default)s)")
    args, run_args = parser.parse_known_args(argv)
    if args.routing_only:
        return subprocess.call([sys.executable, "bench/run.py", "--routing-only", *run_args], cwd=ROOT)
    owned = [option for option in run_args if option.split("=")[0] in _OWNED]
    if owned:
        parser.error(f"{', '.join(owned)}: make bench decides these for each part; pick parts with --parts")
    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))} (from {', '.join(PARTS)})")
    args.results.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load = os.getloadavg()[0]
    results = {part: run_part(part, quick=args.quick, run_args=run_args, directory=args.results) for part in parts}
    for part in PARTS:
        if part not in results:
            results[part] = earlier_part(part, quick=args.quick, directory=args.results)
    found = summary.rows(results)
    suffix = "-quick" if args.quick else ""
    heading = (
        f"# make bench{' --quick' if args.quick else ''}: every target of issue 14\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {round(time.monotonic() - started)} s,"
        f" load average {load:.2f} at the start on {os.cpu_count()} cores. Each part's own report has the"
        " details and the method (docs/performance.md, docs/streams.md, docs/ledger.md)."
    )
    text = summary.markdown(found, heading=heading)
    (args.results / f"summary{suffix}.md").write_text(text)
    (args.results / f"summary{suffix}.json").write_text(
        json.dumps([row.__dict__ for row in found], indent=2, ensure_ascii=False) + "\n"
    )
    print("\n" + text, flush=True)
    print(f"make bench: wrote {args.results / f'summary{suffix}.md'}", flush=True)
    return 1 if any(row.verdict == "failed" for row in found) else 0


if __name__ == "__main__":
    raise SystemExit(main())
