"""OpenAI's Responses API, inbound and stateless: ``POST /v1/responses``.

A thin transport adapter over ``chat.pipeline``, like ``api_openai`` and ``api_anthropic``: the request is run as
the chat completion it translates into (``chat.translate_responses``, inside ``completion_start``), so the same
keys, allow-lists, rate limits, budget reservations, moderation and one ledger row (``operation=responses``,
priced as a chat completion) apply, on every provider. The answer is a ``Response`` object, or its typed events
when streamed. Nothing is stored: ``store`` is accepted and ignored, and ``GET /v1/responses/{id}`` (like every
other path under it) answers 404 in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from django.http import HttpRequest, HttpResponse

from billing.authentication import key_from_headers
from billing.models import Operation
from core.errors import json_dumps, json_response, openai_error_body, openai_error_response
from core.event_stream import EventStreamResponse
from core.exceptions import ApplicationError
from providers.exceptions import ProviderError, ProviderRateLimitError

from .api_openai import method_not_allowed, openai_endpoint, response_stamp, run_open, shutdown_response
from .pipeline import CompletionRun, caller_from_api_key, new_request_id
from .translate_responses import ResponseEvents, response_from_completion, response_id


@openai_endpoint
async def responses_create(request: HttpRequest) -> HttpResponse:
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "POST":
        response = await method_not_allowed(request, "POST", request_id, operation=Operation.RESPONSES)
        return response_stamp(response, request_id, started)
    run: CompletionRun | None = None
    created_at = int(time.time())
    try:
        run = await run_open(
            request, endpoint="rest", request_id=request_id, started=started, operation=Operation.RESPONSES
        )
        body = run.client_body or run.body
        if run.body.get("stream"):
            chunks = await run.stream_open()
            # The model that answered (a fallback, maybe), as the stream's chunks and a whole reply name it.
            events = ResponseEvents(
                body, response_id=response_id(request_id), model=run.answered_by.name, created_at=created_at
            )
            response: HttpResponse = EventStreamResponse(_sse(run, events, chunks))
        else:
            completion = await run.complete()
            response = json_response(
                response_from_completion(body, completion, response_id=response_id(request_id), created_at=created_at)
            )
    except ApplicationError as exc:
        response = openai_error_response(exc)
    except asyncio.CancelledError:
        if (response := shutdown_response(run, openai_error_response)) is None:
            raise
    return response_stamp(response, request_id, started, run)


def _sse_event(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + json_dumps(event).encode() + b"\n\n"


def _failure_code(error: ApplicationError) -> str:
    """The Responses API's error code for a stream that broke: its codes are few (``ResponseErrorCode``)."""
    return "rate_limit_exceeded" if isinstance(error, ProviderRateLimitError) else "server_error"


async def _sse(run: CompletionRun, events: ResponseEvents, chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    for event in events.started():
        yield _sse_event(event)
    try:
        async for chunk in chunks:
            for event in events.chunk(chunk):
                yield _sse_event(event)
    except ProviderError as exc:
        # Headers are gone: the stream ends with response.failed, never with a response.completed.
        for event in events.failed(_failure_code(exc), exc.message):
            yield _sse_event(event)
        return
    except asyncio.CancelledError:
        error = run.shutdown_error()
        if error is None:
            raise
        for event in events.failed("server_error", error.message):
            yield _sse_event(event)
        return
    except Exception as exc:
        # A failure of ours after the headers: response.failed too, never a silent cut.
        for event in events.failed("server_error", run.stream_failed(exc).message):
            yield _sse_event(event)
        return
    finally:
        await chunks.aclose()
    for event in events.completed():
        yield _sse_event(event)


# OpenAI's endpoints beside the responses' own ids, which a request for a response by id must not be taken for.
_NOT_SERVED = {
    "input_tokens": "there is no token count for the Responses API (a response's `usage` has its input tokens).",
    "compact": "compaction needs stored state, which llmhub's stateless /v1/responses does not keep.",
}


@openai_endpoint
async def responses_not_stored(request: HttpRequest, path: str) -> HttpResponse:
    """``/v1/responses/{id}`` and what hangs off it (``input_items``, ``cancel``): llmhub keeps no response, so
    there is none to return, cancel or delete. The caller is authenticated first, as OpenAI does."""
    started = time.perf_counter()
    request_id = new_request_id()
    try:
        await caller_from_api_key(key_from_headers(request.headers))
    except ApplicationError as exc:
        return response_stamp(openai_error_response(exc), request_id, started)
    response_name = path.split("/", 1)[0]
    if response_name in _NOT_SERVED:
        body = openai_error_body(
            f"llmhub does not serve {request.method} /v1/responses/{path}: {_NOT_SERVED[response_name]}",
            error_type="invalid_request_error",
            code="unknown_url",
        )
        return response_stamp(json_response(body, status=404), request_id, started)
    body = openai_error_body(
        f"No response found with id '{response_name}': llmhub's /v1/responses is stateless and stores no "
        "response (`store` is accepted and ignored).",
        error_type="invalid_request_error",
        param="response_id",
        code="not_found",
    )
    return response_stamp(json_response(body, status=404), request_id, started)
