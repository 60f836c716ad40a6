"""OpenTelemetry traces (core/tracing.py), as an operator's collector receives them.

A local OTLP/HTTP receiver on loopback decodes the ``ExportTraceServiceRequest`` protobufs a live llmhub
(uvicorn in a subprocess, configured only by the standard ``OTEL_*`` variables) sends it: a request's span
with the GenAI attributes, one child span per upstream attempt, and the spans still queued when the server
stops flushed at its shutdown. With no ``OTEL_*`` variable, no tracer provider or exporter is built."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from billing.services.keys import api_key_create
from core import tracing
from providers.models import CatalogModel, Deployment, ProviderKind
from tests.conftest import database_url_for_subprocesses, free_port, process_stop, wait_for_port
from tests.factories import ProviderFactory, UserFactory
from tests.loopback_http import LoopbackHTTPServer, QuietHandler
from tests.waiting import wait_for_record

ROOT = Path(__file__).resolve().parent.parent
OTEL_VARIABLES = [name for name in os.environ if name.startswith("OTEL_")]


class Collector(LoopbackHTTPServer):
    """An OTLP/HTTP trace receiver: every span posted to ``/v1/traces``, decoded, with its resource's
    attributes."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []

    @property
    def endpoint(self) -> str:
        return self.origin

    def start(self) -> Collector:
        collector = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.paths.append(self.path)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.receive(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.serve(Handler)
        return self

    def receive(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "kind": span.kind,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "status": span.status.code,
                            "attributes": _attributes(span.attributes),
                            "resource": resource,
                        }
                    )

    def of_request(self, request_id: str) -> dict[str, Any]:
        [span] = [span for span in self.spans if span["attributes"].get("llmhub.request_id") == request_id]
        return span

    def children(self, parent: dict[str, Any]) -> list[dict[str, Any]]:
        found = [
            span
            for span in self.spans
            if span["parent_span_id"] == parent["span_id"] and span["trace_id"] == parent["trace_id"]
        ]
        return sorted(found, key=lambda span: span["start"])


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind)


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector().start()
    yield receiver
    receiver.stop()


