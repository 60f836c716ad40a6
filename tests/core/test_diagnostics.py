"""``kill -USR1`` on a server logs what every thread and task waits on, and the ledger's writers, without stopping
it (``core.diagnostics``)."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from core.diagnostics import diagnostics_describer_register, diagnostics_text
from tests.billing.test_concurrency import ServerProcess
from tests.conftest import wait_for_port
from tests.waiting import wait_until


@pytest.mark.django_db(transaction=True)
def test_sigusr1_logs_every_thread_task_and_ledger_writer_and_the_server_goes_on(tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess(None, log, None)
    try:
        wait_for_port(server.port, process=server.process)
        assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
        server.process.send_signal(signal.SIGUSR1)  # its default action ends the process
        text = wait_until(
            lambda: (t := log.read_text()) and "diagnostics (SIGUSR1)" in t and t,
            "the server logged its diagnostics",
        )
        assert "thread MainThread:" in text
        assert "tasks:" in text and "task " in text
        assert "ledger: " in text
        # It goes on serving.
        assert server.process.poll() is None
        assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
    finally:
        server.stop()


def test_a_tasks_stack_goes_down_the_coroutines_it_awaits_and_a_failing_describer_is_named():
    def broken() -> str:
        raise RuntimeError("no")

    diagnostics_describer_register(broken)

    async def inner(event: asyncio.Event) -> None:
        await event.wait()

    async def outer(event: asyncio.Event) -> None:
        await inner(event)

    async def main() -> str:
        event = asyncio.Event()
        task = asyncio.create_task(outer(event), name="the-waiter")
        await asyncio.sleep(0)
        try:
            return diagnostics_text()
        finally:
            task.cancel()

    try:
        text = asyncio.run(main())
    finally:
        from core import diagnostics

        diagnostics._describers.remove(broken)
    waiter = text.split("task the-waiter (", 1)[1]
    assert waiter.startswith("test_a_tasks_stack_goes_down_the_coroutines_it_awaits_and_a_failing_describer_is_named.")
    assert "in outer" in waiter.split("\n")[1]
    assert "in inner" in waiter  # Task.get_stack stops at the outermost frame of a suspended task
    assert "awaits a " in waiter
    assert "broken failed: RuntimeError" in text
