"""OpenTelemetry traces (issue 14 part 2: being written)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .telemetry import RequestObservation


def request_trace_record(observation: RequestObservation) -> None:
    """Emit the request's span and its attempts' child spans (written by the tracing change)."""