@contextmanager
def traced_server(collector: Collector, tmp_path: Path, **settings: str) -> Iterator[str]:
    """A live llmhub (uvicorn in a subprocess) exporting its traces to ``collector``, configured only by the
    standard ``OTEL_*`` variables (and ``settings``); its URL. Its spans reach the collector when it stops,
    through the flush at its shutdown, which must end cleanly."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", *OTEL_VARIABLES)}
    environment.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        LLMHUB_LEDGER_SPOOL=str(tmp_path / "spool.jsonl"),
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_SERVICE_NAME="llmhub-under-test",
        # Nothing is exported on a timer during the test: the spans reach the collector when the server
        # stops, through the flush at its shutdown.
        OTEL_BSP_SCHEDULE_DELAY="600000",
        PYTHONUNBUFFERED="1",
        **settings,
    )
    command = [sys.executable, "-m", "uvicorn", "llmhub.asgi:application", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--lifespan", "on", "--log-level", "warning"]
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=output, stderr=output)
        try:
            wait_for_port(port, process=server)
            yield f"http://127.0.0.1:{port}"
        finally:
            process_stop(server, grace=60)
    # uvicorn re-raises the signal once its shutdown (and the lifespan's) is done.
    assert server.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Traceback" not in log.read_text()


def failing_then_answering(name: str, failing: tuple[str, Any], answering: tuple[str, Any]) -> CatalogModel:
    """A model whose first deployment (by priority) answers 503 and whose second answers: two attempts."""
    catalog = CatalogModel.objects.create(name=name, strategy="priority")
    prices = {"input_per_mtok": Decimal("0.15"), "output_per_mtok": Decimal("0.60")}
    (first, first_provider), (second, second_provider) = failing, answering
    Deployment.objects.create(model=catalog, name=first, provider=first_provider, upstream_id="fault-503", **prices)
    Deployment.objects.create(
        model=catalog, name=second, provider=second_provider, upstream_id="fake-gpt-4o-mini", priority=1, **prices
    )
    return catalog


# Values of Span.Kind and Status.StatusCode in the OTLP protobuf.
SERVER, CLIENT = 2, 3
STATUS_UNSET, STATUS_ERROR = 0, 2


@pytest.mark.django_db(transaction=True)
def test_a_request_through_a_live_server_exports_its_span_and_one_child_per_attempt(collector, fake_upstream, tmp_path):
    first = ProviderFactory(name="first", kind=ProviderKind.OPENAI, base_url=fake_upstream.base_url + "/v1")
    second = ProviderFactory(name="second", kind=ProviderKind.OPENAI, base_url=fake_upstream.base_url + "/v1")
    failing_then_answering("routed", ("first", first), ("second", second))
    key = api_key_create(user=UserFactory(username="traced"), name="traces").secret

    with traced_server(collector, tmp_path) as url:
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30) as client:
            body = {"model": "routed", "messages": [{"role": "user", "content": "hello [[words=5]]"}]}
            retried = client.post("/v1/chat/completions", json=body)
            refused = client.post("/v1/chat/completions", json={**body, "model": "no-such-model"})
            bad = {**body, "messages": [{"role": "user", "content": "hello [[fault=400]]"}]}
            invalid = client.post("/v1/chat/completions", json=bad)
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
                assert streamed.status_code == 200
                assert any(line == "data: [DONE]" for line in streamed.iter_lines())
        assert retried.status_code == 200, retried.text
        assert retried.headers["x-llmhub-attempts"] == "2"
        assert refused.status_code == 404, refused.text
        assert invalid.status_code == 400, invalid.text
        record = wait_for_record(retried.headers["x-request-id"])
        assert collector.spans == []  # nothing yet: the batch waits for the shutdown

    assert set(collector.paths) == {"/v1/traces"}
    span = collector.of_request(retried.headers["x-request-id"])
    assert span["name"] == "chat routed"
    assert span["kind"] == SERVER
    assert span["status"] == STATUS_UNSET
    assert span["resource"]["service.name"] == "llmhub-under-test"
    usage = retried.json()["usage"]
    assert span["attributes"] == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "routed",
        "gen_ai.response.model": "fake-gpt-4o-mini",
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "gen_ai.response.finish_reasons": ["stop"],
        "llmhub.request_id": retried.headers["x-request-id"],
        "llmhub.transport": "rest",
        "llmhub.status": "ok",
        "llmhub.stream": False,
        "llmhub.attempts": 2,
        "llmhub.provider": "second",
        "llmhub.deployment": "second",
        "llmhub.model": "routed",
        "llmhub.cost_usd": pytest.approx(float(record.cost)),
        "llmhub.duration_s": span["attributes"]["llmhub.duration_s"],
        "llmhub.overhead_s": span["attributes"]["llmhub.overhead_s"],
    }
    assert usage["completion_tokens"] > 0 and record.cost > 0
    assert span["start"] < span["end"]

    attempts = collector.children(span)
    assert [attempt["attributes"]["llmhub.deployment"] for attempt in attempts] == ["first", "second"]
    failed, answered = attempts
    assert failed["name"] == "chat fault-503" and answered["name"] == "chat fake-gpt-4o-mini"
    assert {attempt["kind"] for attempt in attempts} == {CLIENT}
    assert failed["attributes"]["llmhub.outcome"] == "failure" and failed["status"] == STATUS_ERROR
    assert failed["attributes"]["error.type"]
    assert failed["attributes"]["llmhub.provider"] == "first"
    assert failed["attributes"]["gen_ai.provider.name"] == "openai"
    assert failed["attributes"]["gen_ai.request.model"] == "fault-503"
    port = int(fake_upstream.base_url.rsplit(":", 1)[1])
    for attempt in attempts:
        assert attempt["attributes"]["server.address"] == "127.0.0.1"
        assert attempt["attributes"]["server.port"] == port
    # OpenAI's own API is not a kind the trace context is sent to by default.
    assert fake_upstream.requests and all("traceparent" not in seen["headers"] for seen in fake_upstream.requests)
    assert answered["attributes"]["llmhub.outcome"] == "ok" and answered["status"] == STATUS_UNSET
    assert "error.type" not in answered["attributes"]
    assert span["start"] <= failed["start"] <= failed["end"] <= answered["start"] <= answered["end"] <= span["end"]

    # A streamed request: its time to first token, and its two attempts too.
    stream_span = collector.of_request(streamed.headers["x-request-id"])
    streamed_attributes = stream_span["attributes"]
    assert streamed_attributes["llmhub.stream"] is True
    assert 0 < streamed_attributes["llmhub.time_to_first_token_s"] <= streamed_attributes["llmhub.duration_s"]
    assert streamed_attributes["gen_ai.usage.output_tokens"] > 0
    assert len(collector.children(stream_span)) == 2

    # A refused request has its span too, with the refusal's code and no attempt.
    refusal = collector.of_request(refused.headers["x-request-id"])
    assert refusal["attributes"]["error.type"] == refused.json()["error"]["code"]
    assert refusal["attributes"]["llmhub.status"] == "rejected"
    assert collector.children(refusal) == []

    # A request the provider refused as invalid is the client's doing, not a failure of the service.
    bad_request = collector.of_request(invalid.headers["x-request-id"])
    assert bad_request["attributes"]["llmhub.status"] == "invalid" and bad_request["status"] == STATUS_UNSET
    assert [a["attributes"]["llmhub.outcome"] for a in collector.children(bad_request)] == ["neutral"]

    # Never a message's content nor a key in a span.
    exported = repr(collector.spans)
    assert "hello" not in exported and key not in exported


@pytest.mark.django_db(transaction=True)
def test_a_callers_trace_context_is_joined_and_each_attempt_passes_its_own_span_on(collector, fake_upstream, tmp_path):
    """caller → llmhub → each attempt → the provider, one trace: the request's span is the caller's span's
    child, and each upstream request names its own attempt's span as its parent (not the caller's, and not
    the request's), with the caller's tracestate and baggage. A caller's decision not to sample holds."""
    vllm = ProviderFactory(name="vllm", kind=ProviderKind.VLLM, base_url=fake_upstream.base_url + "/v1")
    failing_then_answering("self-hosted", ("flaky", vllm), ("steady", vllm))
    key = api_key_create(user=UserFactory(username="traced-caller"), name="traces").secret
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    unsampled_trace = "0af7651916cd43dd8448eb211c80319c"
    body = {"model": "self-hosted", "messages": [{"role": "user", "content": "hello [[words=3]]"}]}

    with traced_server(collector, tmp_path, LLMHUB_LOG_FORMAT="json") as url:
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30) as client:
            joined = client.post(
                "/v1/chat/completions",
                json=body,
                headers={
                    "traceparent": f"00-{caller_trace}-{caller_span}-01",
                    "tracestate": "vendor=opaque",
                    "baggage": "tenant=acme",
                },
            )
            sent_sampled = fake_upstream.requests
            fake_upstream.reset()
            unsampled = client.post(
                "/v1/chat/completions",
                json={**body, "stream": True},
                headers={"traceparent": f"00-{unsampled_trace}-{caller_span}-00"},
            )
            sent_unsampled = fake_upstream.requests
            fake_upstream.reset()
            garbled = client.post("/v1/chat/completions", json=body, headers={"traceparent": "00-not-a-trace-01"})
            sent_garbled = fake_upstream.requests
        for answer in (joined, unsampled, garbled):
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-llmhub-attempts"] == "2"

    span = collector.of_request(joined.headers["x-request-id"])
    assert span["trace_id"] == caller_trace and span["parent_span_id"] == caller_span
    assert span["attributes"]["gen_ai.response.finish_reasons"] == ["stop"]
    attempts = collector.children(span)
    assert [attempt["attributes"]["llmhub.deployment"] for attempt in attempts] == ["flaky", "steady"]
    assert [seen["body"]["model"] for seen in sent_sampled] == ["fault-503", "fake-gpt-4o-mini"]
    for attempt, seen in zip(attempts, sent_sampled, strict=True):
        assert seen["headers"]["traceparent"] == f"00-{caller_trace}-{attempt['span_id']}-01"
        assert seen["headers"]["tracestate"] == "vendor=opaque"
        assert seen["headers"]["baggage"] == "tenant=acme"

    # The request's log lines lead to its span: the failed attempt's warning carries the trace and span ids.
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    [warning] = [
        line
        for line in lines
        if line["logger"] == "chat.pipeline" and line["request_id"] == joined.headers["x-request-id"]
    ]
    assert "upstream attempt 1" in warning["message"]
    assert (warning["trace_id"], warning["span_id"]) == (caller_trace, span["span_id"])
    # Lines of a request whose trace is not exported carry no ids, which would lead nowhere.
    unsampled_lines = [line for line in lines if line["request_id"] == unsampled.headers["x-request-id"]]
    assert unsampled_lines and not any("trace_id" in line for line in unsampled_lines)

    # Not sampled by the caller: no span of it is exported, and the providers are told so.
    assert not [exported for exported in collector.spans if exported["trace_id"] == unsampled_trace]
    assert len(sent_unsampled) == 2
    for seen in sent_unsampled:
        version, trace_id, parent, flags = seen["headers"]["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", unsampled_trace, "00") and parent != caller_span

    # A traceparent that is not one starts a new trace, as a request without any does.
    fresh = collector.of_request(garbled.headers["x-request-id"])
    assert fresh["parent_span_id"] == "" and fresh["trace_id"] not in (caller_trace, unsampled_trace)
    for attempt, seen in zip(collector.children(fresh), sent_garbled, strict=True):
        assert seen["headers"]["traceparent"] == f"00-{fresh['trace_id']}-{attempt['span_id']}-01"


