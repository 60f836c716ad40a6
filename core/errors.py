"""Errors as each protocol's clients read them, written once: one renderer per wire protocol.

- OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: every ``/v1/*`` answer but the
  Messages API's, the management API (``/api/*``, through ``core.exception_handlers``) and the refusals of
  ``llmhub.handlers`` (plain HTTP, TRACE), so that a client handles errors one way.
- Anthropic's, ``{"type": "error", "error": {"type", "message"}}`` with Anthropic's status codes, for
  ``/v1/messages``: its SDK raises its own exception class per status
  (https://docs.anthropic.com/en/api/errors).

Each renderer gives the body, the HTTP response (status, ``Retry-After`` from ``exc.retry_after``, the
headers in ``exc.extra["headers"]``; OpenAI's 401 also says ``WWW-Authenticate``) and the in-band event a
stream reports a failure with once its headers are gone.
"""

from __future__ import annotations

import json
import math
from typing import Any

from django.http import HttpResponse

from .exceptions import ApplicationError

# Compact, and UTF-8 as it is: the encoding of every /v1 answer (DRF's JSONRenderer writes the same).
json_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def json_response(payload: Any, *, status: int = 200) -> HttpResponse:
    return HttpResponse(json_dumps(payload).encode(), status=status, content_type="application/json")


def error_headers(exc: ApplicationError) -> dict[str, str]:
    """The headers an answer refusing with ``exc`` carries, whatever its protocol: ``Retry-After`` (whole
    seconds, rounded up, at least 1: a client retrying after it must not come back before the time) and
    ``retry-after-ms`` (the exact wait, ``exc.retry_after_ms`` or ``retry_after`` in milliseconds, which the
    openai and anthropic SDKs prefer) when the error knows when to come back, and those it brought in
    ``extra`` (``x-ratelimit-*``)."""
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        exact_ms = getattr(exc, "retry_after_ms", None)
        headers["retry-after-ms"] = str(exact_ms if exact_ms is not None else math.ceil(round(retry_after * 1000, 3)))
    headers.update(exc.extra.get("headers") or {})
    return headers


def _with_headers(response: HttpResponse, headers: dict[str, str]) -> HttpResponse:
    for name, value in headers.items():
        response[name] = value
    return response


# OpenAI


def openai_error_body(
    message: str, *, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def openai_error_body_for(exc: ApplicationError) -> dict[str, Any]:
    return openai_error_body(exc.message, error_type=exc.error_type, param=exc.param, code=exc.code)


def openai_error_response(exc: ApplicationError) -> HttpResponse:
    response = _with_headers(json_response(openai_error_body_for(exc), status=exc.status_code), error_headers(exc))
    if exc.status_code == 401:
        response["WWW-Authenticate"] = 'Bearer realm="llmhub"'
    return response


def openai_error_event(exc: ApplicationError) -> bytes:
    """The server-sent event a chat-completions stream ends with when it fails after its headers: the error
    body as a ``data:`` line, which OpenAI's SDKs raise as ``APIError``."""
    return b"data: " + json_dumps(openai_error_body_for(exc)).encode() + b"\n\n"


# Anthropic

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# Anthropic answers an overloaded model with 529, where our OpenAI-shaped errors say 503.
_ANTHROPIC_OVERLOADED = frozenset({"upstream_overloaded"})


# The paths of Anthropic's Messages API: their errors are in Anthropic's shape whoever asks.
ANTHROPIC_PATHS = ("/v1/messages",)
# The paths of OpenAI's API that llmhub serves (and its own feedback): OpenAI's shape whoever asks.
OPENAI_PATHS = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/feedback")


def speaks_anthropic(path: str, headers: Any) -> bool:
    """Whether a ``/v1`` request expects Anthropic's shapes: the Messages API's paths always, and any other path
    but OpenAI's (``/v1/models``, which both protocols share, and a path llmhub does not serve, such as the
    anthropic SDK's ``/v1/files``) when the client sent ``anthropic-version``, as the anthropic SDK does on every
    request."""
    if path.startswith(ANTHROPIC_PATHS):
        return True
    return "anthropic-version" in headers and not path.startswith(OPENAI_PATHS)


def anthropic_error_body(message: str, *, status: int) -> dict[str, Any]:
    error_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def anthropic_error_for(exc: ApplicationError) -> tuple[int, dict[str, Any]]:
    """The status and body of ``exc`` for a client of the Messages API: the type is Anthropic's for the
    status, which is ours but for an overloaded upstream (529)."""
    status = 529 if exc.code in _ANTHROPIC_OVERLOADED else exc.status_code
    return status, anthropic_error_body(exc.message, status=status)


def anthropic_error_response(exc: ApplicationError) -> HttpResponse:
    """Besides ``error_headers``, a refusal that brought Anthropic's own names for them
    (``extra["anthropic_headers"]``: ``anthropic-ratelimit-*``) carries those too."""
    status, body = anthropic_error_for(exc)
    headers = {**error_headers(exc), **(exc.extra.get("anthropic_headers") or {})}
    return _with_headers(json_response(body, status=status), headers)


def anthropic_error_event(exc: ApplicationError) -> bytes:
    """The ``error`` event a Messages stream ends with when it fails after its headers (Anthropic reports
    in-band; its SDK raises it)."""
    _status, body = anthropic_error_for(exc)
    return b"event: error\ndata: " + json_dumps(body).encode() + b"\n\n"
