#!/usr/bin/env python
"""`make bench`: how much llmhub adds on top of its upstream, under uvicorn and under daphne.

Everything runs on this machine and talks over 127.0.0.1 only:

* upstreams: nginx answering canned OpenAI JSON and SSE in microseconds (``bench/upstream.py``: what
  is left is our cost), and the bundled fake provider streaming at 50 tokens/s (a realistic stream);
* llmhub, started with each production server command on ``bench.settings`` (the production settings
  on a throw-away PostgreSQL, production's database, or with ``--database sqlite`` or without PostgreSQL
  installed a SQLite file; Redis for admission, installed when missing, unless ``--no-redis``), one worker
  process, key auth and the ledger on. Two keys: one on a plan that enforces nothing, one with a budget
  and a rate limit (every request reserves and settles);
* in the same server, ``bench/bare.py``: a Django view that forwards the body to the same upstream with
  no auth, no ledger and no SDK, the ceiling of the stack llmhub is built on.

``wrk`` drives non-streamed and streamed requests at concurrency 1, 32 and 128, llmhub and the bare view
back to back at each point; a sequential Python client times the first streamed ``data:`` line (wrk
sees whole responses only).

Routing (issue 10): three catalog models answered by nginx's canned JSON, taken in turns at concurrency 1
over several rounds: (a) ``bench-json``, one deployment; (b) ``bench-route-3``, three deployments on three
nginx ports, equal weights; (c) ``bench-route-3-down``, the same two healthy ports and a third deployment on a
fake upstream listener that refuses connections, its breaker forced open (``breaker_override``). Routing must
add at most 0.1 ms to (a)'s p50, and (c)'s p50 and p99 must not move from (b)'s. ``bench/routing.py`` times
the routing calls themselves in-process. ``--routing-only`` runs just these.

The figures are printed as markdown and written to ``bench/results/latest.json`` and ``latest.md``.
``--quick`` is a shorter run; ``--profile`` adds the profiles of ``bench/profiling.py``. Every process it
starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

# `make bench` runs this file as a script; its siblings are imported as the package they are.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import profiling, report, upstream
from bench.load import Meter, children_of, first_token_series, request_body, run_wrk
from llmhub.testing import postgres

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Under bench/results/*.tmp, which git ignores: the database, the nginx configuration, the logs.
WORK = RESULTS / "run.tmp"
VENV_BIN = Path(sys.executable).parent
PY = sys.executable
# Four words at 50 tokens/s: a short reply keeps 200 sequential streams within a few seconds.
TIMED_CONTENT = "[[words=4]] Say hello."
LLMHUB_PATH = "/v1/chat/completions"
BARE_PATH = "/bare/v1/chat/completions"
BARE_AIOHTTP_PATH = "/bare-aiohttp/v1/chat/completions"
# The two ceilings, side by side (issue 14): the report measures llmhub against the faster at each point.
BARES = [("bare", BARE_PATH, ""), ("bare-aiohttp", BARE_AIOHTTP_PATH, "")]
# Two uvicorn workers against one, llmhub json at this concurrency (target: ≥ 1.7× the requests per second).
WORKERS_CONCURRENCY = 64


@dataclass(frozen=True)
class Plan:
    duration: int  # seconds per wrk point
    warmup: int  # seconds of wrk before the points of one kind of request
    ttft_requests: int
    concurrencies: tuple[int, ...]
    stream_concurrencies: tuple[int, ...]
    budget_concurrencies: tuple[int, ...]
    route_rounds: int  # rounds of the routing scenarios, each taken in turns within a round
    route_duration: int  # seconds per routing point
    in_process_rounds: int  # rounds of the routing scenarios' whole request in-process (a process each)
    in_process_requests: int  # requests per in-process point


# Routing points are short and many: a tenth of a millisecond is found only in differences taken seconds apart.
FULL = Plan(10, 2, 200, (1, 32, 128), (1, 32, 128), (1, 32), 20, 2, 6, 1500)
# Quick: one in-process round (each point is a process of its own, about 5 s to start): a smoke run.
QUICK = Plan(3, 1, 30, (1, 32), (32,), (32,), 4, 1, 1, 300)
# (name, catalog model): one deployment; three healthy ones; three of which one refuses with its breaker open.
ROUTING_SCENARIOS = (("one", "bench-json"), ("three", "bench-route-3"), ("three-one-down", "bench-route-3-down"))


def say(message: str) -> None:
    print(message, flush=True)


# --- processes --------------------------------------------------------------------------------------------


@dataclass
class Processes:
    """Every process the benchmark starts, each in its own process group, stopped together at the end."""

    running: list[subprocess.Popen[bytes]] = field(default_factory=list)
    work: Path = WORK  # where each process's log goes (bench/streams.py keeps its own)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # The child keeps its own copy of the descriptor: closing ours right after the start is fine.
        with open(self.work / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
        """SIGTERM (a graceful stop: uvicorn runs the lifespan shutdown), then SIGKILL for what remains."""
        if process in self.running:
            self.running.remove(process)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                say(f"  process {process.pid} ignored SIGTERM for {timeout:.0f}s; killing it")
        # Children a server left behind (a worker) go with its group either way.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        return process.returncode

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process, timeout=10.0)


def free_ports(count: int) -> list[int]:
    """Ports in 19100-19999 that nothing listens on (the other servers of the project use 8000 and 18080)."""
    found: list[int] = []
    for port in range(19100, 20000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise SystemExit("bench: no free port in 19100-19999")


def wait_for_port(port: int, process: subprocess.Popen[bytes], name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: {name} exited with {process.returncode}; see {WORK / (name + '.log')}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: {name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def peak_rss_kib(pid: int) -> int:
    """VmHWM (the peak resident set) of ``pid`` plus its children: a multi-process server counts whole."""
    total = 0
    for candidate in [pid, *children_of(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


def ensure_tools(*, redis: bool = False) -> None:
    """nginx (the fast upstream), wrk (the load) and, with ``redis``, redis-server (the admission store) come from
    Debian; install them when missing. A run without Redis measures another configuration (admission and the
    in-flight registry on the database), so a fresh machine must not fall back to it silently."""
    wanted = {"nginx": "nginx", "wrk": "wrk", **({"redis-server": "redis-server"} if redis else {})}
    missing = [
        package
        for name, package in wanted.items()
        if not shutil.which(name) and not Path(f"/usr/sbin/{name}").exists() and not Path(f"/usr/bin/{name}").exists()
    ]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"bench: {' and '.join(missing)} missing; install with: sudo apt-get install -y {' '.join(missing)}"
            + ("" if "redis-server" not in missing else " (or --no-redis to measure admission on the database)")
        )
    say(f"bench: {' and '.join(missing)} not found: running apt-get update && apt-get install -y {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


# --- servers ----------------------------------------------------------------------------------------------


def server_argv(server: str, app: str, port: int, workers: int = 1) -> list[str]:
    """The production server commands, one worker process each (the 2 cores are shared with wrk and nginx),
    unless ``workers`` asks for more (uvicorn only: the two-worker scaling point)."""
    if server == "daphne":
        return [str(VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), app]
    common = [str(VENV_BIN / "uvicorn"), app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    common += ["--lifespan", "on", "--log-level", "warning"]
    if workers > 1:
        common += ["--workers", str(workers)]
    if server == "uvicorn":
        return [*common, "--loop", "auto", "--http", "auto"]
    if server == "uvicorn-h11":
        return [*common, "--loop", "asyncio", "--http", "h11"]
    raise SystemExit(f"bench: unknown server {server!r} (uvicorn, uvicorn-h11, daphne)")


def uvicorn_auto_choice() -> dict[str, str]:
    """What uvicorn's ``auto`` picks here: uvloop and httptools when installed, else asyncio and h11."""
    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }


