"""A database outage answers 503 with Retry-After, never 500, and keeps every ledger row.

In this process: the database connection is pointed where no database answers (a missing directory for
SQLite, a closed port for PostgreSQL), which is what an outage looks like to Django, for /v1 through the
openai SDK, /api/usage/ and the chat WebSocket. Across processes: two servers on a PostgreSQL of their own
that is stopped under load until every caller has been answered past the lookups' TTL, and one that is
restarted while nobody asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.db import close_old_connections, connection, connections
from rest_framework.test import APIClient

from billing.models import UsageRecord
from billing.services import ledger
from billing.services.keys import api_key_create
from llmhub.testing.postgres import PostgresCluster, createdb
from tests.conftest import free_port, own_postgres, process_stop, redis_server, wait_for_port
from tests.own_database import migrate
from tests.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.django_db(transaction=True)


def assert_database_unavailable(status: int, headers, body: dict) -> None:
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    assert body["error"]["code"] == "database_unavailable"
    assert body["error"]["type"] == "server_error"
    assert "database is unavailable" in body["error"]["message"]


@contextlib.contextmanager
def database_unreachable(tmp_path: Path) -> Iterator[None]:
    """Every new connection of this process, in any thread, fails as against a stopped server until the
    block ends. This thread's connection is closed first; the server's threads close theirs at the end of
    each request (CONN_MAX_AGE is 0 in the tests), so a test makes one request to the server before."""
    config = connections.settings["default"]
    saved = {name: config.get(name) for name in ("NAME", "HOST", "PORT")}
    close_connection_of_this_thread()
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config["NAME"] = str(tmp_path / "no-such-directory" / "db.sqlite3")
    else:
        config["HOST"], config["PORT"] = "127.0.0.1", str(free_port())
    try:
        yield
    finally:
        close_connection_of_this_thread()
        config.update(saved)


def close_connection_of_this_thread() -> None:
    """An async test reaches the database only through other threads, whose connections do not last."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        connection.close()


def wait_until_spooled(timeout: float = 30.0) -> None:
    """Until the ledger writer has given every row it holds to the spool (it retries a while first)."""
    wait_until(
        lambda: not ledger._unwritten,
        "the ledger writer gave every row it held to the spool",
        timeout=timeout,
        interval=0.05,
    )


def rows_for(request_ids: list[str], timeout: float = 30.0) -> dict[str, UsageRecord]:
    """The ledger rows of these requests once all are there: replayed by the server's own replay when the
    database answers again, or by this replay (either may run first; a row is never written twice)."""
    rows: dict[str, UsageRecord] = {}

    def all_there() -> bool:
        ledger.ledger_replay_spool()
        rows.clear()
        rows.update((row.request_id, row) for row in UsageRecord.objects.filter(request_id__in=request_ids))
        return len(rows) == len(set(request_ids))

    wait_until(
        all_there,
        lambda: f"ledger rows for {sorted(set(request_ids))} (there are for {sorted(rows)})",
        timeout=timeout,
        interval=0.2,
    )
    return rows


async def replayed_until_there(rows, what: str, *, interval: float) -> None:
    """Until ``rows`` (a queryset) has a row, replaying the spool between looks (the server's own replay, once
    the database answers again, may come first)."""

    async def there() -> bool:
        if await rows.aexists():
            return True
        await sync_to_async(ledger.ledger_replay_spool)()
        return False

    await wait_until_async(there, what, timeout=30, interval=interval)


@pytest.fixture
def short_lookups(settings, tmp_path):
    """Lookups expire at once, so that an outage finds every cached copy past its TTL; a spool of its own."""
    settings.LLMHUB_LOOKUP_CACHE_TTL = 0.01
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "spool.jsonl"
    return settings


def test_v1_serves_cached_callers_and_refuses_the_others_with_503(gateway, short_lookups, tmp_path):
    uncached = api_key_create(user=gateway.user, name="never-seen").secret
    cached = gateway.client()
    messages = [{"role": "user", "content": "hi"}]
    assert cached.chat.completions.create(model="gpt-test", messages=messages).choices[0].message.content
    assert cached.models.list().data

    with database_unreachable(tmp_path):
        served = cached.chat.completions.with_raw_response.create(model="gpt-test", messages=messages)
        with pytest.raises(openai.InternalServerError) as refused:
            gateway.client(api_key=uncached).chat.completions.create(model="gpt-test", messages=messages)
        listed = cached.models.list()
        wait_until_spooled()

    assert served.status_code == 200
    assert "gpt-test" in [model.id for model in listed.data]
    response = refused.value.response
    assert_database_unavailable(response.status_code, response.headers, response.json())
    served_id, refused_id = served.headers["x-request-id"], response.headers["x-request-id"]
    rows = rows_for([served_id, refused_id])
    assert rows[served_id].status == "ok" and rows[served_id].api_key_id == gateway.api_key.pk
    # The key could not be looked up when it was refused: its row is attributed once the database is back.
    refused_row = rows[refused_id]
    assert (refused_row.status, refused_row.error_type) == ("rejected", "database_unavailable")
    assert refused_row.api_key.name == "never-seen" and refused_row.user_id == gateway.user.pk
    assert refused_row.model_name == "gpt-test"


