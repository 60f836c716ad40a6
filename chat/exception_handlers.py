"""One error shape everywhere: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

The OpenAI-compatible endpoints must answer in it; the management API (/api/*) uses it too so that
a client handles errors one way. Model: HackSoft ``api/exception_handlers.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

from providers.exceptions import DATABASE_OUTAGE_ERRORS, ApplicationError, DatabaseUnavailableError

logger = logging.getLogger("llmhub.api")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, *, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def application_error_body(exc: ApplicationError) -> dict[str, Any]:
    return error_body(exc.message, error_type=exc.error_type, param=exc.param, code=exc.code)


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); its SDK raises its own
# exception class per status, so the status is what a client of /v1/messages reacts to.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
# Anthropic answers an overloaded model with 529, where our OpenAI-shaped errors say 503.
_ANTHROPIC_OVERLOADED = frozenset({"upstream_overloaded"})


def anthropic_error(exc: ApplicationError) -> tuple[int, dict[str, Any]]:
    """The status and body of ``exc`` for a client of the Messages API (``/v1/messages``):
    ``{"type": "error", "error": {"type", "message"}}``."""
    status = 529 if exc.code in _ANTHROPIC_OVERLOADED else exc.status_code
    return status, anthropic_error_body(exc.message, status=status)


def anthropic_error_body(message: str, *, status: int) -> dict[str, Any]:
    error_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _first_field_error(detail: Any, path: str = "") -> tuple[str | None, str]:
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            return _first_field_error(value, f"{path}.{name}" if path and name else (name or path))
    if isinstance(detail, list) and detail:
        return _first_field_error(detail[0], path)
    return (path or None), str(detail)


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DATABASE_OUTAGE_ERRORS):
        logger.warning("database unavailable: %s", exc)
        exc = DatabaseUnavailableError()
    if isinstance(exc, ApplicationError):
        response = Response(application_error_body(exc), status=exc.status_code)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            response["Retry-After"] = str(max(1, round(retry_after)))
        return response
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        param, message = _first_field_error(exc.detail)
        message = f"{param}: {message}" if param else message
        code = "invalid_value"
    else:
        param, message = None, str(getattr(exc, "detail", exc))
        code = getattr(getattr(exc, "detail", None), "code", None) or getattr(exc, "default_code", None)
    if response.status_code == status.HTTP_401_UNAUTHORIZED or isinstance(exc, exceptions.NotAuthenticated):
        code = "invalid_api_key"
    response.data = error_body(
        message, error_type=_TYPES.get(response.status_code, "api_error"), param=param, code=code
    )
    return response


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's ``handler404``: a path under /api/ that no route matches (``/api/conversations/-1/``: the
    ``int`` converter takes digits only) answers in the API's error shape; pages keep Django's HTML."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            error_body(
                f"Invalid URL ({request.method} {request.path})", error_type="invalid_request_error", code="unknown_url"
            ),
            status=404,
        )
    return defaults.page_not_found(request, exception)
