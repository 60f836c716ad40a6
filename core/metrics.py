"""Prometheus metrics (issue 14 part 1: being written)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .telemetry import RequestObservation


def request_metrics_record(observation: RequestObservation) -> None:
    """Count and time one request (written by the metrics change)."""


def inflight_add(delta: int) -> None:
    """The requests-in-flight gauge (written by the metrics change)."""
