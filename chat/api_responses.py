"""OpenAI's Responses API, inbound: ``POST /v1/responses`` and the stored responses under it.

A thin transport adapter over ``chat.pipeline``, like ``api_openai`` and ``api_anthropic``: the request is run as
the chat completion it translates into (``chat.translate_responses``, inside ``completion_start``), so the same
keys, allow-lists, rate limits, budget reservations, moderation and one ledger row (``operation=responses``,
priced as a chat completion) apply, on every provider. The answer is a ``Response`` object, or its typed events
when streamed. With ``store`` (OpenAI's default) a response that completed (or is ``incomplete``) is kept
(``StoredResponse``) before the client gets it, so that its id can be chained on at once; keeping it never fails
the request (logged without content and counted, the answer says ``store: false``). ``GET``/``DELETE
/v1/responses/{id}`` and ``GET …/input_items`` serve the caller's own: another user's or out of the key's reach is
the 404 of an unknown id. They make no model call, so like ``/v1/models`` they write no ledger row; a method they do
not take is a 405 with its ``rejected`` row, as on ``/v1/responses``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse

from billing.authentication import key_from_headers
from billing.models import Operation
from core.errors import json_dumps, json_response, openai_error_body, openai_error_response
from core.event_stream import EventStreamResponse
from core.exceptions import ApplicationError
from core.metrics import responses_not_stored_add
from providers.exceptions import ProviderError, ProviderRateLimitError

from .api_openai import method_not_allowed, openai_endpoint, response_stamp, run_open, shutdown_response
from .callers import Caller
from .models import StoredResponse
from .pipeline import CompletionRun, caller_from_api_key, new_request_id
from .selectors import NotFoundError, conversation_reach, stored_response_get, stored_response_input
from .services_responses import stored_response_delete, stored_response_save
from .translate_responses import (
    ResponseEvents,
    refusal_worded,
    response_from_completion,
    response_id,
    response_shown,
)
from .validation import InvalidRequestError

logger = logging.getLogger(__name__)


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
            response: HttpResponse = EventStreamResponse(_sse(run, events, chunks, body.get("include")))
        else:
            completion = await run.complete()
            answer = response_from_completion(
                body, completion, response_id=response_id(request_id), created_at=created_at
            )
            await _store(run, answer)
            response = json_response(response_shown(answer, body.get("include")))
    except ApplicationError as exc:
        if run is not None:
            exc.message = refusal_worded(exc.param, exc.message)
            run.client_refusal_named(exc)
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


def _failed(events: ResponseEvents, code: str, message: str) -> list[dict[str, Any]]:
    """``response.failed``: a failed response is not kept (its output is partial, or was blocked), as it says."""
    events.response["store"] = False
    return events.failed(code, message)


async def _sse(
    run: CompletionRun, events: ResponseEvents, chunks: AsyncIterator[Any], include: Any
) -> AsyncIterator[bytes]:
    for event in events.started():
        yield _sse_event(event)
    try:
        async for chunk in chunks:
            for event in events.chunk(chunk):
                yield _sse_event(response_shown(event, include))
    except ProviderError as exc:
        # Headers are gone: the stream ends with response.failed, never with a response.completed; its message names
        # the client's fields, as an error before the stream does.
        exc.message = refusal_worded(exc.param, exc.message)
        run.client_refusal_named(exc)
        for event in _failed(events, _failure_code(exc), exc.message):
            yield _sse_event(event)
        return
    except asyncio.CancelledError:
        error = run.shutdown_error()
        if error is None:
            raise
        for event in _failed(events, "server_error", error.message):
            yield _sse_event(event)
        return
    except Exception as exc:
        # A failure of ours after the headers: response.failed too, never a silent cut.
        for event in _failed(events, "server_error", run.stream_failed(exc).message):
            yield _sse_event(event)
        return
    finally:
        await chunks.aclose()
    final = events.completed()
    await _store(run, final[-1]["response"])  # before its id reaches the client, which may chain on it at once
    for event in final:
        yield _sse_event(response_shown(event, include))


async def _store(run: CompletionRun, response: dict[str, Any]) -> None:
    """Keep ``response`` (completed or incomplete) when the client asked (``store``, true unless set false), with
    the input it answered (continuing a stored response, the items the client gave and a reference to that one's
    chain: ``stored_response_save``). A failure to keep it does not fail the request: the answer says ``store: false``,
    and the failure is logged (its kind only: a database's message may quote the row, users' conversation) and
    counted (``llmhub_responses_not_stored_total``)."""
    if not response["store"]:
        return
    body = run.client_body or run.body
    try:
        await sync_to_async(stored_response_save)(
            user_id=run.caller.user_id,
            api_key_id=run.caller.api_key_id,
            response=response,
            input=body["input"],
            chained=run.responses_chain,
        )
    except Exception as exc:
        logger.error(
            "response %s could not be stored (%s); answered with store false", response["id"], type(exc).__name__
        )
        responses_not_stored_add()
        response["store"] = False


# OpenAI's endpoints beside the responses' own ids, which a request for a response by id must not be taken for.
_NOT_SERVED = {
    "input_tokens": "there is no token count for the Responses API (a response's `usage` has its input tokens).",
    "compact": "llmhub does not compact conversations.",
}
# What ``include`` may name on a stored response's reads (the spec's ``IncludeEnum``): only
# ``reasoning.encrypted_content`` adds something (Claude's signed thinking, kept with the response).
_INCLUDE_VALUES = frozenset(
    {
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
        "reasoning.encrypted_content",
        "message.output_text.logprobs",
    }
)
_ITEMS_LIMIT_MAX = 100
_ITEMS_LIMIT_DEFAULT = 20


@openai_endpoint
async def responses_stored(request: HttpRequest, path: str) -> HttpResponse:
    """``/v1/responses/{id}`` (GET, DELETE), ``…/input_items`` (GET) and ``…/cancel`` (POST: there are no
    background responses to cancel), for the caller's stored responses."""
    started = time.perf_counter()
    request_id = new_request_id()
    name, _, rest = path.partition("/")
    if name in _NOT_SERVED:
        body = openai_error_body(
            f"llmhub does not serve {request.method} /v1/responses/{path}: {_NOT_SERVED[name]}",
            error_type="invalid_request_error",
            code="unknown_url",
        )
        return response_stamp(json_response(body, status=404), request_id, started)
    allowed = {"": "GET, DELETE", "input_items": "GET", "cancel": "POST"}.get(rest)
    if allowed is None:
        body = openai_error_body(
            f"Invalid URL ({request.method} /v1/responses/{path})",
            error_type="invalid_request_error",
            code="unknown_url",
        )
        return response_stamp(json_response(body, status=404), request_id, started)
    if request.method not in allowed.split(", "):
        response = await method_not_allowed(request, allowed, request_id, operation=Operation.RESPONSES)
        return response_stamp(response, request_id, started)
    try:
        caller = await caller_from_api_key(key_from_headers(request.headers))
        if rest == "input_items":
            page = _items_page(request)
            items = await sync_to_async(_input_reached)(caller, name)
            response = json_response(page(items))
        elif rest == "cancel":
            await sync_to_async(_reached)(caller, name)
            raise InvalidRequestError(
                "Only responses created with `background` can be cancelled, and llmhub makes none: this one has "
                "already ended.",
                param="response_id",
                code="not_cancellable",
            )
        elif request.method == "DELETE":
            if not await sync_to_async(_delete)(caller, name):
                raise _not_found(name)
            response = json_response({"id": name, "object": "response", "deleted": True})
        else:
            _check_include(request)
            if request.GET.get("stream") in ("true", "True", "1"):
                raise InvalidRequestError(
                    "Invalid value for 'stream': llmhub has no background responses to stream; retrieve it whole.",
                    param="stream",
                )
            stored = await sync_to_async(_reached)(caller, name)
            response = json_response(response_shown(_response_of(stored), _included(request)))
    except ApplicationError as exc:
        response = openai_error_response(exc)
    return response_stamp(response, request_id, started)


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"No response found with id '{response_id}'.", param="response_id")


