"""Anthropic's Messages API, inbound: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A thin transport adapter over ``chat.pipeline``, like ``api_openai``: the same keys, allow-lists, rate
limits, budget reservations and one ledger row (``operation=messages``); only the shapes differ. An
Anthropic-protocol model gets the request untranslated and its events relayed as they came; any other
model is reached through the chat-completions translation of ``providers.adapters.translate_anthropic``
(the adapters decide, ``BaseAdapter.messages``). Errors use Anthropic's shape and status codes, so that
its SDK raises its own classes (``AuthenticationError``, ``NotFoundError``, ``RateLimitError``, …);
``x-api-key`` or ``Authorization: Bearer`` carry the gateway key (both sent: the Bearer one); ``anthropic-version``
is accepted whatever it says and not passed on (the provider is called with the version the installed anthropic SDK
sends, its ``ANTHROPIC_API_VERSION``; the body is relayed as the client wrote it), and
``anthropic-beta`` is passed on to an Anthropic-protocol provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from billing.authentication import key_from_headers
from billing.models import Operation
from billing.services.admission import admission_count_request
from core.errors import anthropic_error_body, anthropic_error_event, anthropic_error_response, json_response
from core.event_stream import EventStreamResponse
from core.exceptions import DATABASE_OUTAGE_ERRORS, ApplicationError, DatabaseUnavailableError
from providers.adapters.base import WireEvent
from providers.exceptions import ProviderError
from providers.models import ModelMode
from providers.tokens import prompt_tokens
from providers.types import ResolvedModel

from .api_openai import parse_body, response_stamp, run_open, shutdown_response
from .pipeline import (
    CompletionRun,
    caller_from_api_key,
    completion_reject,
    messages_counted,
    messages_takeable_check,
    model_for_estimate,
    model_listed_for_caller,
    models_for_caller,
    new_request_id,
)
from .validation import InvalidRequestError
from .validation_anthropic import validate_count_tokens_request

logger = logging.getLogger("llmhub.api")

_ENDPOINT = "rest"
# count_tokens's answer says whether its count is the provider's own or llmhub's estimate.
_COUNT_HEADER = "x-llmhub-token-count"
_MAX_PAGE = 1000


def _answer(response: HttpResponse, request_id: str, started: float, run: CompletionRun | None = None) -> HttpResponse:
    # Anthropic's SDK reads the request id from `request-id`; ours also goes out as `x-request-id`.
    response["request-id"] = request_id
    if run is not None:  # the rate limits it was admitted under, in Anthropic's names besides OpenAI's
        for name, value in run.admission.anthropic_headers.items():
            response[name] = value
    return response_stamp(response, request_id, started, run)


def anthropic_endpoint(view: Callable[..., Awaitable[HttpResponse]]) -> Callable[..., Awaitable[HttpResponse]]:
    """``api_openai.openai_endpoint`` for Anthropic's clients: a bad Host and any unexpected failure in
    Anthropic's error shape."""

    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            request.get_host()
        except DisallowedHost:
            body = anthropic_error_body("Invalid Host header.", status=400)
            return _answer(json_response(body, status=400), new_request_id(), time.perf_counter())
        try:
            return await view(request, *args, **kwargs)
        except DATABASE_OUTAGE_ERRORS:
            logger.warning("database unavailable in %s", view.__name__, exc_info=True)
            return _answer(anthropic_error_response(DatabaseUnavailableError()), new_request_id(), time.perf_counter())
        except Exception:
            logger.exception("unexpected failure in %s", view.__name__)
            body = anthropic_error_body("The server had an error while processing your request.", status=500)
            return _answer(json_response(body, status=500), new_request_id(), time.perf_counter())

    return csrf_exempt(wrapper)


@anthropic_endpoint
async def messages(request: HttpRequest) -> HttpResponse:
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "POST":
        return _answer(await method_not_allowed(request, request_id), request_id, started)
    run: CompletionRun | None = None
    try:
        run = await run_open(
            request, endpoint=_ENDPOINT, request_id=request_id, started=started, operation=Operation.MESSAGES
        )
        headers = _forwarded(request)
        if run.body.get("stream"):
            response = await _open_stream(run, headers)
        else:
            response = json_response(await run.messages_complete(headers=headers))
    except ApplicationError as exc:
        response = anthropic_error_response(exc)
    except asyncio.CancelledError:
        if (response := shutdown_response(run, anthropic_error_response)) is None:
            raise
    return _answer(response, request_id, started, run)


