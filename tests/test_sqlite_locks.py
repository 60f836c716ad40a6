"""A SQLite connection waiting for a lock must not stop other threads (``core/sqlite_locks.py``).

Seen on 4 December with the database's write lock held for a minute under load: the server stopped
answering for 20 s at a time. A ledger write in a worker thread had failed ("database is locked") at
``BEGIN``, a statement Django runs on a cursor it never closes; the exception's traceback kept that cursor
in a reference cycle. The thread's next ``BEGIN`` on the same connection waited for the lock (SQLite's busy
timeout, 20 s), holding the connection's mutex, and the garbage collector, run by the event loop's thread,
finalized the old cursor, which takes that mutex: the event loop waited for the busy timeout.

The test builds the same sequence on a database of its own: one thread's failed ``BEGIN``, the same
thread waiting for the lock again, and a collection on another thread, which must end while the first
still waits."""

from __future__ import annotations

import gc
import sqlite3
import threading

import pytest
from django.db import OperationalError
from django.db.utils import ConnectionHandler


@pytest.fixture
def locked_database(tmp_path, django_db_blocker):
    """A SQLite database of its own (not the tests' database), its write lock held by another connection
    until ``.release()``."""
    path = tmp_path / "locked.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    holder.execute("BEGIN IMMEDIATE")

    class Locked:
        options = {"timeout": 0.2, "transaction_mode": "IMMEDIATE"}
        handler = ConnectionHandler(
            {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path), "OPTIONS": options}}
        )

        @staticmethod
        def release() -> None:
            if holder.in_transaction:
                holder.execute("COMMIT")

    with django_db_blocker.unblock():
        yield Locked
    Locked.release()
    holder.close()


def begin_and_commit(connection) -> None:
    """An empty transaction, begun as ``transaction.atomic()`` begins one on SQLite (``BEGIN IMMEDIATE`` on a
    cursor that Django does not close), on a connection that is not one of ``django.db.connections``."""
    connection.set_autocommit(False, force_begin_transaction_with_broken_autocommit=True)
    try:
        connection.commit()
    finally:
        connection.set_autocommit(True)


def test_collecting_a_failed_begins_cursor_does_not_wait_for_its_connection(locked_database):
    waiting, second_done, collected = threading.Event(), threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def writer() -> None:
        connection = locked_database.handler["default"]  # this thread's connection
        try:
            begin_and_commit(connection)  # fails at BEGIN: the lock is held
        except OperationalError:
            outcome["first"] = "locked"  # not the exception: it is garbage now, with its cycle and the cursor
        connection.connection.execute("PRAGMA busy_timeout = 30000")
        waiting.set()
        try:
            begin_and_commit(connection)  # waits for the lock, holding the connection's mutex
            outcome["second"] = "written"
        except OperationalError as exc:
            outcome["second"] = exc
        finally:
            second_done.set()
            connection.close()

    def collect() -> None:
        gc.collect()
        collected.set()

    gc.disable()  # only the collection below runs, on its own thread
    try:
        first = threading.Thread(target=writer)
        first.start()
        assert waiting.wait(10)
        # The writer is in SQLite's busy wait by now (were it not, the collection would pass without proving anything).
        second_done.wait(0.5)
        collector = threading.Thread(target=collect)
        collector.start()
        # Without the fix the collection waits as long as the writer does, until the lock is released below.
        outcome["collected_while_locked"] = collected.wait(10)
        locked_database.release()
        first.join(30)
        collector.join(30)
    finally:
        gc.enable()
    assert outcome["first"] == "locked"
    assert outcome["second"] == "written"
    assert outcome["collected_while_locked"] is True  # the collection did not wait for the lock
