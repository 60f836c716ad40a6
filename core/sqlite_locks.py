"""SQLite: a cursor whose statement failed is closed at once, on the thread that ran it.

A statement that fails leaves its cursor in a reference cycle: Django re-raises the driver's error from
``DatabaseErrorWrapper.__exit__``, whose frame holds the exception, whose traceback holds the frames that
hold the cursor. Only the cyclic garbage collector frees it then, on whichever thread it happens to run,
and finalizing a SQLite cursor resets its statement, which takes its connection's mutex. A thread whose
connection waits for a lock (SQLite's busy timeout, 20 s here) holds that mutex while it waits. So a ledger
write that failed at ``BEGIN`` ("database is locked": Django runs ``BEGIN`` on a cursor it never closes),
then waited for the lock again on the same connection, froze the event loop's thread, which had started a
collection, until the wait ended: seen on 4 December under load with the write lock held for a minute
(tests/test_sqlite_locks.py).

Closing the cursor when its statement fails resets the statement there and then, on the thread that owns
the connection and holds no lock; the collection later finds nothing to reset. Only for ``OperationalError``
(locks, busy, I/O: the connection's failures), the errors after which a connection waits: code that catches
an ``IntegrityError`` may go on with the same cursor, and Django closes the cursors of its own queries.
"""

from __future__ import annotations

from typing import Any

from django.db import OperationalError


def _cursor_closed_on_failure(execute: Any, sql: Any, params: Any, many: bool, context: dict[str, Any]) -> Any:
    try:
        return execute(sql, params, many, context)
    except OperationalError:
        context["cursor"].cursor.close()  # the driver's cursor; Django's wrapper closes it again harmlessly
        raise


def sqlite_cursors_watch(sender: Any, connection: Any, **kwargs: Any) -> None:
    """``connection_created``'s receiver (``core.apps``), for SQLite connections."""
    if connection.vendor == "sqlite" and _cursor_closed_on_failure not in connection.execute_wrappers:
        connection.execute_wrappers.insert(0, _cursor_closed_on_failure)
