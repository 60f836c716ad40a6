"""Several fake upstreams in one process: each listener its own port, timing and standing fault, changed at
run time (in-process through its handle, or over HTTP through ``/__control``), and counting what it served."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from llmhub.testing.fake_upstream import FakeUpstreams, UpstreamHandle, UpstreamSpec, fault_canonical
from tests.conftest import process_stop

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"


def chat(upstream: UpstreamHandle, text: str = "hi", **extra: Any) -> httpx.Response:
    body = {"model": "fake-gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}
    return httpx.post(upstream.base_url + CHAT, json=body, timeout=5)


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def control(via: UpstreamHandle, **settings: Any) -> httpx.Response:
    return httpx.post(via.base_url + "/__control", json=settings, timeout=5)


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("status=503", "503"),
        ("503", "503"),
        ("status=429,retry_after=1", "429:1"),
        ("429:1", "429:1"),
        ("status=429,retry_after=250ms", "429:250ms"),
        ("status=429,retry_after=none", "429:none"),
        ("429:none", "429:none"),
        ("cut_after=3", "cut-3"),
        ("cut-3", "cut-3"),
        ("context_length", "context"),
        ("context", "context"),
        ("refuse", "refuse"),
        ("hang", "hang"),
        ("error-event", "error-event"),
    ],
)
def test_fault_spellings(spelling: str, canonical: str) -> None:
    assert fault_canonical(spelling) == canonical


@pytest.mark.parametrize("spelling", ["", "status=200", "status=999", "cut_after=x", "retry_after=1", "explode"])
def test_unknown_fault_spellings_are_refused(spelling: str) -> None:
    with pytest.raises(ValueError):
        fault_canonical(spelling)


def test_listeners_have_their_own_ports_and_count_what_they_served(fake_upstreams) -> None:
    east, west, north = fake_upstreams("east", "west", "north")
    assert len({east.port, west.port, north.port}) == 3
    for _ in range(3):
        assert chat(east).json()["choices"][0]["message"]["content"] == "Echo: hi"
    assert chat(west).status_code == 200
    assert (east.requests_served(), west.requests_served(), north.requests_served()) == (3, 1, 0)
    assert east.requests_served(CHAT) == 3 and east.requests_served("/v1/embeddings") == 0

    stats = httpx.get(west.base_url + "/__stats", timeout=5).json()
    assert stats["name"] == "west" and stats["port"] == west.port
    assert stats["requests"] == 1 and stats["by_path"] == {CHAT: 1} and stats["listening"] is True
    # Control requests are not counted, and a peer's figures can be read through any listener.
    assert httpx.get(west.base_url + "/__stats", params={"upstream": "east"}, timeout=5).json()["requests"] == 3
    assert west.requests_served() == 1


def test_a_standing_fault_breaks_one_listener_and_healing_it_restores_it(fake_upstreams) -> None:
    east, west = fake_upstreams("east", "west")
    east.set_fault("status=503")
    client = openai.OpenAI(base_url=east.base_url + "/v1", api_key="k", max_retries=0, timeout=5)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="fake-gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 503
    assert chat(west).status_code == 200, "the other listener is not affected"
    # The request's own marker still wins over the standing fault.
    assert chat(east, "[[fault=400]] hi").status_code == 400
    east.set_fault(None)
    assert chat(east).status_code == 200
    assert east.requests_served() == 3, "answered faults count as served"


def test_a_standing_fault_can_hit_some_models_only(fake_upstreams) -> None:
    (upstream,) = fake_upstreams(1)
    upstream.set_fault("status=503", models=["fake-gpt-4o-mini"])
    assert chat(upstream).status_code == 503
    other = httpx.post(
        upstream.base_url + CHAT, json={"model": "fake-gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert other.status_code == 200, "the provider's other models still answer"
    # Over HTTP too; a new fault without models applies to every model again.
    assert control(upstream, fault="status=500", models=["fake-gpt-4o"]).json()["fault_models"] == ["fake-gpt-4o"]
    assert chat(upstream).status_code == 200
    assert control(upstream, fault="status=500").json()["fault_models"] is None
    assert chat(upstream).status_code == 500
    assert control(upstream, fault="refuse", models=["fake-gpt-4o"]).status_code == 400
    with pytest.raises(ValueError):
        upstream.set_fault("refuse", models=["fake-gpt-4o"])


def test_rate_limit_fault_carries_its_retry_after(fake_upstreams) -> None:
    (upstream,) = fake_upstreams(UpstreamSpec("limited", fault="status=429,retry_after=1"))
    response = chat(upstream)
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    ant = anthropic.Anthropic(base_url=upstream.base_url, api_key="k", max_retries=0, timeout=5)
    with pytest.raises(anthropic.RateLimitError) as raised:
        ant.messages.create(model="fake-claude-haiku", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.response.headers["retry-after"] == "1"
    assert raised.value.body["error"]["type"] == "rate_limit_error", "each protocol keeps its error shape"


def test_context_length_and_cut_streams_as_standing_faults(fake_upstreams) -> None:
    (upstream,) = fake_upstreams(1)
    upstream.set_fault("context_length")
    response = chat(upstream)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"

    upstream.set_fault("cut_after=3")
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "[[words=10]]"}]}
    pieces: list[str] = []
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", upstream.base_url + CHAT, json=body, timeout=5) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    assert "".join(pieces) == "lorem ipsum dolor", "three content chunks, then the connection is cut"


def test_hang_never_answers(fake_upstreams) -> None:
    (upstream,) = fake_upstreams(UpstreamSpec("stuck", fault="hang"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(upstream.base_url + CHAT, json={"model": "m", "messages": []}, timeout=0.5)


def test_refuse_closes_the_port_drops_kept_alive_connections_and_accept_reopens_it(fake_upstreams) -> None:
    east, west = fake_upstreams("east", "west")
    port = east.port
    with httpx.Client(timeout=5) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post(east.base_url + CHAT, json=body).status_code == 200  # the connection stays open
        east.refuse()
        assert refused(port), "new connections are refused"
        with pytest.raises(httpx.TransportError):
            client.post(east.base_url + CHAT, json=body)
        assert east.requests_served() == 1, "a refused request was never served"
        assert chat(west).status_code == 200
        east.accept()
        assert east.port == port and not refused(port)
        assert client.post(east.base_url + CHAT, json=body).status_code == 200
    assert east.requests_served() == 2


def test_control_endpoint_breaks_and_heals_a_listener_over_http(fake_upstreams) -> None:
    east, west = fake_upstreams("east", "west")
    answer = control(east, fault="status=503", latency_ms=1, ttft_ms=2, tps=1000)
    assert answer.status_code == 200
    assert (answer.json()["fault"], answer.json()["latency_ms"], answer.json()["tps"]) == ("503", 1.0, 1000.0)
    assert chat(east).status_code == 503

    # A listener refusing itself answers first, then closes its port.
    assert control(east, fault="refuse").json()["fault"] == "refuse"
    assert refused(east.port)
    # Healed through its peer (it cannot be reached itself).
    healed = control(west, upstream="east", fault=None)
    assert healed.status_code == 200 and healed.json()["name"] == "east" and healed.json()["listening"] is True
    assert chat(east).status_code == 200
    assert control(west, reset=True).json()["requests"] == 0, "reset clears the counters"

    assert control(east, fault="explode").status_code == 400
    assert control(east, colour="red").status_code == 400
    assert control(east, upstream="nowhere", fault=None).status_code == 404
    assert east.fault is None, "a refused control request changes nothing"


def test_time_to_first_token_comes_before_the_first_streamed_piece(fake_upstreams) -> None:
    slow, fast = fake_upstreams(UpstreamSpec("slow", ttft_ms=300), UpstreamSpec("fast"))
    for upstream, least in ((slow, 0.3), (fast, 0.0)):
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "[[words=3]]"}]}
        started = time.monotonic()
        with httpx.stream("POST", upstream.base_url + CHAT, json=body, timeout=5) as response:
            lines = response.iter_lines()
            assert '"role":"assistant"' in next(line for line in lines if line.startswith("data: {"))
            first = next(time.monotonic() for line in lines if line.startswith("data: {") and "lorem" in line)
        assert first - started >= least, "the first token comes no sooner than the time to first token"
    slow.set_timing(ttft_ms=0, latency_ms=250)
    started = time.monotonic()
    assert chat(slow).status_code == 200
    assert time.monotonic() - started >= 0.25, "the base latency delays the whole answer"


async def test_handles_work_from_async_tests_while_traffic_flows(fake_upstreams) -> None:
    east, west = fake_upstreams("east", "west", tps=200)
    body = {"model": "m", "messages": [{"role": "user", "content": "[[words=2]]"}]}
    async with httpx.AsyncClient(timeout=5) as client:
        answers = [await client.post(east.base_url + CHAT, json=body) for _ in range(2)]
        east.set_fault("status=500")
        answers.append(await client.post(east.base_url + CHAT, json=body))
        east.refuse()
        for upstream in (east, west):
            try:
                answers.append(await client.post(upstream.base_url + CHAT, json=body))
            except httpx.TransportError:
                answers.append(None)
    assert [a.status_code if a else None for a in answers] == [200, 200, 500, None, 200]
    assert (east.requests_served(), west.requests_served()) == (3, 1)


def test_a_group_in_a_with_block_and_the_single_upstream_api() -> None:
    with FakeUpstreams([UpstreamSpec("a"), UpstreamSpec("b", fault="refuse")]) as group:
        assert group["b"].fault == "refuse" and refused(group["b"].port), "an upstream can start refusing"
        assert [handle.name for handle in group] == ["a", "b"]
        assert chat(group[0]).status_code == 200
    assert refused(group["a"].port)


def test_reset_of_a_single_shared_upstream_heals_it(fake_upstream) -> None:
    """The session's shared ``fake_upstream`` starts every test clean, whatever the previous one broke."""
    fake_upstream.set_fault("refuse")
    fake_upstream.handles[0].set_timing(latency_ms=5000)
    fake_upstream.reset()
    assert chat(fake_upstream.handles[0]).status_code == 200
    assert fake_upstream.requests_served() == 1