def test_a_key_that_matches_nothing_leaves_no_row(gateway, short_lookups, tmp_path):
    """During the outage no key can be checked; one that turns out not to exist gets no row, like a 401."""
    bogus = "sk-llmhub-abcdefgh-" + "x" * 32
    assert gateway.client().models.list().data
    with database_unreachable(tmp_path):
        with pytest.raises(openai.InternalServerError) as refused:
            gateway.client(api_key=bogus).chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}]
            )
        wait_until_spooled()
    assert refused.value.response.status_code == 503
    assert ledger.ledger_replay_spool() >= 0
    assert not UsageRecord.objects.filter(request_id=refused.value.response.headers["x-request-id"]).exists()


def test_management_api_answers_503_not_500(gateway, tmp_path):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {gateway.key}")
    assert client.get("/api/usage/").status_code == 200
    with database_unreachable(tmp_path):
        response = client.get("/api/usage/")
        by_session = APIClient()
        by_session.cookies["sessionid"] = "a-session-the-database-would-have-to-look-up"
        anonymous = by_session.get("/api/usage/")
    assert_database_unavailable(response.status_code, response.headers, response.json())
    assert_database_unavailable(anonymous.status_code, anonymous.headers, anonymous.json())


async def test_websocket_send_gets_an_error_event_and_keeps_the_socket(gateway, short_lookups, tmp_path):
    from tests.chat.conftest import open_socket

    ws, connected, _ = await open_socket()
    assert connected
    try:
        await ws.send_json_to({"type": "auth", "api_key": gateway.key})
        assert await ws.receive_json_from(timeout=10) == {"type": "auth.ok"}
        send = {"type": "chat.send", "conversation": None, "model": "gpt-test", "content": "hi", "request_id": "w1"}
        await ws.send_json_to(send)
        while (event := await ws.receive_json_from(timeout=20))["type"] != "chat.completed":
            assert event["type"] in ("chat.started", "chat.delta"), event

        # The thread the async ORM runs in keeps a connection until a call through Channels closes it.
        await database_sync_to_async(close_old_connections)()
        with database_unreachable(tmp_path):
            await ws.send_json_to({**send, "request_id": "w2"})
            error = await ws.receive_json_from(timeout=20)
            await ws.send_json_to({"type": "ping"})
            pong = await ws.receive_json_from(timeout=10)
            await sync_to_async(wait_until_spooled)()
        # An unauthenticated socket whose key cannot be checked is told so and may try again.
        other, connected, _ = await open_socket()
        try:
            with database_unreachable(tmp_path):
                await other.send_json_to({"type": "auth", "api_key": "sk-llmhub-abcdefgh-" + "y" * 32})
                auth_error = await other.receive_json_from(timeout=10)
            await other.send_json_to({"type": "auth", "api_key": gateway.key})
            assert await other.receive_json_from(timeout=10) == {"type": "auth.ok"}
        finally:
            await other.disconnect(timeout=10)
    finally:
        await ws.disconnect(timeout=10)

    assert (error["type"], error["code"], error["request_id"]) == ("error", "database_unavailable", "w2")
    assert error["retry_after"] >= 1
    assert pong == {"type": "pong"}
    assert (auth_error["type"], auth_error["code"]) == ("error", "database_unavailable")
    # The socket's request ids are the client's; its ledger rows have ids of their own.
    refused = UsageRecord.objects.filter(endpoint="websocket", status="rejected", error_type="database_unavailable")
    await replayed_until_there(refused, "the refused request's row, replayed from the spool", interval=0.02)
    row = await refused.select_related("api_key").aget()
    assert row.api_key_id == gateway.api_key.pk and row.model_name == "gpt-test"


