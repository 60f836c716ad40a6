"""A read made by another request while a change is saved and not yet committed: how the tests of the in-process
caches (the catalog, limits, roles, sessions, moderation policies, prompt labels, experiment plans, users' own
keys) show that a read in between, which still sees the rows as they were, does not keep that copy once the change
commits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from django.db import connection, transaction

T = TypeVar("T")

# How long the read may take before the test fails rather than wait for ever: on a lock the change holds, it
# would wait for a commit that never comes. Not a bound on how fast it is (the machine may be slow).
READ_TIMEOUT = 30.0


def read_before_commit(change: Callable[[], object], read: Callable[[], T]) -> T:
    """What ``read`` answers while ``change`` is made in a transaction that has not committed yet. It runs in
    another thread, so on its own database connection (Django's are per thread), which sees committed rows
    only, as another request of the same process would; the connection is closed once it has read. Once this
    returns the change has committed."""
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
        reader.join(timeout=READ_TIMEOUT)
        assert not reader.is_alive(), f"the read did not answer within {READ_TIMEOUT:g} s of the change"
    if errors:
        raise errors[0]
    return answers[0]
