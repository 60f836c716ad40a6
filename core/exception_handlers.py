"""DRF's ``EXCEPTION_HANDLER`` and Django's ``handler404`` for the management API (``/api/*``): every error
answers in OpenAI's shape (``core.errors``), as ``/v1/*`` does, so that a client handles errors one way.
Model: HackSoft ``api/exception_handlers.py``.
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

from .errors import error_headers, openai_error_body, openai_error_body_for
from .exceptions import DATABASE_OUTAGE_ERRORS, ApplicationError, DatabaseUnavailableError

logger = logging.getLogger("llmhub.api")

# OpenAI's error type for the statuses DRF's own exceptions answer with.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
}


def _first_field_error(detail: Any, path: str = "") -> tuple[str | None, str]:
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = str(key) if key != "non_field_errors" else ""  # a list's errors are keyed by index, 0 too
            return _first_field_error(value, f"{path}.{name}" if path and name else (name or path))
    if isinstance(detail, list) and detail:
        return _first_field_error(detail[0], path)
    return (path or None), str(detail)


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DATABASE_OUTAGE_ERRORS):
        logger.warning("database unavailable: %s", exc)
        exc = DatabaseUnavailableError()
    if isinstance(exc, ApplicationError):
        # A DRF Response, not core.errors' HttpResponse: DRF renders it for the client's Accept header.
        return Response(openai_error_body_for(exc), status=exc.status_code, headers=error_headers(exc))
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
    response.data = openai_error_body(
        message, error_type=_TYPES.get(response.status_code, "api_error"), param=param, code=code
    )
    return response


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's ``handler404``: a path under /api/ that no route matches (``/api/conversations/-1/``: the
    ``int`` converter takes digits only) answers in the API's error shape; pages keep Django's HTML."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            openai_error_body(
                f"Invalid URL ({request.method} {request.path})", error_type="invalid_request_error", code="unknown_url"
            ),
            status=404,
        )
    return defaults.page_not_found(request, exception)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's ``handler400``, for what Django refuses before any view runs (a suspicious request: more form
    fields than ``DATA_UPLOAD_MAX_NUMBER_FIELDS``, a malformed multipart body): JSON in the API's error shape
    under /api/ and /v1/, Django's HTML page elsewhere. The exception's text is not echoed."""
    if request.path.startswith(("/api/", "/v1/")):
        return JsonResponse(
            openai_error_body(
                "The request could not be read (too many fields, or a malformed body).",
                error_type="invalid_request_error",
                code="bad_request",
            ),
            status=400,
        )
    return defaults.bad_request(request, exception)