def lifespan_probe(processes: Processes, server: str, port: int, env: dict[str, str]) -> list[str]:
    """The ASGI events ``server`` delivers to an app over a start, one request and a SIGTERM."""
    notes = WORK / f"lifespan-{server}.txt"
    notes.unlink(missing_ok=True)
    process = processes.start(
        f"lifespan-{server}",
        server_argv(server, "bench.lifespan_probe:application", port),
        {**env, "BENCH_PROBE_FILE": str(notes)},
    )
    wait_for_port(port, process, f"lifespan-{server}")
    httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    processes.stop(process)
    return notes.read_text().splitlines() if notes.exists() else []


def shutdown_probe(
    processes: Processes,
    server: str,
    port: int,
    env: dict[str, str],
    key: str,
    extra_args: tuple[str, ...] = (),
    streams: int = 16,
) -> dict[str, Any]:
    """SIGTERM while ``streams`` requests are streaming: how many of them reach the ledger (or its spool)?

    A graceful stop finishes or cancels each request, and every request's ledger row is written in a
    background task afterwards: only a server that waits for those tasks (llmhub's lifespan shutdown runs
    ``ledger_flush``) keeps them all. ``extra_args`` go to the server command, e.g. uvicorn's
    ``--timeout-graceful-shutdown``, after which it cancels the requests still running."""
    spool = WORK / "ledger-spool.jsonl"
    before = sum(json.loads(django_command(env, "-m", "bench.db", "ledger")).values())
    spooled_before = len(spool.read_text().splitlines()) if spool.exists() else 0
    argv = [*server_argv(server, "llmhub.asgi:application", port), *extra_args]
    if "--timeout-graceful-shutdown" in extra_args:
        # llmhub's own grace period (LLMHUB_SHUTDOWN_GRACE_SECONDS, 20 s) comes before uvicorn's: shorten it
        # so that this variant still cuts the two-second streams.
        env = {**env, "LLMHUB_SHUTDOWN_GRACE_SECONDS": "0.5"}
    process = processes.start(f"shutdown-{server}", argv, env)
    wait_for_port(port, process, f"shutdown-{server}")
    # 100 words at 50 tokens/s: two seconds of stream, so that all of them are in flight at the signal.
    body = request_body("bench-timed", stream=True, content="[[words=100]] Tell a long story.")
    url = f"http://127.0.0.1:{port}{LLMHUB_PATH}"
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    async def one(client: httpx.AsyncClient) -> str:
        try:
            async with client.stream("POST", url, content=body, headers=headers) as response:
                lines = [line async for line in response.aiter_lines()]
            if any("server_shutting_down" in line for line in lines):
                return "cut with an in-band error"
            return "completed"
        except httpx.HTTPError:
            return "cut"

    async def probe() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as client:
            clients = [asyncio.create_task(one(client)) for _ in range(streams)]
            await asyncio.sleep(0.7)
            os.killpg(process.pid, signal.SIGTERM)
            return await asyncio.gather(*clients)

    outcomes = asyncio.run(probe())
    # Let it finish its own shutdown: a second signal would make uvicorn skip the graceful part.
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    exit_code = processes.stop(process)
    written = sum(json.loads(django_command(env, "-m", "bench.db", "ledger")).values()) - before
    spooled = (len(spool.read_text().splitlines()) if spool.exists() else 0) - spooled_before
    return {
        "server_args": " ".join(extra_args),
        "in_flight": streams,
        "completed": outcomes.count("completed"),
        "cut": outcomes.count("cut"),
        "ledger_rows": written,
        "spooled": spooled,
        "lost": streams - written - spooled,
        "exit_code": exit_code,
    }


