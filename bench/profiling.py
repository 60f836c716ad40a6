"""`make bench ARGS=--profile`: where the time goes, in four views.

* ``py-spy record`` on the server during one extra wrk run at concurrency 32: the functions on the stack
  most often, across every thread (a thread started per request shows up here, not in cProfile);
* ``bench.profile_request`` in-process: the CPU per request of llmhub and of the bare view as they are,
  and without the thread hops of Django's request signals;
* ``bench.components``: each piece of the request path alone;
* ``bench.first_line``: a stream's first line, stage by stage.

None of these runs count in the benchmark's figures: a sampler attached changes them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import first_line
from bench.load import Meter, run_wrk

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
WHAT_IFS = ("", "no-request-signals")


def py_spy_point(
    work: Path, pid: int, name: str, url: str, body: str, key: str, seconds: int, meter: Meter
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The top functions by inclusive and by own samples, and the wrk point they were taken during."""
    raw = work / f"py-spy-{name}.txt"
    sampler = py_spy_start(pid, raw, seconds=seconds)
    if sampler is None:
        return None
    try:
        time.sleep(0.5)
        point = run_wrk(url, body, key, 32, seconds, meter)
    finally:
        py_spy_stop(sampler, wait=True)
    return (summarize_collapsed(raw), point) if raw.exists() else None


def py_spy_start(pid: int, raw: Path, *, seconds: int | None = None) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` on ``pid`` into ``raw`` (collapsed stacks), for ``seconds`` or until stopped; None
    when py-spy is not installed."""
    py_spy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    if not Path(py_spy).exists():
        print("  --profile: py-spy is not installed (.venv/bin/pip install py-spy); skipped", flush=True)
        return None
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking", "--format", "raw"]
    if seconds is not None:
        argv += ["--duration", str(seconds)]
    raw.unlink(missing_ok=True)  # a file left by an earlier run must not pass for this one's
    sampler = subprocess.Popen([*argv, "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the work begins
    return sampler


def py_spy_stop(sampler: subprocess.Popen[bytes], *, wait: bool = False) -> None:
    """Stop a sampler (SIGINT writes its file) or, with ``wait``, let its duration run out."""
    if not wait:
        sampler.send_signal(signal.SIGINT)
    try:
        sampler.wait(timeout=60)
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()


def summarize_collapsed(raw: Path, top: int = 25) -> dict[str, Any]:
    """Collapsed stacks (``frame;frame;... count``) to the share of samples each function is on the stack
    (inclusive) or at the top of it (own)."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count

    def ranked(counts: dict[str, int]) -> list[list[Any]]:
        best = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [[frame, round(100 * n / max(total, 1), 1)] for frame, n in best]

    return {"samples": total, "inclusive_pct": ranked(inclusive), "own_pct": ranked(own)}


def _short_frame(frame: str) -> str:
    # "function (/path/to/site-packages/package/module.py:123)" -> "function (package/module.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def _module(env: dict[str, str], *argv: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if completed.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed:\n{completed.stdout}\n{completed.stderr}")
    return json.loads(completed.stdout)


def in_process(env: dict[str, str], requests: int) -> dict[str, Any]:
    """CPU per request of llmhub and the bare view, as they are and under each what-if; then the pieces."""
    what_ifs = []
    for what_if in WHAT_IFS:
        row: dict[str, Any] = {"what_if": what_if or "as configured"}
        for target in ("bare", "llmhub"):
            measured = _module(
                env, "bench.profile_request", "--target", target, "-n", str(requests), "--what-if", what_if
            )
            row[target] = {k: measured[k] for k in ("cpu_ms_per_request", "wall_p50_ms", "wall_p99_ms")}
        row["llmhub_minus_bare_cpu_ms"] = round(
            row["llmhub"]["cpu_ms_per_request"] - row["bare"]["cpu_ms_per_request"], 3
        )
        print(
            f"  in-process, {row['what_if']}: CPU ms/request bare {row['bare']['cpu_ms_per_request']:.3f}, "
            f"llmhub {row['llmhub']['cpu_ms_per_request']:.3f}",
            flush=True,
        )
        what_ifs.append(row)
    components = _module(env, "bench.components", "-n", str(requests))
    for name, figures in components.items():
        print(f"  component {name}: CPU {figures['cpu_ms']:.3f} ms, wall {figures['wall_ms']:.3f} ms", flush=True)
    stages = _module(env, "bench.first_line", "-n", str(requests))
    print(f"  a stream's first line, in-process, p50 ms at each stage: {stages['median_ms_at']}", flush=True)
    return {"what_ifs": what_ifs, "components": components, "first_line": stages}


def markdown(profile: dict[str, Any]) -> str:
    lines = [
        "",
        "| in-process, sequential (CPU ms per request) | bare view | llmhub | llmhub − bare |",
        "|---|---:|---:|---:|",
    ]
    for row in profile["what_ifs"]:
        lines.append(
            f"| {row['what_if']} | {row['bare']['cpu_ms_per_request']:.3f} | "
            f"{row['llmhub']['cpu_ms_per_request']:.3f} | {row['llmhub_minus_bare_cpu_ms']:+.3f} |"
        )
    lines += ["", "| piece of the request path, alone | CPU ms | wall ms |", "|---|---:|---:|"]
    for name, figures in profile["components"].items():
        lines.append(f"| {name} | {figures['cpu_ms']:.3f} | {figures['wall_ms']:.3f} |")
    if "first_line" in profile:
        lines.append(first_line.markdown(profile["first_line"]))
    for server, spied in profile.get("py_spy", {}).items():
        lines += ["", f"py-spy, {server}, llmhub json at c=32 ({spied['samples']} samples), own time:", ""]
        lines += [f"- {pct:5.1f} % {frame}" for frame, pct in spied["own_pct"][:12]]
        lines += ["", "inclusive:", ""]
        lines += [f"- {pct:5.1f} % {frame}" for frame, pct in spied["inclusive_pct"][:25]]
    return "\n".join(lines)