def _reached(caller: Caller, response_id: str) -> StoredResponse:
    return stored_response_get(reach=conversation_reach(caller), response_id=response_id)


def _input_reached(caller: Caller, response_id: str) -> list[dict[str, Any]]:
    """The whole input the stored response answered (its chain's items, then its own), as it was given."""
    return stored_response_input(_reached(caller, response_id)).items


def _delete(caller: Caller, response_id: str) -> bool:
    return stored_response_delete(reach=conversation_reach(caller), response_id=response_id)


def _response_of(stored: StoredResponse) -> dict[str, Any]:
    """The ``Response`` as it was answered."""
    response = {
        "id": stored.response_id,
        **stored.response,
        "created_at": int(stored.created_at.timestamp()),
        "status": stored.status,
        "instructions": stored.instructions,
        "model": stored.model_name,
        "output": stored.output_items,
    }
    if stored.usage is not None:
        response["usage"] = stored.usage
    return response


def _included(request: HttpRequest) -> list[str]:
    return [*request.GET.getlist("include"), *request.GET.getlist("include[]")]


def _check_include(request: HttpRequest) -> None:
    for value in _included(request):
        if value not in _INCLUDE_VALUES:
            raise InvalidRequestError(
                f"Invalid value for 'include': {value!r} (expected one of {', '.join(sorted(_INCLUDE_VALUES))}).",
                param="include",
            )


def _items_page(request: HttpRequest) -> Any:
    """The page of input items the query asks for (``limit`` 1 to 100, 20 by default; ``order`` ``desc`` by
    default or ``asc``; ``after`` an item's id), as a function of the items: checked before the response is read."""
    _check_include(request)
    raw_limit = request.GET.get("limit")
    try:
        limit = _ITEMS_LIMIT_DEFAULT if raw_limit is None else int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= _ITEMS_LIMIT_MAX:
        raise InvalidRequestError(
            f"Invalid 'limit': expected an integer between 1 and {_ITEMS_LIMIT_MAX}.", param="limit"
        )
    order = request.GET.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("Invalid value for 'order': expected 'asc' or 'desc'.", param="order")
    after = request.GET.get("after")

    def page(items: list[dict[str, Any]]) -> dict[str, Any]:
        ordered = items if order == "asc" else items[::-1]
        start = 0
        if after is not None:
            ids = [item.get("id") for item in ordered]
            if after not in ids:
                raise InvalidRequestError(f"Invalid value for 'after': no input item '{after}'.", param="after")
            start = ids.index(after) + 1
        data = ordered[start : start + limit]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": start + limit < len(ordered),
        }

    return page
