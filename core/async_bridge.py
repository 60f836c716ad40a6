"""A coroutine run from synchronous code (a Celery task, a management command), its loop ended with the call.

``async_to_sync`` runs the coroutine on a new event loop in a thread of its own while the calling thread waits,
running the loop's thread-sensitive ``sync_to_async`` work (the database) as it comes. When the caller is
interrupted while it waits (a task's soft time limit: billiard raises ``SoftTimeLimitExceeded`` in the worker
child's main thread, from a signal handler), the exception leaves ``async_to_sync`` at once, and the loop runs on:
its next ``sync_to_async`` is handed to a caller that is gone and waits for it for ever, so the loop's thread
never ends (nor the work it holds: connections, the rows it was about to write). ``run_async`` is
``async_to_sync`` on a loop of its own that, when the caller is interrupted, is stopped before the exception goes
on: its tasks are cancelled, and the caller runs their ``sync_to_async`` clean-up until every one has ended.

That wait is bounded (``STOP_GRACE_SECONDS``, well inside the minute billiard leaves between the soft and the hard
limit, whose SIGKILL ends a child stuck there whatever it does): a call that does not end when cancelled (a
clean-up that waits for what no thread will do, a coroutine that swallows the cancel) held its caller for ever, a
worker child until that SIGKILL, a test run for good. Past the bound the call's task is cancelled again (a second
cancel ends a clean-up's ``sync_to_async`` wait whatever became of its work item), and past a second one the loop
is abandoned, with an error log naming the function, and the exception goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from asgiref.current_thread_executor import CurrentThreadExecutor
from asgiref.sync import AsyncToSync

logger = logging.getLogger(__name__)

# How often a call from the main thread wakes its wait (``_wake``).
WAKE_SECONDS = 0.25

# asgiref (3.13) offers no public way to wake or time out ``CurrentThreadExecutor.run_until_future``: it waits on
# this condition, a private attribute, with no timeout. Its public ``submit`` would wake it too, but runs the item
# submitted in the waiting thread inside ``_WorkItem.run``, which catches every exception into the item's future: a
# soft limit whose handler ran there would be swallowed, no longer raised to the caller. An asgiref without the
# attribute (renamed in an upgrade) leaves the wait unwoken, as before 7 December, with one warning (``_wakeable``).
_WAIT_CONDITION = "_work_ready"
_unwakeable_warned = False
_unwakeable_lock = threading.Lock()

# How long an interrupted caller waits for the cancelled call's clean-up, then again after a second cancel.
STOP_GRACE_SECONDS = 20.0

P = ParamSpec("P")
R = TypeVar("R")


def run_async(func: Callable[P, Coroutine[Any, Any, R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """``async_to_sync(func)(*args, **kwargs)``, on a new event loop that has ended when this returns or raises,
    even when the caller is interrupted while it waits (above)."""
    # what a log line names: the function, never its arguments (a key may be one)
    loop_of_call: dict[str, Any] = {"name": getattr(func, "__qualname__", type(func).__qualname__)}
    ended: concurrent.futures.Future[None] = concurrent.futures.Future()
    lock = threading.Lock()

    async def call() -> R:
        with lock:
            if "abandoned" in loop_of_call:  # the caller was interrupted before the loop started
                raise asyncio.CancelledError()
            loop_of_call["task"] = asyncio.current_task()
            loop_of_call["loop"] = asyncio.get_running_loop()
            # where this loop's thread-sensitive sync_to_async calls run: the calling thread
            loop_of_call["executor"] = getattr(AsyncToSync.executors, "current", None)
            loop_of_call["keeper"] = asyncio.create_task(_until_all_ended(ended))  # a loop holds tasks weakly
        return await func(*args, **kwargs)

    returned = threading.Event()
    if threading.current_thread() is threading.main_thread():
        threading.Thread(target=_wake, args=(loop_of_call, returned), name="run_async-waker", daemon=True).start()
    try:
        return AsyncToSync(call, force_new_loop=True)()
    except BaseException:
        with lock:
            loop_of_call["abandoned"] = True
        _stop(loop_of_call, ended)
        raise
    finally:
        returned.set()


def _wake(loop_of_call: dict[str, Any], returned: threading.Event) -> None:
    """Wake the main thread's wait every ``WAKE_SECONDS`` while the call runs, so that a signal's handler (billiard's
    soft time limit) runs: CPython runs a Python handler only when the main thread next runs bytecode, and a signal
    that comes just before the thread sleeps in a lock's wait (asgiref's ``run_until_future`` waits without a
    timeout) does not interrupt that wait: the handler never ran, and the caller waited for the call for ever (one
    call in a few hundred in a loop here, 7 December 2026). Woken, the wait finds no work and waits again, running
    the pending handler on the way. Only the main thread gets signals' handlers, so only its calls start this; and
    only while asgiref's executor has the condition it waits on (``_wakeable``)."""
    while not returned.wait(WAKE_SECONDS):
        executor: CurrentThreadExecutor | None = loop_of_call.get("executor")
        if executor is not None:
            condition = _wakeable(executor)
            if condition is None:
                return
            with condition:
                condition.notify_all()


