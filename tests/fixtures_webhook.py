"""A local HTTP server standing in for Slack, its URL set as the alert webhook: for the budget and the
incident alerts' tests alike."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port


@dataclass
class Webhook:
    url: str
    received: list[dict] = field(default_factory=list)
    fail_next: int = 0  # answer 500 to this many requests first
    delay: float = 0.0  # seconds each request waits before it is answered (and counted)


@pytest.fixture
def webhook(settings) -> Iterator[Webhook]:
    """A local HTTP server standing in for Slack; its URL is the configured alert webhook."""
    port = free_port()
    hook = Webhook(url=f"http://127.0.0.1:{port}/services/T000/B000/secret-path")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(hook.delay)
            with lock:
                failing = hook.fail_next > 0
                if failing:
                    hook.fail_next -= 1
                else:
                    hook.received.append(body)
            self.send_response(500 if failing else 200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.LLMHUB_ALERT_WEBHOOK_URL = hook.url
    yield hook
    server.shutdown()
    server.server_close()
