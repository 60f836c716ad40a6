"""What-if settings for `make bench ARGS=--settings bench.settings_gclog`: bench.settings, and every garbage
collection the server runs noted in ``$BENCH_GC_LOG`` (generation, objects collected, milliseconds)."""

from __future__ import annotations

import gc
import os
import time

from bench.settings import *  # noqa: F403

_log = open(os.environ.get("BENCH_GC_LOG", "/tmp/bench-gc.log"), "a", buffering=1)
_started: list[float] = []


def _note(phase: str, info: dict) -> None:
    if phase == "start":
        _started.append(time.perf_counter())
        return
    began = _started.pop() if _started else time.perf_counter()
    spent = 1000 * (time.perf_counter() - began)
    _log.write(f"{os.getpid()} {time.time():.3f} gen{info['generation']} {info['collected']} {spent:.2f}\n")


gc.callbacks.append(_note)

if os.environ.get("BENCH_GC_CENSUS"):
    import collections

    _seen = [0]

    def _census(phase: str, info: dict) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        _seen[0] += 1
        if _seen[0] % 8:
            return
        counts = collections.Counter(type(item).__qualname__ for item in gc.get_objects())
        _log.write(f"{os.getpid()} census {sum(counts.values())} {counts.most_common(12)}\n")

    gc.callbacks.append(_census)

if os.environ.get("BENCH_GC_SAVEALL"):
    import collections

    gc.set_debug(gc.DEBUG_SAVEALL)

    def _garbage(phase: str, info: dict) -> None:
        if phase != "stop" or info["generation"] != 2 or not gc.garbage:
            return
        counts = collections.Counter(type(item).__qualname__ for item in gc.garbage)
        _log.write(f"{os.getpid()} garbage {len(gc.garbage)} {counts.most_common(25)}\n")
        gc.garbage.clear()

    gc.callbacks.append(_garbage)
