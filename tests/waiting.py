"""Waiting in a test for something another thread or process does: one helper, with a monotonic deadline (the
wall clock may be pinned), and a failure that says what never happened."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], what: str, *, timeout: float = 30.0, interval: float = 0.02) -> None:
    """Return once ``condition()`` is true; fail the test with ``what`` if it is not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(interval)