@pytest.fixture
def fresh_tracing(monkeypatch) -> Iterator[None]:
    """core.tracing as a new process has it (nothing configured), with no OTEL_* variable."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name)
    monkeypatch.setattr(tracing, "_configured", False)
    monkeypatch.setattr(tracing, "_provider", None)
    monkeypatch.setattr(tracing, "_tracer", None)
    yield
    tracing.tracing_shutdown()


@pytest.mark.django_db(transaction=True)
def test_with_no_otel_variable_no_tracer_provider_or_exporter_is_built(fresh_tracing, llmhub_server, fake_upstream):
    from opentelemetry import trace

    from tests.factories import ModelFactory

    # A self-hosted kind, which is sent the trace context while tracing is on.
    provider = ProviderFactory(kind=ProviderKind.VLLM, base_url=fake_upstream.base_url + "/v1")
    ModelFactory(name="plain", provider=provider)
    key = api_key_create(user=UserFactory(username="untraced"), name="k").secret
    answer = httpx.post(
        llmhub_server.url + "/v1/chat/completions",
        headers={
            "authorization": f"Bearer {key}",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        },
        json={"model": "plain", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    wait_for_record(answer.headers["x-request-id"])
    # Off, nothing is added to an upstream request, and a caller's header is not passed on.
    [sent] = fake_upstream.requests
    assert not {"traceparent", "tracestate", "baggage"} & sent["headers"].keys()

    assert tracing._configured  # decided once (at start-up, or when a request ended): off
    assert tracing.trace_begin() is None
    assert tracing.tracer_provider() is None
    assert tracing.tracing_configure() is None
    # OpenTelemetry's global provider is untouched: still the API's no-op proxy.
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"


def test_an_exporter_setting_builds_one_provider_with_a_batch_otlp_exporter(fresh_tracing, monkeypatch):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{free_port()}/v1/traces")
    provider = tracing.tracing_configure()

    assert isinstance(provider, TracerProvider)
    assert tracing.tracing_configure() is provider  # once per process
    assert provider.resource.attributes["service.name"] == "llmhub"
    [processor] = provider._active_span_processor._span_processors
    assert isinstance(processor, BatchSpanProcessor)
    assert isinstance(processor._batch_processor._exporter, OTLPSpanExporter)


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "llmhub"}, False),  # a name is not an exporter
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
    ],
)
def test_tracing_is_wanted_only_when_an_exporter_is_named(environ, wanted):
    assert tracing.tracing_wanted(environ) is wanted
