"""Circuit breakers per deployment (first version: in-process, consecutive failures only)."""

from __future__ import annotations

import time

from ..types import ResolvedDeployment

FAILURES_TO_OPEN = 5
COOLDOWN_SECONDS = 30.0

_failures: dict[int, int] = {}
_open_until: dict[int, float] = {}


def breaker_is_open(deployment: ResolvedDeployment) -> bool:
    """Sync, no I/O: whether the router should leave ``deployment`` out."""
    if deployment.forced_state == "open":
        return True
    if deployment.forced_state == "closed":
        return False
    return _open_until.get(deployment.id, 0.0) > time.monotonic()


async def breaker_allows(deployment: ResolvedDeployment) -> bool:
    """Just before an attempt: False when the breaker is open (another process may have opened it since the
    candidates were listed); True when closed, or when this caller won the half-open probe."""
    return not breaker_is_open(deployment)


def breaker_record(deployment_id: int, *, ok: bool) -> None:
    if ok:
        _failures.pop(deployment_id, None)
        _open_until.pop(deployment_id, None)
        return
    _failures[deployment_id] = _failures.get(deployment_id, 0) + 1
    if _failures[deployment_id] >= FAILURES_TO_OPEN:
        _open_until[deployment_id] = time.monotonic() + COOLDOWN_SECONDS
