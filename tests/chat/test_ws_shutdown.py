"""The chat socket when its server stops: a real uvicorn subprocess, SIGTERM, and the ``websockets`` client.

The server's grace period is longer than the test, so that the test can look at the shutdown window;
a second signal ends the grace period and cuts the reply still streaming.
"""

from __future__ import annotations

import json
import signal

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from billing.models import UsageRecord
from chat.models import Message, MessageStatus
from tests.gateway.conftest import make_catalog
from tests.gateway.test_shutdown import ENDLESS, replay, stopped, uvicorn_server

pytestmark = pytest.mark.django_db(transaction=True)
# A guard against a hang, not a measurement: every wait below ends on an event long before this.
RECV_TIMEOUT = 60


def next_event(ws) -> dict:
    return json.loads(ws.recv(timeout=RECV_TIMEOUT))


@pytest.fixture
def key(fake_upstream) -> str:
    from billing.services.keys import api_key_create
    from tests.factories import UserFactory

    make_catalog(fake_upstream)
    return api_key_create(user=UserFactory(username="socket"), name="t").secret


def authenticate(ws, key: str) -> None:
    ws.send(json.dumps({"type": "auth", "api_key": key}))
    assert next_event(ws) == {"type": "auth.ok"}


def close_code(ws) -> int:
    """Read until the server closes the socket; the code it closed with."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=RECV_TIMEOUT)
    return closed.value.rcvd.code


def test_a_stopping_server_ends_the_reply_in_band_keeps_it_and_closes_with_service_restart(key, tmp_path):
    with uvicorn_server(tmp_path, grace_seconds=300) as (server, port, spool):
        with connect(f"ws://127.0.0.1:{port}/ws/chat/", open_timeout=RECV_TIMEOUT) as ws:
            authenticate(ws, key)
            ws.send(json.dumps({"type": "chat.send", "request_id": "long", "model": "gpt-test", "content": ENDLESS}))
            started = next_event(ws)
            assert started["type"] == "chat.started"
            deltas: list[str] = []
            while len(deltas) < 3:
                event = next_event(ws)
                assert event["type"] == "chat.delta"
                deltas.append(event["content"])

            server.send_signal(signal.SIGTERM)
            # Until the server has seen the signal a new reply is served; from then on it is refused.
            refusal: dict | None = None
            for attempt in range(1000):
                probe = f"probe-{attempt}"
                ws.send(json.dumps({"type": "chat.send", "request_id": probe, "model": "gpt-test", "content": "hi"}))
                while True:
                    event = next_event(ws)
                    if event["request_id"] == "long":
                        assert event["type"] == "chat.delta"
                        deltas.append(event["content"])
                    elif event["type"] in ("chat.completed", "error"):
                        break
                if event["type"] == "error":
                    refusal = event
                    break
            assert refusal is not None
            assert refusal["code"] == "server_shutting_down" and refusal["retry_after"] > 0

            # A socket opened in the shutdown window is told at once to go elsewhere.
            with connect(f"ws://127.0.0.1:{port}/ws/chat/", open_timeout=RECV_TIMEOUT) as late:
                assert close_code(late) == 1012

            server.send_signal(signal.SIGTERM)  # a second signal ends the grace period at once
            while (event := next_event(ws))["type"] == "chat.delta":
                deltas.append(event["content"])
            assert event == {
                "type": "error",
                "request_id": "long",
                "code": "server_shutting_down",
                "message": "The server is restarting and ended this reply; retry the request.",
                "retry_after": 5,
            }
            # No reply is streaming any more: the socket closes with 1012 (service restart).
            assert close_code(ws) == 1012
        stopped(server)
        replay(spool)

    message = Message.objects.get(pk=started["message"])
    assert message.status == MessageStatus.ERROR
    assert message.content == "".join(deltas)  # the partial reply is kept, as the client saw it
    row = UsageRecord.objects.get(request_id=message.request_id)
    assert row.status == "server_shutdown" and row.completion_tokens > 0
