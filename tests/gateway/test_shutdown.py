"""A server stopped while requests are in flight tells its clients and accounts for every request.

A real uvicorn subprocess with the Dockerfile's lifespan is sent SIGTERM while the fake upstream streams
slowly. The server's grace period (``LLMHUB_SHUTDOWN_GRACE_SECONDS``) is either short, so that it runs out
with the streams still going, or long, so that the test can look at the shutdown window at its leisure
and then end it with a second signal (which cuts the grace short).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from django.test import override_settings

from billing.models import UsageRecord
from billing.services.ledger import ledger_replay_spool
from tests.conftest import database_url_for_subprocesses, free_port, wait_for_port
from tests.gateway.conftest import make_catalog

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]
STREAMS = 4
# Long enough never to end by itself during a test: 3000 words at 20 tokens a second.
ENDLESS = "[[words=3000]] [[tps=20]]"
SHUTTING_DOWN = {
    "error": {
        "message": "The server is restarting and ended this reply; retry the request.",
        "type": "server_error",
        "param": None,
        "code": "server_shutting_down",
    }
}


@contextlib.contextmanager
def uvicorn_server(tmp_path: Path, *, grace_seconds: float, graceful_timeout: int = 3) -> Iterator[tuple]:
    """A uvicorn subprocess serving llmhub on a free port; yields ``(process, port, spool)``. On the way
    out it is killed if still running, and the rows it spooled are replayed into the test's database."""
    spool = tmp_path / "spool.jsonl"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        LLMHUB_LEDGER_SPOOL=str(spool),
        LLMHUB_SHUTDOWN_GRACE_SECONDS=str(grace_seconds),
    )
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "llmhub.asgi:application",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--timeout-graceful-shutdown",
            str(graceful_timeout),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=30)
        yield server, port, spool
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        log.close()


def stopped(server: subprocess.Popen) -> int:
    # uvicorn re-raises the captured SIGTERM once its shutdown has run.
    code = server.wait(timeout=60)
    assert code in (0, -signal.SIGTERM)
    return code


class SlowStream(threading.Thread):
    """One streaming request; keeps every ``data:`` payload it reads until the server ends the stream."""

    def __init__(self, port: int, key: str, content: str = ENDLESS, started: threading.Barrier | None = None):
        super().__init__(daemon=True)
        self.port, self.key, self.content, self.started = port, key, content, started
        self.request_id = ""
        self.events: list[str] = []
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self._read()
        except Exception as exc:  # a stream the server broke off: the test says so
            self.error = exc

    def _read(self) -> None:
        body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": self.content}]}
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=60,
        ) as response:
            assert response.status_code == 200
            self.request_id = response.headers["x-request-id"]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line.removeprefix("data: "))
                    # The first chunks (the role, then words) have arrived: the reply is under way.
                    if len(self.events) == 3 and self.started is not None:
                        self.started.wait()


def completion(port: int, key: str, content: str) -> httpx.Response:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": content}]}
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def upstream_received(upstream, count: int) -> None:
    """Wait until the fake upstream has received ``count`` completion requests (each is in flight)."""
    for _ in range(3000):
        if sum(r["path"].endswith("/chat/completions") for r in upstream.requests) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"the upstream never received {count} requests")


def replay(spool: Path) -> None:
    """What the next start-up does with the rows a stopping server spooled."""
    with override_settings(LLMHUB_LEDGER_SPOOL=spool):
        ledger_replay_spool()


@pytest.fixture
def key(fake_upstream) -> str:
    from billing.services.keys import api_key_create
    from tests.factories import UserFactory

    make_catalog(fake_upstream)
    return api_key_create(user=UserFactory(username="shutdown"), name="t").secret


def test_streams_still_running_after_the_grace_period_end_with_an_in_band_error(key, fake_upstream, tmp_path):
    with uvicorn_server(tmp_path, grace_seconds=1) as (server, port, spool):
        started = threading.Barrier(STREAMS + 1, timeout=30)
        streams = [SlowStream(port, key, started=started) for _ in range(STREAMS)]
        for stream in streams:
            stream.start()
        started.wait()
        # A non-streamed reply held back far longer than the grace period: it is cut too.
        answer: list[httpx.Response] = []
        slow = threading.Thread(target=lambda: answer.append(completion(port, key, ENDLESS)), daemon=True)
        slow.start()
        upstream_received(fake_upstream, STREAMS + 1)
        server.send_signal(signal.SIGTERM)
        for thread in [*streams, slow]:
            thread.join(timeout=60)
        stopped(server)
        assert not (spool.exists() and spool.read_text().strip()), "the ledger was drained before the exit"

    for stream in streams:
        assert stream.error is None
        assert json.loads(stream.events[-1]) == SHUTTING_DOWN
        assert "[DONE]" not in stream.events
    [response] = answer
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert int(response.headers["Retry-After"]) > 0
    rows = {row.request_id: row for row in UsageRecord.objects.all()}
    for stream in streams:
        row = rows[stream.request_id]
        assert row.status == "server_shutdown"
        assert row.completion_tokens > 0 and row.usage_estimated and row.cost > 0  # billed for what was sent
    cut = rows[response.headers["x-request-id"]]
    assert cut.status == "server_shutdown" and cut.completion_tokens == 0
    assert len(rows) == STREAMS + 1


def test_the_shutdown_window_refuses_new_requests_and_lets_short_ones_finish(key, tmp_path):
    # A grace period longer than the test: the window stays open until the second signal ends it.
    with uvicorn_server(tmp_path, grace_seconds=300, graceful_timeout=3) as (server, port, spool):
        started = threading.Barrier(3, timeout=30)
        endless = SlowStream(port, key, started=started)
        short = SlowStream(port, key, content="[[words=30]] [[tps=20]]", started=started)
        endless.start()
        short.start()
        started.wait()
        server.send_signal(signal.SIGTERM)
        # Until the server has seen the signal, a request is served; from then on it is refused.
        for _ in range(1000):
            refused = completion(port, key, "[[reply=hello]]")
            if refused.status_code != 200:
                break
        assert refused.status_code == 503
        assert refused.json()["error"] == {
            "message": "The server is restarting; retry the request.",
            "type": "server_error",
            "param": None,
            "code": "server_shutting_down",
        }
        assert int(refused.headers["Retry-After"]) > 0
        short.join(timeout=60)  # the grace period lets a reply in flight end normally
        assert server.poll() is None and endless.is_alive()
        server.send_signal(signal.SIGTERM)  # a second signal ends the grace period at once
        endless.join(timeout=60)
        stopped(server)
        replay(spool)

    assert short.error is None and endless.error is None
    assert short.events[-1] == "[DONE]"
    assert json.loads(endless.events[-1]) == SHUTTING_DOWN
    rows = {row.request_id: row for row in UsageRecord.objects.all()}
    assert rows[short.request_id].status == "ok"
    assert rows[endless.request_id].status == "server_shutdown"
    refused_row = rows[refused.headers["x-request-id"]]
    assert (refused_row.status, refused_row.error_type) == ("rejected", "server_shutting_down")