def test_the_command_line_serves_several_upstreams_in_one_process() -> None:
    with FakeUpstreams([UpstreamSpec("p1"), UpstreamSpec("p2")]) as probe:
        east_port, west_port = probe["p1"].port, probe["p2"].port  # free a moment ago
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmhub.testing.fake_upstream",
            "--upstream",
            f"east={east_port},latency_ms=1",
            "--upstream",
            f"west={west_port},fault=status=429,retry_after=3",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(2)]
        assert lines == [
            f"fake upstream east listening on http://127.0.0.1:{east_port}",
            f"fake upstream west listening on http://127.0.0.1:{west_port}",
        ]
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"http://127.0.0.1:{east_port}{CHAT}", json=body, timeout=5).status_code == 200
        limited = httpx.post(f"http://127.0.0.1:{west_port}{CHAT}", json=body, timeout=5)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "3"
        # One process: the east listener heals the west one.
        httpx.post(f"http://127.0.0.1:{east_port}/__control", json={"upstream": "west", "fault": None}, timeout=5)
        assert httpx.post(f"http://127.0.0.1:{west_port}{CHAT}", json=body, timeout=5).status_code == 200
    finally:
        process_stop(process)


def test_the_command_line_refuses_a_malformed_upstream() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "llmhub.testing.fake_upstream", "--upstream", "east=18080,colour=red"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 2 and "unknown setting 'colour=red'" in completed.stderr