def check_gateway(base: str, keys: dict[str, str]) -> int:
    """One request of each kind through llmhub before any load: a broken gateway stops the run here."""
    sent = 0
    routed = [(model, False) for _, model in ROUTING_SCENARIOS[1:]]
    for key in keys.values():
        for model, stream in (("bench-json", False), ("bench-sse", True), ("bench-timed", True), *routed):
            response = httpx.post(
                base + LLMHUB_PATH,
                content=request_body(model, stream=stream),
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
                timeout=30,
            )
            sent += 1
            if response.status_code != 200 or (stream and b"data: [DONE]" not in response.content):
                raise SystemExit(
                    f"bench: llmhub is not answering {model} (stream={stream}): HTTP {response.status_code}\n"
                    f"{response.text[:1000]}\nserver log: {WORK}"
                )
    return sent


def bench_server(
    processes: Processes,
    server: str,
    port: int,
    env: dict[str, str],
    keys: dict[str, str],
    plan: Plan,
    meter: Meter,
    profile: bool,
    routing_only: bool = False,
) -> dict[str, Any]:
    say(f"\n== {server}: {' '.join(server_argv(server, 'llmhub.asgi:application', port))}")
    process = processes.start(server, server_argv(server, "llmhub.asgi:application", port), env)
    wait_for_port(port, process, server)
    meter.server = process.pid
    base = f"http://127.0.0.1:{port}"
    completed_via_llmhub = check_gateway(base, keys)
    result: dict[str, Any] = {"wrk": [], "first_token": {}}
    if routing_only:
        result["routing"] = bench_routing(base, keys["key"], plan, meter)
        completed_via_llmhub += sum(point["requests"] for point in result["routing"])
        meter.server = None
        result["exit_code"] = processes.stop(process)
        result["completed_via_llmhub"] = completed_via_llmhub
        return result
    # (label, path, key, model, stream, concurrencies); llmhub and the bare view alternate at each point, so
    # that a change in the machine's load (other processes) hits both alike.
    kinds = [
        (False, "bench-json", plan.concurrencies, [("llmhub", LLMHUB_PATH, keys["key"]), *BARES]),
        (True, "bench-sse", plan.stream_concurrencies, [("llmhub", LLMHUB_PATH, keys["key"]), *BARES]),
        (False, "bench-json", plan.budget_concurrencies, [("llmhub-budget", LLMHUB_PATH, keys["budgeted_key"])]),
    ]
    for stream, model, concurrencies, targets in kinds:
        body = request_body(model, stream=stream)
        for label, path, key in targets:
            warm = run_wrk(base + path, body, key, 32, plan.warmup, meter)
            completed_via_llmhub += warm["requests"] if not label.startswith("bare") else 0
        for concurrency in concurrencies:
            for label, path, key in targets:
                point = run_wrk(base + path, body, key, concurrency, plan.duration, meter)
                point.update(target=label, stream=stream)
                result["wrk"].append(point)
                completed_via_llmhub += point["requests"] if not label.startswith("bare") else 0
                say(f"  {label:13} {'sse ' if stream else 'json'} c={concurrency:<3} {_point_text(point)}")
    for name, model, content in (("timed", "bench-timed", TIMED_CONTENT), ("fast", "bench-sse", None)):
        body = request_body(model, stream=True, **({"content": content} if content else {}))
        for label, path, key in (("llmhub", LLMHUB_PATH, keys["key"]), ("bare", BARE_PATH, "")):
            series = asyncio.run(first_token_series(base + path, body, key, plan.ttft_requests))
            result["first_token"][f"{label}-{name}"] = series
            completed_via_llmhub += plan.ttft_requests + 5 if label == "llmhub" else 0
            say(f"  {label:13} first line ({name} upstream): {_ttft_text(series)}")
    result["routing"] = bench_routing(base, keys["key"], plan, meter)
    completed_via_llmhub += sum(point["requests"] for point in result["routing"])
    result["peak_rss_mib"] = round(peak_rss_kib(process.pid) / 1024, 1)
    say(f"  peak RSS {result['peak_rss_mib']} MiB")
    if profile:
        body = request_body("bench-json", stream=False)
        spied = profiling.py_spy_point(
            WORK, process.pid, server, base + LLMHUB_PATH, body, keys["key"], plan.duration, meter
        )
        if spied is not None:
            result["py_spy"], point = spied
            completed_via_llmhub += point["requests"]
    meter.server = None
    result["exit_code"] = processes.stop(process)
    result["completed_via_llmhub"] = completed_via_llmhub
    return result


