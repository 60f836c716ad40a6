"""The ceiling of our stack: the same server, Django and middleware as llmhub, and nothing else.

This view forwards the request body to the upstream and relays the answer's bytes: no key check, no
catalog, no admission, no ledger, no SDK, no per-chunk JSON. Whatever llmhub costs above this view is
the price of its own work, which is what `make bench` reports.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

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
