"""Load and what it cost: wrk for throughput and latency, a sequential client for the first streamed line,
and a CPU meter that tells the server's own CPU per request from what the rest of the machine did.

The meter matters on a shared 2-core machine: a test-suite running beside the benchmark slows every
figure, and ``other_cores`` (CPU used by processes the benchmark did not start, in cores) says how much.
The server's CPU milliseconds per request hardly move with such noise, so they compare llmhub with the
bare view even when latencies do not.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
_HZ = os.sysconf("SC_CLK_TCK")


def request_body(model: str, *, stream: bool, content: str = "Say hello in one short sentence.") -> str:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":"))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def _process_cpu(pid: int) -> float:
    """User + system seconds of ``pid``, all its threads included; 0 once it is gone."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        # The command name in field 2 may hold spaces and parentheses: count fields after the last ')'.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _HZ
    return 0.0


def _machine_busy() -> float:
    """Seconds of CPU the whole machine spent doing anything (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / _HZ


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class Meter:
    """CPU seconds of the server, of everything the benchmark started, and of the machine."""

    ours: list[int] = field(default_factory=list)  # upstreams and their workers
    server: int | None = None

    def snapshot(self) -> dict[str, float]:
        server = _process_cpu(self.server) if self.server else 0.0
        started = sum(_process_cpu(pid) for pid in self.ours)
        own = resource.getrusage(resource.RUSAGE_SELF)
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has been waited for
        harness = own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime
        return {"server": server, "ours": server + started + harness, "machine": _machine_busy()}

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
        other = (after["machine"] - before["machine"]) - (after["ours"] - before["ours"])
        return {"server_cpu_s": after["server"] - before["server"], "other_cores": max(0.0, other / seconds)}


def run_wrk(url: str, body: str, key: str, concurrency: int, duration: int, meter: Meter) -> dict[str, Any]:
    # One wrk thread: the 2 cores are shared with the server and the upstream, and one thread keeps
    # 128 connections busy at the request rates this machine reaches.
    env = {**os.environ, "BENCH_BODY": body, "BENCH_KEY": key}
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s", "-s", str(BENCH / "wrk.lua"), url]
    before, started = meter.snapshot(), time.monotonic()
    completed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60, check=False)
    spent = meter.delta(before, meter.snapshot(), time.monotonic() - started)
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if completed.returncode != 0 or line is None:
        raise SystemExit(f"bench: wrk failed on {url}:\n{completed.stdout}\n{completed.stderr}")
    raw = json.loads(line.removeprefix("BENCH_RESULT "))
    errors = sum(raw[name] for name in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    requests = raw["requests"]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "rps": round(requests / (raw["duration_us"] / 1e6), 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "errors": errors,
        "status_errors": raw["status_errors"],
        "server_cpu_ms_per_request": round(spent["server_cpu_s"] * 1000 / requests, 3) if requests else None,
        "other_cores": round(spent["other_cores"], 2),
    }


async def first_token_series(url: str, body: str, key: str, count: int, warmup: int = 5) -> dict[str, Any]:
    """Sequential streams over one kept-alive connection, timed from sending the request to the first
    ``data:`` line, to the first chunk with content, and to the end of the stream."""
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    first_line: list[float] = []
    first_token: list[float] = []
    whole: list[float] = []
    overhead: list[float] = []
    async with httpx.AsyncClient(timeout=30.0) as client:
        for attempt in range(count + warmup):
            started = time.perf_counter()
            line_at = token_at = None
            async with client.stream("POST", url, content=body, headers=headers) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:500]
                    raise SystemExit(f"bench: {url} answered {response.status_code}: {detail!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = time.perf_counter()
                    line_at = line_at or now
                    if token_at is None and line != "data: [DONE]":
                        chunk = json.loads(line[5:])
                        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                            token_at = now
            ended = time.perf_counter()
            if attempt < warmup:
                continue
            if line_at is None or token_at is None:
                raise SystemExit(f"bench: a stream from {url} carried no content")
            first_line.append((line_at - started) * 1000)
            first_token.append((token_at - started) * 1000)
            whole.append((ended - started) * 1000)
            if "x-llmhub-overhead-ms" in response.headers:
                overhead.append(float(response.headers["x-llmhub-overhead-ms"]))
    result = {
        "requests": count,
        "first_line_p50_ms": round(percentile(first_line, 50), 3),
        "first_line_p99_ms": round(percentile(first_line, 99), 3),
        "first_token_p50_ms": round(percentile(first_token, 50), 3),
        "first_token_p99_ms": round(percentile(first_token, 99), 3),
        "whole_p50_ms": round(percentile(whole, 50), 3),
    }
    if overhead:
        result["overhead_header_p50_ms"] = round(percentile(overhead, 50), 3)
    return result