def _forwarded(request: HttpRequest) -> dict[str, str]:
    """The client's headers an Anthropic-protocol provider must see: the beta features it opted into
    (``anthropic-beta``: interleaved thinking, longer contexts, …), without which such a request fails."""
    beta = request.headers.get("anthropic-beta")
    return {"anthropic-beta": beta} if beta else {}


async def _open_stream(run: CompletionRun, headers: dict[str, str]) -> HttpResponse:
    """As for chat completions: answer once the first event has arrived (``messages_stream_open``), so that
    a failure before any output still gets its own HTTP status."""
    events = await run.messages_stream_open(headers=headers)
    return EventStreamResponse(_sse(run, events))


async def _sse(run: CompletionRun, events: AsyncIterator[WireEvent]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event.sse()
    except ProviderError as exc:
        # Headers are gone: Anthropic reports in-band with an `error` event, which its SDK raises.
        yield anthropic_error_event(exc)
    except asyncio.CancelledError:
        error = run.shutdown_error()
        if error is None:
            raise
        yield anthropic_error_event(error)
    except Exception as exc:
        # A failure of ours after the headers: an `error` event too, never a silent cut.
        yield anthropic_error_event(run.stream_failed(exc))
    finally:
        await events.aclose()


@anthropic_endpoint
async def count_tokens(request: HttpRequest) -> HttpResponse:
    """A Messages request's input tokens for the model the caller names: its provider's own count where the provider
    counts (Anthropic's API, exact and free: ``messages_counted``, after admission, so a caller over its limit
    sends nothing), else, or when that provider fails, the estimate the ledger charges when a provider counts none
    (``providers.tokens.prompt_tokens``); ``x-llmhub-token-count`` says which (``provider``, ``estimate``). Nothing
    is charged, so no ledger row. A request the model would refuse before any call (what the translation for an
    OpenAI-protocol model cannot express: ``messages_takeable_check``) gets the 400 /v1/messages answers. It counts
    toward the caller's requests per minute (not tokens), so that it cannot be called without bound; over the limit
    it gets the 429 /v1/messages would."""
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "POST":
        return _answer(await method_not_allowed(request, request_id), request_id, started)
    try:
        caller = await caller_from_api_key(key_from_headers(request.headers))
        body = parse_body(request)
        validate_count_tokens_request(body)
        model = await model_for_estimate(caller=caller, name=body["model"], operation=Operation.MESSAGES)
        messages_takeable_check(model, body)
        admission = await admission_count_request(
            user_id=caller.user_id, api_key_id=caller.api_key_id, request_id=request_id
        )
    except ApplicationError as exc:
        return _answer(anthropic_error_response(exc), request_id, started)
    counted = await messages_counted(caller, model, body, headers=_forwarded(request), request_id=request_id)
    estimated = counted is None
    if counted is None:
        counted = prompt_tokens(body, operation=Operation.MESSAGES)
    response = json_response({"input_tokens": counted})
    # Which it is: an exact count lets a client fit a prompt to the last token, an estimate does not.
    response[_COUNT_HEADER] = "estimate" if estimated else "provider"
    for name, value in {**admission.headers, **admission.anthropic_headers}.items():
        response[name] = value
    return _answer(response, request_id, started)


async def method_not_allowed(request: HttpRequest, request_id: str, allowed: str = "POST") -> HttpResponse:
    """405, and the ``rejected`` ledger row a request from a valid key gets however it was refused."""
    error = InvalidRequestError(f"Method not allowed; use {allowed}.", code="method_not_allowed", status_code=405)
    raw_key = key_from_headers(request.headers)
    if raw_key:
        with contextlib.suppress(ApplicationError):
            caller = await caller_from_api_key(raw_key)
            completion_reject(
                caller=caller, endpoint=_ENDPOINT, request_id=request_id, error=error, operation=Operation.MESSAGES
            )
    response = anthropic_error_response(error)
    response["Allow"] = allowed
    return response


@anthropic_endpoint
async def models_list(request: HttpRequest) -> HttpResponse:
    """``GET /v1/models`` as Anthropic answers it: the models the caller may send to ``/v1/messages`` (chat
    models; embedding models are listed to OpenAI's clients only) as ``ModelInfo`` objects, a page at a time
    (``limit``, 1–1000, 20 by default; ``after_id`` or ``before_id``, a listed model's id), in the order
    ``/v1/models`` lists them to OpenAI's clients."""
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "GET":
        return _answer(await method_not_allowed(request, request_id, allowed="GET"), request_id, started)
    try:
        caller = await caller_from_api_key(key_from_headers(request.headers))
        limit, after_id, before_id = _page_parameters(request)
        models = await models_for_caller(caller, mode=ModelMode.CHAT)
        names = [model.name for model in models]
        start, end = 0, len(models)
        if after_id is not None:
            start = _cursor(names, after_id, "after_id") + 1
            end = min(end, start + limit)
        elif before_id is not None:
            end = _cursor(names, before_id, "before_id")
            start = max(0, end - limit)
        else:
            end = min(end, limit)
    except ApplicationError as exc:
        return _answer(anthropic_error_response(exc), request_id, started)
    page = [_model_info(model) for model in models[start:end]]
    more = start > 0 if before_id is not None else end < len(models)
    payload = {
        "data": page,
        "has_more": more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
    return _answer(json_response(payload), request_id, started)


@anthropic_endpoint
async def model_retrieve(request: HttpRequest, model: str) -> HttpResponse:
    started = time.perf_counter()
    request_id = new_request_id()
    if request.method != "GET":
        return _answer(await method_not_allowed(request, request_id, allowed="GET"), request_id, started)
    try:
        caller = await caller_from_api_key(key_from_headers(request.headers))
        listed = await model_listed_for_caller(caller, model, mode=ModelMode.CHAT)
        if listed is not None:
            return _answer(json_response(_model_info(listed)), request_id, started)
        raise ApplicationError(
            f"model: {model} does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
            status_code=404,
        )
    except ApplicationError as exc:
        return _answer(anthropic_error_response(exc), request_id, started)


def _page_parameters(request: HttpRequest) -> tuple[int, str | None, str | None]:
    query = request.GET
    raw_limit = query.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= _MAX_PAGE:
        raise InvalidRequestError(f"limit: must be an integer from 1 to {_MAX_PAGE}.", param="limit")
    after_id, before_id = query.get("after_id"), query.get("before_id")
    if after_id is not None and before_id is not None:
        raise InvalidRequestError("Give after_id or before_id, not both.", param="after_id")
    return int(raw_limit), after_id, before_id


def _cursor(names: list[str], model_id: str, param: str) -> int:
    try:
        return names.index(model_id)
    except ValueError:
        raise InvalidRequestError(f"{param}: no listed model has the id {model_id!r}.", param=param) from None


def _model_info(model: ResolvedModel) -> dict[str, Any]:
    """A public model as Anthropic's ``ModelInfo``: the catalog keeps no release date, so ``created_at`` is the
    epoch, as Anthropic's own documentation allows for an unknown one."""
    info: dict[str, Any] = {
        "type": "model",
        "id": model.name,
        "display_name": model.label or model.name,
        "created_at": "1970-01-01T00:00:00Z",
        "lifecycle": "active",
        "max_input_tokens": model.context_window,
    }
    if model.max_output_tokens:
        info["max_tokens"] = model.max_output_tokens
    return info


@anthropic_endpoint
async def not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    """A path llmhub does not serve, asked by Anthropic's clients: under /v1/messages (batches), or any other the
    anthropic SDK reaches (its Files API: ``api_models.not_found``)."""
    body = anthropic_error_body(f"Not found: {request.method} {request.path}", status=404)
    return _answer(json_response(body, status=404), new_request_id(), time.perf_counter())