def bench_workers(
    processes: Processes, server: str, port: int, env: dict[str, str], key: str, plan: Plan, meter: Meter
) -> dict[str, Any]:
    """llmhub (json) at concurrency ``WORKERS_CONCURRENCY`` on one uvicorn worker, then on two, then on one
    and two again (alternated, so that a change in the machine's load hits both alike); the better point of
    each is kept. The target is two workers ≥ 1.7× one."""
    body = request_body("bench-json", stream=False)
    points: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    completed = 0
    for workers in (1, 2, 1, 2):
        argv = server_argv(server, "llmhub.asgi:application", port, workers=workers)
        process = processes.start(f"{server}-{workers}w", argv, env)
        wait_for_port(port, process, f"{server}-{workers}w")
        # The port answers before the workers have loaded the app (seconds on a busy machine): wait until
        # bursts of requests, which the kernel spreads over the workers, all succeed, then warm up with wrk.
        completed += _answering(f"http://127.0.0.1:{port}{LLMHUB_PATH}", body, key, 8 * workers)
        warm = run_wrk(f"http://127.0.0.1:{port}{LLMHUB_PATH}", body, key, WORKERS_CONCURRENCY, plan.warmup + 1, meter)
        point = run_wrk(f"http://127.0.0.1:{port}{LLMHUB_PATH}", body, key, WORKERS_CONCURRENCY, plan.duration, meter)
        point.update(target="llmhub", stream=False, workers=workers)
        points[str(workers)].append(point)
        completed += warm["requests"] + point["requests"]
        processes.stop(process)
        say(f"  workers={workers}     json c={WORKERS_CONCURRENCY:<3} {_point_text(point)}")
    best = {n: max(series, key=lambda p: p["rps"]) for n, series in points.items()}
    return {"points": points, "best": best, "completed": completed}


