"""A coroutine run from synchronous code (a Celery task, a management command), its loop ended with the call.

``async_to_sync`` runs the coroutine on a new event loop in a thread of its own while the calling thread waits,
running the loop's thread-sensitive ``sync_to_async`` work (the database) as it comes. When the caller is
interrupted while it waits (a task's soft time limit: billiard raises ``SoftTimeLimitExceeded`` in the worker
child's main thread, from a signal handler), the exception leaves ``async_to_sync`` at once, and the loop runs on:
its next ``sync_to_async`` is handed to a caller that is gone and waits for it for ever, so the loop's thread
never ends (nor the work it holds: connections, the rows it was about to write). ``run_async`` is
``async_to_sync`` on a loop of its own that, when the caller is interrupted, is stopped before the exception goes
on: its tasks are cancelled, and the caller runs their ``sync_to_async`` clean-up until every one has ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from asgiref.current_thread_executor import CurrentThreadExecutor
from asgiref.sync import AsyncToSync

P = ParamSpec("P")
R = TypeVar("R")


def run_async(func: Callable[P, Coroutine[Any, Any, R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """``async_to_sync(func)(*args, **kwargs)``, on a new event loop that has ended when this returns or raises,
    even when the caller is interrupted while it waits (above)."""
    loop_of_call: dict[str, Any] = {}
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

    try:
        return AsyncToSync(call, force_new_loop=True)()
    except BaseException:
        with lock:
            loop_of_call["abandoned"] = True
        _stop(loop_of_call, ended)
        raise


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
    thread-sensitive work here until all its tasks have ended. A call that raised has ended already."""
    loop: asyncio.AbstractEventLoop | None = loop_of_call.get("loop")
    executor: CurrentThreadExecutor | None = loop_of_call.get("executor")
    if loop is None or ended.done():
        return
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: it ended, and set ``ended`` first
        loop.call_soon_threadsafe(loop_of_call["task"].cancel)
    if executor is not None:
        executor.run_until_future(ended)
    else:
        ended.result()
