"""Routing strategies: the order in which a model's deployments are tried (first version: weighted and
priority only; the others fall back to weighted)."""

from __future__ import annotations

import random

from ..types import ResolvedDeployment, ResolvedModel, RoutingStrategy
from .breakers import breaker_is_open

ROUTE_HINTS = ("cost", "latency", "quality")


def route_candidates(model: ResolvedModel, *, hint: str | None = None) -> list[ResolvedDeployment]:
    """The deployments of ``model`` to try, best first, without those whose breaker is open."""
    healthy = [d for d in model.deployments if not breaker_is_open(d)]
    if model.strategy == RoutingStrategy.PRIORITY:
        return sorted(healthy, key=lambda d: (d.priority, d.id))
    order: list[ResolvedDeployment] = []
    pool = list(healthy)
    while pool:
        pick = random.choices(pool, weights=[max(d.weight, 0) or 0.000001 for d in pool])[0]  # noqa: S311 (load spreading, not secrets)
        order.append(pick)
        pool.remove(pick)
    return order
