"""``core.loops.LoopRegistry``, the one home of state kept per event loop: an entry is let go when its loop ends
(its task ends, or its keeper is cancelled), or, for a loop closed without that, when the next loop makes its
entry; a replacement is never forgotten in place of the entry that ended. The modules that use it check their
own loops are collected (``tests/*/test_*_loops.py``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

from core.loops import LoopRegistry, task_abandoned


class _State:
    """A loop's state that refers to its loop, as a client's or a task's does."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.keeper: asyncio.Task[None] | None = None
        self.closed = False


def test_a_kept_entry_is_forgotten_and_closed_when_its_loop_ends():
    registry: LoopRegistry[_State] = LoopRegistry()
    states: list[_State] = []

    async def closing(state: _State) -> None:
        await asyncio.sleep(0)  # on its loop, still running
        state.closed = True

    async def call() -> None:
        state = registry.start(asyncio.get_running_loop(), _State())
        state.keeper = registry.keep(state.loop, state, closing)
        states.append(state)

    asyncio.run(call())

    assert states[0].closed
    assert not list(registry)


def test_an_entry_replaced_meanwhile_is_not_forgotten_for_the_old_one():
    registry: LoopRegistry[_State] = LoopRegistry()

    async def call() -> None:
        loop = asyncio.get_running_loop()
        old = registry.start(loop, _State())
        new = registry.start(loop, _State())
        assert not registry.forget(loop, old)
        assert registry.get(loop) is new
        assert registry.forget(loop, new)
        assert registry.get(loop) is None

    asyncio.run(call())


def test_the_entry_of_a_loop_closed_without_cancelling_its_tasks_is_dropped_by_the_next(caplog):
    dropped: list[_State] = []
    registry: LoopRegistry[_State] = LoopRegistry(
        on_drop=lambda state: (dropped.append(state), task_abandoned(state.keeper))
    )
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        state = registry.start(asyncio.get_running_loop(), _State())
        state.keeper = registry.keep(state.loop, state)

    caplog.set_level(logging.ERROR, logger="asyncio")
    loop = asyncio.new_event_loop()
    loop.run_until_complete(call())
    loop.close()
    del loop
    gc.collect()
    assert refs[0]() is not None  # its entry holds it: nothing told the registry

    asyncio.run(call())
    state = dropped.pop()
    assert state.loop.is_closed() and not dropped
    del state
    gc.collect()

    assert refs[0]() is None and refs[1]() is None
    assert not [record.getMessage() for record in caplog.records if "destroyed" in record.getMessage()]