def _wakeable(executor: CurrentThreadExecutor) -> threading.Condition | None:
    """The condition ``executor``'s ``run_until_future`` waits on (``_WAIT_CONDITION``); None, with a warning the
    process's first time, when this asgiref has none by that name: a soft limit may then be raised late, or not until
    the hard limit, as before the waking."""
    global _unwakeable_warned
    condition = getattr(executor, _WAIT_CONDITION, None)
    if isinstance(condition, threading.Condition):
        return condition
    with _unwakeable_lock:
        warned, _unwakeable_warned = _unwakeable_warned, True
    if not warned:
        logger.warning(
            "run_async: asgiref's CurrentThreadExecutor has no %s condition to wake; a task's soft time limit may be "
            "raised late, or only at the hard limit, while it waits for a coroutine (core/async_bridge.py)",
            _WAIT_CONDITION,
        )
    return None


async def _until_all_ended(ended: concurrent.futures.Future[None]) -> None:
    """Wait until cancelled (``asyncio.run`` cancels the tasks left when the call returns, ``_stop`` the call),
    then until every other task of the loop has ended, and say so in ``ended``."""
    try:
        await asyncio.Event().wait()
    finally:
        try:
            # those that ``asyncio.run`` cancels with this one (not those they start meanwhile: it does not either)
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:
                await asyncio.wait(others)
        finally:
            ended.set_result(None)


def _stop(loop_of_call: dict[str, Any], ended: concurrent.futures.Future[None]) -> None:
    """The caller was interrupted (or the call raised): cancel the call's task, and run the loop's
    thread-sensitive work here until all its tasks have ended, or ``STOP_GRACE_SECONDS`` twice over (above).
    A call that raised has ended already."""
    loop: asyncio.AbstractEventLoop | None = loop_of_call.get("loop")
    executor: CurrentThreadExecutor | None = loop_of_call.get("executor")
    if loop is None or ended.done():
        return
    task: asyncio.Task[Any] = loop_of_call["task"]

    def cancel() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: it ended, and set ``ended`` first
            loop.call_soon_threadsafe(task.cancel)

    # ``run_until_future`` takes no timeout: it waits for ``waited``, which ``ended`` or the second bound sets.
    waited: concurrent.futures.Future[None] = concurrent.futures.Future()
    ended.add_done_callback(lambda _: _settle(waited))
    left = threading.Event()

    def bound() -> None:
        if left.wait(STOP_GRACE_SECONDS):
            return
        cancel()
        if not left.wait(STOP_GRACE_SECONDS):
            _settle(waited)

    cancel()
    threading.Thread(target=bound, name="run_async-stop-bound", daemon=True).start()
    try:
        if executor is not None:
            executor.run_until_future(waited)
        else:
            waited.result()
    finally:
        left.set()
    if not ended.done():
        logger.error(
            "run_async: the interrupted call of %s did not end within %ss of its cancel; its loop is abandoned",
            loop_of_call["name"],
            2 * STOP_GRACE_SECONDS,
        )


def _settle(future: concurrent.futures.Future[None]) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_result(None)
