"""Logs as JSON lines (llmhub/logging.py) with the id of the request being served on every line its
handling writes, from any logger, and concurrent requests never swapping ids."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from billing.services.keys import api_key_create
from llmhub.logging import JsonFormatter, RequestIdFilter, logging_settings
from providers.models import CatalogModel, Deployment
from tests.conftest import process_stop
from tests.factories import ProviderFactory, UserFactory
from tests.waiting import wait_for_record, wait_until

ROOT = Path(__file__).resolve().parent.parent
# The loggers a /v1 request's handling writes to: ours, Django's request log, the provider SDK's.
REQUEST_LOGGERS = ("chat", "billing", "providers", "core", "django.request", "openai")


class JsonLines(logging.Handler):
    """What the production handler writes (the JSON formatter and the request-id filter), kept."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.addFilter(RequestIdFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def objects(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def json_lines() -> Iterator[JsonLines]:
    """The request's loggers at DEBUG into a JSON-lines handler on the root logger."""
    handler = JsonLines()
    root = logging.getLogger()
    loggers = [logging.getLogger(name) for name in REQUEST_LOGGERS]
    saved = [(logger, logger.level) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    for logger, level in saved:
        logger.setLevel(level)


def routed_model(fake_upstream) -> CatalogModel:
    """``routed``: its first deployment answers 503 (the pipeline logs the failed attempt, then retries on
    the second, which answers)."""
    first = ProviderFactory(name="first", base_url=fake_upstream.base_url + "/v1")
    second = ProviderFactory(name="second", base_url=fake_upstream.base_url + "/v1")
    catalog = CatalogModel.objects.create(name="routed", strategy="priority")
    prices = {"input_per_mtok": Decimal("0.15"), "output_per_mtok": Decimal("0.60")}
    Deployment.objects.create(model=catalog, name="first", provider=first, upstream_id="fault-503", **prices)
    Deployment.objects.create(
        model=catalog, name="second", provider=second, upstream_id="fake-gpt-4o-mini", priority=1, **prices
    )
    return catalog


@pytest.fixture
def retried(llmhub_server, fake_upstream) -> httpx.Client:
    routed_model(fake_upstream)
    key = api_key_create(user=UserFactory(username="logged"), name="logs").secret
    return httpx.Client(base_url=llmhub_server.url, headers={"authorization": f"Bearer {key}"}, timeout=30)


def chat(client: httpx.Client, model: str = "routed") -> httpx.Response:
    return client.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi [[words=4]]"}]}
    )


@pytest.mark.django_db(transaction=True)
def test_every_line_a_retried_request_logs_carries_its_request_id(retried, json_lines):
    answer = chat(retried)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-llmhub-attempts"] == "2"
    request_id = answer.headers["x-request-id"]
    wait_for_record(request_id)

    lines = json_lines.objects()
    assert all(set(line) >= {"time", "level", "logger", "message", "request_id"} for line in lines)
    [warning] = [line for line in lines if line["logger"] == "chat.pipeline" and line["level"] == "WARNING"]
    assert "deployment first" in warning["message"] and "failed" in warning["message"]
    assert warning["request_id"] == request_id
    # The provider SDK's own lines, written while the request called it, carry the id too.
    sdk_lines = [line for line in lines if line["logger"].startswith("openai")]
    assert sdk_lines
    assert {line["request_id"] for line in sdk_lines} == {request_id}
    assert {line["request_id"] for line in lines if line["logger"].startswith("chat")} == {request_id}


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_each_log_with_their_own_id(retried, json_lines):
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: chat(retried), range(6)))
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    ids = sorted(answer.headers["x-request-id"] for answer in answers)
    for request_id in ids:
        wait_for_record(request_id)

    warnings = [line["request_id"] for line in json_lines.objects() if line["logger"] == "chat.pipeline"]
    assert sorted(warnings) == ids  # one failed attempt each, under its own id: none missing, none doubled