async def test_websocket_reply_streaming_when_the_database_goes_down_runs_to_its_end(gateway, short_lookups, tmp_path):
    from tests.chat.conftest import open_socket

    ws, connected, _ = await open_socket()
    assert connected
    try:
        await ws.send_json_to({"type": "auth", "api_key": gateway.key})
        assert await ws.receive_json_from(timeout=10) == {"type": "auth.ok"}
        await ws.send_json_to(
            {"type": "chat.send", "conversation": None, "model": "gpt-test", "content": "[[words=40]] [[tps=20]]"}
        )
        assert (await ws.receive_json_from(timeout=20))["type"] == "chat.started"
        assert (await ws.receive_json_from(timeout=20))["type"] == "chat.delta"
        await database_sync_to_async(close_old_connections)()
        with database_unreachable(tmp_path):
            # Two seconds of words: its checkpoints meet the outage, and so does the save at its end.
            events = [await ws.receive_json_from(timeout=20)]
            while events[-1]["type"] == "chat.delta":
                events.append(await ws.receive_json_from(timeout=20))
            await sync_to_async(wait_until_spooled)()
    finally:
        await ws.disconnect(timeout=10)
    assert events[-1]["type"] == "chat.completed", events[-1]
    assert len(events) > 20
    # Its ledger row, spooled meanwhile, bills the whole reply.
    billed = UsageRecord.objects.filter(endpoint="websocket", status="ok", completion_tokens__gte=40)
    await replayed_until_there(billed, "the whole reply's row, replayed from the spool", interval=0.2)


# ACROSS PROCESSES: A POSTGRESQL OF THEIR OWN, STOPPED UNDER LOAD

ROOT = Path(__file__).resolve().parents[2]
# The database stays down until every caller has been answered three times on requests sent a second past the
# servers' lookup TTL after it stopped, so that the cached callers are served from copies that have expired
# (stale-if-error), and the ledger writer (its attempts last 0.75 s) has given the rows of the outage's first second
# to the spool. It was down for a fixed 10 s: more than this takes on an idle machine, and under load no promise
# that every caller had been answered past the TTL.
OUTAGE_PAST_TTL = 1.0
# The servers' lookup TTL (LLMHUB_LOOKUP_CACHE_TTL in their environment): at the test settings' 5 s the outage
# spent most of its 6 s waiting for their copies to run out (2 s at this one). A copy was loaded before the stop,
# so every one has run out when the requests counted are sent, however short the TTL.
SERVER_LOOKUP_TTL = 0.5


# The catalog and the keys, written by a process of its own into the cluster. Keys: on the server with
# Redis budgets and on the one with row-lock budgets, a budgeted and an unbudgeted one each; and one no
# server has looked up before the outage.
SETUP = """
import django, json, sys
from decimal import Decimal
django.setup()
from billing.services.keys import api_key_create
from tests.factories import ModelFactory, ProviderFactory, UserFactory
provider = ProviderFactory(name="fake-openai", base_url=sys.argv[1] + "/v1")
ModelFactory(name="gpt-test", provider=provider, input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
user = UserFactory(username="outage")
keys = {}
for name, budget in [("redis-budgeted", 100), ("redis-free", None), ("rowlock-budgeted", 100), ("rowlock-free", None),
                     ("uncached", None)]:
    created = api_key_create(user=user, name=name, budget_usd=None if budget is None else Decimal(budget),
                             budget_period="total")
    keys[name] = {"secret": created.secret, "id": created.api_key.pk}
print(json.dumps(keys))
"""


def ledger_rows(database_url: str, request_ids: list[str]) -> dict[str, tuple[str, str, int | None]]:
    import psycopg

    with psycopg.connect(database_url) as db:
        rows = db.execute(
            "SELECT request_id, status, error_type, api_key_id FROM billing_usagerecord WHERE request_id = ANY(%s)",
            [request_ids],
        ).fetchall()
    return {request_id: (status, error_type, key_id) for request_id, status, error_type, key_id in rows}


@dataclass
class Outcome:
    kind: str
    sent: float
    done: float
    status: int
    headers: dict[str, str]
    body: dict | None


