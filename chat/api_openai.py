"""The OpenAI-compatible REST entry point: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models``.

These are plain async Django views rather than DRF views: DRF's ``APIView`` is synchronous, so
every request would hop to a thread and back, which the hot path cannot afford. They stay thin all
the same: parse, hand over to ``chat.pipeline``, serialize. Every answer, error or not, carries
``x-request-id`` and ``x-llmhub-overhead-ms``; errors use OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from billing.authentication import key_from_headers
from billing.models import Operation
from core.errors import (
    json_response,
    openai_error_body,
    openai_error_body_for,
    openai_error_event,
    openai_error_response,
)
from core.event_stream import EventStreamResponse
from core.exceptions import DATABASE_OUTAGE_ERRORS, ApplicationError, DatabaseUnavailableError
from providers.adapters.base import chunk_json
from providers.exceptions import ProviderError, model_not_found
from providers.types import ResolvedModel

from .pipeline import (
    Caller,
    CompletionRun,
    caller_from_api_key,
    completion_reject,
    completion_reject_unverified,
    completion_start,
    model_listed_for_caller,
    model_refused_as_unknown,
    models_for_caller,
    new_request_id,
)
from .validation import InvalidRequestError, RequestTooLargeError, json_parse, json_text

logger = logging.getLogger("llmhub.api")

SSE_DONE = b"data: [DONE]\n\n"


def response_stamp(
    response: HttpResponse, request_id: str, started: float, run: CompletionRun | None = None
) -> HttpResponse:
    response["x-request-id"] = request_id
    response["X-Content-Type-Options"] = "nosniff"
    overhead = run.overhead_ms() if run is not None else (time.perf_counter() - started) * 1000
    response["x-llmhub-overhead-ms"] = f"{overhead:.2f}"
    if run is not None:
        for name, value in run.response_headers.items():
            response[name] = value
    return response


def parse_body(request: HttpRequest) -> Any:
    """The request's JSON, read once, at most ``LLMHUB_MAX_REQUEST_BYTES`` of it. Not through ``request.body``, which
    applies Django's limit for forms (``DATA_UPLOAD_MAX_MEMORY_SIZE``, 2.5 MB: one photo as a base64 image passes it)
    and keeps the bytes for the request's life: a 30 MB body would be held twice, as bytes and as its JSON. The bytes
    are let go once decoded, before the JSON is parsed (``json.loads`` of bytes holds them, their text and the
    result at once)."""
    content_type = request.content_type or ""
    if content_type and content_type != "application/json":
        raise InvalidRequestError("Content-Type must be application/json.", code="invalid_content_type")
    limit = settings.LLMHUB_MAX_REQUEST_BYTES
    # An announced length over the limit is not read (llmhub/handlers.py did not receive it); a chunked body has
    # none, and what arrived is measured instead.
    raw = request.read(limit + 1) if int(request.META.get("CONTENT_LENGTH") or 0) <= limit else None
    if raw is None or len(raw) > limit:
        raise RequestTooLargeError(
            f"The request body is larger than the {limit / 2**20:g} MB ({limit:,} bytes) this server accepts.",
            code="request_too_large",
        )
    text = json_text(raw)
    del raw
    return json_parse(text or "null")


def openai_endpoint(view: Callable[..., Awaitable[HttpResponse]]) -> Callable[..., Awaitable[HttpResponse]]:
    """What Django's middleware would otherwise do for these views (they are served without it, see
    ``llmhub.handlers``): refuse a Host not in ALLOWED_HOSTS, and turn any unexpected failure into an
    OpenAI-shaped 500 rather than Django's HTML error page."""

    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            request.get_host()
        except DisallowedHost:
            return json_response(
                openai_error_body("Invalid Host header.", error_type="invalid_request_error", code="invalid_host"),
                status=400,
            )
        try:
            return await view(request, *args, **kwargs)
        except DATABASE_OUTAGE_ERRORS:
            # Any query of ours that met a database outage outside the pipeline's steps: a 503 to retry.
            logger.warning("database unavailable in %s", view.__name__, exc_info=True)
            return response_stamp(
                openai_error_response(DatabaseUnavailableError()), new_request_id(), time.perf_counter()
            )
        except Exception:
            logger.exception("unexpected failure in %s", view.__name__)
            response = json_response(
                openai_error_body(
                    "The server had an error while processing your request.",
                    error_type="api_error",
                    code="internal_error",
                ),
                status=500,
            )
            return response_stamp(response, new_request_id(), time.perf_counter())

    return csrf_exempt(wrapper)


