#!/usr/bin/env python
"""Streams at scale (issue 14, part 6): what llmhub adds to hundreds of open streams, and what each costs.

Everything runs on this machine over 127.0.0.1: the bundled fake provider (``llmhub.testing.fake_upstream``)
streams replies of 300 words at 30 tokens/s (10 s each, one SSE chunk per word); llmhub runs under uvicorn
(``bench/run.py``'s production command, one worker, then two) on ``bench.settings`` with a throw-away SQLite
database, key auth and the ledger on. The figures, each printed beside its target:

* **steady streams**: streams opened at a steady rate, so that about 300 (then 500) are open at once; the
  time to the first token (the first chunk with content) of those opened once that many are open, through
  llmhub and, in the same run, straight from the fake provider: the difference is what llmhub adds;
* **burst**: 100 streams opened at the same moment, the same comparison;
* **two workers** carry twice the streams (600 and 1,000) at the same figures;
* **WebSocket chats**: that many concurrent ``/ws/chat/`` conversations (key auth, one ``chat.send`` each,
  300 words at 30 tokens/s); every one must end with ``chat.completed``;
* **ledger**: every request this script sent has its ledger row, counted in the database once the server
  has stopped (a graceful stop: rows still queued are written or spooled; the spool is counted too);
* **memory per open stream**: the server's resident set with the steady streams open, less its idle one,
  divided by the streams open;
* **RSS over many requests**: non-streamed requests (100,000 by default), the resident set after a warm-up
  tenth and at the end: it must stay within 10 %;
* **CPU per relayed chunk and per stream start**, in microseconds of the server process's CPU time (user +
  system from ``/proc``): unpaced streams of 300 words and of 1 word, 200 each; the difference per
  chunk is the chunk's cost, what is left of the short streams per start is the start's; the same two
  through the bare aiohttp view, beside them. Then 200 streams
  paced at 30 tokens/s, through llmhub and through the bare aiohttp view, in three pairs (one with
  ``--quick``): the CPU per paced chunk, each side's the median, and llmhub's over the bare view's the
  median of the pairs' differences (the machine drifts between runs; a pair sees the same machine). That gap
  is split in two: llmhub's extra cost per stream start (over the bare view's), spread over a stream's
  chunks, and what is left, the chunk's own (and the rounds' noise).

The streams are read by a minimal asyncio HTTP/1.1 client (``Connection: close``, the body scanned as bytes)
so that on a 2-core machine the load generator takes as little CPU as it can from the server it measures.

``--quick`` runs everything with small numbers (a few dozen streams, 200 requests, 30-word streams in the CPU
part) in under a minute: a test runs it end to end so that the script cannot rot; it asserts on nothing timed.
Results go to stdout as markdown and to ``bench/results/streams.json`` (``streams-quick.json`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script (`python bench/streams.py`): its siblings are imported as the package they are.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import profiling, summary
from bench.load import _process_cpu, children_of, percentile
from bench.run import (
    PY,
    ROOT,
    Processes,
    bench_environment,
    code_version,
    server_argv,
)

RESULTS = ROOT / "bench" / "results"
WORK = RESULTS / "streams.tmp"  # git ignores bench/results/*.tmp
PATH = "/v1/chat/completions"
BARE_PATH = "/bare-aiohttp/v1/chat/completions"  # bench/bare.py: the ceiling make bench measures against
MODEL = "bench-stream"
TOKENS_PER_SECOND = 30
PARTS = frozenset({"steady", "burst", "cpu", "ws", "rss"})
_CONTENT = re.compile(rb'"content":"[^"]')


@dataclass(frozen=True)
class Plan:
    steady: tuple[int, ...]  # streams open at once, for one worker (two workers: twice as many)
    window: float  # seconds of measuring once that many are open
    burst: int
    ws_chats: int
    requests: int  # non-streamed requests for the RSS drift
    cost_streams: int  # streams of each kind for the CPU per chunk and per start
    workers: tuple[int, ...]
    words: int = 300  # per stream, at TOKENS_PER_SECOND
    # Per long stream of the CPU part (its unpaced and paced streams): a paced one lasts cost_words / TOKENS_PER_SECOND
    # seconds, so the quick plan's 30 words make each of its two paced runs 1 s, not 10.
    cost_words: int = 300
    paced_rounds: int = 3  # pairs of paced runs (ours, the bare view's) for the CPU per paced chunk
    parts: frozenset[str] = PARTS
    profile: str = ""  # where py-spy's collapsed stacks of the CPU part go ("": not sampled)
    # Every steady point and burst also through the bench's bare aiohttp view on the same server: the
    # fastest bare Django proxy's own added TTFT, the ceiling of what any gateway on this stack adds.
    bare: bool = True

    @property
    def stream_seconds(self) -> float:
        return self.words / TOKENS_PER_SECOND

    @property
    def content(self) -> str:
        return f"[[words={self.words}]] [[tps={TOKENS_PER_SECOND}]] Tell me a long story."


FULL = Plan(steady=(300, 500), window=10.0, burst=100, ws_chats=500, requests=100_000, cost_streams=200, workers=(1, 2))
# Streams of 1 s: the whole run takes about a minute.
QUICK = Plan(
    steady=(20,),
    window=1.0,
    burst=10,
    ws_chats=10,
    requests=200,
    cost_streams=10,
    paced_rounds=1,
    workers=(1,),
    words=30,
    cost_words=30,
)


def say(message: str) -> None:
    print(message, flush=True)


def say_profile(summary: dict[str, Any], label: str = "") -> None:
    """py-spy's top frames (``profiling.summarize_collapsed``), own time first, then inclusive."""
    for kind in ("own_pct", "inclusive_pct"):
        for frame, share in summary.get(kind, []):
            say(f"    {label}{kind[:-4]:>9} {share:5.1f} %  {frame}")