@pytest.mark.django_db(transaction=True)
def test_a_refused_request_logs_with_its_id(retried, json_lines):
    refused = chat(retried, model="no-such-model")
    assert refused.status_code == 404

    [line] = [line for line in json_lines.objects() if line["logger"] == "django.request"]
    assert line["message"] == "Not Found: /v1/chat/completions"
    assert line["request_id"] == refused.headers["x-request-id"]


def test_a_json_line_is_one_line_with_the_traceback_and_a_null_id_outside_a_request():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("tests.json_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("bad value")
        except ValueError:
            logger.error("two\nlines: %s", "ünïcode")
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True

    first, second = stream.getvalue().splitlines()
    plain = json.loads(first)
    assert plain["message"] == "two\nlines: ünïcode" and plain["level"] == "ERROR"
    assert plain["logger"] == "tests.json_logs" and plain["request_id"] is None
    assert "exception" not in plain
    assert plain["time"].endswith("+00:00")
    failed = json.loads(second)
    assert failed["exception"].startswith("Traceback") and "ValueError: bad value" in failed["exception"]


def test_the_log_format_is_text_or_json():
    assert logging_settings(log_format="json", level="INFO")["handlers"]["console"]["formatter"] == "json"
    assert logging_settings(log_format="text", level="INFO")["handlers"]["console"]["formatter"] == "text"
    with pytest.raises(ValueError, match="LLMHUB_LOG_FORMAT"):
        logging_settings(log_format="xml", level="INFO")


def test_llmhub_log_format_json_makes_the_whole_process_log_json_lines(tmp_path):
    """The setting as an operator sets it, in a process of its own: our loggers and uvicorn's write JSON."""
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    environment.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        LLMHUB_LOG_FORMAT="json",
        TEST_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )
    script = (
        "import django, logging; django.setup(); "
        "logging.getLogger('llmhub.check').warning('one'); "
        "logging.getLogger('uvicorn.error').warning('two')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line["message"]) for line in lines] == [("llmhub.check", "one"), ("uvicorn.error", "two")]


@pytest.fixture
def asgi_application():
    """The ASGI application imported before ``json_lines`` attaches its handler: its first import sets
    Django up, and so configures logging anew."""
    from llmhub.asgi import application

    return application


@pytest.mark.django_db(transaction=True)
async def test_each_chat_socket_turn_logs_with_its_own_ledger_request_id(asgi_application, fake_upstream, json_lines):
    from asgiref.sync import sync_to_async

    from chat.models import Message, Role
    from tests.chat.conftest import ends, events_until, open_socket

    await sync_to_async(routed_model)(fake_upstream)
    user = await sync_to_async(UserFactory)(username="socketeer")
    socket, connected, _ = await open_socket(user=user)
    assert connected
    try:
        for turn in ("t1", "t2"):  # two replies streaming at once on one socket, each its own turn
            await socket.send_json_to(
                {"type": "chat.send", "conversation": None, "model": "routed", "content": "hi", "request_id": turn}
            )
        events = await events_until(socket, ends("t1"))
        if not any(ends("t2")(event) for event in events):
            events += await events_until(socket, ends("t2"))
    finally:
        await socket.disconnect()
    assert {event["request_id"] for event in events if event["type"] == "chat.completed"} == {"t1", "t2"}

    replies = [m async for m in Message.objects.filter(role=Role.ASSISTANT).exclude(request_id="")]
    ledger_ids = sorted(reply.request_id for reply in replies)
    assert len(ledger_ids) == 2
    warnings = [line["request_id"] for line in json_lines.objects() if line["logger"] == "chat.pipeline"]
    assert sorted(warnings) == ledger_ids


@pytest.mark.django_db(transaction=True)
async def test_a_background_writer_a_request_starts_does_not_log_under_its_id(json_lines):
    """The ledger's writer task is started by the first request that settles in a loop, and outlives it:
    its lines are no request's (``core.request_context.outside_request``)."""
    from billing.models import UsageRecord
    from billing.services.ledger import ledger_flush, usage_record_submit
    from billing.services.ledger_rows import UsageData
    from core.request_context import request_id_bind

    request_id_bind("req_starts_the_writer")
    # A row whose user is gone: the writer warns, then writes it without the reference.
    usage_record_submit(
        UsageData(request_id="req_starts_the_writer", endpoint="rest", stream=False, status="ok", user_id=987654)
    )
    await ledger_flush()

    assert await UsageRecord.objects.filter(request_id="req_starts_the_writer", user_id=None).aexists()
    [warning] = [line for line in json_lines.objects() if "deleted users" in line["message"]]
    assert warning["request_id"] is None


def schedule_stored(program: list[str], directory: Path) -> bool:
    """Whether a beat has built its scheduler, which it does after logging "beat: Starting...": its shelve of the
    schedule written (dbm.dumb, without gdbm: the ``.dir`` file, written when the schedule is first synced; gdbm's
    file or ndbm's ``.db``). A beat stopped before that died opening the shelve in the interpreter's shutdown,
    writing a traceback in text, not JSON. A worker has none."""
    if program[0] != "beat":
        return True
    return any((directory / f"beat-schedule{suffix}").exists() for suffix in (".dir", "", ".db"))


@pytest.mark.redis
@pytest.mark.parametrize(
    ("program", "ready"),
    [
        (["worker", "-l", "info", "--concurrency", "1", "--without-gossip", "--without-mingle"], "ready."),
        (["beat", "-l", "info", "--scheduler", "celery.beat:PersistentScheduler"], "beat: Starting..."),
    ],
    ids=["worker", "beat"],
)
def test_celery_worker_and_beat_log_json_lines_under_production_settings(program, ready, tmp_path, redis_url):
    """`celery -A llmhub worker` and `beat` as docker-compose.yml runs them, under the production settings: their
    records (Celery's own and a task's) are JSON lines like the web server's, not Celery's text format."""
    from cryptography.fernet import Fernet

    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT)}
    environment.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.production",
        SECRET_KEY="production-like-secret-" + "x7Qp2Lm9Zr4Tb8Wn" * 3,
        FIELD_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        ALLOWED_HOSTS="llmhub.example.com",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        REDIS_URL=redis_url.rsplit("/", 1)[0] + "/12",
        LLMHUB_LEDGER_SPOOL=str(tmp_path / "spool.jsonl"),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    if os.geteuid() == 0:
        # The image runs as a user of its own; as root the worker warns so before logging is set up, in text.
        environment["PYTHONWARNINGS"] = "ignore:You're running the worker with superuser privileges"
    if program[0] == "beat":
        program = [*program, "--schedule", str(tmp_path / "beat-schedule")]
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "llmhub", *program],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.DEVNULL,  # the worker's start-up banner, not a log record
            stderr=stderr,
        )
    try:
        wait_until(
            lambda: (
                (ready in stderr_path.read_text() and schedule_stored(program, tmp_path)) or process.poll() is not None
            ),
            lambda: f"celery {program[0]} starts; its stderr:\n{stderr_path.read_text()}",
            timeout=60,
            interval=0.2,
        )
        assert process.poll() is None, stderr_path.read_text()
        if program[0] == "worker":
            from celery import Celery

            # Not made the current app: the tasks' proxies (``shared_task``) would run on it, not eagerly, in
            # every later test of this process.
            with Celery(broker=environment["REDIS_URL"], set_as_current=False) as sender:
                sender.send_task("billing.tasks.ledger_spool_replay")
            wait_until(
                lambda: "succeeded" in stderr_path.read_text(),
                lambda: f"the worker runs a task; its stderr:\n{stderr_path.read_text()}",
                timeout=30,
                interval=0.2,
            )
    finally:
        process_stop(process, grace=30)
    lines = [line for line in stderr_path.read_text().splitlines() if line.strip()]
    not_json = []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            not_json.append(line)
    assert not not_json, "lines that are not JSON:\n" + "\n".join(not_json)
    assert any(ready in record["message"] for record in records), records
    assert all({"time", "level", "logger", "message", "request_id"} <= set(record) for record in records)
