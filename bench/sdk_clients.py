"""The adapters' HTTP client, httpx2's pool against aiohttp (the SDKs' ``DefaultAioHttpClient``), side by side.

``python bench/sdk_clients.py`` starts nginx answering canned OpenAI JSON and SSE (``bench/upstream.py``) and
calls it through ``OpenAIAdapter`` (the openai SDK) in-process, on uvloop like the served gateway, with each
client in turns over several rounds (so a change in the machine's load hits both alike):

* concurrency 1: CPU microseconds per call (the process's own CPU: the steadier figure on a shared machine)
  and wall p50 / p99;
* concurrency 32: calls per second and CPU per call;
* a stream: CPU per streamed call.

Both clients go through the outbound policy (``providers.adapters.aiohttp_client`` for aiohttp). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmhub.testing.ports import free_port


def _setup() -> None:
    import django
    from django.conf import settings

    settings.configure(
        LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS=True,
        LLMHUB_PROVIDER_HTTP_CLIENT="httpx",
        USE_TZ=True,
        INSTALLED_APPS=[],
    )
    django.setup()


async def _measure(client: str, base_url: str, calls: int, concurrency: int, stream: bool) -> dict[str, Any]:
    from django.conf import settings

    from providers.adapters.openai import OpenAIAdapter
    from providers.fields import Secret
    from providers.types import ProviderConfig

    settings.LLMHUB_PROVIDER_HTTP_CLIENT = client
    config = ProviderConfig(id=1, name="bench", kind="openai", base_url=base_url, api_key=Secret("sk-bench"))
    adapter = OpenAIAdapter(config)
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}

    async def one() -> float:
        started = time.perf_counter()
        if stream:
            async for _ in adapter.stream(body):
                pass
        else:
            await adapter.complete(body)
        return time.perf_counter() - started

    for _ in range(50):
        await one()
    gate = asyncio.Semaphore(concurrency)

    async def gated() -> float:
        async with gate:
            return await one()

    cpu, wall = time.process_time(), time.perf_counter()
    if concurrency == 1:
        durations = [await one() for _ in range(calls)]
    else:
        durations = await asyncio.gather(*(gated() for _ in range(calls)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await adapter.aclose()
    durations.sort()
    return {
        "client": client,
        "concurrency": concurrency,
        "stream": stream,
        "calls": calls,
        "cpu_us_per_call": round(cpu / calls * 1e6, 1),
        "calls_per_s": round(calls / wall, 1),
        "p50_ms": round(durations[len(durations) // 2] * 1000, 3),
        "p99_ms": round(durations[min(len(durations) - 1, int(len(durations) * 0.99))] * 1000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args(argv)
    _setup()
    import uvloop

    from bench import upstream

    work = Path(tempfile.mkdtemp(prefix="bench-sdk-"))
    port = free_port()
    (work / "nginx.conf").write_text(upstream.nginx_conf(work, port))
    nginx = subprocess.Popen([upstream.nginx_binary(), "-c", str(work / "nginx.conf"), "-p", str(work)])
    try:
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        results = []
        for round_number in range(args.rounds):
            order = ("httpx", "aiohttp") if round_number % 2 == 0 else ("aiohttp", "httpx")
            for client in order:
                for path, concurrency, stream in (("json", 1, False), ("json", 32, False), ("sse", 1, True)):
                    base_url = f"http://127.0.0.1:{port}/{path}/v1"
                    point = uvloop.run(_measure(client, base_url, args.calls, concurrency, stream))
                    point["round"] = round_number
                    results.append(point)
                    print(json.dumps(point), file=sys.stderr)
        summary: dict[str, Any] = {}
        for client in ("httpx", "aiohttp"):
            for concurrency, stream in ((1, False), (32, False), (1, True)):
                mine = [r for r in results if r["client"] == client and r["concurrency"] == concurrency]
                mine = [r for r in mine if r["stream"] == stream]
                key = f"{client}_{'sse' if stream else 'json'}_c{concurrency}"
                summary[key] = {
                    "cpu_us_per_call_min": min(r["cpu_us_per_call"] for r in mine),
                    "calls_per_s_max": max(r["calls_per_s"] for r in mine),
                    "p50_ms_min": min(r["p50_ms"] for r in mine),
                    "p99_ms_min": min(r["p99_ms"] for r in mine),
                }
        print(json.dumps({"points": results, "summary": summary}, indent=2))
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
