"""Where llmhub's time goes, one request at a time, without a server or a network client in the way.

Drives llmhub's ASGI application in-process (the same ``llmhub.asgi.application`` the servers run) with
sequential requests against the upstream the benchmark started, and reports the CPU and wall time per
request and, with ``--cprofile``, the functions that take it. The CPU time counts every thread of the
process, so a hop to a worker thread and back is paid for here too. ``--what-if`` switches show what a
change would save before anyone makes it: ``no-request-signals`` and ``short-switch-interval`` (see
``bench/whatif.py``).

Run by ``bench/run.py --profile``, or by hand with the benchmark's environment::

    python -m bench.profile_request --target llmhub --model bench-json -n 2000 --cprofile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import time
from typing import Any


def _setup(what_if: set[str]) -> Any:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    from bench import whatif

    django.setup()
    unknown = what_if - {"no-request-signals", "short-switch-interval"}
    if unknown:
        raise SystemExit(f"profile: unknown --what-if {', '.join(sorted(unknown))}")
    if "no-request-signals" in what_if:
        whatif.disconnect_request_signals()
    if "short-switch-interval" in what_if:
        whatif.short_switch_interval()
    from llmhub.asgi import application

    return application


async def _request(application: Any, path: str, body: bytes, key: str) -> tuple[int, bytes, float]:
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }
    delivered = False
    response_ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        # Django listens for a disconnect while the view runs; this client never goes away, and, as uvicorn
        # does, the receive answers ``http.disconnect`` once the response has ended.
        await response_ended
        return {"type": "http.disconnect"}

    status = 0
    parts: list[bytes] = []
    first_body_at = 0.0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, first_body_at
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            if not first_body_at and message.get("body"):
                first_body_at = time.perf_counter()
            parts.append(message.get("body", b""))
            if not message.get("more_body", False) and not response_ended.done():
                response_ended.set_result(None)

    await application(scope, receive, send)
    response_ended.cancel()
    return status, b"".join(parts), first_body_at


async def _loop(
    application: Any, path: str, body: bytes, key: str, count: int, concurrency: int = 1
) -> tuple[list[float], list[float]]:
    """Per request: milliseconds to the whole answer, and to its first body bytes (a stream's first line).
    ``concurrency``: requests in flight at once, each client sending its next as soon as its last has ended."""
    walls: list[float] = []
    firsts: list[float] = []
    left = count

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            status, content, first_body_at = await _request(application, path, body, key)
            walls.append((time.perf_counter() - started) * 1000)
            firsts.append((first_body_at - started) * 1000)
            if status != 200:
                raise SystemExit(f"profile: {path} answered {status}: {content[:500]!r}")

    await asyncio.gather(*(client() for _ in range(concurrency)))
    from billing.services.ledger import ledger_flush

    # The ledger rows of the last requests are still being written: their cost belongs to the run.
    await ledger_flush()
    return walls, firsts


def _top(profile: cProfile.Profile, sort: str, limit: int) -> list[str]:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats(sort).print_stats(limit)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return [line for line in lines[start:] if line.strip()]


QUESTION = [{"role": "user", "content": "Say hello."}]
TURN = (
    "A sentence of an earlier turn of the conversation, with some punctuation, numbers like 3.14 and 42, "
    'a quoted "word", an accented café and a line break.\n'
)


def history(size: int) -> list[dict[str, str]]:
    """Earlier turns, user and assistant in turn, about ``size`` bytes of JSON in all (none for 0)."""
    turns: list[dict[str, str]] = []
    while size > 0:
        content = TURN * 8
        turns.append({"role": ("user", "assistant")[len(turns) % 2], "content": content})
        size -= len(json.dumps(turns[-1]))
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("llmhub", "bare", "bare-aiohttp"), default="llmhub")
    parser.add_argument("--model", default="bench-json")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("-n", type=int, default=1000, help="requests measured (after 50 of warm-up)")
    parser.add_argument("--key", default=os.environ.get("BENCH_KEY", ""))
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight at once (default 1: one after the other); the ledger writer's batches grow with it",
    )
    parser.add_argument(
        "--what-if",
        default="",
        help="comma-separated: no-request-signals, short-switch-interval",
    )
    parser.add_argument(
        "--history-kb",
        type=int,
        default=0,
        help="send a conversation of about this many KiB (earlier turns before the question), as chat clients do",
    )
    parser.add_argument("--cprofile", action="store_true", help="also list the top functions (slows the run)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    what_if = {name.strip() for name in args.what_if.split(",") if name.strip()}
    application = _setup(what_if)
    path = "/v1/chat/completions" if args.target == "llmhub" else f"/{args.target}/v1/chat/completions"
    payload: dict[str, Any] = {"model": args.model, "messages": [*history(args.history_kb * 1024), *QUESTION]}
    if args.stream:
        payload.update(stream=True, stream_options={"include_usage": True})
    body = json.dumps(payload).encode()

    async def run() -> dict[str, Any]:
        await _loop(application, path, body, args.key, 50, args.concurrency)
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        walls, firsts = await _loop(application, path, body, args.key, args.n, args.concurrency)
        cpu = time.process_time() - cpu_started
        wall = time.perf_counter() - wall_started
        walls.sort()
        firsts.sort()
        result: dict[str, Any] = {
            "target": args.target,
            "model": args.model,
            "stream": args.stream,
            "body_bytes": len(body),
            "what_if": sorted(what_if),
            "requests": args.n,
            "concurrency": args.concurrency,
            "cpu_ms_per_request": round(cpu * 1000 / args.n, 3),
            "wall_ms_per_request": round(wall * 1000 / args.n, 3),
            "wall_p50_ms": round(walls[len(walls) // 2], 3),
            "wall_p99_ms": round(walls[min(len(walls) - 1, int(len(walls) * 0.99))], 3),
            "first_body_p50_ms": round(firsts[len(firsts) // 2], 3),
        }
        if args.cprofile:
            profile = cProfile.Profile()
            profile.enable()
            await _loop(application, path, body, args.key, args.n, args.concurrency)
            profile.disable()
            result["cprofile_cumulative"] = _top(profile, "cumulative", args.top)
            result["cprofile_own"] = _top(profile, "tottime", args.top)
        return result

    print(json.dumps(asyncio.run(run()), indent=2))


if __name__ == "__main__":
    main()
