"""What the pipeline tells the operator's tools about each request: one ``RequestObservation`` when a request
settles (or is refused), handed to the metrics (``core.metrics``: Prometheus) and the traces
(``core.tracing``: OpenTelemetry, when configured). Built once per request from what the pipeline already
measured, after the response has been decided: it never delays a reply, and a failure in either tool is
logged, never raised into the request.

``core`` imports no app: the pipeline (``chat.pipeline``) builds the observation from its own types."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tracing import TraceStart

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AttemptObservation:
    """One upstream call of a request: which deployment, when (``time.perf_counter()`` and wall-clock
    ``time.time_ns()`` at its start and end), how it ended (``outcome``: ok, failure, neutral), and the
    error's code if it failed."""

    deployment: str
    provider: str
    provider_kind: str
    model: str
    upstream_model: str
    started: float
    ended: float
    started_ns: int
    ended_ns: int
    outcome: str
    error_type: str = ""
    span_id: int = 0  # the id promised to its span when tracing is on (its requests' ``traceparent``)
    base_url: str = ""  # the provider's, for the span's ``server.address`` and ``server.port``


@dataclass(frozen=True, slots=True)
class RequestObservation:
    """One request, as the ledger row says it and a little more.

    ``transport``: rest or websocket; ``operation``: chat, messages, embeddings; ``status``: the ledger's
    (ok, upstream_error, rejected, client_disconnected, …); ``error_type``: the refusal's or failure's code
    (``rate_limit_exceeded``, ``budget_exceeded``, …). Times in seconds: ``duration`` whole, ``ttft`` to the
    first token (streams), ``overhead`` llmhub's own share (``duration`` less the upstream's). ``started_ns``
    and ``ended_ns``: wall clock, for spans. ``attempts``: every upstream call, in order."""

    request_id: str
    transport: str
    operation: str
    status: str
    model: str = ""
    deployment: str = ""
    provider: str = ""
    provider_kind: str = ""
    upstream_model: str = ""
    error_type: str = ""
    stream: bool = False
    duration: float = 0.0
    ttft: float | None = None
    overhead: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    started_ns: int = 0
    ended_ns: int = 0
    attempts: tuple[AttemptObservation, ...] = field(default=())
    experiment: str = ""  # ``name:variant`` when the request was in an A/B experiment
    finish_reason: str = ""  # why the answer ended (``stop``, ``length``, …), as the client was told
    trace: TraceStart | None = None  # its place in a trace (``core.tracing.trace_begin``); None: not traced

    @property
    def retries(self) -> int:
        """Upstream calls after the first (on the same model's deployments or on its fallbacks)."""
        return max(0, len(self.attempts) - 1)

    @property
    def fell_back(self) -> bool:
        """Answered (or last tried) by another public model than the first attempt's."""
        return len({a.model for a in self.attempts}) > 1


def request_observed(observation: RequestObservation) -> None:
    """Hand ``observation`` to the metrics and the traces. Never raises."""
    from .metrics import request_metrics_record
    from .tracing import request_trace_record

    for record in (request_metrics_record, request_trace_record):
        try:
            record(observation)
        except Exception:
            logger.exception("telemetry: %s failed", record.__name__)


def request_started() -> None:
    """A request was admitted and its run begins (the in-flight gauge). Never raises."""
    from .metrics import inflight_add

    try:
        inflight_add(1)
    except Exception:
        logger.exception("telemetry: inflight_add failed")


def request_ended() -> None:
    from .metrics import inflight_add

    try:
        inflight_add(-1)
    except Exception:
        logger.exception("telemetry: inflight_add failed")
