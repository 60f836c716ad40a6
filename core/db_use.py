"""Which threads, and which request, have used the database since Django last checked the connections.

Django checks a thread's database connections when a request ends (``close_old_connections``, a receiver
of ``request_finished``: a connection past ``CONN_MAX_AGE``, or left unusable by an error, is closed). Under
ASGI it must run on the thread whose connections it checks, the thread the request's ORM calls ran on: a
hop to that thread and back for every request, which on the lean /v1 handler (``llmhub/handlers.py``) was
most of the handler's own CPU (a view that does nothing, in-process on a loaded machine: 313–389 µs a
request with the hop, 83–125 µs without; docs/performance.md). Most /v1 requests use no connection on that
thread: keys, the catalog and plans come from in-process caches, admission from Redis, and the ledger writes
from threads of its own, which check their connections themselves (``billing.services.ledger._write_rows``).

So every connection notes the thread and the request (a context variable the handler sets) of each
connect and each query (``execute_wrappers``), and the handler makes its hop only when the thread it lands on
has used its connections since it last checked them, or the request used the database, on any thread.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar, Token
from typing import Any

# Threads that connected or queried since their connections were last checked by ``db_use_checked``.
_used_threads: set[int] = set()
# The thread the lean handler's check last ran on (its hop's destination); None until it has run once.
_checking_thread: int | None = None


class RequestDatabaseUse:
    """Whether a request connected or queried, on any thread: shared by its tasks and the threads its
    ``sync_to_async`` calls run on, which all see the context variable's value."""

    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = False


_request_use: ContextVar[RequestDatabaseUse | None] = ContextVar("llmhub_request_database_use", default=None)


def _note() -> None:
    _used_threads.add(threading.get_ident())
    request = _request_use.get()
    if request is not None:
        request.used = True


def _noted_execute(execute: Any, sql: Any, params: Any, many: bool, context: dict[str, Any]) -> Any:
    _note()
    return execute(sql, params, many, context)


def db_use_watch(sender: Any, connection: Any, **kwargs: Any) -> None:
    """``connection_created``'s receiver (``core.apps``): the connect is a use, and so is each query on it.
    First among the wrappers, so that a test's ``connection.execute_wrapper()``, which pops the last one
    when it ends, never removes it."""
    _note()
    if _noted_execute not in connection.execute_wrappers:
        connection.execute_wrappers.insert(0, _noted_execute)


def db_use_request_begin() -> tuple[RequestDatabaseUse, Token[RequestDatabaseUse | None]]:
    """A request begins: its uses are noted from here (for its tasks created after this call)."""
    use = RequestDatabaseUse()
    return use, _request_use.set(use)


def db_use_request_end(token: Token[RequestDatabaseUse | None]) -> None:
    _request_use.reset(token)


def db_use_unchecked(request: RequestDatabaseUse) -> bool:
    """Whether a check at the end of ``request`` has anything to look at: the request used the database,
    or the checking thread did since its last check (a task outside any request, say), or it is not known
    yet which thread that is."""
    return request.used or _checking_thread is None or _checking_thread in _used_threads


def db_use_checked() -> None:
    """Called on the checking thread right before its connections are checked: their uses so far are seen
    by this check, and a use after it (on this thread, so after the check is done) is noted again."""
    global _checking_thread
    ident = threading.get_ident()
    _checking_thread = ident
    _used_threads.discard(ident)
