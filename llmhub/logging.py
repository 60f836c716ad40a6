"""Keeping secrets out of the server's own log lines.

uvicorn logs every request's target with its query string: the access log (``uvicorn.access``) and
the WebSocket handshakes (``uvicorn.error``). llmhub refuses an API key sent in a query string, but a
client that sends one has put it in the URL all the same, and a log line is read by more people, and
kept longer, than the request. The filter sits on those loggers themselves, not on a handler or a
formatter, so it holds whatever log configuration the server was started with.
"""

from __future__ import annotations

import logging

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
