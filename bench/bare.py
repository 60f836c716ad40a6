"""The ceiling of our stack: the same server, Django and middleware as llmhub, and nothing else.

These views forward the request body to the upstream and relay the answer's bytes: no key check, no
catalog, no admission, no ledger, no SDK, no per-chunk JSON. Whatever llmhub costs above the faster of
them is the price of its own work, which is what `make bench` reports.

Two clients, measured side by side (issue 14): ``chat_completions`` forwards with httpx,
``chat_completions_aiohttp`` with aiohttp. The report takes the faster one as the ceiling, per point.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import httpx
from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

# One pooled client for the process, sized like llmhub's (providers.adapters.common.POOL_LIMITS), so
# that neither side pays for new connections under load.
_client = httpx.AsyncClient(
    timeout=httpx.Timeout(60.0, connect=10.0),
    limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=30.0),
)


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    body = request.body
    parsed = json.loads(body)
    url = settings.BENCH_BARE_UPSTREAMS[parsed["model"]] + "/chat/completions"
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench-upstream"}
    if not parsed.get("stream"):
        upstream = await _client.post(url, content=body, headers=headers)
        return HttpResponse(
            upstream.content, status=upstream.status_code, content_type=upstream.headers.get("content-type")
        )
    upstream = await _client.send(_client.build_request("POST", url, content=body, headers=headers), stream=True)
    response = StreamingHttpResponse(
        _relay(upstream), status=upstream.status_code, content_type=upstream.headers.get("content-type")
    )
    response["Cache-Control"] = "no-cache"
    return response


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for part in upstream.aiter_raw():
            yield part
    finally:
        await upstream.aclose()


# aiohttp's session must be made inside the running loop: one per loop (uvicorn runs one per worker).
_sessions: dict[int, aiohttp.ClientSession] = {}


def _session() -> aiohttp.ClientSession:

    loop = asyncio.get_running_loop()
    session = _sessions.get(id(loop))
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30.0)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=60.0),
            auto_decompress=False,
        )
        _sessions[id(loop)] = session
    return session


@csrf_exempt
async def chat_completions_aiohttp(request: HttpRequest) -> HttpResponse:
    body = request.body
    parsed = json.loads(body)
    url = settings.BENCH_BARE_UPSTREAMS[parsed["model"]] + "/chat/completions"
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench-upstream"}
    upstream = await _session().post(url, data=body, headers=headers)
    if not parsed.get("stream"):
        try:
            content = await upstream.read()
        finally:
            upstream.release()
        return HttpResponse(content, status=upstream.status, content_type=upstream.headers.get("content-type"))
    response = StreamingHttpResponse(
        _relay_aiohttp(upstream), status=upstream.status, content_type=upstream.headers.get("content-type")
    )
    response["Cache-Control"] = "no-cache"
    return response


async def _relay_aiohttp(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for part in upstream.content.iter_any():
            yield part
    finally:
        upstream.release()