def _answering(url: str, body: str, key: str, burst: int, patience: float = 180.0) -> int:
    """Send bursts of ``burst`` concurrent requests until one burst succeeds whole; the requests sent."""
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    async def one_burst() -> tuple[bool, int]:
        async with httpx.AsyncClient(timeout=60) as client:
            answers = await asyncio.gather(
                *(client.post(url, content=body, headers=headers) for _ in range(burst)), return_exceptions=True
            )
        ok = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 200]
        return len(ok) == burst, len(ok)

    deadline = time.monotonic() + patience
    sent = 0
    while True:
        whole, ok = asyncio.run(one_burst())
        sent += ok
        if whole:
            return sent
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {url} did not answer a burst of {burst} within {patience:.0f} s")
        time.sleep(0.5)


def bench_routing(base: str, key: str, plan: Plan, meter: Meter) -> list[dict[str, Any]]:
    """The routing scenarios at concurrency 1, in rounds; within a round each scenario once, the order turned
    by one each round, so that neither a scenario's place nor the machine's drift favours one of them."""
    say(f"  routing: {plan.route_rounds} rounds of {len(ROUTING_SCENARIOS)} points, {plan.route_duration} s each")
    for _, model in ROUTING_SCENARIOS:
        run_wrk(base + LLMHUB_PATH, request_body(model, stream=False), key, 1, plan.warmup, meter)
    points = []
    for round_number in range(plan.route_rounds):
        shift = round_number % len(ROUTING_SCENARIOS)
        for scenario, model in ROUTING_SCENARIOS[shift:] + ROUTING_SCENARIOS[:shift]:
            point = run_wrk(base + LLMHUB_PATH, request_body(model, stream=False), key, 1, plan.route_duration, meter)
            point.update(target="llmhub", stream=False, scenario=scenario, model=model, round=round_number)
            points.append(point)
            say(f"  route {scenario:15} round {round_number} {_point_text(point)}")
    return points


def routing_in_process(env: dict[str, str], key: str, rounds: int, requests: int) -> list[dict[str, Any]]:
    """Each routing scenario's whole request in-process (``bench.profile_request``: llmhub's ASGI application
    without a server or a client in the way, so its CPU per request is far steadier than a served latency),
    in rounds taken in turns like the served points."""
    points = []
    for round_number in range(rounds):
        shift = round_number % len(ROUTING_SCENARIOS)
        for scenario, model in ROUTING_SCENARIOS[shift:] + ROUTING_SCENARIOS[:shift]:
            measured = json.loads(
                django_command(env, "-m", "bench.profile_request", "--model", model, "-n", str(requests), "--key", key)
            )
            point = {k: measured[k] for k in ("cpu_ms_per_request", "wall_p50_ms", "wall_p99_ms")}
            points.append({**point, "scenario": scenario, "model": model, "round": round_number})
            say(f"  route in-process {scenario:15} round {round_number} {point}")
    return points


def _point_text(point: dict[str, Any]) -> str:
    errors = f"  ERRORS {point['errors']}" if point["errors"] else ""
    return (
        f"{point['rps']:>8.1f} req/s  p50 {point['p50_ms']:7.2f} ms  p99 {point['p99_ms']:7.2f} ms  "
        f"server CPU {point['server_cpu_ms_per_request'] or 0:.2f} ms/req  other load {point['other_cores']:.2f}"
        f"{errors}"
    )