async def run_open(
    request: HttpRequest, *, endpoint: str, request_id: str, started: float, operation: str = Operation.CHAT
) -> CompletionRun:
    """The steps every POST entry point takes before its call: authenticate, read the body, start the run
    (resolve and admit). A request refused on the way still gets its ``rejected`` ledger row: by its key's
    hash when the database cannot say whose key it is, by its caller when the body is unreadable."""
    raw_key = key_from_headers(request.headers)
    try:
        caller = await caller_from_api_key(raw_key)
    except DatabaseUnavailableError as exc:
        body = None
        with contextlib.suppress(ApplicationError):
            body = parse_body(request)
        completion_reject_unverified(
            raw_key=raw_key or "",
            endpoint=endpoint,
            request_id=request_id,
            error=exc,
            started=started,
            body=body,
            operation=operation,
        )
        raise
    try:
        body = parse_body(request)
    except ApplicationError as exc:
        completion_reject(
            caller=caller, endpoint=endpoint, request_id=request_id, error=exc, started=started, operation=operation
        )
        raise
    # Only a body that named a model reaches the allow-lists; any other is refused before them.
    with model_refused_as_unknown(body.get("model") if isinstance(body, dict) else None):
        return await completion_start(
            caller=caller,
            body=body,
            endpoint=endpoint,
            request_id=request_id,
            operation=operation,
            route=request.headers.get("x-llmhub-route"),
        )


def shutdown_response(
    run: CompletionRun | None, render: Callable[[ApplicationError], HttpResponse]
) -> HttpResponse | None:
    """The answer to a run the server's shutdown cut before its answer began (a 503 that says so); None
    for any other cancellation, which the caller lets go on."""
    error = run.shutdown_error() if run is not None else None
    return None if error is None else render(error)


@openai_endpoint
async def chat_completions(request: HttpRequest) -> HttpResponse:
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "POST":
        return response_stamp(await method_not_allowed(request, "POST", request_id), request_id, started)
    run: CompletionRun | None = None
    try:
        run = await run_open(request, endpoint="rest", request_id=request_id, started=started)
        if run.body.get("stream"):
            response = await _open_stream(run)
        else:
            response = json_response(await run.complete())
    except ApplicationError as exc:
        response = openai_error_response(exc)
    except asyncio.CancelledError:
        if (response := shutdown_response(run, openai_error_response)) is None:
            raise
    return response_stamp(response, request_id, started, run)


@openai_endpoint
async def embeddings(request: HttpRequest) -> HttpResponse:
    """``POST /v1/embeddings``: the same steps as a chat completion (key, model, admission, one call, one
    ledger row with ``operation=embeddings``), answered with the upstream's list of embeddings."""
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "POST":
        refused = await method_not_allowed(request, "POST", request_id, operation=Operation.EMBEDDINGS)
        return response_stamp(refused, request_id, started)
    run: CompletionRun | None = None
    try:
        run = await run_open(
            request, endpoint="rest", request_id=request_id, started=started, operation=Operation.EMBEDDINGS
        )
        response = json_response(await run.embed())
    except ApplicationError as exc:
        response = openai_error_response(exc)
    except asyncio.CancelledError:
        if (response := shutdown_response(run, openai_error_response)) is None:
            raise
    return response_stamp(response, request_id, started, run)


@openai_endpoint
async def completions(request: HttpRequest) -> HttpResponse:
    """``POST /v1/completions``: OpenAI's legacy text completions (a ``prompt`` continued; with a ``suffix``, the
    gap between them filled in, as code-completion plugins ask), the same steps as a chat completion (key, model,
    admission, moderation of the prompt, the suffix and the output, routing, one ledger row with
    ``operation=completions``), answered as the upstream's ``text_completion``, or its chunks when streamed. Only a
    model an OpenAI-compatible provider serves can continue a text (``docs/completions.md``)."""
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "POST":
        refused = await method_not_allowed(request, "POST", request_id, operation=Operation.COMPLETIONS)
        return response_stamp(refused, request_id, started)
    run: CompletionRun | None = None
    try:
        run = await run_open(
            request, endpoint="rest", request_id=request_id, started=started, operation=Operation.COMPLETIONS
        )
        if run.body.get("stream"):
            response = await _open_stream(run)
        else:
            response = json_response(await run.complete())
    except ApplicationError as exc:
        response = openai_error_response(exc)
    except asyncio.CancelledError:
        if (response := shutdown_response(run, openai_error_response)) is None:
            raise
    return response_stamp(response, request_id, started, run)


