"""Per-deployment statistics (first version: in-process counters only)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

_in_flight: dict[int, int] = {}


@dataclass(slots=True)
class CallTicket:
    deployment_id: int
    started: float = field(default_factory=time.perf_counter)


def stats_call_started(deployment_id: int) -> CallTicket:
    _in_flight[deployment_id] = _in_flight.get(deployment_id, 0) + 1
    return CallTicket(deployment_id)


def stats_call_finished(ticket: CallTicket, *, ok: bool, ttft_s: float | None, tokens: int) -> None:
    _in_flight[ticket.deployment_id] = max(0, _in_flight.get(ticket.deployment_id, 0) - 1)
