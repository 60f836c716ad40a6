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

Attributes follow OpenTelemetry's GenAI semantic conventions (``gen_ai.*``, ``error.type``) plus llmhub's
own (``llmhub.*``); ``server.address`` is left out, the observation not carrying the provider's host. They
come from the observation alone, which carries no message content and no key: no prompt, completion or
secret can reach a span."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
# Our operations as ``gen_ai.operation.name`` spells them: an Anthropic Messages call is a chat.
GEN_AI_OPERATIONS = {"chat": "chat", "messages": "chat", "embeddings": "embeddings"}
# Ledger statuses that are not a failure of the service: the client's own doing, or a refusal by policy
# (whose code still goes in ``error.type``).
NOT_FAILED = frozenset({"ok", "rejected", "client_disconnected", "cancelled"})

_lock = threading.Lock()
_configured = False
_provider: TracerProvider | None = None
_tracer: Tracer | None = None


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
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=True)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tracer_provider() -> TracerProvider | None:
    """The provider built for this process, None while tracing is off (or not yet configured)."""
    return _provider


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
    span = tracer.start_span(
        f"{operation} {requested}" if requested else operation,
        kind=SpanKind.SERVER,
        attributes=attributes,
        start_time=observation.started_ns or None,
    )
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
    if attempt.error_type:
        attributes["error.type"] = attempt.error_type
    span = tracer.start_span(
        f"{operation} {attempt.upstream_model}",
        context=parent,
        kind=SpanKind.CLIENT,
        attributes=attributes,
        start_time=attempt.started_ns,
    )
    if attempt.outcome == "failure":
        span.set_status(Status(StatusCode.ERROR, attempt.error_type or "failure"))
    span.end(end_time=attempt.ended_ns)
