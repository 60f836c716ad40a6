"""Where a stream's first line spends its time, stage by stage, in-process.

Drives llmhub's ASGI application as ``bench.profile_request`` does (sequential streaming requests against
the canned nginx stream) with timing wrappers around the stages of the request path, and reports the
median time at which each stage is reached, counted from the moment the server hands the request to the
application. Whatever lies between two stages is the cost of the code between them; the step from
``sdk post`` to ``upstream headers`` includes the round trip to the upstream.

The wrappers are installed here, for measurement only: nothing in llmhub knows about them. Each adds a
``perf_counter`` call, well under a microsecond.

Run by ``bench/run.py --profile``, or by hand with the benchmark's environment::

    python -m bench.first_line -n 1500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

# (mark, what a reader sees) in request order; the table keeps this order.
STAGES = [
    ("start", "the request reaches the ASGI application"),
    ("request_built", "Django has built the request (body read, HttpRequest created)"),
    ("view", "the view starts (URL resolved, handler tasks scheduled)"),
    ("authenticated", "the gateway key is checked (cached)"),
    ("admitted", "validated, model resolved, admitted"),
    ("sdk_post", "the adapter calls the SDK"),
    ("http_send", "the SDK hands the built request to its HTTP client"),
    ("upstream_headers", "the upstream's response headers are in"),
    ("first_chunk", "the first chunk is read and decoded"),
    ("first_bytes_sent", "its SSE line is sent to the client"),
]


def _install(marks: dict[str, float]) -> None:
    import httpx2
    from django.core.handlers.asgi import ASGIHandler

    from chat import api_openai
    from providers.adapters.openai import OpenAIAdapter

    def mark(name: str) -> None:
        marks.setdefault(name, time.perf_counter())

    create_request = ASGIHandler.create_request

    def timed_create_request(self: Any, scope: Any, body_file: Any) -> Any:
        built = create_request(self, scope, body_file)
        mark("request_built")
        return built

    ASGIHandler.create_request = timed_create_request  # type: ignore[method-assign]

    def around(func: Callable[..., Any], before: str | None, after: str | None) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            if before:
                mark(before)
            result = await func(*args, **kwargs)
            if after:
                mark(after)
            return result

        return timed

    api_openai.caller_from_api_key = around(api_openai.caller_from_api_key, "view", "authenticated")
    api_openai.completion_start = around(api_openai.completion_start, None, "admitted")
    send = httpx2.AsyncClient.send
    httpx2.AsyncClient.send = around(send, "http_send", "upstream_headers")  # type: ignore[method-assign]

    stream = OpenAIAdapter.stream

    async def timed_stream(self: Any, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        mark("sdk_post")
        async for chunk in stream(self, body):
            mark("first_chunk")
            yield chunk

    OpenAIAdapter.stream = timed_stream  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1500, help="requests measured (after 100 of warm-up)")
    parser.add_argument("--model", default="bench-sse")
    parser.add_argument("--key", default=os.environ.get("BENCH_KEY", ""))
    args = parser.parse_args()

    from bench.profile_request import _request, _setup

    application = _setup(set())
    marks: dict[str, float] = {}
    _install(marks)
    payload = {"model": args.model, "messages": [{"role": "user", "content": "Say hello."}], "stream": True}
    body = json.dumps(payload).encode()

    async def run() -> dict[str, float]:
        seen: dict[str, list[float]] = {name: [] for name, _ in STAGES}
        for index in range(100 + args.n):
            marks.clear()
            started = marks["start"] = time.perf_counter()
            status, content, first_body_at = await _request(application, "/v1/chat/completions", body, args.key)
            if status != 200:
                raise SystemExit(f"first_line: answered {status}: {content[:300]!r}")
            marks["first_bytes_sent"] = first_body_at
            if index >= 100:
                for name, at in marks.items():
                    seen[name].append((at - started) * 1000)
        return {name: round(statistics.median(values), 3) for name, values in seen.items() if values}

    print(json.dumps({"requests": args.n, "median_ms_at": asyncio.run(run())}, indent=2))


def markdown(result: dict[str, Any]) -> str:
    at = result["median_ms_at"]
    lines = [
        "",
        f"| a stream's first line, in-process ({result['requests']} requests) | reached at, p50 ms | step ms |",
        "|---|---:|---:|",
    ]
    previous = 0.0
    for name, text in STAGES:
        if name in at:
            lines.append(f"| {text} | {at[name]:.3f} | {at[name] - previous:+.3f} |")
            previous = at[name]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
