"""Routing strategies: the order in which a model's deployments are tried.

``route_candidates`` leaves out the deployments whose breaker is open and those at their rpm/tpm cap this
minute, then hands the rest to the model's strategy, or to the one a request's ``x-llmhub-route`` hint
names. Each strategy is a small function from the usable deployments to their order, registered by name in
``STRATEGIES`` (a new one is a function and a line there). They all start from a weighted random order
and stable-sort it by what they care about, so that deployments they rank equal share the traffic by
weight. Everything reads in-process figures (``stats``, ``breakers``): no I/O, a few microseconds for
three deployments (``bench/route_hotpath.py``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal

from ..types import ResolvedDeployment, ResolvedModel, RoutingStrategy
from . import stats
from .breakers import breaker_is_open, breaker_reopens_in

ROUTE_HINTS = ("cost", "latency", "quality")

EXPLORATION = 0.05  # lowest_latency: share of requests that try another deployment first, to re-measure it

# Load spreading, not secrets; one generator, so that a test can seed it (``rng.seed(...)``).
rng = random.Random()  # noqa: S311

Strategy = Callable[[list[ResolvedDeployment]], list[ResolvedDeployment]]


def weighted(deployments: list[ResolvedDeployment]) -> list[ResolvedDeployment]:
    """Random by weight: the first is deployment i with probability weight_i / sum of weights, the next
    among the rest likewise (sampling without replacement). Efraimidis & Spirakis, "Weighted random
    sampling with a reservoir" (2006): order by u ** (1 / weight), u uniform in [0, 1), descending. A
    weight of 0 comes after every weighted deployment (a standby)."""
    random_ = rng.random
    return sorted(
        deployments,
        key=lambda d: random_() ** (1.0 / d.weight) if d.weight > 0 else -random_(),
        reverse=True,
    )


def priority(deployments: list[ResolvedDeployment]) -> list[ResolvedDeployment]:
    """Lowest ``priority`` number first; equal priorities in weighted random order."""
    return sorted(weighted(deployments), key=_priority_of)


def cheapest(deployments: list[ResolvedDeployment]) -> list[ResolvedDeployment]:
    """Lowest price first (input + output per million tokens); equal prices in weighted random order."""
    return sorted(weighted(deployments), key=_price_of)


def lowest_latency(deployments: list[ResolvedDeployment]) -> list[ResolvedDeployment]:
    """Fastest first by the latency averages (``stats.latency_score``: time to first token, else the whole
    call). Deployments not measured yet come first, so that they get measured. With probability
    ``EXPLORATION`` another deployment is put first, so that a slow one that got faster is noticed."""
    order = sorted(weighted(deployments), key=_latency_key)
    if len(order) > 1 and rng.random() < EXPLORATION:
        order.insert(0, order.pop(rng.randrange(1, len(order))))
    return order


def least_busy(deployments: list[ResolvedDeployment]) -> list[ResolvedDeployment]:
    """Fewest requests in flight first, counting every process's (``stats.in_flight``); ties by weight."""
    return sorted(weighted(deployments), key=_in_flight_of)


def best_quality(deployments: list[ResolvedDeployment]) -> list[ResolvedDeployment]:
    """Highest ``quality`` score first, unscored ones last; ties by weight."""
    return sorted(weighted(deployments), key=_quality_key)


def _priority_of(deployment: ResolvedDeployment) -> int:
    return deployment.priority


def _price_of(deployment: ResolvedDeployment) -> Decimal:
    return deployment.input_per_mtok + deployment.output_per_mtok


def _latency_key(deployment: ResolvedDeployment) -> float:
    score = stats.latency_score(deployment.id)
    return -1.0 if score is None else score


def _in_flight_of(deployment: ResolvedDeployment) -> int:
    return stats.in_flight(deployment.id)


def _quality_key(deployment: ResolvedDeployment) -> float:
    return float("inf") if deployment.quality is None else -deployment.quality


