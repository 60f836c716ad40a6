"""What-if settings for `make bench ARGS=--settings bench.settings_nofreeze`: bench.settings with the
garbage collector as CPython leaves it (no freeze after start-up; core/gc_tuning.py)."""

from __future__ import annotations

from bench.settings_gclog import *  # noqa: F403

LLMHUB_GC_FREEZE = False