class Load:
    """Clients of the official SDK (no retries) sending chat completions in turn to each target until stopped,
    at most ``limit`` in all; a target is (kind, server URL, key), and ``later`` are added by ``widen``."""

    def __init__(self, targets: list[tuple[str, str, str]], *, threads: int = 4, limit: int = 3000) -> None:
        self.targets, self.limit = list(targets), limit
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def widen(self, targets: list[tuple[str, str, str]]) -> None:
        with self.lock:
            self.targets += targets

    def _run(self, offset: int) -> None:
        clients: dict[tuple[str, str], openai.OpenAI] = {}
        turn = offset
        while not self.stop.is_set():
            with self.lock:
                if len(self.outcomes) >= self.limit:
                    return
                kind, url, key = self.targets[turn % len(self.targets)]
            turn += 1
            client = clients.get((url, key))
            if client is None:
                client = clients[(url, key)] = openai.OpenAI(
                    base_url=url + "/v1", api_key=key, max_retries=0, timeout=30
                )
            sent = time.monotonic()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hi [[words=3]]"}]
                )
                status, headers, body = raw.status_code, dict(raw.headers), None
            except openai.APIStatusError as exc:
                status, headers, body = exc.status_code, dict(exc.response.headers), exc.response.json()
            except openai.APIConnectionError:
                status, headers, body = 0, {}, None
            with self.lock:
                self.outcomes.append(Outcome(kind, sent, time.monotonic(), status, headers, body))
            time.sleep(0.02)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def count(self, kind: str | None = None) -> int:
        with self.lock:
            return sum(1 for outcome in self.outcomes if kind is None or outcome.kind == kind)

    def answered_since(self, instant: float, *, per_kind: int, kinds) -> bool:
        """Whether each of ``kinds`` has ``per_kind`` answers to requests sent after ``instant``."""
        with self.lock:
            counts = Counter(outcome.kind for outcome in self.outcomes if outcome.sent > instant)
        return all(counts[kind] >= per_kind for kind in kinds)


@pytest.fixture(scope="module")
def outage_postgres() -> Iterator[PostgresCluster]:
    with own_postgres() as cluster:
        yield cluster


def database_recreated(url: str) -> None:
    """The database of ``url`` dropped, with whatever an earlier test of the module left in it, and created empty."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as maintenance:
        maintenance.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    createdb(url)


@pytest.fixture
def own_redis() -> Iterator[str]:
    """A redis-server of this test's own: the session's holds counters of other tests' keys with the same ids."""
    with redis_server() as (url, _):
        yield url


def server_env(database_url: str, tmp_path: Path, name: str, redis_url: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        # Persistent connections, as production keeps them (CONN_MAX_AGE=60): the ones the restart cut
        # must be replaced, not fail a request once the database is back.
        TEST_DATABASE_URL=database_url + "?conn_max_age=60",
        LLMHUB_LEDGER_SPOOL=str(tmp_path / f"spool-{name}.jsonl"),
        PYTHONPATH=str(ROOT),
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


@contextlib.contextmanager
def servers(envs: dict[str, dict[str, str]], tmp_path: Path) -> Iterator[dict[str, str]]:
    """uvicorn processes, one per environment; yields their URLs by name."""
    started: list[subprocess.Popen] = []
    urls, ports = {}, []
    try:
        # Started together, then waited for: each spends seconds importing Django.
        for name, env in envs.items():
            port = free_port()
            log = (tmp_path / f"server-{name}.log").open("w")
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "llmhub.asgi:application", "--port", str(port)],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            urls[name] = f"http://127.0.0.1:{port}"
            ports.append(port)
        for port, process in zip(ports, started, strict=True):
            wait_for_port(port, process=process)
        yield urls
        for process in started:
            assert process.poll() is None, "a server died"
    finally:
        for process in started:
            process_stop(process, grace=30)


