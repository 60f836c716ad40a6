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
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from django.test import override_settings

from billing.models import UsageRecord
from billing.services.ledger import ledger_replay_spool
from tests.conftest import database_url_for_subprocesses, free_port, own_postgres, wait_for_port
from tests.gateway.conftest import make_catalog
from tests.own_database import migrate
from tests.waiting import wait_until

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
def uvicorn_server(
    tmp_path: Path,
    *,
    grace_seconds: float,
    graceful_timeout: int = 3,
    database_url: str | None = None,
    redis_url: str = "",
) -> Iterator[tuple]:
    """A uvicorn subprocess serving llmhub on a free port; yields ``(process, port, spool)``. On the way
    out it is killed if still running. ``database_url``: the test's own database (default: the suite's);
    ``redis_url``: the counters' store (default: the database)."""
    spool = tmp_path / "spool.jsonl"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url or database_url_for_subprocesses(),
        LLMHUB_LEDGER_SPOOL=str(spool),
        LLMHUB_SHUTDOWN_GRACE_SECONDS=str(grace_seconds),
        PYTHONPATH=str(ROOT),
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
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
        wait_for_port(port, process=server)
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
    wait_until(
        lambda: sum(r["path"].endswith("/chat/completions") for r in upstream.requests) >= count,
        f"the upstream received {count} requests",
        timeout=30,
        interval=0.01,
    )


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


# SETTLEMENT: a row spooled at shutdown keeps its reservation's release

# The catalog, a user and a key with a budget, written into the test's own PostgreSQL by a process of its own.
BUDGET_SETUP = """
import django, sys
from decimal import Decimal
django.setup()
from billing.services.keys import api_key_create
from tests.factories import ModelFactory, ProviderFactory, UserFactory
provider = ProviderFactory(name="fake-openai", base_url=sys.argv[1] + "/v1")
ModelFactory(name="gpt-test", provider=provider, input_per_mtok=Decimal(0), output_per_mtok=Decimal(100))
created = api_key_create(user=UserFactory(username="budgeted"), name="budgeted", budget_usd=Decimal(100),
                         budget_period="total")
print(created.secret, created.api_key.pk)
"""


def own_database_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DJANGO_SETTINGS_MODULE="llmhub.settings.test", TEST_DATABASE_URL=database_url, PYTHONPATH=str(ROOT))
    return env


def key_counter(database_url: str, redis_url: str, api_key_id: int) -> tuple[Decimal, Decimal]:
    """(spent, reserved) of the key's total budget, in whichever store holds it."""
    import psycopg
    import redis

    if redis_url:
        from billing.models import BudgetPeriod
        from billing.services.budgets import CounterRef, period_bounds

        start, _ = period_bounds(BudgetPeriod.TOTAL, datetime.now(UTC))
        ref = CounterRef("key", api_key_id, "cost", BudgetPeriod.TOTAL, start)
        spent, reserved = redis.Redis.from_url(redis_url).hmget(ref.key, "spent", "reserved")
        return ref.from_units(spent), ref.from_units(reserved or 0)
    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            "SELECT spent, reserved FROM billing_budgetcounter WHERE scope_kind = 'key' AND scope_id = %s",
            [api_key_id],
        ).fetchone()
    return Decimal(row[0]), Decimal(row[1])


def ledger_row(database_url: str, request_id: str) -> tuple[str, Decimal] | None:
    import psycopg

    with psycopg.connect(database_url) as connection:
        return connection.execute(
            "SELECT status, cost FROM billing_usagerecord WHERE request_id = %s", [request_id]
        ).fetchone()


@pytest.mark.parametrize("store", ["database", "redis"])
def test_a_stream_cut_at_shutdown_with_the_database_down_is_settled_once_when_its_row_is_replayed(
    request, store, fake_upstream, tmp_path, tmp_path_factory
):
    """The database is down when the server stops: the cut stream's row, and on the database store its
    settle, cannot be written, so the row is spooled with its admission and the process exits. The next
    start replays it: the reservation is released at once (on the database store it was held until then:
    before, until it expired) and the key has spent exactly the row's cost, on Redis too, where the settle
    had landed before the write failed and the replay, in another process, must not make it twice."""
    redis_url = request.getfixturevalue("redis_url") if store == "redis" else ""
    if redis_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()
    with own_postgres() as postgres:
        env = own_database_env(postgres.url)
        migrate(postgres.url, env, tmp_path_factory)
        setup = subprocess.run(
            [sys.executable, "-c", BUDGET_SETUP, fake_upstream.base_url],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        secret, api_key_id = setup.stdout.split()
        serve = {"database_url": postgres.url, "redis_url": redis_url}
        with uvicorn_server(tmp_path, grace_seconds=1, **serve) as (server, port, spool):
            started = threading.Barrier(2, timeout=30)
            stream = SlowStream(port, secret, started=started)
            stream.start()
            started.wait()
            postgres.stop()
            server.send_signal(signal.SIGTERM)
            stream.join(timeout=60)
            stopped(server)
        [spooled] = [json.loads(line) for line in spool.read_text().splitlines() if line.strip()]
        assert spooled["request_id"] == stream.request_id and spooled["admission"]
        cost = Decimal(spooled["cost"])
        assert cost > 0  # billed for what was relayed

        postgres.start()
        if store == "database":
            assert key_counter(postgres.url, redis_url, int(api_key_id))[1] > 0  # still held
        with uvicorn_server(tmp_path, grace_seconds=1, **serve) as (restarted, _, _):
            # Listening means its start-up (which replays the spool) is done.
            assert ledger_row(postgres.url, stream.request_id) == ("server_shutdown", cost)
            assert key_counter(postgres.url, redis_url, int(api_key_id)) == (cost, Decimal(0))
            restarted.send_signal(signal.SIGTERM)
            stopped(restarted)
        assert not (spool.exists() and spool.read_text().strip())
