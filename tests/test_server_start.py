"""What the tests' fixtures do with a server that never comes up: ``wait_for_port`` stops the process it waited for
(terminated, then killed) whenever it fails, so a test that times out or is interrupted leaves nothing running."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import free_port, process_stop, wait_for_port

NEVER_LISTENS = "import time; time.sleep(120)"
# Ignores SIGTERM, as a server stuck in its start-up or its shutdown may: only SIGKILL ends it.
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"


def started(script: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def processes():
    """The processes a test starts, killed after it whatever ``wait_for_port`` did (so a failure here leaves
    nothing behind either)."""
    started_here: list[subprocess.Popen] = []
    yield started_here
    for process in started_here:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stdout.close()


def test_a_server_that_never_listens_is_stopped_when_the_wait_times_out(processes):
    process = started(NEVER_LISTENS)
    processes.append(process)
    with pytest.raises(TimeoutError):
        wait_for_port(free_port(), timeout=0.5, process=process)
    assert process.poll() is not None, "the process that never listened is still running"


def test_one_that_ignores_sigterm_is_killed(processes):
    process = started(DEAF)
    processes.append(process)
    assert process.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
    with pytest.raises(TimeoutError):
        wait_for_port(free_port(), timeout=0.5, process=process)
    assert process.poll() is not None, "the process that ignored SIGTERM is still running"


def test_the_stop_of_a_server_kills_one_that_ignores_sigterm(processes):
    """``process_stop`` is every test server's and worker's stop (the fixtures' teardowns, not only a failed
    wait): those that sent SIGTERM and waited left a server that ignored it running, the wait timed out."""
    process = started(DEAF)
    processes.append(process)
    assert process.stdout.readline().strip() == "ready"
    process_stop(process, grace=0.5)
    assert process.returncode == -9, "the process that ignored SIGTERM was not killed"


def test_a_server_that_listens_is_left_running(processes):
    port = free_port()
    script = f"import socket, time; s = socket.create_server(('127.0.0.1', {port})); time.sleep(120)"
    process = started(script)
    processes.append(process)
    wait_for_port(port, timeout=60, process=process)
    assert process.poll() is None