def _ttft_text(series: dict[str, Any]) -> str:
    return (
        f"p50 {series['first_line_p50_ms']:.2f} ms (first content {series['first_token_p50_ms']:.2f} ms), "
        f"p99 {series['first_line_p99_ms']:.2f} ms, n={series['requests']}"
    )


# --- main -------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    memory = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    versions = {}
    for package in ("Django", "daphne", "Twisted", "uvicorn", "uvloop", "httptools", "openai", "httpx2", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    nginx = subprocess.run([upstream.nginx_binary(), "-v"], capture_output=True, text=True, check=False).stderr
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "nginx": nginx.strip().split("/")[-1],
        "uvicorn_auto": uvicorn_auto_choice(),
    }


def code_version() -> str:
    """The commit measured, and whether tracked files differed from it: figures belong to a version."""

    def git(*argv: str) -> str:
        completed = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        return completed.stdout.strip() if completed.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def bench_environment(upstreams: dict[str, str], redis_url: str, database_url: str) -> dict[str, str]:
    from cryptography.fernet import Fernet

    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "DATABASE_", "REDIS_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="bench.settings",
        # Kept after the work tree: `PYTHONPATH=DIR make bench` can add packages (uvloop, httptools) to
        # measure them without installing them into the project's .venv.
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
        SECRET_KEY=base64.urlsafe_b64encode(secrets.token_bytes(48)).decode(),
        FIELD_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        # Production settings refuse to start without it; bench/settings.py then names 127.0.0.1 itself.
        ALLOWED_HOSTS="127.0.0.1",
        DATABASE_URL=database_url,
        LLMHUB_LEDGER_SPOOL=str(WORK / "ledger-spool.jsonl"),
        BENCH_BARE_UPSTREAMS=json.dumps(upstreams),
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def django_command(env: dict[str, str], *argv: str) -> str:
    completed = subprocess.run([PY, *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed.stdout


@contextlib.contextmanager
def stopped_on_signals(processes: Processes) -> Iterator[None]:
    """A Ctrl-C or a SIGTERM still stops every child: the handler turns SIGTERM into the same exception."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (under 2 minutes)")
    parser.add_argument(
        "--servers",
        default="uvicorn,daphne",
        help="comma-separated, from uvicorn, uvicorn-h11 (asyncio + h11 forced) and daphne (default: %(default)s)",
    )
    parser.add_argument("--duration", type=int, help="seconds per wrk point (default 10, 3 with --quick)")
    parser.add_argument(
        "--ttft-requests", type=int, help="streams timed to their first line (default 200, 30 with --quick)"
    )
    parser.add_argument("--route-rounds", type=int, help="rounds of the routing scenarios (default 20, 4 with --quick)")
    parser.add_argument(
        "--database",
        choices=("postgres", "sqlite"),
        default="postgres" if postgres.server_bin() else "sqlite",
        help="a throw-away PostgreSQL (production's database; the default when installed) or SQLite file",
    )
    parser.add_argument("--no-redis", action="store_true", help="admission on the database even if Redis is here")
    parser.add_argument(
        "--settings",
        default="bench.settings",
        help="settings module of the served llmhub, to measure a what-if (default: %(default)s)",
    )
    parser.add_argument("--profile", action="store_true", help="also profile (bench/profiling.py; ~3 more minutes)")
    parser.add_argument(
        "--routing-only", action="store_true", help="only the routing scenarios (and the in-process routing cost)"
    )
    parser.add_argument(
        "--output", type=Path, help="default: bench/results/latest.json (routing.json with --routing-only)"
    )
    args = parser.parse_args(argv)
    args.output = args.output or RESULTS / ("routing.json" if args.routing_only else "latest.json")
    plan = QUICK if args.quick else FULL
    if args.duration:
        plan = replace(plan, duration=args.duration)
    if args.ttft_requests:
        plan = replace(plan, ttft_requests=args.ttft_requests)
    if args.route_rounds:
        plan = replace(plan, route_rounds=args.route_rounds)
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    for name in servers:
        server_argv(name, "", 0)

    started = time.monotonic()
    load_at_start = Path("/proc/loadavg").read_text().split()[0]
    ensure_tools(redis=not args.no_redis)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    choice = uvicorn_auto_choice()
    say(f"bench: load average {load_at_start}; uvicorn's auto loop/http here: {choice['loop']} + {choice['http']}")
    if choice != {"loop": "uvloop", "http": "httptools"}:
        say("bench: uvloop/httptools are not installed; PYTHONPATH=DIR make bench measures them from DIR")
    redis_binary = None if args.no_redis else shutil.which("redis-server")

    processes = Processes()
    meter = Meter()
    with contextlib.ExitStack() as database, stopped_on_signals(processes):
        if args.database == "postgres":
            database_url = database.enter_context(postgres.throwaway_postgres(max_connections=300))
            postgres.createdb(database_url)
            database_text = f"PostgreSQL {postgres.server_bin().parent.name} (throw-away, fsync off)"
        else:
            database_url = f"sqlite:///{WORK / 'bench.sqlite3'}"
            database_text = f"SQLite {WORK / 'bench.sqlite3'}"
        nginx_port, fake_port, redis_port, server_port, *route_ports, down_port = free_ports(7)
        upstreams = {
            "bench-json": f"http://127.0.0.1:{nginx_port}/json/v1",
            "bench-sse": f"http://127.0.0.1:{nginx_port}/sse/v1",
            "bench-timed": f"http://127.0.0.1:{fake_port}/v1",
        }
        healthy = [{"base_url": f"http://127.0.0.1:{port}/json/v1"} for port in (nginx_port, *route_ports)]
        routed = {
            "bench-route-3": healthy,
            "bench-route-3-down": [
                *healthy[:2],
                {"base_url": f"http://127.0.0.1:{down_port}/v1", "breaker_override": "open"},
            ],
        }
        env = bench_environment(upstreams, f"redis://127.0.0.1:{redis_port}/0" if redis_binary else "", database_url)
        env["BENCH_ROUTED_MODELS"] = json.dumps(routed)
        (WORK / "nginx.conf").write_text(upstream.nginx_conf(WORK, nginx_port, tuple(route_ports)))
        # One fake upstream process: the paced provider, and a listener that refuses every connection (the
        # deployment that is down in the third routing scenario).
        fake_argv = [PY, "-m", "llmhub.testing.fake_upstream", "--upstream", f"timed={fake_port}"]
        fake_argv += ["--upstream", f"down={down_port},fault=refuse", "--tps", "50"]
        started_upstreams = [
            ("nginx", nginx_port, [upstream.nginx_binary(), "-c", str(WORK / "nginx.conf"), "-p", str(WORK)]),
            ("fake-upstream", fake_port, fake_argv),
        ]
        if redis_binary:
            redis_argv = [redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
            started_upstreams.append(("redis", redis_port, [*redis_argv, "--appendonly", "no"]))
        for name, port, command in started_upstreams:
            process = processes.start(name, command, env)
            wait_for_port(port, process, name)
            meter.ours += [process.pid, *children_of(process.pid)]
        say(
            f"bench: nginx :{nginx_port} and :{route_ports[0]}, :{route_ports[1]} (canned JSON and SSE), fake provider "
            f":{fake_port} (50 tokens/s) and :{down_port} (refusing), "
            + (f"redis :{redis_port} (admission store)" if redis_binary else "no Redis (admission on the database)")
        )

        django_command(env, "manage.py", "migrate", "--noinput", "-v", "0")
        keys = json.loads(django_command(env, "-m", "bench.db", "seed"))
        say(f"bench: database {database_text} migrated and seeded (2 users and keys, 5 models on 9 providers)")
        in_process = json.loads(django_command(env, "-m", "bench.routing", *(m for _, m in ROUTING_SCENARIOS)))
        for name, figures in in_process.items():
            say(f"  routing calls in-process {name:20} {figures}")
        whole_in_process = routing_in_process(env, keys["key"], plan.in_process_rounds, plan.in_process_requests)

        # Migrations and the seed ran on bench.settings; only the servers take a what-if module.
        server_env = {**env, "DJANGO_SETTINGS_MODULE": args.settings}
        results: dict[str, Any] = {
            "mode": "quick" if args.quick else "full",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),  # the run's start (bench/all.py reads it)
            "settings": args.settings,
            "code": code_version(),
            "plan": asdict(plan),
            "load_at_start": load_at_start,
            "machine": machine(),
            "admission_store": "redis" if redis_binary else "database",
            "database": args.database,
            "direct": {"wrk": [], "first_token": {}},
            "servers": {},
            "routing_in_process": in_process,
            "routing_whole_in_process": whole_in_process,
            "routing_only": args.routing_only,
        }
        if args.routing_only:
            for server in servers:
                results["servers"][server] = bench_server(
                    processes, server, server_port, server_env, keys, plan, meter, False, routing_only=True
                )
        else:
            say("\n== upstream direct (nginx)")
            for stream, url, concurrencies in (
                (False, upstreams["bench-json"], plan.concurrencies),
                (True, upstreams["bench-sse"], plan.stream_concurrencies),
            ):
                body = request_body("fake-gpt-4o-mini", stream=stream)
                run_wrk(url + "/chat/completions", body, "", 32, plan.warmup, meter)
                for concurrency in concurrencies:
                    point = run_wrk(url + "/chat/completions", body, "", concurrency, plan.duration, meter)
                    point.update(target="direct", stream=stream)
                    results["direct"]["wrk"].append(point)
                    say(f"  direct        {'sse ' if stream else 'json'} c={concurrency:<3} {_point_text(point)}")
            for name, url, content in (
                ("timed", upstreams["bench-timed"], TIMED_CONTENT),
                ("fast", upstreams["bench-sse"], None),
            ):
                body = request_body("fake-gpt-4o-mini", stream=True, **({"content": content} if content else {}))
                series = asyncio.run(first_token_series(url + "/chat/completions", body, "", plan.ttft_requests))
                results["direct"]["first_token"][name] = series
                say(f"  direct        first line ({name} upstream): {_ttft_text(series)}")

            for server in servers:
                ledger_before = json.loads(django_command(env, "-m", "bench.db", "ledger"))
                data = bench_server(processes, server, server_port, server_env, keys, plan, meter, args.profile)
                if server.startswith("uvicorn"):
                    data["workers"] = bench_workers(
                        processes, server, server_port, server_env, keys["key"], plan, meter
                    )
                    data["completed_via_llmhub"] += data["workers"]["completed"]
                ledger_now = json.loads(django_command(env, "-m", "bench.db", "ledger"))
                data["ledger"] = {
                    status: n - ledger_before.get(status, 0)
                    for status, n in ledger_now.items()
                    if n != ledger_before.get(status, 0)
                }
                data["lifespan_events"] = lifespan_probe(processes, server, server_port, env)
                data["lifespan_supported"] = "lifespan.shutdown" in data["lifespan_events"]
                # uvicorn waits for running requests unless told how long to: both ways are probed.
                variants = [()] + ([("--timeout-graceful-shutdown", "1")] if server.startswith("uvicorn") else [])
                data["shutdown"] = [
                    shutdown_probe(processes, server, server_port, server_env, keys["key"], v) for v in variants
                ]
                for probe in data["shutdown"]:
                    say(f"  SIGTERM with streams in flight: {probe}")
                if server.startswith("uvicorn"):
                    data["loop_http"] = choice if server == "uvicorn" else {"loop": "asyncio", "http": "h11"}
                say(f"  ledger rows written: {data['ledger']}; ASGI events seen by an app: {data['lifespan_events']}")
                results["servers"][server] = data

        if args.profile:
            say("\n== profiles (not part of the figures above)")
            profile_env = {**env, "BENCH_KEY": keys["key"], "BENCH_BUDGETED_KEY": keys["budgeted_key"]}
            results["profile"] = profiling.in_process(profile_env, 1000 if args.quick else 3000)
            results["profile"]["py_spy"] = {s: d.pop("py_spy") for s, d in results["servers"].items() if "py_spy" in d}

    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    report.derive(results)
    text = report.markdown(results)
    if "profile" in results:
        text += "\n" + profiling.markdown(results["profile"])
    say("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(text + "\n")
    say(f"\nbench: {results['wall_seconds']:.0f} s; wrote {args.output} and {args.output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