async def _open_stream(run: CompletionRun) -> HttpResponse:
    """Answer once the stream's first chunk has arrived (``CompletionRun.stream_open``), so that a failure
    before any output (429, 5xx, timeout, bad auth, on every deployment tried) still gets its proper HTTP
    status instead of a 200 and a broken stream."""
    chunks = await run.stream_open()
    return EventStreamResponse(_sse(run, chunks))


async def _sse(run: CompletionRun, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield b"data: " + chunk_json(chunk) + b"\n\n"
    except ProviderError as exc:
        # Headers are gone: report in-band the way OpenAI does; its SDK raises APIError on this event.
        yield openai_error_event(exc)
        return
    except asyncio.CancelledError:
        # The server's shutdown cut the stream: in-band too, and no [DONE], so the client knows it is short.
        error = run.shutdown_error()
        if error is None:
            raise
        yield openai_error_event(error)
        return
    except Exception as exc:
        # A failure of ours after the headers: in-band as well, and no [DONE], never a silent cut.
        yield openai_error_event(run.stream_failed(exc))
        return
    finally:
        await chunks.aclose()
    yield SSE_DONE


@openai_endpoint
async def models_list(request: HttpRequest) -> HttpResponse:
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "GET":
        return response_stamp(await method_not_allowed(request, "GET", request_id), request_id, started)
    try:
        caller = await caller_from_api_key(key_from_headers(request.headers))
        models = await models_for_caller(caller, mode=None)  # embedding models too, unlike the chat picker
    except ApplicationError as exc:
        return response_stamp(openai_error_response(exc), request_id, started)
    payload = {"object": "list", "data": [_model_object(model) for model in models]}
    return response_stamp(json_response(payload), request_id, started)


@openai_endpoint
async def model_retrieve(request: HttpRequest, model: str) -> HttpResponse:
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "GET":
        return response_stamp(await method_not_allowed(request, "GET", request_id), request_id, started)
    try:
        caller = await caller_from_api_key(key_from_headers(request.headers))
        listed = await model_listed_for_caller(caller, model, mode=None)
        if listed is not None:
            return response_stamp(json_response(_model_object(listed)), request_id, started)
        raise model_not_found(model)
    except ApplicationError as exc:
        return response_stamp(openai_error_response(exc), request_id, started)


def _model_object(model: ResolvedModel) -> dict[str, Any]:
    """A public model as OpenAI's model object, the same in the list and on its own."""
    return {"id": model.name, "object": "model", "created": 0, "owned_by": model.provider.name}


async def method_not_allowed(
    request: HttpRequest, allowed: str, request_id: str, operation: str = Operation.CHAT
) -> HttpResponse:
    """405, and the ``rejected`` ledger row (of ``operation``) a request from a valid key gets however it was
    refused."""
    error = InvalidRequestError(
        f"Method not allowed; use {allowed}." if allowed else f"Method not allowed ({request.method}).",
        param=None,
        code="method_not_allowed",
    )
    raw_key = key_from_headers(request.headers)
    if raw_key:
        caller: Caller | None
        try:
            caller = await caller_from_api_key(raw_key)
        except ApplicationError:
            caller = None  # the method is wrong whoever asks; an unknown key changes nothing
        if caller is not None:
            completion_reject(caller=caller, endpoint="rest", request_id=request_id, error=error, operation=operation)
    response = json_response(openai_error_body_for(error), status=405)
    response["Allow"] = allowed
    return response


@openai_endpoint
async def not_found(request: HttpRequest, path: str) -> HttpResponse:
    """Unknown /v1 paths answer in OpenAI's error shape too, not Django's HTML 404; TRACE, refused
    everywhere, is a 405 here as well."""
    started = time.perf_counter()
    if request.method == "TRACE":
        request_id = new_request_id()
        return response_stamp(await method_not_allowed(request, "", request_id), request_id, started)
    response = json_response(
        openai_error_body(
            f"Invalid URL ({request.method} /v1/{path})", error_type="invalid_request_error", code="unknown_url"
        ),
        status=404,
    )
    return response_stamp(response, new_request_id(), started)
