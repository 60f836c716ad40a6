"""The relay's idle timeout is one watchdog per stream (``chat.pipeline._IdleWatch``), not a timer per chunk:
a stream that goes on longer than its idle timeout, its chunks each arriving within it, must end cleanly
with every word; one that stalls still ends with the in-band error (``test_routing_faults``); and a client
that goes away mid-stream is recorded as gone, not as an upstream stall."""

from __future__ import annotations

import json
import re
import socket
import time
from decimal import Decimal
from types import SimpleNamespace

import httpx
import pytest

from billing.models import UsageRecord
from billing.services.keys import api_key_create
from tests.factories import ProviderFactory, UserFactory
from tests.gateway.test_routing_faults import CHEAP, single, sse_lines
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def client(llmhub_server):
    created = api_key_create(user=UserFactory(username="relay-user"), name="relay")
    return SimpleNamespace(key=created)


def test_a_stream_longer_than_its_idle_timeout_whose_chunks_keep_coming_ends_cleanly(
    llmhub_server, client, fake_upstream
):
    provider = ProviderFactory(name="steady", base_url=fake_upstream.base_url + "/v1")
    # 8 words at 5 tokens/s: 1.6 s in all, 0.2 s between chunks, under the 0.5 s idle timeout.
    single("steady", provider, "fake-gpt-4o-mini", CHEAP, stream_idle_timeout_seconds=Decimal("0.5"))
    messages = [{"role": "user", "content": "go on [[tps=5]] [[words=8]]"}]

    lines, request_id = sse_lines(llmhub_server, client, "steady", messages)

    assert lines[-1] == "data: [DONE]", lines[-3:]
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.completion_tokens == 8


def test_a_client_gone_mid_stream_is_recorded_as_gone_not_as_a_stall(llmhub_server, client, fake_upstream):
    provider = ProviderFactory(name="long", base_url=fake_upstream.base_url + "/v1")
    single("long", provider, "fake-gpt-4o-mini", CHEAP, stream_idle_timeout_seconds=Decimal("0.3"))
    messages = [{"role": "user", "content": "a long one [[tps=20]] [[words=200]]"}]
    with httpx.stream(
        "POST",
        llmhub_server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {client.key.secret}"},
        json={"model": "long", "messages": messages, "stream": True},
        timeout=30,
    ) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        contents = 0
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                contents += 1
                if contents == 3:
                    break
    record = wait_for_record(request_id)
    assert record.status == "client_disconnected", (record.status, record.error_type)
    time.sleep(0.5)  # past the idle timeout: no second row, no late stall
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1


def test_a_client_slow_to_read_is_not_taken_for_a_stalled_upstream(llmhub_server, client, fake_upstream):
    """The idle timeout counts the waits for the upstream only. A client that stops reading for longer than
    it (its receive buffer kept small, so that the server's sends soon wait for it) still gets the whole
    stream: while the relay waits on the client, the watchdog must not take that for a stall."""
    provider = ProviderFactory(name="fast", base_url=fake_upstream.base_url + "/v1")
    single("fast", provider, "fake-gpt-4o-mini", CHEAP, stream_idle_timeout_seconds=Decimal("0.3"))
    # About 9 MB of events: more than the server's socket send buffer can take (4 MB at most here).
    words = 40_000
    body = json.dumps(
        {"model": "fast", "stream": True, "messages": [{"role": "user", "content": f"on [[words={words}]]"}]}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {client.key.secret}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # set before connecting: no autotuning
        sock.settimeout(60)
        sock.connect(("127.0.0.1", llmhub_server.port))
        sock.sendall(head + body)
        time.sleep(1.5)  # five idle timeouts without reading
        received = bytearray()
        while piece := sock.recv(1 << 16):
            received += piece
    request_id = re.search(rb"x-request-id: (\S+)", bytes(received), re.IGNORECASE).group(1).decode()
    assert b"data: [DONE]" in received[-200:], bytes(received[-300:])
    assert b"upstream_stream_interrupted" not in received
    record = wait_for_record(request_id)
    assert record.status == "ok" and record.completion_tokens == words, (record.status, record.error_type)
