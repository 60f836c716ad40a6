"""``core.async_bridge.run_async``: ``async_to_sync`` whose loop has ended when the call leaves, even when the
caller is interrupted while it waits (a Celery task's soft time limit, raised in the main thread by billiard's
signal handler)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
from asgiref.sync import AsyncToSync, sync_to_async
from billiard.pool import soft_timeout_sighandler
from celery.exceptions import SoftTimeLimitExceeded

from core.async_bridge import run_async


async def add(a: int, b: int) -> int:
    return a + b


async def refuse() -> None:
    raise ValueError("refused")


def test_run_async_returns_and_raises_as_async_to_sync():
    assert run_async(add, 2, b=3) == 5
    with pytest.raises(ValueError, match="refused"):
        run_async(refuse)


def test_an_interrupted_caller_runs_the_cancelled_calls_database_clean_up_and_leaves_no_loop_behind():
    """The caller leaves while the coroutine waits; the coroutine is cancelled, and its clean-up's
    thread-sensitive call (the database) runs in the caller's thread before the exception goes on: with
    ``async_to_sync`` it waited for ever for the thread that had left."""
    started = threading.Event()
    cleaned_in: list[threading.Thread] = []

    async def waits_then_cleans_up() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await sync_to_async(lambda: cleaned_in.append(threading.current_thread()))()

    def time_is_up() -> None:
        assert started.wait(30), "the call never started"
        os.kill(os.getpid(), signal.SIGUSR1)

    loops_before = set(AsyncToSync.loop_thread_executors)
    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    timer = threading.Thread(target=time_is_up)
    try:
        timer.start()
        with pytest.raises(SoftTimeLimitExceeded):
            run_async(waits_then_cleans_up)
    finally:
        timer.join()
        signal.signal(signal.SIGUSR1, previous)

    assert cleaned_in == [threading.main_thread()]
    assert set(AsyncToSync.loop_thread_executors) <= loops_before
