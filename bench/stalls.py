"""What stalls a request at p99: sequential requests in-process, each timed, beside what ran at the same time.

``python bench/stalls.py`` seeds a throw-away database (SQLite by default, ``--database postgres``), starts nginx
(canned OpenAI JSON) and drives llmhub's ASGI application in-process, one request at a time, as
``bench/profile_request.py`` does. Measurement only, from outside the code: the ledger's batch write
(``billing.services.ledger._write_rows``) is wrapped to note when each write ran and for how long, and a
sampler task notes how late the event loop wakes up (its lag). Each request is then classed as overlapping a
ledger write or not, and the report gives the p50 / p99 / max of each class, the write times, and the lag.
The rows' batches are in the write times: ``writes`` and ``rows_per_write``.

``--what-if`` runs the same with a change applied from outside (``bench/whatif.py``), to see a fix pay before
it is made: ``short-switch-interval``, ``no-request-signals``, and ``no-ledger-write`` (the batch write skipped:
what the ledger's insert costs the other requests), ``no-linger`` (the writer's batch written at every
wake-up, as before ``LLMHUB_LEDGER_LINGER_MS``), ``no-wal-autocheckpoint`` (SQLite's WAL checkpoint, with its
fsync, no longer run by the committing connection every 1000 pages); ``census`` also counts the objects the
garbage collector tracks, by type, before and after the run (what grows), and ``garbage`` what the run left
in reference cycles (what only the garbage collector frees). ``--budgeted`` sends every request on a key
with a budget, so that admission reserves and the writer settles. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": round(ordered[len(ordered) // 2], 3),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max": round(ordered[-1], 3),
    }


def _census() -> dict[str, int]:
    """Objects the garbage collector tracks, by type, after a full collection."""

    gc.collect()
    return dict(collections.Counter(type(item).__qualname__ for item in gc.get_objects()))


def _census_growth(before: dict[str, int]) -> dict[str, Any]:
    after = _census()
    grown = {name: after.get(name, 0) - before.get(name, 0) for name in set(before) | set(after)}
    top = sorted(grown.items(), key=lambda item: -item[1])[:15]
    sized = []
    for item in gc.get_objects():
        try:
            size = len(item) if isinstance(item, (list, dict, set, tuple, collections.deque)) else 0
        except TypeError:
            continue
        if size > 5000:
            sized.append((size, type(item).__qualname__, repr(item)[:120]))
    sized.sort(reverse=True)
    return {
        "tracked_before": sum(before.values()),
        "tracked_after": sum(after.values()),
        "top": top,
        "largest_containers": sized[:10],
    }


def child(requests: int, key: str, what_if: set[str]) -> dict[str, Any]:
    from bench.profile_request import _request, _setup

    application = _setup(what_if - {"no-ledger-write", "no-wal-autocheckpoint", "no-linger", "census", "garbage"})
    if "no-linger" in what_if:
        from django.conf import settings

        settings.LLMHUB_LEDGER_LINGER_MS = 0  # every wake-up of the ledger's writer writes at once
    if "no-wal-autocheckpoint" in what_if:
        from django.db.backends.signals import connection_created

        def no_autocheckpoint(sender: Any, connection: Any, **kwargs: Any) -> None:
            if connection.vendor == "sqlite":
                with connection.cursor() as cursor:
                    cursor.execute("PRAGMA wal_autocheckpoint=0")

        connection_created.connect(no_autocheckpoint, weak=False)
    from billing.services import ledger

    writes: list[tuple[float, float, str]] = []  # (start, end, thread)
    original = ledger._write_rows

    def timed_write_rows(rows: list[Any], settled: Any = ()) -> None:
        started = time.perf_counter()
        try:
            if "no-ledger-write" not in what_if:
                original(rows, settled)
        finally:
            writes.append((started, time.perf_counter(), threading.current_thread().name))

    ledger._write_rows = timed_write_rows
    body = json.dumps({"model": "bench-json", "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    path = "/v1/chat/completions"

    async def run() -> dict[str, Any]:
        lags: list[float] = []
        stop = False

        async def sampler() -> None:
            loop = asyncio.get_running_loop()
            while not stop:
                expected = loop.time() + 0.001
                await asyncio.sleep(0.001)
                lags.append((loop.time() - expected) * 1000)

        for _ in range(50):
            await _request(application, path, body, key)
        census_before = _census() if "census" in what_if else None
        if "garbage" in what_if:
            gc.collect()
            gc.freeze()
            gc.set_debug(gc.DEBUG_SAVEALL)
        writes.clear()
        sampling = asyncio.create_task(sampler())
        spans: list[tuple[float, float]] = []
        cpu_started = time.process_time()
        for _ in range(requests):
            started = time.perf_counter()
            status, content, _first = await _request(application, path, body, key)
            spans.append((started, time.perf_counter()))
            if status != 200:
                raise SystemExit(f"stalls: {status} {content[:300]!r}")
        cpu_ms = (time.process_time() - cpu_started) * 1000 / requests
        stop = True
        await sampling
        await ledger.ledger_flush()
        grown = _census_growth(census_before) if census_before is not None else None
        if "garbage" in what_if:
            gc.collect()
            kinds = collections.Counter(type(item).__qualname__ for item in gc.garbage)
            grown = {"cyclic_garbage_per_request": len(gc.garbage) / requests, "kinds": kinds.most_common(40)}
            gc.set_debug(0)
            gc.garbage.clear()
        overlapping, alone = [], []
        for start, end in spans:
            wall = (end - start) * 1000
            hit = any(w_start < end and w_end > start for w_start, w_end, _ in writes)
            (overlapping if hit else alone).append(wall)
        slowest = sorted(spans, key=lambda span: span[0] - span[1])[: max(1, requests // 100)]
        slow_with_write = sum(1 for s, e in slowest if any(ws < e and we > s for ws, we, _ in writes))
        return {
            "what_if": sorted(what_if),
            "requests": requests,
            "all_ms": _percentiles([(e - s) * 1000 for s, e in spans]),
            # The process's CPU (every thread: the ledger's writes too, and the loop-lag sampler's wake-ups).
            "cpu_ms_per_request": round(cpu_ms, 3),
            "overlapping_a_ledger_write_ms": _percentiles(overlapping),
            "not_overlapping_ms": _percentiles(alone),
            "slowest_1pct_overlapping_a_write": f"{slow_with_write} of {len(slowest)}",
            "ledger_writes_ms": _percentiles([(e - s) * 1000 for s, e, _ in writes]),
            "writes": len(writes),
            "rows_per_write": round(requests / len(writes), 2) if writes else None,
            "ledger_write_threads": len({t for _, _, t in writes}),
            "loop_lag_ms": _percentiles(lags),
            **({"objects_grown": grown} if grown is not None else {}),
        }

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="requests per variant")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--what-if", action="append", default=[], help="a variant (comma-separated what-ifs)")
    parser.add_argument("--rounds", type=int, default=2, help="each variant this many times, in turns")
    parser.add_argument(
        "--budgeted", action="store_true", help="on a key with a budget: admission reserves, the writer settles"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--key", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        what_if = {name for item in args.what_if for name in item.split(",") if name}
        print(json.dumps(child(args.n, args.key, what_if)))
        return 0

    import contextlib

    from bench import run, upstream
    from llmhub.testing import postgres

    work = Path(tempfile.mkdtemp(prefix="bench-stalls-"))
    run.WORK = work  # bench_environment puts the ledger spool there
    processes = run.Processes(work=work)  # its logs beside the run's files
    results = []
    try:
        with contextlib.ExitStack() as stack, run.stopped_on_signals(processes):
            if args.database == "postgres":
                database_url = stack.enter_context(postgres.throwaway_postgres(max_connections=50))
                postgres.createdb(database_url)
            else:
                database_url = f"sqlite:///{work / 'stalls.sqlite3'}"
            run.ensure_tools()
            nginx_port, *route_ports = run.free_ports(3)
            upstreams = {"bench-json": f"http://127.0.0.1:{nginx_port}/json/v1"}
            env = run.bench_environment(upstreams, "", database_url)
            env["BENCH_ROUTED_MODELS"] = "{}"
            (work / "nginx.conf").write_text(upstream.nginx_conf(work, nginx_port, tuple(route_ports)))
            nginx = processes.start(
                "nginx", [upstream.nginx_binary(), "-c", str(work / "nginx.conf"), "-p", str(work)], env
            )
            run.wait_for_port(nginx_port, nginx, "nginx")
            run.django_command(env, "manage.py", "migrate", "--noinput", "-v", "0")
            keys = json.loads(run.django_command(env, "-m", "bench.db", "seed"))
            variants = args.what_if or [""]
            for round_number in range(args.rounds):
                for variant in variants[round_number % len(variants) :] + variants[: round_number % len(variants)]:
                    key = keys["budgeted_key" if args.budgeted else "key"]
                    argv_child = [sys.executable, "bench/stalls.py", "--child", "-n", str(args.n), "--key", key]
                    if variant:
                        argv_child += ["--what-if", variant]
                    done = subprocess.run(argv_child, cwd=run.ROOT, env=env, capture_output=True, text=True)
                    if done.returncode != 0:
                        raise SystemExit(done.stdout + done.stderr)
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result.update(round=round_number, database=args.database, load=os.getloadavg()[0])
                    result.update(budgeted=args.budgeted)
                    results.append(result)
                    print(json.dumps(result), file=sys.stderr)
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
