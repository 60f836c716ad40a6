"""The access log of llmhub served as production serves it keeps no query string, so no key a client put in
a URL; the production commands of the Dockerfile and docker-compose.yml are the same command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography.fernet import Fernet

from llmhub.logging import DropQueryStrings
from tests.conftest import database_url_for_subprocesses, free_port, process_stop, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-llmhub-sent-in-a-query-string-0123456789"


def dockerfile_command() -> list[str]:
    [line] = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD ")]
    return json.loads(line.removeprefix("CMD "))


def test_compose_serves_with_the_dockerfile_command():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["web"]["command"] == dockerfile_command()


def on_loopback(command: list[str], port: int) -> list[str]:
    """The production command, listening on a free loopback port instead of 0.0.0.0:8000."""
    argv = list(command)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    assert argv[0] == "uvicorn"
    return [sys.executable, "-m", *argv]


@contextlib.contextmanager
def production_server(tmp_path: Path, *options: str) -> Iterator[tuple[int, Path]]:
    """The Dockerfile's command (``options`` after it) on a free loopback port, with production's settings, this
    run's database and a spool of its own, its output in ``tmp_path / "server.log"``; yields (port, log) once it
    listens and stops it after."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environment.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.production",
        SECRET_KEY=Fernet.generate_key().decode() * 2,
        FIELD_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        DATABASE_URL=database_url_for_subprocesses(),
        ALLOWED_HOSTS="127.0.0.1",
        LLMHUB_LEDGER_SPOOL=str(tmp_path / "spool.jsonl"),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [*on_loopback(dockerfile_command(), port), *options],
            cwd=ROOT,
            env=environment,
            stdout=output,
            stderr=output,
        )
        try:
            wait_for_port(port, timeout=60, process=server)
            yield port, log
        finally:
            process_stop(server, grace=60)


@pytest.mark.django_db(transaction=True)
def test_production_access_log_drops_the_query_string(tmp_path):
    with production_server(tmp_path) as (port, log):
        url = f"http://127.0.0.1:{port}/v1/models?api_key={SECRET}&limit=5"
        # Through the TLS proxy production expects (the view answers), and over plain HTTP (refused).
        behind_proxy = httpx.get(url, headers={"X-Forwarded-Proto": "https"}, timeout=30)
        plain = httpx.get(url, timeout=30)

    text = log.read_text()
    assert SECRET not in text and "api_key" not in text
    assert behind_proxy.status_code == 401 and plain.status_code == 403
    # Production logs JSON lines (llmhub/logging.py), uvicorn's access log included.
    messages = [json.loads(line)["message"] for line in text.splitlines()]
    lines = [found for message in messages for found in re.findall(r'"GET (\S+) HTTP/1\.1" (\d{3})', message)]
    assert lines == [("/v1/models?[redacted]", "401"), ("/v1/models?[redacted]", "403")], text
    # The access line of a /v1 request carries the id its answer gave the client: uvicorn writes it when the
    # application starts the response, in the request's own context (docs/observability.md). The plain-HTTP
    # refusal comes before the view, which is where a request gets its id: it has none, on the line or the answer.
    access = [json.loads(line) for line in text.splitlines() if '"logger": "uvicorn.access"' in line]
    assert [line["request_id"] for line in access] == [behind_proxy.headers["x-request-id"], None], text
    assert "x-request-id" not in plain.headers


def test_the_filter_leaves_other_arguments_and_plain_paths_alone():
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", "/v1/models", "1.1", 200),
        None,
    )
    assert DropQueryStrings().filter(record)
    assert record.getMessage() == '1.2.3.4:5 - "GET /v1/models HTTP/1.1" 200'

    websocket = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("1.2.3.4:5", "/ws/chat/?token=abc"),
        None,
    )
    DropQueryStrings().filter(websocket)
    assert websocket.getMessage() == '1.2.3.4:5 - "WebSocket /ws/chat/?[redacted]" [accepted]'


@pytest.mark.django_db(transaction=True)
def test_make_runs_daphne_drops_the_query_string_too(tmp_path):
    """`make run` serves with daphne, whose access log is its own writer, not Python's logging."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environment.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "daphne.log"
    command = [sys.executable, "-m", "llmhub.devserver", "-b", "127.0.0.1", "-p", str(port), "llmhub.asgi:application"]
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=output, stderr=output)
        try:
            wait_for_port(port, timeout=60, process=server)
            response = httpx.get(f"http://127.0.0.1:{port}/v1/models?api_key={SECRET}", timeout=30)
        finally:
            process_stop(server, grace=60)

    text = log.read_text()
    assert response.status_code == 401
    assert SECRET not in text and "api_key" not in text
    assert '"GET /v1/models?[redacted]" 401' in text, text
