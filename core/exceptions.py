"""The errors every app raises: ``ApplicationError`` for a failure of ours a client should see, and what
a database outage looks like.

Each app subclasses ``ApplicationError`` for its own failures (``providers.exceptions``,
``billing.exceptions``); ``core.errors`` renders any of them in the client's protocol. Model: HackSoft
``core/exceptions.py``.
"""

from __future__ import annotations

from typing import Any

import django.db
from django.conf import settings


class ApplicationError(Exception):
    """A failure of ours that a client should see as a clear message (HackSoft's ApplicationError).

    ``status_code``, ``error_type`` and ``code`` are what OpenAI's error shape says; a subclass that knows
    when to come back sets ``retry_after`` (seconds, the ``Retry-After`` header; ``retry_after_ms`` when it knows
    the wait more exactly than in whole seconds, the ``retry-after-ms`` header), and headers the answer must
    carry go in ``extra["headers"]``."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None
    retry_after_ms: int | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        extra: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.extra = extra or {}


# What a database that is down, unreachable, restarting or locked raises (as opposed to a query that is
# wrong, which stays a 500): Django's wrappers, and psycopg's own classes for the paths Django does not wrap.
try:
    import psycopg

    _DRIVER_OUTAGE_ERRORS: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # pragma: no cover - SQLite-only installs
    _DRIVER_OUTAGE_ERRORS = ()

DATABASE_OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    django.db.OperationalError,
    django.db.InterfaceError,
    *_DRIVER_OUTAGE_ERRORS,
)


class DatabaseUnavailableError(ApplicationError):
    """llmhub's own database did not answer: a 503 the client should retry after ``retry_after`` seconds.

    ``server_error`` is the type OpenAI gives its own 5xx answers (the SDKs raise ``InternalServerError``
    for the status and retry it by default)."""

    status_code = 503
    error_type = "server_error"
    code = "database_unavailable"

    def __init__(self, message: str = "llmhub's database is unavailable; retry shortly", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = float(settings.LLMHUB_DATABASE_RETRY_AFTER)
