"""OpenTelemetry traces: a span per request and a child span per upstream attempt, exported over OTLP/HTTP.

Optional and off by default. On when the environment names an exporter the standard way
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp``)
and ``OTEL_SDK_DISABLED`` is not true; ``OTEL_TRACES_EXPORTER=none`` turns it off. Off, no tracer provider
and no exporter are built, the SDK is not even imported, and ``request_trace_record`` returns on its first
line. On, one ``TracerProvider`` per process (service name ``llmhub`` unless ``OTEL_SERVICE_NAME`` or
``OTEL_RESOURCE_ATTRIBUTES`` says otherwise) with a ``BatchSpanProcessor`` in front of the OTLP/HTTP
exporter, which reads the rest of its configuration (headers, timeout, compression, certificates, the
batch's size and delay) from the standard ``OTEL_*`` variables itself.

The spans are written from the request's ``RequestObservation`` after the request has ended, with the
times the pipeline measured (``started_ns``/``ended_ns``): nothing is traced on the hot path, and the batch
processor exports from its own thread. The provider is ours, not the global one: it is not set as
OpenTelemetry's global tracer provider, so instrumentation an operator adds keeps its own configuration.

Attributes follow OpenTelemetry's GenAI semantic conventions (``gen_ai.*``, ``error.type``, and on each
attempt ``server.address`` and ``server.port``) plus llmhub's own (``llmhub.*``). They come from the
observation alone, which carries no message content and no key: no prompt, completion or secret can reach a
span.

**Trace context.** A request that arrives with a W3C ``traceparent`` (or whatever ``OTEL_PROPAGATORS``
names: ``tracecontext,baggage`` by default) joins the caller's trace: its span is a child of the caller's,
and the caller's sampling decision holds (``OTEL_TRACES_SAMPLER``, parent-based by default). Each upstream
attempt sends the provider a ``traceparent`` whose parent is that attempt's own span, so a vLLM or any
OpenTelemetry-instrumented server continues the trace under the right span (caller → llmhub → attempt →
provider), not beside it. Which providers are sent it: ``LLMHUB_TRACE_UPSTREAM_KINDS``, the self-hosted
kinds by default (a cloud provider does not read it, and need not see the operator's trace ids). Because
the spans are written after the request, their ids are chosen when the request starts (``TraceStart``) and
handed to the SDK's tracer through this module's id generator (``_PresetIds``) when the spans are built.
With tracing off none of this runs: ``trace_begin`` returns None on its first line and no header is added."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from .telemetry import AttemptObservation, RequestObservation

logger = logging.getLogger(__name__)

SERVICE_NAME = "llmhub"
# Any of these names an exporter: without one, tracing stays off.
EXPORTER_SETTINGS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")

# Provider kinds as ``gen_ai.provider.name`` spells them (the GenAI conventions' well-known values); a kind
# without one (a self-hosted OpenAI-compatible server) is named by the kind itself.
GEN_AI_PROVIDER_NAMES = {
    "openai": "openai",
    "anthropic": "anthropic",
    "azure_openai": "azure.ai.openai",
    "gemini": "gcp.gemini",
    "cohere": "cohere",
    "mistral": "mistral_ai",
}
# Our operations as ``gen_ai.operation.name`` spells them: an Anthropic Messages call is a chat, and so is an
# OpenAI Responses call (served as one).
GEN_AI_OPERATIONS = {
    "chat": "chat",
    "messages": "chat",
    "responses": "chat",
    "embeddings": "embeddings",
    "completions": "text_completion",
}
# Ledger statuses that are not a failure of the service: the client's own doing, or a refusal by policy
# (whose code still goes in ``error.type``).
NOT_FAILED = frozenset({"ok", "rejected", "invalid", "client_disconnected", "cancelled"})

_lock = threading.Lock()
_configured = False
_provider: TracerProvider | None = None
_tracer: Tracer | None = None

# The request's headers as the server received them (ASGI's list of byte pairs), set by the /v1 handler while
# tracing is on: where ``trace_begin`` finds the caller's trace context.
_incoming: ContextVar[Any] = ContextVar("llmhub_trace_incoming", default=None)
# The trace headers the upstream attempt being made sends (``trace_attempt_begin``), read by the HTTP
# clients' request hook (``trace_headers_add``).
_upstream: ContextVar[dict[str, str] | None] = ContextVar("llmhub_trace_upstream", default=None)
# The trace of the request being served, for its log lines (``trace_log_ids``).
_current: ContextVar[TraceStart | None] = ContextVar("llmhub_trace_current", default=None)


@dataclass(frozen=True, slots=True)
class TraceStart:
    """A request's place in a trace, decided when it starts: the caller's context (None: a new trace), the
    trace's id and the id its span will have, and whether the trace is sampled (the upstream headers' flag)."""

    parent: Context | None
    trace_id: int
    span_id: int
    sampled: bool


class _PresetIds:
    """The tracer provider's id generator: the ids a span was promised when its request started (set just
    before the span is built, on this thread), random ones otherwise (OpenTelemetry's own generator)."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        self._random = RandomIdGenerator()
        self._preset = threading.local()

    def preset(self, trace_id: int = 0, span_id: int = 0) -> None:
        self._preset.trace_id = trace_id
        self._preset.span_id = span_id

    def generate_trace_id(self) -> int:
        value = getattr(self._preset, "trace_id", 0)
        self._preset.trace_id = 0
        return value or self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        value = getattr(self._preset, "span_id", 0)
        self._preset.span_id = 0
        return value or self._random.generate_span_id()

    def is_trace_id_random(self) -> bool:
        return True


_ids: _PresetIds | None = None


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` asks for traces (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return any(environ.get(name, "").strip() for name in EXPORTER_SETTINGS)


def tracing_configure(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Build the process's tracer provider and exporter once, if the environment asks for traces; the
    provider, or None when tracing is off. Later calls return what the first one built."""
    global _configured, _provider, _tracer
    with _lock:
        if _configured:
            return _provider
        _configured = True
        environ = os.environ if environ is None else environ
        if not tracing_wanted(environ):
            return None
        exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
        if exporter != "otlp":
            logger.warning("OTEL_TRACES_EXPORTER=%s is not supported (only otlp, over HTTP); traces are off", exporter)
            return None
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol and protocol.strip() != "http/protobuf":
            logger.warning("OTLP protocol %s is not supported; exporting traces over http/protobuf", protocol)
        _provider = _provider_build(environ)
        _tracer = _provider.get_tracer("llmhub")
        return _provider


def _provider_build(environ: Mapping[str, str]) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win over this default.
    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    attributes = {} if named else {"service.name": SERVICE_NAME}
    global _ids
    _ids = _PresetIds()
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=True, id_generator=_ids)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tracer_provider() -> TracerProvider | None:
    """The provider built for this process, None while tracing is off (or not yet configured)."""
    return _provider


def tracing_active() -> bool:
    """Whether this process exports traces (configured on first use, as ``request_trace_record`` does)."""
    if _tracer is None and not _configured:
        tracing_configure()
    return _tracer is not None


def trace_incoming_bind(headers: Any) -> None:
    """The request being served arrived with ``headers`` (ASGI's byte pairs): ``trace_begin`` reads the
    caller's trace context from them. Called by the /v1 handler only while tracing is on."""
    _incoming.set(headers)


def trace_begin() -> TraceStart | None:
    """The request starting in this task: its trace, its span's id and the sampling decision, under the
    caller's trace context if its headers carry one; None while tracing is off."""
    if _tracer is None and not tracing_active():
        return None
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    provider = _provider
    assert provider is not None
    parent = None
    trace_id = 0
    headers = _incoming.get()
    if headers:
        carrier: dict[str, str] = {}
        for name, value in headers:
            carrier.setdefault(name.decode("latin1").lower(), value.decode("latin1"))
        parent = extract(carrier)
        context = trace.get_current_span(parent).get_span_context()
        if context.is_valid:
            trace_id = context.trace_id
    trace_id = trace_id or random.getrandbits(128) or 1
    sampled = provider.sampler.should_sample(parent, trace_id, "", trace.SpanKind.SERVER).decision.is_sampled()
    start = TraceStart(parent=parent, trace_id=trace_id, span_id=random.getrandbits(64) or 1, sampled=sampled)
    _current.set(start)
    return start


def trace_log_ids() -> tuple[str, str] | None:
    """The trace id and span id (hex, as OTLP backends show them) of the request being served, for its log
    lines; None outside a request, while tracing is off, or when its trace is not sampled (no span to find)."""
    start = _current.get()
    if start is None or not start.sampled:
        return None
    return f"{start.trace_id:032x}", f"{start.span_id:016x}"


def trace_upstream_wanted(kind: str) -> bool:
    """Whether a provider of ``kind`` is sent the trace context (``LLMHUB_TRACE_UPSTREAM_KINDS``)."""
    from django.conf import settings

    kinds = getattr(settings, "LLMHUB_TRACE_UPSTREAM_KINDS", ())
    return kind in kinds or "*" in kinds


def trace_attempt_begin(start: TraceStart | None, kind: str) -> int:
    """An upstream attempt of the request ``start`` begins: the id its span will have (0 while tracing is
    off), and, for a provider of a ``kind`` that is sent it, the ``traceparent`` (and the caller's
    ``tracestate`` and baggage) the attempt's requests carry, naming that span as their parent. Ended by
    ``trace_attempt_end``."""
    if start is None:
        return 0
    span_id = random.getrandbits(64) or 1
    if trace_upstream_wanted(kind):
        from opentelemetry import trace
        from opentelemetry.propagate import inject

        parent_state = trace.get_current_span(start.parent).get_span_context().trace_state if start.parent else None
        context = trace.SpanContext(
            start.trace_id,
            span_id,
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED if start.sampled else trace.TraceFlags.DEFAULT),
            trace_state=parent_state,
        )
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(trace.NonRecordingSpan(context), start.parent))
        _upstream.set(carrier)
    return span_id


def trace_attempt_end() -> None:
    """The attempt's requests have been sent: later requests of this task carry no trace headers of it."""
    if _upstream.get() is not None:
        _upstream.set(None)


async def trace_headers_add(request: Any) -> None:
    """An HTTP client's request hook (an adapter's pooled client, while tracing is on): the attempt's trace
    headers, if it has any, on the request (the SDK's retries of the attempt carry the same)."""
    headers = _upstream.get()
    if headers:
        for name, value in headers.items():
            request.headers[name] = value


def _server_attributes(base_url: str) -> dict[str, Any]:
    """``server.address`` and ``server.port`` of a provider's base URL (never its path or credentials)."""
    try:
        parts = urlsplit(base_url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    except ValueError:
        return {}
    attributes: dict[str, Any] = {}
    if parts.hostname:
        attributes["server.address"] = parts.hostname
        if port:
            attributes["server.port"] = port
    return attributes


def tracing_shutdown() -> None:
    """Export the spans still queued and stop the exporter (the ASGI lifespan's shutdown). Blocks up to the
    exporter's timeout; safe to call when tracing is off, and more than once."""
    provider = _provider
    if provider is None:
        return
    try:
        provider.force_flush()
        provider.shutdown()
    except Exception:
        logger.exception("tracing: the last spans could not be exported")


def request_trace_record(observation: RequestObservation) -> None:
    """Emit the request's span and its attempts' child spans (after the request ended)."""
    tracer = _tracer
    if tracer is None:
        if _configured:
            return
        tracing_configure()
        tracer = _tracer
        if tracer is None:
            return
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    operation = GEN_AI_OPERATIONS.get(observation.operation, observation.operation)
    requested = observation.attempts[0].model if observation.attempts else observation.model
    failed = observation.status not in NOT_FAILED
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "llmhub.request_id": observation.request_id,
        "llmhub.transport": observation.transport,
        "llmhub.status": observation.status,
        "llmhub.stream": observation.stream,
        "llmhub.attempts": len(observation.attempts),
        "llmhub.cost_usd": float(observation.cost),
        "llmhub.duration_s": observation.duration,
    }
    if requested:
        attributes["gen_ai.request.model"] = requested
    if observation.provider_kind:
        attributes.update(_provider_attributes(observation.provider_kind))
    if observation.provider:
        attributes["llmhub.provider"] = observation.provider
    if observation.deployment:
        attributes["llmhub.deployment"] = observation.deployment
    if observation.model:
        attributes["llmhub.model"] = observation.model
    if observation.upstream_model and observation.status == "ok":
        attributes["gen_ai.response.model"] = observation.upstream_model
    if observation.prompt_tokens or observation.completion_tokens:
        attributes["gen_ai.usage.input_tokens"] = observation.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = observation.completion_tokens
    if observation.ttft is not None:
        attributes["llmhub.time_to_first_token_s"] = observation.ttft
    if observation.overhead is not None:
        attributes["llmhub.overhead_s"] = observation.overhead
    if observation.experiment:
        attributes["llmhub.experiment"] = observation.experiment
    error_type = observation.error_type or (observation.status if failed else "")
    if error_type:
        attributes["error.type"] = error_type
    if observation.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = (observation.finish_reason,)
    start = observation.trace
    if start is not None and _ids is not None:
        _ids.preset(trace_id=start.trace_id, span_id=start.span_id)
    try:
        span = tracer.start_span(
            f"{operation} {requested}" if requested else operation,
            context=start.parent if start is not None else None,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=observation.started_ns or None,
        )
    finally:
        if _ids is not None:
            _ids.preset()  # a caller's trace id went unused: not the next span's
    if failed:
        span.set_status(Status(StatusCode.ERROR, error_type))
    parent = trace.set_span_in_context(span)
    for attempt in observation.attempts:
        _attempt_span(tracer, parent, operation, attempt)
    span.end(end_time=observation.ended_ns or None)


def _provider_attributes(kind: str) -> dict[str, str]:
    name = GEN_AI_PROVIDER_NAMES.get(kind, kind)
    # gen_ai.system is the older name of gen_ai.provider.name: backends that read either find it.
    return {"gen_ai.provider.name": name, "gen_ai.system": name}


def _attempt_span(tracer: Tracer, parent: Any, operation: str, attempt: AttemptObservation) -> None:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": attempt.upstream_model,
        **_provider_attributes(attempt.provider_kind),
        "llmhub.deployment": attempt.deployment,
        "llmhub.provider": attempt.provider,
        "llmhub.model": attempt.model,
        "llmhub.outcome": attempt.outcome,
    }
    if attempt.base_url:
        attributes.update(_server_attributes(attempt.base_url))
    if attempt.error_type:
        attributes["error.type"] = attempt.error_type
    if attempt.span_id and _ids is not None:
        _ids.preset(span_id=attempt.span_id)  # the id its requests named as their parent
    try:
        span = tracer.start_span(
            f"{operation} {attempt.upstream_model}",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=attempt.started_ns,
        )
    finally:
        if _ids is not None:
            _ids.preset()
    if attempt.outcome == "failure":
        span.set_status(Status(StatusCode.ERROR, attempt.error_type or "failure"))
    span.end(end_time=attempt.ended_ns)
