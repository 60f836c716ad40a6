"""Run a Python module in a process whose clock is pinned, as a test's own clock is (``period_instants``):
``python -m tests.pinned_clock <ISO instant> <module> [args...]``, e.g. a uvicorn server or an admission
worker that must agree with the test on the day and month it is in. time-machine reaches only the process
it runs in, hence this launcher. Frozen, like the test's clock; the monotonic clock (asyncio, timeouts)
runs on."""

from __future__ import annotations

import runpy
import sys
from datetime import datetime

import time_machine

if __name__ == "__main__":
    instant, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    with time_machine.travel(datetime.fromisoformat(instant), tick=False):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
