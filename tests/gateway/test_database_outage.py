"""A database outage answers 503 with Retry-After, never 500, and keeps every ledger row.

In this process: the database connection is pointed where no database answers (a missing directory for
SQLite, a closed port for PostgreSQL), which is what an outage looks like to Django, for /v1 through the
openai SDK, /api/usage/ and the chat WebSocket. Across processes: two servers on a PostgreSQL of their own
that is stopped for ten seconds under load, and one that is restarted while nobody asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
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
from tests.conftest import free_port

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
    deadline = time.monotonic() + timeout
    while ledger._unwritten and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ledger._unwritten


def rows_for(request_ids: list[str], timeout: float = 30.0) -> dict[str, UsageRecord]:
    """The ledger rows of these requests once all are there: replayed by the server's own replay when the
    database answers again, or by this replay (either may run first; a row is never written twice)."""
    deadline = time.monotonic() + timeout
    while True:
        ledger.ledger_replay_spool()
        rows = {row.request_id: row for row in UsageRecord.objects.filter(request_id__in=request_ids)}
        if len(rows) == len(set(request_ids)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


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
    deadline = time.monotonic() + 30
    while not await refused.aexists() and time.monotonic() < deadline:
        await sync_to_async(ledger.ledger_replay_spool)()
    row = await refused.select_related("api_key").aget()
    assert row.api_key_id == gateway.api_key.pk and row.model_name == "gpt-test"
