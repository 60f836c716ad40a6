"""Circuit breakers as a client sees them: a live llmhub (breakers in Redis) serving a model of two deployments
on two fake upstreams, the first of which stops accepting connections, and comes back."""

from __future__ import annotations

import httpx
import pytest

from billing.services.keys import api_key_create
from providers.models import Deployment, RoutingStrategy
from providers.routing.breaker_machine import CLOSED, OPEN
from providers.routing.breakers import breaker_is_open, breaker_state
from providers.selectors import resolved_deployment
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UserFactory
from tests.shared_redis import use_redis  # noqa: F401  (a fixture)
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("use_redis")]


@pytest.fixture
def site(llmhub_server, fake_upstreams, settings):
    settings.LLMHUB_BREAKER_COOLDOWN_SECONDS = 1
    upstreams = fake_upstreams("east", "west")
    east = ProviderFactory(name="east", base_url=upstreams["east"].base_url + "/v1")
    west = ProviderFactory(name="west", base_url=upstreams["west"].base_url + "/v1")
    routed = ModelFactory(
        name="routed", provider=east, upstream_id="fake-gpt-4o-mini", strategy=RoutingStrategy.PRIORITY
    )
    Deployment.objects.filter(model=routed).update(name="east", priority=0)
    DeploymentFactory(model=routed, name="west", provider=west, upstream_id="fake-gpt-4o-mini", priority=1)
    key = api_key_create(user=UserFactory(username="breakers"), name="breakers").secret
    with httpx.Client(base_url=llmhub_server.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as http:
        yield http, upstreams, Deployment.objects.get(model=routed, name="east")


def served(http: httpx.Client, n: int) -> list[tuple[str, str]]:
    """(deployment, attempts) of ``n`` chat completions."""
    answers = []
    for _ in range(n):
        response = http.post(
            "/v1/chat/completions",
            json={"model": "routed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        )
        assert response.status_code == 200, response.text
        answers.append((response.headers["x-llmhub-deployment"], response.headers["x-llmhub-attempts"]))
    return answers


def test_a_failing_deployment_is_left_out_until_a_probe_finds_it_back(site):
    http, upstreams, east = site
    snapshot = resolved_deployment(east)
    upstreams["east"].refuse()

    # Each request tries east first, fails, and is answered by west; the fifth failure opens east's breaker.
    assert served(http, 5) == [("west", "2")] * 5
    wait_until(lambda: breaker_is_open(snapshot), "east's breaker opens")
    assert breaker_state(east.pk).state == OPEN  # in Redis, for every server
    assert served(http, 4) == [("west", "1")] * 4  # east is not even tried

    # The cooldown over, one request probes east: still down, so it opens again, for twice as long.
    wait_until(lambda: not breaker_is_open(snapshot), "half-open after the cooldown")
    assert served(http, 1) == [("west", "2")]
    wait_until(lambda: breaker_is_open(snapshot), "open again")
    assert breaker_state(east.pk).cooldown_seconds == 2
    assert served(http, 2) == [("west", "1")] * 2

    # East comes back: the next probe finds it, and traffic returns to it.
    upstreams["east"].accept()
    wait_until(lambda: not breaker_is_open(snapshot), "half-open again")
    assert upstreams["east"].requests_served() == 0
    assert served(http, 1) == [("east", "1")]
    wait_until(lambda: breaker_state(east.pk).state == CLOSED, "the probe's success closes it")
    assert served(http, 3) == [("east", "1")] * 3
    assert upstreams["east"].requests_served() == 4
