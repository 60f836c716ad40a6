"""A local HTTP server standing in for the alert webhook, its URL set as ``LLMHUB_ALERT_WEBHOOK_URL``: for the
budget and the incident alerts' tests alike. ``webhook`` is a receiver that is not Slack (its URL names
127.0.0.1); ``slack_webhook`` is the same server reached as Slack's ``hooks.slack.com``, which the outbound
resolver (``providers.outbound.resolver``) sends to 127.0.0.1, so that the alerts take it for Slack."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from providers import outbound
from tests.conftest import free_port


@dataclass
class Webhook:
    url: str
    received: list[dict] = field(default_factory=list)
    fail_next: int = 0  # answer 500 to this many requests first
    delay: float = 0.0  # seconds each request waits before it is answered (and counted)


def _serve(settings, host: str) -> Iterator[Webhook]:
    port = free_port()
    hook = Webhook(url=f"http://{host}:{port}/services/T000/B000/secret-path")
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


@pytest.fixture
def webhook(settings) -> Iterator[Webhook]:
    """A local HTTP server that is not Slack (a generic JSON receiver); its URL is the configured alert webhook."""
    yield from _serve(settings, "127.0.0.1")


class _SlackOnLoopback:
    """DNS with Slack's webhook host on 127.0.0.1; every other name as the system resolves it."""

    def __init__(self, system: outbound.SystemResolver) -> None:
        self.system = system

    def resolve_sync(self, host: str, port: int | None = None) -> list[outbound.IPAddress]:
        if host.lower() == SLACK_HOST:
            return [ipaddress.ip_address("127.0.0.1")]
        return self.system.resolve_sync(host, port)

    async def resolve(self, host: str, port: int) -> list[outbound.IPAddress]:
        return self.resolve_sync(host, port)


SLACK_HOST = "hooks.slack.com"


@pytest.fixture
def slack_webhook(settings, monkeypatch) -> Iterator[Webhook]:
    """The same local server reached as Slack's incoming webhook (``http://hooks.slack.com:<port>/services/…``)."""
    monkeypatch.setattr(outbound, "resolver", _SlackOnLoopback(outbound.resolver))
    yield from _serve(settings, SLACK_HOST)