# --- processes ----------------------------------------------------------------------------------------------


def ephemeral_ports(count: int) -> list[int]:
    """Free ports from ``llmhub.testing.ports`` (``bench/run.py``'s 19100-19999 are raced for when `make
    bench` runs beside; the kernel's ephemeral ports are raced for by every outgoing connection)."""
    from llmhub.testing.ports import free_port

    return [free_port() for _ in range(count)]


def wait_for_http(port: int, process: subprocess.Popen[bytes], name: str, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"streams: {name} exited with {process.returncode}; see {WORK / (name + '.log')}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(0.5)
                if process.poll() is not None:  # another process holds the port: ours could not bind it
                    raise SystemExit(f"streams: {name} exited; see {WORK / (name + '.log')}")
                return
        time.sleep(0.05)
    raise SystemExit(f"streams: {name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def tree(pid: int) -> list[int]:
    """``pid`` and its children: a server with two workers is measured whole."""
    return [pid, *children_of(pid)]


def rss_kib(pid: int) -> int:
    total = 0
    for candidate in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    return sum(_process_cpu(candidate) for candidate in tree(pid))


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def django_command(env: dict[str, str], *argv: str) -> str:
    completed = subprocess.run([PY, *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"streams: {' '.join(argv)} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed.stdout


# --- the client -----------------------------------------------------------------------------------------------


@dataclass
class Stream:
    started: float
    first_token: float | None = None
    ended: float | None = None
    status: int = 0
    chunks: int = 0
    done: bool = False  # ended with data: [DONE]
    error: str = ""


def _request(port: int, path: str, body: bytes, key: str) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if key:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def stream_once(port: int, request: bytes) -> Stream:
    """One stream over its own connection, read to the end; the body is scanned as bytes (chunked framing
    and all): the first ``"content":"<something>"`` is the first token, ``data: `` counts the chunks."""
    result = Stream(started=time.perf_counter())
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        result.status = int(head.split(b" ", 2)[1])
        tail = b""
        while piece := await reader.read(65536):
            scanned = tail + piece
            if result.first_token is None and _CONTENT.search(scanned):
                result.first_token = time.perf_counter()
            result.chunks += scanned.count(b"data: ") - tail.count(b"data: ")
            if b"data: [DONE]" in scanned:
                result.done = True
            if b'{"error"' in scanned:
                result.error = "in-band error"
            tail = scanned[-16:]
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.ended = time.perf_counter()
        if writer is not None:
            writer.close()
    if not result.error and (result.status != 200 or not result.done):
        result.error = f"status {result.status}" if result.status != 200 else "no [DONE]"
    return result


async def steady(port: int, request: bytes, open_target: int, window: float, length: float) -> dict[str, Any]:
    """Streams of ``length`` seconds opened at ``open_target / length`` per second: after one stream's
    length, about ``open_target`` are open; those opened during the next ``window`` seconds are timed."""
    rate = open_target / length
    total = round(rate * (length + window))
    ramp = round(rate * length)
    tasks: list[asyncio.Task[Stream]] = []
    opened = time.perf_counter()
    open_now: list[int] = []
    for index in range(total):
        delay = opened + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(stream_once(port, request)))
        if index >= ramp:
            open_now.append(sum(1 for task in tasks if not task.done()))
    streams = await asyncio.gather(*tasks)
    return _series(streams[ramp:], streams, open_now)


async def burst(port: int, request: bytes, count: int) -> dict[str, Any]:
    streams = await asyncio.gather(*(stream_once(port, request) for _ in range(count)))
    return _series(streams, streams, [count])


def _series(timed: list[Stream], every: list[Stream], open_now: list[int]) -> dict[str, Any]:
    ttft = [(s.first_token - s.started) * 1000 for s in timed if s.first_token is not None]
    errors = [s.error for s in every if s.error]
    return {
        "streams": len(every),
        "timed": len(ttft),
        "open_p50": percentile(open_now, 50) if open_now else 0,
        "ttft_p50_ms": round(percentile(ttft, 50), 1) if ttft else None,
        "ttft_p99_ms": round(percentile(ttft, 99), 1) if ttft else None,
        "chunks": sum(s.chunks for s in every),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5],
    }


async def many_requests(port: int, key: str, count: int, concurrency: int, on_progress: Any) -> int:
    """``count`` non-streamed requests over ``concurrency`` kept-alive connections; the failures."""
    import aiohttp

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "[[words=4]] Hi."}]})
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    url = f"http://127.0.0.1:{port}{PATH}"
    sent = failures = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal sent, failures
            while sent < count:
                sent += 1
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        failures += response.status != 200
                except aiohttp.ClientError:
                    failures += 1
                on_progress(sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


async def ws_chats(port: int, key: str, count: int, content: str) -> dict[str, Any]:
    """``count`` sockets at once, each: auth, one ``chat.send``, read until ``chat.completed``."""
    import websockets

    outcomes: list[str] = []
    ttft: list[float] = []

    async def chat(index: int) -> None:
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/", open_timeout=60, max_size=None) as ws:
                await ws.send(json.dumps({"type": "auth", "api_key": key}))
                reply = json.loads(await ws.recv())
                if reply.get("type") != "auth.ok":
                    outcomes.append(f"auth: {reply.get('code')}")
                    return
                started = time.perf_counter()
                send = {"type": "chat.send", "conversation": None, "model": MODEL, "content": content}
                await ws.send(json.dumps({**send, "request_id": f"bench-{index}"}))
                first = True
                while True:
                    event = json.loads(await ws.recv())
                    kind = event.get("type")
                    if kind == "chat.delta" and first:
                        first = False
                        ttft.append((time.perf_counter() - started) * 1000)
                    elif kind == "chat.completed":
                        outcomes.append("completed")
                        return
                    elif kind in ("error", "chat.cancelled"):
                        outcomes.append(f"{kind}: {event.get('code', '')}")
                        return
        except Exception as exc:
            outcomes.append(f"{type(exc).__name__}")

    await asyncio.gather(*(chat(index) for index in range(count)))
    errors = [outcome for outcome in outcomes if outcome != "completed"]
    return {
        "chats": count,
        "completed": count - len(errors),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5],
        "ttft_p50_ms": round(percentile(ttft, 50), 1) if ttft else None,
        "ttft_p99_ms": round(percentile(ttft, 99), 1) if ttft else None,
    }