def migrated(
    cluster: PostgresCluster, upstream_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict]:
    """The cluster's database created anew, as ``manage.py migrate`` leaves it (``tests.own_database.migrate``:
    the run's schema dump restored, or migrated once for the run), with the catalog and the callers' keys."""
    env = server_env(cluster.url, tmp_path, "setup")
    database_recreated(cluster.url)
    migrate(cluster.url, env, tmp_path_factory)
    setup = subprocess.run(
        [sys.executable, "-c", SETUP, upstream_url], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    return json.loads(setup.stdout.strip().splitlines()[-1])


def test_postgres_stopped_under_load_answers_503_and_keeps_every_row(
    outage_postgres, own_redis, fake_upstream, tmp_path, tmp_path_factory
):
    keys = migrated(outage_postgres, fake_upstream.base_url, tmp_path, tmp_path_factory)
    envs = {
        "redis": server_env(outage_postgres.url, tmp_path, "redis", own_redis),
        "rowlock": server_env(outage_postgres.url, tmp_path, "rowlock"),
    }
    for env in envs.values():
        env["LLMHUB_LOOKUP_CACHE_TTL"] = str(SERVER_LOOKUP_TTL)
    with servers(envs, tmp_path) as urls:
        targets = [
            (name, urls[name.split("-")[0]], keys[name]["secret"])
            for name in ("redis-budgeted", "redis-free", "rowlock-budgeted", "rowlock-free")
        ]
        with Load(targets) as load:
            wait_until(  # every caller is in its server's caches
                lambda: min(load.count(kind) for kind, _, _ in targets) >= 3,
                "three answers for every caller before the outage",
                timeout=30,
                interval=0.05,
            )
            outage_postgres.stop()
            stopped = time.monotonic()
            # A key neither server has seen: both must look it up, and cannot.
            load.widen([("uncached", url, keys["uncached"]["secret"]) for url in urls.values()])
            wait_until(
                lambda: load.answered_since(stopped + OUTAGE_PAST_TTL + SERVER_LOOKUP_TTL, per_kind=3, kinds=keys),
                "three answers for every caller sent after the lookups' TTL ran out in the outage",
                timeout=60,
                interval=0.05,
            )
            restarting = time.monotonic()
            outage_postgres.start()
            back = time.monotonic()
            during = load.count()
            wait_until(
                lambda: load.count() >= during + 100,
                "100 more answers after the restart",
                timeout=60,
                interval=0.05,
            )
        outcomes = list(load.outcomes)
        # Every answer's x-request-id has its one ledger row, written by the servers themselves while they
        # run on (no Celery worker, no restart), the refused ones as `rejected` under the key that sent them.
        expected = {o.headers["x-request-id"]: o for o in outcomes}
        assert len(expected) == len(outcomes)
        rows: dict[str, tuple[str, str, int | None]] = {}

        def every_row() -> bool:
            rows.clear()
            rows.update(ledger_rows(outage_postgres.url, list(expected)))
            return len(rows) >= len(expected)

        wait_until(
            every_row,
            lambda: f"every row arrived ({len(expected) - len(rows)} of {len(expected)} did not)",
            timeout=90,
            interval=0.5,
        )

    assert {o.status for o in outcomes} <= {200, 503}, sorted({(o.kind, o.status) for o in outcomes})
    for outcome in outcomes:
        if outcome.status == 503:
            assert_database_unavailable(outcome.status, outcome.headers, outcome.body)

    # Sent and answered while the database was down: callers in the caches are served where admission
    # needs no database (Redis budgets, or no budget); row-lock budgets and unknown keys are refused.
    outage = [o for o in outcomes if o.sent > stopped and o.done < restarting]
    by_kind = {kind: {o.status for o in outage if o.kind == kind} for kind in keys}
    assert by_kind == {
        "redis-budgeted": {200},
        "redis-free": {200},
        "rowlock-budgeted": {503},
        "rowlock-free": {200},
        "uncached": {503},
    }
    # Once the database is back, every caller is served again, the one never seen before included.
    for kind in keys:
        assert [o.status for o in outcomes if o.kind == kind and o.sent > back][-3:] == [200, 200, 200], kind

    key_ids = {kind: key["id"] for kind, key in keys.items()}
    for request_id, outcome in expected.items():
        status, error_type, key_id = rows[request_id]
        assert key_id == key_ids[outcome.kind]
        if outcome.status == 503:
            assert (status, error_type) == ("rejected", "database_unavailable")
        else:
            assert status == "ok"


def test_a_restart_nobody_saw_costs_no_request(outage_postgres, fake_upstream, tmp_path, tmp_path_factory):
    """The server's persistent connections all died in a restart that happened while it was idle: the
    first requests after it (one that must look its key up among them) are served, not failed once each."""
    keys = migrated(outage_postgres, fake_upstream.base_url, tmp_path, tmp_path_factory)
    with servers({"rowlock": server_env(outage_postgres.url, tmp_path, "rowlock")}, tmp_path) as urls:
        clients = {
            kind: openai.OpenAI(base_url=urls["rowlock"] + "/v1", api_key=keys[kind]["secret"], max_retries=0)
            for kind in ("rowlock-budgeted", "uncached")
        }
        messages = [{"role": "user", "content": "hi"}]
        for _ in range(3):
            clients["rowlock-budgeted"].chat.completions.create(model="gpt-test", messages=messages)
        outage_postgres.stop()
        outage_postgres.start()
        for kind in ("uncached", "rowlock-budgeted"):
            assert clients[kind].chat.completions.create(model="gpt-test", messages=messages).choices