@pytest.mark.django_db(transaction=True)
def test_a_live_llmhub_reaches_them_and_keeps_answering_while_one_refuses(llmhub_server, fake_upstreams) -> None:
    from billing.services.keys import api_key_create
    from providers.models import CatalogModel
    from tests.factories import DeploymentFactory, ProviderFactory, UserFactory

    east, west = fake_upstreams("east", "west")
    model = CatalogModel.objects.create(name="balanced")
    for upstream in (east, west):
        provider = ProviderFactory(name=f"fake-{upstream.name}", base_url=upstream.base_url + "/v1")
        DeploymentFactory(model=model, name=upstream.name, provider=provider)
    key = api_key_create(user=UserFactory(), name="tests").secret
    client = openai.OpenAI(base_url=llmhub_server.url + "/v1", api_key=key, max_retries=0, timeout=20)

    def deployment_answering() -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="balanced", messages=[{"role": "user", "content": "[[reply=ok]]"}]
        )
        assert raw.parse().choices[0].message.content == "ok"
        return raw.headers["x-llmhub-deployment"]

    first = [deployment_answering() for _ in range(20)]
    assert (east.requests_served(), west.requests_served()) == (first.count("east"), first.count("west"))
    assert 0 < east.requests_served() < 20, "equal weights: both take a share"

    east.refuse()
    served_by_west = west.requests_served()
    assert [deployment_answering() for _ in range(8)] == ["west"] * 8
    assert west.requests_served() == served_by_west + 8