async def cpu_costs(
    port: int,
    key: str,
    pid: int,
    count: int,
    profile: Path | None = None,
    rounds_of_paced: int = 1,
    words: int = 300,
) -> dict[str, Any]:
    """Server CPU over ``count`` unpaced streams of ``words`` words (the plan's ``cost_words``: 300), then of 1
    word, 10 at a time; then ``count`` streams of as many words at 30 tokens/s, all open at once. Unpaced, the
    upstream's chunks reach the server several to a read; paced, as in the steady points, every chunk is a wake-up
    of its own (a read, the relay, a write), which costs more: that is the figure the 500-stream target depends on.
    With ``profile``, py-spy samples the server during a second paced round (not counted) and writes its collapsed
    stacks there."""

    async def run(content: str, at_once: int = 10, path: str = PATH) -> tuple[float, int, int]:
        body = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": content}]})
        request = _request(port, path, body.encode(), key)
        semaphore = asyncio.Semaphore(at_once)

        async def one() -> Stream:
            async with semaphore:
                return await stream_once(port, request)

        before = cpu_seconds(pid)
        streams = await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.sleep(0.5)  # the settlements after the last byte
        return cpu_seconds(pid) - before, sum(s.chunks for s in streams), sum(1 for s in streams if s.error)

    def split(long: tuple[float, int, int], short: tuple[float, int, int]) -> tuple[float, float]:
        """CPU per chunk and per stream start, from the long streams and the short ones."""
        per_chunk = (long[0] - short[0]) / max(1, long[1] - short[1])
        return per_chunk, (short[0] - short[1] * per_chunk) / count

    await run(f"[[words={words}]] warm-up")
    long = await run(f"[[words={words}]] A long one.")
    short = await run("[[words=1]] A short one.")
    (long_cpu, long_chunks, long_errors), (_, short_chunks, short_errors) = long, short
    per_chunk, per_start = split(long, short)
    # The same two through the bare aiohttp view: what a chunk and a start cost with nothing of llmhub's in
    # them, so that the paced gap below splits into its two parts (the start's, spread over a stream's chunks,
    # and the chunk's own).
    bare_long = await run(f"[[words={words}]] A long one.", path=BARE_PATH)
    bare_short = await run("[[words=1]] A short one.", path=BARE_PATH)
    bare_per_chunk, bare_per_start = split(bare_long, bare_short)
    paced = f"[[words={words}]] [[tps={TOKENS_PER_SECOND}]] Paced."
    # The floor: the bench's bare Django view relaying the same paced streams with aiohttp (same server,
    # same lean handler, no key, no SDK, no ledger), all its CPU per chunk, start included, as ours beside it.
    # In ``rounds_of_paced`` pairs (the plan's ``paced_rounds``), ours then the bare view's: this shared
    # machine's speed drifts by a fifth within the hour, and a pair sees the same machine; the figures are
    # the medians, the gap the median pair's.
    rounds: list[dict[str, float]] = []
    paced_errors = bare_errors = 0
    for _ in range(rounds_of_paced):
        paced_cpu, paced_chunks, errors = await run(paced, at_once=count)
        paced_errors += errors
        bare_cpu, bare_chunks, errors = await run(paced, at_once=count, path=BARE_PATH)
        bare_errors += errors
        rounds.append(
            {
                "ours_all_in_us": round(paced_cpu / max(1, paced_chunks) * 1e6, 1),
                "ours_us": round((paced_cpu - count * per_start) / max(1, paced_chunks) * 1e6, 1),
                "bare_all_in_us": round(bare_cpu / max(1, bare_chunks) * 1e6, 1),
            }
        )
    if profile is not None and (sampler := profiling.py_spy_start(pid, profile)) is not None:
        await run(paced, at_once=count)
        profiling.py_spy_stop(sampler)
    over_bare = statistics.median(r["ours_all_in_us"] - r["bare_all_in_us"] for r in rounds)
    # A paced stream's chunks (its words, the role's and the finish's): its start's extra cost is spread over them.
    chunks_per_stream = long_chunks / max(1, count)
    gap_of_start = (per_start - bare_per_start) / max(1.0, chunks_per_stream) * 1e6
    return {
        "streams": count,
        "long_chunks": long_chunks,
        "short_chunks": short_chunks,
        "cpu_per_chunk_us": round(per_chunk * 1e6, 1),
        "cpu_per_start_us": round(per_start * 1e6, 1),
        "cpu_per_long_stream_ms": round(long_cpu / count * 1000, 2),
        "cpu_per_paced_chunk_us": statistics.median(r["ours_us"] for r in rounds),
        "cpu_per_paced_chunk_all_in_us": statistics.median(r["ours_all_in_us"] for r in rounds),
        "bare_cpu_per_paced_chunk_all_in_us": statistics.median(r["bare_all_in_us"] for r in rounds),
        "cpu_per_paced_chunk_over_bare_us": round(over_bare, 1),
        "bare_cpu_per_chunk_us": round(bare_per_chunk * 1e6, 1),
        "bare_cpu_per_start_us": round(bare_per_start * 1e6, 1),
        # The paced gap in its two parts: llmhub's extra start cost per chunk of a stream, and the rest (the
        # chunk's own extra cost, and the noise of the paired rounds).
        "paced_gap_of_start_us": round(gap_of_start, 1),
        "paced_gap_of_chunk_us": round(over_bare - gap_of_start, 1),
        "paced_rounds": rounds,
        "errors": long_errors + short_errors + paced_errors + bare_errors + bare_long[2] + bare_short[2],
    }


