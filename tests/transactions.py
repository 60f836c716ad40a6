"""Another request's transaction, on another thread and its own database connection (Django's are per thread),
open while the test does something: a read made while a change is saved and not yet committed, how the tests of
the in-process caches (the catalog, limits, roles, sessions, moderation policies, prompt labels, experiment plans,
users' own keys) show that a read in between, which still sees the rows as they were, does not keep that copy once
the change commits; and a write held uncommitted, as behind another process's long transaction, for the tests of
what waits for it (the ledger's high water, a second fold) or is refused at its commit."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from django.db import connection, transaction

T = TypeVar("T")

# How long the other thread may take before the test fails rather than wait for ever: a read on a lock the change
# holds would wait for a commit that never comes. Not a bound on how fast it is (the machine may be slow).
ANSWER_TIMEOUT = 30.0


def read_before_commit(change: Callable[[], object], read: Callable[[], T]) -> T:
    """What ``read`` answers while ``change`` is made in a transaction that has not committed yet. It runs in
    another thread, so on its own connection, which sees committed rows only, as another request of the same
    process would; the connection is closed once it has read. Once this returns the change has committed."""
    answers: list[T] = []
    errors: list[BaseException] = []

    def another_request_reads() -> None:
        try:
            answers.append(read())
        except BaseException as error:  # raised in the test's thread, which the test sees
            errors.append(error)
        finally:
            connection.close()  # this thread's own

    with transaction.atomic():
        change()
        reader = threading.Thread(target=another_request_reads, name="read-before-commit")
        reader.start()
        reader.join(timeout=ANSWER_TIMEOUT)
        assert not reader.is_alive(), f"the read did not answer within {ANSWER_TIMEOUT:g} s of the change"
    if errors:
        raise errors[0]
    return answers[0]


@contextlib.contextmanager
def transaction_held_open(write: Callable[[], T]) -> Iterator[T]:
    """``write`` made in another thread, on its own connection, in a transaction held open while the block runs:
    the block gets what ``write`` returned. The transaction commits as the block ends, and what its commit raised
    (a constraint checked then) is raised there, unless the block raised first; what ``write`` raised is raised
    before the block. The connection is closed once it has committed."""
    written, release = threading.Event(), threading.Event()
    results: list[T] = []
    errors: list[BaseException] = []

    def another_request_writes() -> None:
        try:
            with transaction.atomic():
                results.append(write())
                written.set()
                release.wait()  # set whatever the block does
        except BaseException as error:  # raised in the test's thread, which the test sees
            errors.append(error)
        finally:
            written.set()  # a write that failed does not leave the test waiting
            connection.close()  # this thread's own

    writer = threading.Thread(target=another_request_writes, name="transaction-held-open")
    writer.start()
    try:
        assert written.wait(ANSWER_TIMEOUT), f"the write did not end within {ANSWER_TIMEOUT:g} s"
        if errors:
            raise errors[0]
        yield results[0]
    finally:
        release.set()
        writer.join(timeout=ANSWER_TIMEOUT)
    assert not writer.is_alive(), f"the transaction did not commit within {ANSWER_TIMEOUT:g} s of the block's end"
    if errors:
        raise errors[0]