STRATEGIES: dict[str, Strategy] = {
    RoutingStrategy.WEIGHTED: weighted,
    RoutingStrategy.PRIORITY: priority,
    RoutingStrategy.LOWEST_LATENCY: lowest_latency,
    RoutingStrategy.LEAST_BUSY: least_busy,
    RoutingStrategy.CHEAPEST: cheapest,
}

# What an ``x-llmhub-route`` header asks for, over the model's own strategy.
HINTS: dict[str, Strategy] = {"cost": cheapest, "latency": lowest_latency, "quality": best_quality}


def _strategy_for(model: ResolvedModel, hint: str | None) -> Strategy:
    if hint:
        chosen = HINTS.get(hint) or HINTS.get(hint.strip().lower())
        if chosen is not None:
            return chosen
        # An unknown hint is ignored (the request is served by the model's strategy): a client sending a
        # hint this version does not know still gets an answer.
    return STRATEGIES.get(model.strategy, weighted)


def _at_cap(deployment: ResolvedDeployment, minute: int) -> bool:
    entry = stats.stats_of(deployment.id)
    if entry is None:  # nothing counted yet; a cap is at least 1 (``Deployment``'s constraints)
        return False
    if deployment.rpm_limit is not None and entry.requests_in(minute) >= deployment.rpm_limit:
        return True
    return deployment.tpm_limit is not None and entry.tokens_in(minute) >= deployment.tpm_limit


OwnKey = Callable[[ResolvedDeployment], bool]


def _usable(deployments: Sequence[ResolvedDeployment], own_key: OwnKey | None) -> tuple[list[ResolvedDeployment], bool]:
    """The deployments neither open nor at their cap, and whether any was left out for its cap only. A
    deployment the request would call on the user's own key (``own_key``) is not held to the caps: they stand
    for the platform's account with the provider, not the user's."""
    usable: list[ResolvedDeployment] = []
    capped = False
    minute = -1
    for deployment in deployments:
        if breaker_is_open(deployment):
            continue
        if (deployment.rpm_limit is not None or deployment.tpm_limit is not None) and not (
            own_key is not None and own_key(deployment)
        ):
            if minute < 0:
                minute = stats.current_minute()
            if _at_cap(deployment, minute):
                capped = True
                continue
        usable.append(deployment)
    return usable, capped


def route_candidates(
    model: ResolvedModel, *, hint: str | None = None, own_key: OwnKey | None = None
) -> list[ResolvedDeployment]:
    """The deployments of ``model`` to try, best first, without those whose breaker is open or that reached
    their rpm/tpm cap this minute. Empty when none is left: the pipeline moves on to the model's fallbacks,
    or answers 429 when the caps left everything out (``caps_retry_after``) and 503 when the breakers did.
    Capped deployments are never returned "to let the upstream say no": a 429 from upstream would count
    as a failure against their breakers. ``own_key`` says which deployments the request would call on the
    user's own key: those are not held to the caps."""
    usable, _ = _usable(model.deployments, own_key)
    if len(usable) < 2:
        return usable
    return _strategy_for(model, hint)(usable)


def caps_retry_after(model: ResolvedModel, *, own_key: OwnKey | None = None) -> float | None:
    """When ``route_candidates`` came back empty: the seconds until the caps' minute rolls over if some
    deployment was left out for its cap (a 429 with that Retry-After), None if only open breakers
    left them out (a 503)."""
    usable, capped = _usable(model.deployments, own_key)
    if usable or not capped:
        return None
    return 60.0 - time.time() % 60


def breakers_retry_after(models: Iterable[ResolvedModel]) -> float | None:
    """When no deployment of ``models`` (a model and its fallbacks) was left to try: the seconds until the first of
    them lets a call through again (a 503's Retry-After), None when none of them knows when (an admin holds each
    open)."""
    waits = [wait for model in models for d in model.deployments if (wait := breaker_reopens_in(d)) is not None]
    return min(waits) if waits else None
