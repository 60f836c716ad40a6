"""State kept per event loop, and let go with its loop.

An asyncio client, a background task, a future: each is bound to the event loop that made it, so state of that
kind is kept per loop, in a mapping weakly keyed by the loop. A weak key is not enough: an entry whose value refers
to its loop (a task, a future, a connection's stream) keeps its key alive, and a process that makes a loop per call
(a Celery task, a management command, a sync caller through ``async_to_sync`` or ``asyncio.run``) would keep every
loop it ever made, with all that they hold. A ``LoopRegistry`` lets go of an entry:

- when its loop ends: ``asyncio.run`` and ``async_to_sync`` cancel the tasks left when their call returns, so the
  entry's own task (``forget_when_done``), or a task that only waits for that (``keep``), ends then;
- for a loop closed without that (``run_until_complete``, then ``close``): when the next loop makes its entry
  (``start``), which hands the dropped value to ``on_drop`` (its tasks will never run: ``task_abandoned``).

A lookup on a running loop is the mapping's ``get``, as before: the rest happens once per loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

V = TypeVar("V")


class LoopRegistry(weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, V]):
    """``loop -> value``, one entry per event loop, added with ``start`` and removed with ``forget`` (both
    callable from any thread: each thread may run a loop of its own)."""

    def __init__(
        self, *, on_drop: Callable[[V], None] | None = None, lock: threading.Lock | threading.RLock | None = None
    ) -> None:
        super().__init__()
        self.lock = lock or threading.Lock()  # held while entries are added, removed or listed
        self._on_drop = on_drop

    def start(self, loop: asyncio.AbstractEventLoop, value: V) -> V:
        """Make ``value`` the entry of ``loop``, after dropping those of loops closed since."""
        with self.lock:
            dropped = [self.pop(closed) for closed in [other for other in self.keys() if other.is_closed()]]
            self[loop] = value
        if self._on_drop is not None:
            for old in dropped:
                self._on_drop(old)
        return value

    def forget(self, loop: asyncio.AbstractEventLoop, value: V) -> bool:
        """Forget the entry of ``loop`` if it is ``value`` (not one that replaced it); whether it was."""
        with self.lock:
            if self.get(loop) is not value:
                return False
            with contextlib.suppress(KeyError):  # its loop was collected meanwhile
                del self[loop]
        return True

    def snapshot(self) -> list[tuple[asyncio.AbstractEventLoop, V]]:
        """The entries now, from any thread (another thread's loop may be adding its own)."""
        with self.lock:
            return list(self.items())

    def forget_when_done(self, task: asyncio.Task, value: V) -> None:
        """Forget ``value`` when ``task`` (of its loop) ends: it ended, or its loop cancelled it."""
        task.add_done_callback(functools.partial(self._task_done, value))

    def _task_done(self, value: V, task: asyncio.Task) -> None:
        self.forget(task.get_loop(), value)

    def keep(
        self,
        loop: asyncio.AbstractEventLoop,
        value: V,
        closing: Callable[[V], Awaitable[None]] | None = None,
    ) -> asyncio.Task[None]:
        """A task of ``loop`` that waits for the loop to end (its caller cancels it), then forgets ``value`` and,
        if it was still the entry, awaits ``closing(value)``. Hold it with the value: a loop holds its tasks
        only weakly."""
        return loop.create_task(self._kept(loop, value, closing))

    async def _kept(
        self, loop: asyncio.AbstractEventLoop, value: V, closing: Callable[[V], Awaitable[None]] | None
    ) -> None:
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            # Not on a task destroyed pending with its closed loop (GeneratorExit): nothing can be awaited there.
            if self.forget(loop, value) and closing is not None:
                await closing(value)
            raise


def task_abandoned(task: asyncio.Task | None) -> None:
    """``task`` is of a closed loop and will never run: it is not reported "destroyed but pending" when it is
    collected (it says nothing a caller could act on)."""
    if task is not None:
        task._log_destroy_pending = False
