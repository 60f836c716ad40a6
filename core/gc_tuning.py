"""The garbage collector on a long-running server: the objects the process starts with are frozen.

CPython's full (generation 2) collection walks every object the collector tracks. A served llmhub holds
about 300,000 of them after its first requests (Django, the SDKs, pydantic's validators, the catalog), and
on this project's 2-core machine a full collection of them took 40 ms at start-up and 170–230 ms under
load, once every 0.7–1 s at 350 requests/s: every request in flight stalled that long, and at concurrency 1
it was the whole p99 (``make bench``: +155 ms at p99 with the collector as it was; docs/performance.md).
Almost none of those objects is ever garbage: they are the program.

``gc.freeze()`` moves every object tracked at that moment into a permanent generation that collections no
longer walk (Instagram's "Dismissing Python Garbage Collection", and the pattern the ``gc`` module's own
documentation gives for pre-fork servers). So the ASGI lifespan calls ``gc_freeze_startup`` once the app
is loaded and warmed (a full collection first, so nothing that is already garbage is frozen), and
``RequestCounter`` freezes again after the first requests, which import and build what start-up did not
(the SDKs' response models, lazily built validators: about 130,000 objects over the first 50 requests).
Those later freezes run no collection (a freeze costs the same whatever the heap's size; a collection then
would be the very pause this avoids), so cyclic garbage alive at that instant, a few requests' worth, stays
for the process's life: bounded, and paid once. Objects created afterwards are collected as before.
``LLMHUB_GC_FREEZE=false`` turns all of it off."""

from __future__ import annotations

import gc

from django.conf import settings

# Requests after which what the process holds is frozen again (no collection).
FREEZE_AFTER_REQUESTS = frozenset({100, 2000})


def gc_freeze_startup() -> None:
    if not settings.LLMHUB_GC_FREEZE:
        return
    gc.collect()
    gc.freeze()


class RequestCounter:
    """Counts the requests (HTTP and WebSocket) a process has served and freezes at the counts above."""

    __slots__ = ("served",)

    def __init__(self) -> None:
        self.served = 0

    def count(self) -> None:
        self.served += 1
        if self.served in FREEZE_AFTER_REQUESTS and settings.LLMHUB_GC_FREEZE:
            gc.freeze()
