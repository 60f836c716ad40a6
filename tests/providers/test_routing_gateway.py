"""Routing as a client sees it: a live llmhub serving a model of two deployments (two providers, both the fake
upstream), the answering deployment named by ``x-llmhub-deployment``."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
import time_machine

from billing.services.keys import api_key_create
from providers.models import Deployment, RoutingStrategy
from providers.routing import router
from providers.routing.stats import stats_clear
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def site(llmhub_server, fake_upstream):
    stats_clear()
    router.rng.seed(31)  # the live server runs in this process: it draws from the same generator
    east = ProviderFactory(name="east", base_url=fake_upstream.base_url + "/v1")
    west = ProviderFactory(name="west", base_url=fake_upstream.base_url + "/v1")
    routed = ModelFactory(name="routed", provider=east, upstream_id="fake-gpt-4o-mini")
    Deployment.objects.filter(model=routed).update(name="east")
    DeploymentFactory(model=routed, name="west", provider=west, upstream_id="fake-gpt-4o-mini")
    key = api_key_create(user=UserFactory(username="router"), name="routing").secret
    with httpx.Client(base_url=llmhub_server.url, headers={"authorization": f"Bearer {key}"}, timeout=20) as client:
        yield client, routed
    stats_clear()


def served_by(client: httpx.Client, n: int, **headers: str) -> list[str]:
    names = []
    for _ in range(n):
        response = client.post(
            "/v1/chat/completions",
            json={"model": "routed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            headers=headers,
        )
        assert response.status_code == 200, response.text
        names.append(response.headers["x-llmhub-deployment"])
    return names


def test_traffic_is_split_by_weight(site):
    client, routed = site
    Deployment.objects.filter(model=routed, name="east").update(weight=3)
    counts = Counter(served_by(client, 120))
    assert 0.65 <= counts["east"] / 120 <= 0.85
    assert counts["west"] > 0


def test_the_cost_hint_picks_the_cheaper_deployment_over_the_models_priority(site):
    client, routed = site
    routed.strategy = RoutingStrategy.PRIORITY
    routed.save()
    Deployment.objects.filter(model=routed, name="east").update(priority=0, input_per_mtok=Decimal("5"))
    Deployment.objects.filter(model=routed, name="west").update(priority=1, input_per_mtok=Decimal("0.1"))
    assert served_by(client, 3) == ["east"] * 3
    assert served_by(client, 3, **{"x-llmhub-route": "cost"}) == ["west"] * 3
    assert served_by(client, 2, **{"x-llmhub-route": "no-such-hint"}) == ["east"] * 2


def test_a_deployment_at_its_rpm_cap_is_skipped_until_the_next_minute(site):
    client, routed = site
    routed.strategy = RoutingStrategy.PRIORITY
    routed.save()
    Deployment.objects.filter(model=routed, name="east").update(priority=0, rpm_limit=2)
    Deployment.objects.filter(model=routed, name="west").update(priority=1)
    with time_machine.travel(datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC), tick=True) as clock:
        assert served_by(client, 4) == ["east", "east", "west", "west"]
        clock.move_to(datetime(2026, 12, 1, 12, 1, 1, tzinfo=UTC))
        assert served_by(client, 1) == ["east"]


def test_a_client_retrying_after_the_caps_retry_after_is_served(site):
    """Every deployment at its cap: the 429's Retry-After is the time until the minute rolls over, in whole
    seconds rounded up. Rounded down (12.4 s said as 12), a client retrying after it, as the SDKs do, came back
    before the rollover and got the same 429 again."""
    client, routed = site
    Deployment.objects.filter(model=routed).update(rpm_limit=1)
    with time_machine.travel(datetime(2026, 12, 1, 12, 0, 47, 600_000, tzinfo=UTC), tick=False) as clock:
        assert sorted(served_by(client, 2)) == ["east", "west"]
        body = {"model": "routed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        capped = client.post("/v1/chat/completions", json=body)
        assert (capped.status_code, capped.json()["error"]["code"]) == (429, "deployments_at_capacity")
        assert capped.headers["retry-after"] == "13"  # 12.4 s until 12:01:00

        clock.shift(int(capped.headers["retry-after"]))
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_the_caps_429_says_a_wait_under_a_second_exactly_in_retry_after_ms(site):
    """Retry-After cannot say less than a second; retry-after-ms, which the SDKs wait instead, says 400 ms."""
    client, routed = site
    Deployment.objects.filter(model=routed).update(rpm_limit=1)
    with time_machine.travel(datetime(2026, 12, 1, 12, 0, 59, 600_000, tzinfo=UTC), tick=False) as clock:
        assert sorted(served_by(client, 2)) == ["east", "west"]
        body = {"model": "routed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        capped = client.post("/v1/chat/completions", json=body)
        assert capped.status_code == 429
        assert (capped.headers["retry-after"], capped.headers["retry-after-ms"]) == ("1", "400")

        clock.shift(int(capped.headers["retry-after-ms"]) / 1000)
        assert client.post("/v1/chat/completions", json=body).status_code == 200
