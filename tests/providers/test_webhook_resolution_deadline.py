"""An alert webhook's deadline bounds the lookup of its host name too: a name whose DNS does not answer is given
up on at ``LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS`` (or at the 10 s connect timeout, if sooner), like a receiver
that does not answer. The lookup is ``outbound.resolver``'s, which the tests swap for one they control (as
``test_outbound.py`` does); the address it answers is judged and connected to as in production."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from providers import outbound
from providers.services.incidents import WebhookDeliveryError, alert_webhook_post
from tests.loopback_http import AiohttpThreadServer


class SlowResolver:
    """A DNS that answers ``127.0.0.1`` for every name once released (``released``), or after ``delay`` seconds;
    ``answered`` says whether it has answered yet."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.released = threading.Event()
        self.lookups = 0
        self.answered = False

    def resolve_sync(self, host: str, port: int | None = None) -> list[outbound.IPAddress]:
        self.lookups += 1
        self.released.wait(self.delay)
        self.answered = True
        return [ipaddress.ip_address("127.0.0.1")]


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers every POST with 200 and counts them (``posts``)."""

    def __init__(self) -> None:
        self.posts = 0
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._post)
        self._server = AiohttpThreadServer(app)

    async def _post(self, request: web.Request) -> web.Response:
        await request.read()
        self.posts += 1
        return web.Response(text="ok")

    @property
    def port(self) -> int:
        return self._server.port


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    served = Receiver()
    with served._server:
        yield served


@pytest.fixture
def slow_dns(monkeypatch) -> Iterator[SlowResolver]:
    resolver = SlowResolver(delay=10.0)
    monkeypatch.setattr(outbound, "resolver", resolver)
    yield resolver
    resolver.released.set()


def test_a_webhook_host_whose_dns_does_not_answer_is_given_up_at_the_deadline(receiver, slow_dns, settings):
    """The synchronous guard resolved the name outside any bound (its docstring said so): neither the 10 s connect
    timeout nor the webhook's deadline held while the lookup waited, so a DNS that did not answer held the worker
    for as long as the resolver's own timeouts ran (here 10 s, past a 0.5 s deadline), the deadline
    judged only once it had. The lookup is now waited for within what is left of the deadline: past it, the attempt
    is the failure of a receiver that did not answer in time, given up while the lookup still waits, and nothing is
    sent."""
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    settings.LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS = 0.5
    url = f"http://hooks.slow-dns.test:{receiver.port}/services/T000/B000/slow"

    with pytest.raises(WebhookDeliveryError) as refused:
        alert_webhook_post(url=url, text="an alert")

    assert str(refused.value) == (
        "the alert webhook did not answer within 0.5 s (LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS)"
    )
    assert slow_dns.lookups == 1 and not slow_dns.answered  # given up on while the lookup still waited
    assert receiver.posts == 0


def test_a_webhook_host_whose_dns_answers_in_time_is_delivered(receiver, settings, monkeypatch):
    """The same lookup answered within the deadline: the alert goes out as before."""
    resolver = SlowResolver(delay=0.0)
    monkeypatch.setattr(outbound, "resolver", resolver)
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    settings.LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS = 15.0

    alert_webhook_post(url=f"http://hooks.quick-dns.test:{receiver.port}/services/T000/B000/quick", text="an alert")

    assert resolver.lookups == 1
    assert receiver.posts == 1
