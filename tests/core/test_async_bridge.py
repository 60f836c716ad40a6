"""``core.async_bridge.run_async``: ``async_to_sync`` whose loop has ended when the call leaves, even when the
caller is interrupted while it waits (a Celery task's soft time limit, raised in the main thread by billiard's
signal handler)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

import pytest
from asgiref.current_thread_executor import CurrentThreadExecutor
from asgiref.sync import AsyncToSync, sync_to_async
from billiard.pool import soft_timeout_sighandler
from celery.exceptions import SoftTimeLimitExceeded

from core import async_bridge
from core.async_bridge import run_async
from tests.waiting import wait_until

# This file raises exceptions from signal handlers, as billiard does: pytest-timeout's own SIGALRM is raised the same
# way, and where it is not delivered (a hang in the main thread) it never fires. The thread method always does: it
# dumps every thread's stack and ends the worker, which xdist reports and replaces.
pytestmark = pytest.mark.timeout(60, method="thread")


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
        # once the caller waits for the call, as a soft limit lands on a task that runs: sent while the caller
        # is still starting the loop's thread (in Thread.start), the exception leaves that thread unregistered
        # with its executor, and the interpreter's exit waits for it for ever
        wait_until(
            lambda: _waits_for_the_call(threading.main_thread()), "the caller waits for the call", interval=0.001
        )
        # To the main thread, where billiard's handler raises: sent to the process (os.kill, as billiard's parent
        # sends it), the kernel may hand it to another thread, and CPython runs the handler only when the main
        # thread next runs bytecode, which a main thread asleep in asgiref's untimed wait does not (a run here
        # hung so; docs/reliability.md). This test is of what run_async does once the exception is raised.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

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


def _waits_for_the_call(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "run_until_future":
            return True
        frame = frame.f_back
    return False


class Stuck(BaseException):
    """Raised in the main thread by the watchdog below: the call did not leave."""


def _raise_stuck(signum, frame):
    raise Stuck("run_async did not leave after its caller was interrupted")


def test_an_interrupted_caller_whose_call_does_not_end_when_cancelled_leaves_within_the_bound(monkeypatch, caplog):
    """A call whose clean-up waits for ever, then swallows every cancel: the caller cancels it, again after
    ``STOP_GRACE_SECONDS``, and past twice that leaves with its exception and a log line naming the loop's task,
    where it used to wait for ever (a worker child stuck until the hard limit's SIGKILL; a test run that never
    ended). The watchdog turns such a wait into a failure (``Stuck``)."""
    monkeypatch.setattr(async_bridge, "STOP_GRACE_SECONDS", 0.1)
    started = threading.Event()
    cancels: list[str] = []
    left = threading.Event()
    released = threading.Event()  # lets the abandoned loop end after the test, or the worker would not exit

    async def never_ends() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            while not released.is_set():  # a clean-up that will not be cancelled
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    cancels.append("cancelled")

    main = threading.main_thread().ident

    def time_is_up() -> None:
        assert started.wait(30), "the call never started"
        # once the caller waits for the call, as a soft limit lands on a task that runs: sent while the caller
        # is still starting the loop's thread (in Thread.start), the exception leaves that thread unregistered
        # with its executor, and the interpreter's exit waits for it for ever
        wait_until(
            lambda: _waits_for_the_call(threading.main_thread()), "the caller waits for the call", interval=0.001
        )
        signal.pthread_kill(main, signal.SIGUSR1)
        if not left.wait(30):
            signal.pthread_kill(main, signal.SIGUSR2)

    loops_before = set(AsyncToSync.loop_thread_executors)
    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    previous_2 = signal.signal(signal.SIGUSR2, _raise_stuck)
    timer = threading.Thread(target=time_is_up)
    try:
        timer.start()
        with caplog.at_level(logging.ERROR, logger="core.async_bridge"), pytest.raises(SoftTimeLimitExceeded):
            try:
                run_async(never_ends)
            finally:
                left.set()
    finally:
        released.set()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGUSR2, previous_2)

    assert cancels == ["cancelled"]  # the second cancel reached the clean-up
    [record] = caplog.records
    assert "abandoned" in record.getMessage()
    assert "never_ends" in record.getMessage()
    while set(AsyncToSync.loop_thread_executors) - loops_before:  # released, the loop ends (the timeout bounds this)
        threading.Event().wait(0.01)


def test_a_soft_limit_whose_signal_another_thread_received_still_interrupts_the_caller():
    """A signal the kernel hands to another thread of the process (billiard's parent sends the soft limit to the
    child process, not to a thread) is only flagged there: CPython runs its Python handler when the main thread
    next runs bytecode, and a main thread asleep in asgiref's untimed wait ran none, so the caller waited for the
    call for ever (one call in a few hundred, in a loop here). ``signal.raise_signal`` in the timer's thread is
    that delivery, made certain. The caller's wait is woken (``_wake``) and the handler runs; without that, the
    watchdog's own signal to the main thread is what ends the wait, and the test fails."""
    started = threading.Event()
    left = threading.Event()
    watchdog_woke: list[bool] = []

    async def waits() -> None:
        started.set()
        await asyncio.Event().wait()

    main = threading.main_thread().ident

    def time_is_up() -> None:
        assert started.wait(30), "the call never started"
        wait_until(
            lambda: _waits_for_the_call(threading.main_thread()), "the caller waits for the call", interval=0.001
        )
        signal.raise_signal(signal.SIGUSR1)  # handled in this thread: the main thread is not interrupted
        if not left.wait(10):
            watchdog_woke.append(True)
            signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    timer = threading.Thread(target=time_is_up)
    try:
        timer.start()
        with pytest.raises(SoftTimeLimitExceeded):
            try:
                run_async(waits)
            finally:
                left.set()
    finally:
        timer.join()
        signal.signal(signal.SIGUSR1, previous)

    assert watchdog_woke == [], "the soft limit's handler ran only when the watchdog signalled the main thread"


def test_an_asgiref_without_the_condition_its_wait_sleeps_on_leaves_the_wait_unwoken_with_one_warning(
    monkeypatch, caplog
):
    """asgiref (3.13) has no public way to wake ``run_until_future``, so ``_wake`` notifies its private condition
    (``_work_ready``). An asgiref without it (an upgrade that renamed it): the waker stops, saying once that a soft
    limit may be late, rather than die of an AttributeError in its thread at every call; the calls still return.
    Before, ``_wake`` raised that AttributeError."""
    monkeypatch.setattr(async_bridge, "WAKE_SECONDS", 0.001)
    monkeypatch.setattr(async_bridge, "_unwakeable_warned", False)
    executor = CurrentThreadExecutor(None)
    monkeypatch.delattr(executor, "_work_ready")
    returned = threading.Event()
    with caplog.at_level(logging.WARNING, logger="core.async_bridge"):
        async_bridge._wake({"executor": executor}, returned)  # returns: nothing to wake
        async_bridge._wake({"executor": executor}, returned)
        monkeypatch.setattr(async_bridge, "_WAIT_CONDITION", "_work_ready_renamed")

        async def slow_add(a: int, b: int) -> int:
            await asyncio.sleep(0.05)  # a few of the waker's turns
            return a + b

        assert run_async(slow_add, 2, b=3) == 5
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "soft time limit may be raised late" in record.getMessage()
