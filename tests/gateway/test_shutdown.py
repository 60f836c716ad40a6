"""A server stopped while streams are in flight still accounts for every one of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from billing.models import UsageRecord
from billing.services.ledger import ledger_replay_spool
from tests.conftest import database_url_for_subprocesses, free_port, wait_for_port
from tests.gateway.conftest import make_catalog

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]
STREAMS = 6


def test_sigterm_with_streams_in_flight_loses_no_ledger_row(fake_upstream, tmp_path):
    from billing.services.keys import api_key_create
    from tests.factories import UserFactory

    make_catalog(fake_upstream)
    key = api_key_create(user=UserFactory(username="shutdown"), name="t").secret
    spool = tmp_path / "spool.jsonl"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        LLMHUB_LEDGER_SPOOL=str(spool),
    )
    # A one-second grace period: uvicorn then cuts the streams, which settle while the loop winds down.
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
            "1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    request_ids: list[str] = []
    started = threading.Barrier(STREAMS + 1, timeout=30)

    def stream() -> None:
        body = {
            "model": "gpt-test",
            "stream": True,
            "messages": [{"role": "user", "content": "[[words=3000]] [[tps=20]]"}],
        }
        try:
            with httpx.stream(
                "POST",
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            ) as response:
                request_ids.append(response.headers["x-request-id"])
                lines = response.iter_lines()
                next(lines)
                started.wait()
                for _ in lines:
                    pass
        except httpx.HTTPError:
            pass  # the server went away mid-stream, which is the point

    try:
        wait_for_port(port, timeout=30)
        threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
        for thread in threads:
            thread.start()
        started.wait()
        server.send_signal(signal.SIGTERM)
        # uvicorn re-raises the captured SIGTERM once its shutdown has run.
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()

    settings.LLMHUB_LEDGER_SPOOL = spool
    ledger_replay_spool()  # what the next start-up (or the beat task) does
    assert len(request_ids) == STREAMS
    rows = UsageRecord.objects.filter(request_id__in=request_ids)
    assert rows.count() == STREAMS
    assert all(row.status == "client_disconnected" and row.completion_tokens > 0 for row in rows)
