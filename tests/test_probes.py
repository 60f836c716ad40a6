"""``/healthz`` and ``/readyz`` as an orchestrator meets them: over HTTP, against a real database, a real Redis
that is stopped, a migration recorded as not applied, a ledger spool that grows, and production's settings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from django.db import connection
from django.db.migrations.recorder import MigrationRecorder

from billing.services.spool import spool_append, spool_claim
from llmhub.probes import readiness_forget
from tests.conftest import database_url_for_subprocesses, free_port, process_stop, redis_server, wait_for_port
from tests.gateway.test_database_outage import database_unreachable
from tests.test_project import ROOT, production_env

CHECKS = ["database", "migrations", "ledger_spool"]


@pytest.fixture(autouse=True)
def _new_process_state():
    """Each test probes as a process that has not probed before (nothing remembered about migrations or the
    spool's size)."""
    readiness_forget()
    yield
    readiness_forget()


@pytest.fixture
def spool(settings, tmp_path) -> Path:
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "spool.jsonl"
    return settings.LLMHUB_LEDGER_SPOOL


def readyz(server) -> httpx.Response:
    return httpx.get(f"{server.url}/readyz", timeout=30)


def assert_unavailable(response: httpx.Response, *failing: str) -> dict:
    body = response.json()
    assert response.status_code == 503, body
    assert body["status"] == "unavailable"
    assert body["failing"] == list(failing)
    for name in failing:
        assert body["checks"][name]["ok"] is False
        assert body["checks"][name]["error"]
    return body


@pytest.mark.django_db(transaction=True)
def test_healthz_answers_while_the_database_is_down(llmhub_server, spool, tmp_path):
    """The process answers, so it is alive: no database, no session, and no Host check (an orchestrator probes
    the container's own address, which ``ALLOWED_HOSTS`` need not name)."""
    url = f"{llmhub_server.url}/healthz"
    headers = {"Host": "10.0.0.7:8000"}
    assert readyz(llmhub_server).status_code == 200

    with database_unreachable(tmp_path):
        got = httpx.get(url, headers=headers, timeout=30)
        head = httpx.head(url, headers=headers, timeout=30)
        posted = httpx.post(url, headers=headers, timeout=30)
        ready = readyz(llmhub_server)

    assert got.status_code == 200
    assert got.json() == {"status": "ok"}
    assert "set-cookie" not in got.headers
    assert head.status_code == 200
    assert posted.status_code == 405
    assert_unavailable(ready, "database")  # the same outage, seen by the readiness probe


@pytest.mark.django_db(transaction=True)
def test_readyz_is_ready_when_every_check_passes(llmhub_server, spool):
    response = readyz(llmhub_server)
    head = httpx.head(f"{llmhub_server.url}/readyz", timeout=30)

    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "ready"
    assert body["failing"] == []
    assert list(body["checks"]) == CHECKS  # no REDIS_URL in the tests' settings: no redis check
    assert all(check["ok"] for check in body["checks"].values())
    assert response.headers["cache-control"] == "no-store"
    assert head.status_code == 200


@pytest.mark.django_db(transaction=True)
def test_readyz_names_the_database_when_it_is_down(llmhub_server, spool, tmp_path, settings):
    assert readyz(llmhub_server).status_code == 200

    with database_unreachable(tmp_path):
        down = readyz(llmhub_server)
    back = readyz(llmhub_server)

    body = assert_unavailable(down, "database")
    assert "database" in body["checks"]["database"]["error"]
    # Nothing about where the database is: not its name, host or password.
    assert str(tmp_path) not in down.text
    assert str(settings.DATABASES["default"]["NAME"]) not in down.text
    # Migrations were found applied before the outage, and do not un-apply.
    assert body["checks"]["migrations"]["ok"] is True
    assert back.status_code == 200


@pytest.mark.django_db(transaction=True)
def test_readyz_names_the_migrations_while_one_is_not_applied(llmhub_server, spool):
    recorder = MigrationRecorder(connection)
    app, name = max(key for key in recorder.applied_migrations() if key[0] == "billing")
    recorder.record_unapplied(app, name)
    try:
        unapplied = readyz(llmhub_server)
    finally:
        recorder.record_applied(app, name)
    applied = readyz(llmhub_server)

    body = assert_unavailable(unapplied, "migrations")
    assert f"{app}.{name}" in body["checks"]["migrations"]["error"]
    assert body["checks"]["database"]["ok"] is True
    assert applied.status_code == 200


@pytest.fixture
def own_redis() -> Iterator[tuple[str, subprocess.Popen]]:
    """A redis-server this test may stop (the session's, ``redis_url``, must stay up for the others)."""
    with redis_server() as server:
        yield server


@pytest.mark.django_db(transaction=True)
def test_readyz_names_redis_when_it_is_configured_and_down(llmhub_server, spool, settings, own_redis):
    url, process = own_redis
    settings.REDIS_URL = url
    up = readyz(llmhub_server)
    process.terminate()
    process.wait(timeout=10)
    down = readyz(llmhub_server)

    assert up.status_code == 200, up.json()
    assert up.json()["checks"]["redis"]["ok"] is True
    body = assert_unavailable(down, "redis")
    assert "Redis" in body["checks"]["redis"]["error"]
    assert url not in down.text


@pytest.mark.django_db(transaction=True)
def test_readyz_names_the_ledger_spool_while_it_grows(llmhub_server, spool):
    row = json.dumps({"request_id": "req-probe", "cost": "0.01"})
    empty = readyz(llmhub_server)
    spool_append([row])  # the first probe saw it empty: it grew since
    grew = readyz(llmhub_server)
    unchanged = readyz(llmhub_server)  # pending, but no longer growing
    spool_append([row, row])
    grew_again = readyz(llmhub_server)
    with spool_claim():  # a replay takes the spool's rows; one more row comes meanwhile
        spool_append([row])
    shrinking = readyz(llmhub_server)  # pending, but less than before
    with spool_claim():
        pass
    replayed = readyz(llmhub_server)

    assert empty.status_code == 200
    assert empty.json()["checks"]["ledger_spool"]["pending_bytes"] == 0
    body = assert_unavailable(grew, "ledger_spool")
    assert "grew" in body["checks"]["ledger_spool"]["error"]
    assert unchanged.status_code == 200
    assert unchanged.json()["checks"]["ledger_spool"]["pending_bytes"] > 0
    assert_unavailable(grew_again, "ledger_spool")
    assert shrinking.status_code == 200, shrinking.json()
    assert (
        0
        < shrinking.json()["checks"]["ledger_spool"]["pending_bytes"]
        < grew_again.json()["checks"]["ledger_spool"]["pending_bytes"]
    )
    assert replayed.status_code == 200
    assert replayed.json()["checks"]["ledger_spool"]["pending_bytes"] == 0


def compose_readiness_command(port: int) -> list[str]:
    """docker-compose.yml's health check for web, pointed at ``port`` and run with this interpreter."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    kind, program, *args = compose["services"]["web"]["healthcheck"]["test"]
    assert (kind, program) == ("CMD", "python")
    return [sys.executable, *(arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in args)]


@pytest.mark.django_db(transaction=True)
def test_probes_answer_over_plain_http_under_production_settings(tmp_path):
    """Production's settings in a uvicorn of its own: HTTPS required (pages redirected, /v1 refused), and
    ``ALLOWED_HOSTS`` naming only the public host; the probes still answer the container's own address over
    plain HTTP, and docker-compose's health check passes against it."""
    port = free_port()
    env = production_env(
        DATABASE_URL=database_url_for_subprocesses(),
        LLMHUB_LEDGER_SPOOL=str(tmp_path / "spool.jsonl"),
        PYTHONPATH=str(ROOT),
    )
    errors_path = tmp_path / "stderr.log"
    with errors_path.open("w") as errors_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "llmhub.asgi:application", "--port", str(port), "--lifespan", "on"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=errors_file,
        )
    try:
        wait_for_port(port, process=server)
        base = f"http://127.0.0.1:{port}"
        healthz = httpx.get(f"{base}/healthz", timeout=30)
        ready = httpx.get(f"{base}/readyz", timeout=30)
        api = httpx.get(f"{base}/v1/models", timeout=30)
        page = httpx.get(f"{base}/accounts/login/", headers={"Host": "llmhub.example.com"}, timeout=30)
        compose_check = subprocess.run(compose_readiness_command(port), capture_output=True, text=True, timeout=30)
    finally:
        process_stop(server, grace=30)
    errors = errors_path.read_text()

    assert healthz.status_code == 200, errors
    assert healthz.json() == {"status": "ok"}
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    # The settings are production's: the same plain HTTP is refused or redirected elsewhere.
    assert api.status_code == 403
    assert api.json()["error"]["code"] == "https_required"
    assert page.status_code == 301
    assert page.headers["location"].startswith("https://")
    assert compose_check.returncode == 0, compose_check.stderr
