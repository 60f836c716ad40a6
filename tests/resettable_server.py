"""Run a Python module (a uvicorn server) that a module's tests share, told between them to forget the last one:
``python -m tests.resettable_server <reply fd> <module> [args...]``, under ``tests.pinned_clock`` when its clock is
pinned (``tests.billing.test_concurrency.ServerPairs``).

Each line on its stdin is a command, answered with one line on the file descriptor ``reply fd``: the count of what
the process still holds of a test (requests admitted and not settled, or settled with their ledger rows not yet
written; rows queued or being written; lines in its ledger spool). ``busy`` only answers; ``reset`` also forgets
what the test process forgets before each test (``tests/conftest.py``: ``_fresh_lookup_caches``,
``_empty_django_cache``), as a fresh server would have nothing of it: the cached models, keys and limits (looked up
by names the next test reuses), the breakers, routing figures, keys' last use and rate windows (by ids), its Django
cache. The commands are read by a thread of their own: the server's event loop never waits for them."""

from __future__ import annotations

import os
import runpy
import sys
import threading
import traceback


def held_of_a_test() -> int:
    """What this process still holds of a test; 0 once every request it took has settled and its row is written."""
    from billing.services import ledger
    from billing.services.inflight import held_count
    from billing.services.spool import CLAIMED_INFIX, spool_path

    path = spool_path()
    spooled = sum(
        len(leftover.read_text().splitlines())
        for leftover in [path, *path.parent.glob(path.name + CLAIMED_INFIX + "*")]
        if leftover.exists()
    )
    # From this thread: the snapshot, as the loop's thread may be adding a writer.
    writing = sum(len(writer.queue) + len(writer.in_flight) for _, writer in ledger._writers.snapshot())
    return held_count() + writing + spooled


def forget_the_last_test() -> None:
    from django.core.cache import cache

    from billing.services.inflight import held_clear
    from billing.services.ledger_rows import last_used_forget_local
    from billing.services.ratelimits import local_rate_limiter
    from core.cache import lookup_caches_invalidate
    from llmhub.schema_view import schema_documents_forget
    from providers.routing.breakers import breakers_forget_local
    from providers.routing.stats import stats_forget_local

    lookup_caches_invalidate()
    schema_documents_forget()
    breakers_forget_local()
    stats_forget_local()
    last_used_forget_local()
    local_rate_limiter.clear()
    held_clear()
    cache.clear()


def answer_commands(reply_fd: int) -> None:
    with os.fdopen(reply_fd, "w", buffering=1) as reply:
        for command in sys.stdin:
            try:
                held = held_of_a_test()  # before a reset, what it held: the caller then starts another pair
                if command.strip() == "reset":
                    forget_the_last_test()
            except Exception:
                traceback.print_exc()  # into the server's log; -1 has the caller start another pair
                held = -1
            reply.write(f"{held}\n")


if __name__ == "__main__":
    reply_fd, module, *args = sys.argv[1:]
    threading.Thread(target=answer_commands, args=(int(reply_fd),), name="test-commands", daemon=True).start()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
