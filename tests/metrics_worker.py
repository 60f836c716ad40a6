"""A multiprocessing target for tests/test_metrics.py: importable in a spawned child without Django set up."""

from __future__ import annotations

import os
from pathlib import Path


def directory_in_a_spawned_worker(root: str, queue) -> None:
    from core import metrics

    os.environ.pop(metrics.ENV, None)
    queue.put(metrics.metrics_directory_choose(Path(root)))
