"""What a running server is doing, on demand: ``kill -USR1 <pid>`` logs, at WARNING on ``llmhub.diagnostics``, the
stack of every thread of the process and of every task of its event loop, and what the apps describe of their own
state (the ledger's writers: rows queued, in flight, written). For a server that looks stuck (requests answered
but ledger rows not arriving, a worker that stopped answering): what each thread and each task waits on, without
stopping it. A thread dump alone (``py-spy dump``, ``faulthandler``) shows an event loop idle in its selector
while a task awaits something that never comes; the tasks' stacks show that.

Installed by the ASGI lifespan (uvicorn, one per worker process; daphne sends no lifespan). The text holds code
locations and names only: no local variables, no task or future reprs (a callback's arguments may be a key), so
nothing secret reaches the log."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable

logger = logging.getLogger("llmhub.diagnostics")

# Functions that describe a part of the process's state in a line or a few, registered by the apps that own it.
_describers: list[Callable[[], str]] = []
STACK_LIMIT = 30  # frames a task's stack shows, innermost last


def diagnostics_describer_register(describe: Callable[[], str]) -> None:
    """Add ``describe``'s text to every diagnostics dump of this process."""
    if describe not in _describers:
        _describers.append(describe)


def diagnostics_install(loop: asyncio.AbstractEventLoop) -> bool:
    """Log a diagnostics dump (``diagnostics_text``) at each SIGUSR1 this process receives, from ``loop`` (the
    server's, running in the main thread). False where signals cannot be handled so (no SIGUSR1, not the main
    thread)."""
    if not hasattr(signal, "SIGUSR1"):
        return False
    try:
        loop.add_signal_handler(signal.SIGUSR1, _dump, loop)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


def _dump(loop: asyncio.AbstractEventLoop) -> None:
    try:
        logger.warning("diagnostics (SIGUSR1):\n%s", diagnostics_text(loop))
    except Exception:  # a dump must never take the server down
        logger.exception("diagnostics (SIGUSR1) failed")


def diagnostics_text(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """Every thread's stack, every task's of ``loop`` (the running one by default), and the apps' descriptions."""
    out = io.StringIO()
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        out.write(f"thread {names.get(ident, ident)}:\n")
        out.write("".join(traceback.format_stack(frame)))
    if loop is None:
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
    if loop is not None:
        tasks = sorted(asyncio.all_tasks(loop), key=lambda task: task.get_name())
        out.write(f"{len(tasks)} tasks:\n")
        for task in tasks:
            coro = task.get_coro()
            out.write(f"task {task.get_name()} ({getattr(coro, '__qualname__', type(coro).__name__)}):\n")
            frames, awaited = _await_chain(coro)
            summary = traceback.StackSummary.extract(
                ((frame, frame.f_lineno) for frame in frames), limit=STACK_LIMIT, capture_locals=False
            )
            out.write("".join(summary.format()))
            if awaited is not None:
                kind = type(awaited).__qualname__
                out.write(f"  awaits a {'future' if 'Future' in kind else kind}\n")
    for describe in list(_describers):
        try:
            out.write(describe().rstrip("\n") + "\n")
        except Exception as exc:
            out.write(f"{getattr(describe, '__qualname__', describe)} failed: {type(exc).__name__}\n")
    return out.getvalue()


def _await_chain(coro: object) -> tuple[list, object | None]:
    """The frames of ``coro`` and of the coroutines it awaits, outermost first (``Task.get_stack`` gives only the
    outermost frame of a suspended task), and what the innermost awaits when that is not a coroutine (a future)."""
    frames = []
    while coro is not None and len(frames) < STACK_LIMIT:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            return frames, coro if not frames or not hasattr(coro, "cr_frame") else None
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
    return frames, None
