"""The server's log lines: one JSON object per line in production, each carrying the id of the request it
was written for, and no secret in any of them.

JSON lines (``JsonFormatter``, ``LLMHUB_LOG_FORMAT=json``, production's default): ``time`` (UTC, ISO 8601,
milliseconds), ``level``, ``logger``, ``message``, ``request_id`` (null outside a request), ``trace_id`` and
``span_id`` when the request's trace is exported (``core.tracing.trace_log_ids``: a log line leads to its
request's span) and, when there is one, ``exception`` (the traceback as text). The request id comes from
``core.request_context``, set where a request gets its id, through ``RequestIdFilter`` on the handler: every
line a request's handling writes carries it, from any logger. Plain text (the default in development)
carries it too.

Keeping secrets out of the server's own log lines.

uvicorn logs every request's target with its query string: the access log (``uvicorn.access``) and
the WebSocket handshakes (``uvicorn.error``). llmhub refuses an API key sent in a query string, but a
client that sends one has put it in the URL all the same, and a log line is read by more people, and
kept longer, than the request. The filter sits on those loggers themselves, not on a handler or a
formatter, so it holds whatever log configuration the server was started with.

The providers' SDKs log at DEBUG. The anthropic SDK writes every response's headers (``HTTP Response: …
Headers({…})``): a provider or a proxy that echoes the key it was sent in a header (a user's own key, or
the platform's) would have it written to the log. ``SdkResponseHeaderNames`` keeps only those headers'
names; it sits on the SDKs' loggers (``SDK_LOGGERS``) through ``logging_settings``, so every process that
configures Django's logging (the servers, the Celery workers that re-check users' keys) has it.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import httpx2

from core.request_context import request_id_current
from core.tracing import trace_log_ids

# No space: log parsers split the request line on spaces.
QUERY_REDACTED = "?[redacted]"
SERVER_LOGGERS = ("uvicorn.access", "uvicorn.error")


def without_query(target: str) -> str:
    path, separator, _ = target.partition("?")
    return path + QUERY_REDACTED if separator else path


class DropQueryStrings(logging.Filter):
    """Cuts the query string off every request target (a string argument starting with ``/``) of a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(arg, str) and arg[:1] == "/" and "?" in arg for arg in args):
            record.args = tuple(without_query(arg) if isinstance(arg, str) and arg[:1] == "/" else arg for arg in args)
        return True


def drop_query_strings_from_server_logs() -> None:
    """Install the filter on uvicorn's loggers (once, however often it is called). uvicorn configures its
    logging before it imports the application, so the application installs it when it is imported."""
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, DropQueryStrings) for existing in logger.filters):
            logger.addFilter(DropQueryStrings())


# websockets' DEBUG lines: uvicorn hands its socket protocol ``uvicorn.error`` (the library's own default is
# ``websockets.server``), which then prints every frame's text and every handshake header.
WEBSOCKET_LOGGERS = ("uvicorn.error", "websockets.server")
# Handshake headers that carry a credential: the browser's session cookie, a bearer key or token.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "set-cookie", "x-api-key"})


class WebSocketDebugRedacted(logging.Filter):
    """A chat socket's auth message carries a gateway key or a JWT, its handshake the session cookie: websockets'
    DEBUG lines print a frame's text (its first 50 and last 25 characters) and every header. A frame becomes its
    type and length, a credential header's value ``[redacted]``; the lines stay, an operator's trace of the socket."""

    def filter(self, record: logging.LogRecord) -> bool:
        args, message = record.args, record.msg
        if not isinstance(args, tuple) or message not in ("< %s", "> %s", "< %s: %s", "> %s: %s"):
            return True
        if len(args) == 1 and hasattr(args[0], "opcode") and hasattr(args[0], "data"):
            frame = args[0]
            if frame.opcode.name in ("TEXT", "BINARY", "CONT"):
                record.args = (f"{frame.opcode.name} [{len(frame.data)} bytes]",)
        elif len(args) == 2 and str(args[0]).lower() in CREDENTIAL_HEADERS:
            record.args = (args[0], "[redacted]")
        return True


def websocket_debug_redact() -> None:
    """Install ``WebSocketDebugRedacted`` on the loggers websockets writes to (once, however often it is called);
    like ``drop_query_strings_from_server_logs``, when the application is imported, after uvicorn's logging."""
    for name in WEBSOCKET_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, WebSocketDebugRedacted) for existing in logger.filters):
            logger.addFilter(WebSocketDebugRedacted())


# The official SDKs' loggers of the requests they send and the responses they get (the openai one writes no
# headers today; it is built by the same generator, so it gets the same filter).
SDK_LOGGERS = ("anthropic._base_client", "openai._base_client")


class SdkResponseHeaderNames(logging.Filter):
    """Replaces a record's headers argument (the SDK's ``response.headers``) by their names only."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(arg, httpx2.Headers) for arg in args):
            record.args = tuple(
                f"(headers: {', '.join(arg.keys())})" if isinstance(arg, httpx2.Headers) else arg for arg in args
            )
        return True


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served (``record.request_id``; None outside
    one). On the handler, so that records of every logger, propagated or not, get it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_current()
        if getattr(record, "trace_ids", None) is None:
            record.trace_ids = trace_log_ids()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Only the formatted message goes out: a record's arguments are not
    written apart from it, and neither are ``extra`` fields, so a line says what its message says."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_current(),
        }
        trace_ids = getattr(record, "trace_ids", None)
        if trace_ids:
            line["trace_id"], line["span_id"] = trace_ids
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # Non-ASCII stays readable; a line break inside a message is escaped, so one record is one line.
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The development format, with the request's id after the logger's name when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request_tag)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None) or request_id_current()
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


LOG_FORMATS = ("text", "json")


def logging_settings(*, log_format: str, level: str) -> dict[str, Any]:
    """Django's ``LOGGING``: everything to stderr, as ``log_format`` (text or json) says, the request id on
    every line. In JSON, uvicorn's own loggers (the access log, the server's errors) write JSON lines
    through the same handler instead of uvicorn's text ones, so a log collector reads one format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"LLMHUB_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "request_id": {"()": "llmhub.logging.RequestIdFilter"},
            "sdk_header_names": {"()": "llmhub.logging.SdkResponseHeaderNames"},
        },
        "formatters": {
            "text": {"()": "llmhub.logging.TextFormatter"},
            "json": {"()": "llmhub.logging.JsonFormatter"},
        },
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": log_format, "filters": ["request_id"]}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "django.db.backends": {"level": "WARNING"},
            "httpx": {"level": "WARNING"},
            "httpx2": {"level": "WARNING"},
            **{name: {"filters": ["sdk_header_names"]} for name in SDK_LOGGERS},
        },
    }
    if log_format == "json":
        for name in SERVER_LOGGERS:
            config["loggers"][name] = {"handlers": ["console"], "propagate": False}
    return config