# --- one server --------------------------------------------------------------------------------------------


def bench_workers(
    processes: Processes, workers: int, port: int, fake_port: int, env: dict[str, str], key: str, plan: Plan
) -> tuple[dict[str, Any], int]:
    """Every figure for one server with ``workers`` processes; the requests it was sent (ledger rows due)."""
    argv = server_argv("uvicorn", "llmhub.asgi:application", port)
    if workers > 1:
        argv += ["--workers", str(workers)]
    say(f"\n== uvicorn, {workers} worker(s): {' '.join(argv[1:])}")
    process = processes.start(f"uvicorn-{workers}", argv, env)
    wait_for_http(port, process, f"uvicorn-{workers}")
    time.sleep(1.0 if workers == 1 else 3.0)  # workers import the app after the parent listens
    sent = 0
    result: dict[str, Any] = {"workers": workers, "steady": [], "load_average_start": load_average()}
    body = json.dumps(
        {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": plan.content}]}
    ).encode()
    ours = _request(port, PATH, body, key)
    direct = _request(fake_port, "/v1/chat/completions", body.replace(MODEL.encode(), b"fake-gpt-4o-mini"), "")
    bare = _request(port, BARE_PATH, body, "")

    async def warm() -> None:
        await asyncio.gather(
            *(
                stream_once(port, _request(port, PATH, body.replace(f"words={plan.words}".encode(), b"words=5"), key))
                for _ in range(20)
            )
        )

    asyncio.run(warm())
    sent += 20
    idle_rss = rss_kib(process.pid)
    for base in plan.steady if "steady" in plan.parts else ():
        target = base * workers
        sampled: list[int] = []

        async def measured(target: int = target, sampled: list[int] = sampled) -> dict[str, Any]:
            async def sample() -> None:
                await asyncio.sleep(plan.stream_seconds + plan.window / 2)
                sampled.append(rss_kib(process.pid))

            sampler = asyncio.create_task(sample())
            series = await steady(port, ours, target, plan.window, plan.stream_seconds)
            await sampler
            return series

        before = cpu_seconds(process.pid)
        ours_series = asyncio.run(measured())
        ours_series["server_cpu_s"] = round(cpu_seconds(process.pid) - before, 2)
        sent += ours_series["streams"]
        straight = asyncio.run(steady(fake_port, direct, target, plan.window, plan.stream_seconds))
        point = {"open_target": target, "llmhub": ours_series, "direct": straight}
        point["added_ttft_p50_ms"] = _minus(ours_series["ttft_p50_ms"], straight["ttft_p50_ms"])
        point["added_ttft_p99_ms"] = _minus(ours_series["ttft_p99_ms"], straight["ttft_p99_ms"])
        open_p50 = ours_series["open_p50"] or 1
        point["rss_per_stream_kib"] = round((sampled[0] - idle_rss) / open_p50, 1) if sampled else None
        if plan.bare:
            ceiling = asyncio.run(steady(port, bare, target, plan.window, plan.stream_seconds))
            point["bare"] = ceiling
            point["bare_added_ttft_p50_ms"] = _minus(ceiling["ttft_p50_ms"], straight["ttft_p50_ms"])
            point["bare_added_ttft_p99_ms"] = _minus(ceiling["ttft_p99_ms"], straight["ttft_p99_ms"])
        point["load_average"] = load_average()
        result["steady"].append(point)
        say(
            f"  {target} open: added TTFT p50 {point['added_ttft_p50_ms']} ms, p99 {point['added_ttft_p99_ms']} ms"
            f" (llmhub {ours_series['ttft_p50_ms']}/{ours_series['ttft_p99_ms']}, direct"
            f" {straight['ttft_p50_ms']}/{straight['ttft_p99_ms']}); errors {ours_series['errors']}"
            f" {ours_series['error_kinds']}; {point['rss_per_stream_kib']} KiB per open stream; load {load_average()}"
        )
        if "bare" in point:
            say(
                f"  {target} open, bare aiohttp view: added TTFT p50 {point['bare_added_ttft_p50_ms']} ms, p99"
                f" {point['bare_added_ttft_p99_ms']} ms; errors {point['bare']['errors']}"
            )
    if "burst" in plan.parts:
        count = plan.burst * workers
        burst_profile = Path(plan.profile).with_name("py-spy-burst.txt") if plan.profile else None
        sampler = profiling.py_spy_start(process.pid, burst_profile) if burst_profile else None
        ours_burst = asyncio.run(burst(port, ours, count))
        if sampler is not None and burst_profile is not None:
            profiling.py_spy_stop(sampler)
            if burst_profile.exists():
                say_profile(profiling.summarize_collapsed(burst_profile), "burst ")
        sent += count
        direct_burst = asyncio.run(burst(fake_port, direct, count))
        result["burst"] = {
            "streams": count,
            "llmhub": ours_burst,
            "direct": direct_burst,
            "added_ttft_p50_ms": _minus(ours_burst["ttft_p50_ms"], direct_burst["ttft_p50_ms"]),
        }
        say(
            f"  burst of {count}: added TTFT p50 {result['burst']['added_ttft_p50_ms']} ms (llmhub"
            f" {ours_burst['ttft_p50_ms']}, direct {direct_burst['ttft_p50_ms']}); errors {ours_burst['errors']}"
        )
        if plan.bare:
            bare_burst = asyncio.run(burst(port, bare, count))
            result["burst"]["bare"] = bare_burst
            result["burst"]["bare_added_ttft_p50_ms"] = _minus(bare_burst["ttft_p50_ms"], direct_burst["ttft_p50_ms"])
            say(
                f"  burst of {count}, bare aiohttp view: added TTFT p50 {result['burst']['bare_added_ttft_p50_ms']}"
                f" ms; errors {bare_burst['errors']}"
            )
    if workers == 1 and "cpu" in plan.parts:
        profile = Path(plan.profile) if plan.profile else None
        result["cpu"] = asyncio.run(
            cpu_costs(port, key, process.pid, plan.cost_streams, profile, plan.paced_rounds, plan.cost_words)
        )
        if profile is not None and profile.exists():
            result["cpu"]["profile"] = profiling.summarize_collapsed(profile)
        # llmhub's streams (the bare view's make no ledger row): warm-up, long, short, each paced round, profile.
        sent += (3 + plan.paced_rounds + (1 if profile else 0)) * plan.cost_streams
        cpu = result["cpu"]
        say(
            f"  CPU: {cpu['cpu_per_chunk_us']} µs per relayed chunk ({cpu['cpu_per_paced_chunk_us']} µs paced at"
            f" {TOKENS_PER_SECOND}/s; all in {cpu['cpu_per_paced_chunk_all_in_us']} µs, bare aiohttp view"
            f" {cpu['bare_cpu_per_paced_chunk_all_in_us']} µs, {cpu['cpu_per_paced_chunk_over_bare_us']} µs over it"
            f" in the median of {len(cpu['paced_rounds'])} paired rounds), {cpu['cpu_per_start_us']} µs per stream"
            " start"
            f" ({cpu['cpu_per_long_stream_ms']} ms per {plan.cost_words}-word stream)"
        )
        if "profile" in cpu:
            say_profile(cpu["profile"])
    if workers == 1 and "ws" in plan.parts:
        result["ws"] = asyncio.run(ws_chats(port, key, plan.ws_chats, plan.content))
        sent += plan.ws_chats
        say(
            f"  {plan.ws_chats} WebSocket chats: {result['ws']['completed']} completed, errors {result['ws']['errors']}"
        )
    if workers == 1 and "rss" in plan.parts:
        result["rss"] = rss_drift(port, key, process.pid, plan.requests)
        sent += plan.requests
    result["load_average_end"] = load_average()
    result["exit_code"] = processes.stop(process, timeout=30.0)  # the lifespan drains the ledger queue
    return result, sent


def rss_drift(port: int, key: str, pid: int, count: int) -> dict[str, Any]:
    marks: dict[str, int] = {}
    warm = max(1, count // 10)
    samples: list[tuple[int, int]] = []
    step = max(1, count // 20)

    def progress(sent: int) -> None:
        if sent == warm:
            marks["after_warmup"] = rss_kib(pid)
        if sent % step == 0:
            samples.append((sent, rss_kib(pid)))

    started = time.perf_counter()
    failures = asyncio.run(many_requests(port, key, count, 32, progress))
    seconds = time.perf_counter() - started
    end = rss_kib(pid)
    after = marks.get("after_warmup") or end
    drift = (end - after) / after * 100
    say(
        f"  {count} requests ({count / seconds:.0f}/s, {failures} failed): RSS {after / 1024:.1f} MiB after warm-up,"
        f" {end / 1024:.1f} MiB at the end ({drift:+.1f} %)"
    )
    return {
        "requests": count,
        "failures": failures,
        "rps": round(count / seconds, 1),
        "rss_after_warmup_mib": round(after / 1024, 1),
        "rss_end_mib": round(end / 1024, 1),
        "drift_pct": round(drift, 2),
        "samples_mib": [(sent, round(kib / 1024, 1)) for sent, kib in samples],
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 1)


# --- the report --------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    """The figures beside their targets: the rows of ``make bench``'s summary for this part
    (``bench.summary.streams_rows``), so that the two tables cannot say different things."""
    rows = ["| figure | measured | target | |", "|---|---|---|---|"]
    rows += [f"| {r.figure} | {r.measured} | {r.target} | {r.verdict} |" for r in summary.streams_rows(results)]
    head = (
        f"Streams at scale, {results['when']} on commit {results['commit']};"
        f" load average {results['load_average_start']}"
        f" at the start, {results['load_average_end']} at the end; {results['cores']} cores"
        + ("; chunks padded as OpenAI's (`--obfuscation`)" if results.get("obfuscation") else "")
        + ".\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small numbers, about a minute: the smoke test's run")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1,2; --quick: 1)")
    parser.add_argument("--requests", type=int, default=None, help="non-streamed requests for the RSS drift")
    parser.add_argument("--open", default=None, help="comma-separated streams open per worker (default: 300,500)")
    parser.add_argument("--only", default=None, help=f"comma-separated parts, from {', '.join(sorted(PARTS))}")
    parser.add_argument("--cost-streams", type=int, default=None, help="streams of each kind for the CPU costs")
    parser.add_argument("--output", default=None, help="where the JSON goes (default: bench/results/streams.json)")
    parser.add_argument(
        "--settings", default="bench.settings", help="the server's settings (a what-if: bench.settings_gclog, ...)"
    )
    parser.add_argument(
        "--no-bare", action="store_true", help="skip the bare aiohttp view's run of every steady point and burst"
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample the server with py-spy during an extra round of the CPU part"
    )
    parser.add_argument(
        "--migrated-database",
        default=None,
        help="a SQLite file with every migration applied, copied rather than migrating (the smoke test's run hands"
        " it its test database's template)",
    )
    parser.add_argument(
        "--obfuscation",
        action="store_true",
        help="the fake provider pads every chunk with a random `obfuscation` string, as OpenAI's streams come",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.workers:
        plan = Plan(**{**plan.__dict__, "workers": tuple(int(n) for n in args.workers.split(","))})
    if args.requests is not None:
        plan = Plan(**{**plan.__dict__, "requests": args.requests})
    if args.open:
        plan = Plan(**{**plan.__dict__, "steady": tuple(int(n) for n in args.open.split(","))})
    if args.cost_streams is not None:
        plan = Plan(**{**plan.__dict__, "cost_streams": args.cost_streams})
    if args.no_bare:
        plan = Plan(**{**plan.__dict__, "bare": False})
    if args.profile:
        plan = Plan(**{**plan.__dict__, "profile": str(WORK / "py-spy-streams.txt")})
    if args.only:
        parts = frozenset(args.only.split(","))
        if parts - PARTS:
            raise SystemExit(f"streams: unknown parts {', '.join(sorted(parts - PARTS))}")
        plan = Plan(**{**plan.__dict__, "parts": parts})
    WORK.mkdir(parents=True, exist_ok=True)
    for stale in ("bench.sqlite3", "bench.sqlite3-wal", "bench.sqlite3-shm", "ledger-spool.jsonl"):
        (WORK / stale).unlink(missing_ok=True)
    for stale in WORK.glob("ledger-spool.jsonl.replaying-*"):  # a spool a stopped run was replaying
        stale.unlink()
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": code_version(),
        "cores": os.cpu_count(),
        "load_average_start": load_average(),
        "quick": args.quick,
        "obfuscation": args.obfuscation,
        "servers": [],
    }
    say(f"streams: load average {results['load_average_start']}; plan {plan}")
    processes = Processes(work=WORK)
    fake_port, server_port = ephemeral_ports(2)
    env = bench_environment({MODEL: f"http://127.0.0.1:{fake_port}/v1"}, "", f"sqlite:///{WORK / 'bench.sqlite3'}")
    env["LLMHUB_LEDGER_SPOOL"] = str(WORK / "ledger-spool.jsonl")
    env["DJANGO_SETTINGS_MODULE"] = args.settings
    try:
        padding = ["--obfuscation"] if args.obfuscation else []
        fake = processes.start(
            "fake-upstream", [PY, "-m", "llmhub.testing.fake_upstream", "--port", str(fake_port), *padding], env
        )
        wait_for_http(fake_port, fake, "fake-upstream")
        if args.migrated_database:
            shutil.copyfile(args.migrated_database, WORK / "bench.sqlite3")
        else:
            django_command(env, "manage.py", "migrate", "--noinput", "-v", "0")
        key = json.loads(django_command(env, "-m", "bench.db", "seed"))["key"]
        sent = 0
        for workers in plan.workers:
            server, count = bench_workers(processes, workers, server_port, fake_port, env, key, plan)
            results["servers"].append(server)
            sent += count
        rows = sum(json.loads(django_command(env, "-m", "bench.db", "ledger")).values())
        spool = WORK / "ledger-spool.jsonl"
        spooled = len(spool.read_text().splitlines()) if spool.exists() else 0
        results["ledger"] = {"sent": sent, "rows": rows, "spooled": spooled}
        say(f"  ledger: {rows} rows and {spooled} spooled for {sent} requests sent")
    finally:
        processes.stop_all()
    results["load_average_end"] = load_average()
    output = (
        Path(args.output) if args.output else (WORK / "streams-quick.json" if args.quick else RESULTS / "streams.json")
    )
    output.write_text(json.dumps(results, indent=2) + "\n")
    say("\n" + markdown(results))
    ledger = results["ledger"]
    return 0 if ledger["rows"] + ledger["spooled"] == ledger["sent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
