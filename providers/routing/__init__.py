"""Routing: which deployment of a public model serves an attempt, and what each attempt taught us.

The pipeline (``chat.pipeline``) asks ``route_candidates`` for the order in which to try a model's
deployments, checks each with ``breaker_allows`` just before calling it, and reports every call with
``call_started`` / ``call_finished``. Everything on the request path is in-process and cheap: the
breakers' and the statistics' shared state (Redis, when ``REDIS_URL`` is set) is kept in sync in the
background, never awaited per request, except to claim a half-open breaker's single probe.

- ``router``: the strategies (weighted, priority, lowest_latency, least_busy, cheapest), the
  ``x-llmhub-route`` hints (cost, latency, quality) and the deployments' rpm/tpm caps; when the caps leave
  no deployment, ``caps_retry_after`` says how long until they reopen (a 429, not a 503); when the breakers
  leave none, ``breakers_retry_after`` says how long until the first lets a call through (the 503's Retry-After).
- ``breakers``: circuit breakers per deployment, shared by every process through Redis.
- ``stats``: latency and time-to-first-token averages, requests in flight, rpm/tpm per deployment.
"""

from __future__ import annotations

from .breakers import breaker_allows, breaker_is_open, breaker_record, breaker_release_probe
from .router import ROUTE_HINTS, breakers_retry_after, caps_retry_after, route_candidates
from .stats import CallTicket, stats_call_finished, stats_call_started


class Outcome:
    """How an attempt ended, for the breaker and the statistics."""

    OK = "ok"
    FAILURE = "failure"  # the deployment failed (5xx, 429, timeout, refused, cut, bad credentials)
    NEUTRAL = "neutral"  # says nothing about the deployment (a 400 for the client's input, a client gone)


def call_started(deployment_id: int, *, own_key: bool = False) -> CallTicket:
    """An attempt on ``deployment_id`` begins: counted in flight (least_busy) and, unless it goes out on a
    user's own key (``own_key``), against its rpm cap (and its tokens, when it ends, against its tpm cap)."""
    return stats_call_started(deployment_id, capped=not own_key)


def call_finished(ticket: CallTicket, *, outcome: str, ttft_s: float | None = None, tokens: int = 0) -> None:
    """An attempt ended: its latency (and time to first token) feed the averages, its outcome the breaker,
    its tokens the deployment's tpm cap. Never raises, never blocks: shared state is written in the
    background."""
    stats_call_finished(ticket, ok=outcome == Outcome.OK, ttft_s=ttft_s, tokens=tokens)
    if outcome == Outcome.NEUTRAL:
        breaker_release_probe(ticket.deployment_id)  # if it was a half-open probe, the next caller probes
    else:
        breaker_record(ticket.deployment_id, ok=outcome == Outcome.OK)


__all__ = [
    "ROUTE_HINTS",
    "CallTicket",
    "Outcome",
    "breaker_allows",
    "breaker_is_open",
    "breaker_release_probe",
    "breakers_retry_after",
    "call_finished",
    "call_started",
    "caps_retry_after",
    "route_candidates",
]
