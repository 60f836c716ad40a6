"""The 503 of a model whose every deployment has its circuit breaker open says when to come back: ``Retry-After``
(and ``retry-after-ms``) from the earliest moment one of them lets a call through again, so that the openai and
anthropic SDKs wait that long instead of spending their retries within a second."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai
import pytest

from providers.models import CatalogModel, Deployment
from providers.routing.breaker_machine import OPEN
from providers.routing.breakers import breaker_state
from tests.factories import ProviderFactory
from tests.providers.health_probes import breakers_closed_after  # noqa: F401  (a fixture)
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("breakers_closed_after")]

PRICES = {"input_per_mtok": Decimal("0.15"), "output_per_mtok": Decimal("0.60")}
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def both_down(gateway, settings) -> tuple[Deployment, Deployment]:
    """The model ``down``: ``a`` then ``b``, both answering 503, one attempt a request; each one's breaker opened by
    its failure, ``a``'s for 100 s, then ``b``'s for 20 s."""
    settings.LLMHUB_BREAKER_FAILURES = 1
    provider = ProviderFactory(name="down-provider", base_url=gateway.upstream.base_url + "/v1")
    model = CatalogModel.objects.create(name="down", strategy="priority", retries=0)
    a = Deployment.objects.create(model=model, name="a", provider=provider, upstream_id="fault-503", **PRICES)
    b = Deployment.objects.create(
        model=model, name="b", provider=provider, upstream_id="fault-503", priority=1, **PRICES
    )
    client = gateway.client()
    for deployment, cooldown in ((a, 100), (b, 20)):
        settings.LLMHUB_BREAKER_COOLDOWN_SECONDS = cooldown
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="down", messages=MESSAGES)
        assert failed.value.response.headers["x-llmhub-deployment"] == deployment.name
        wait_until(lambda deployment=deployment: breaker_state(deployment.pk).state == OPEN, "its breaker open")
    return a, b


def assert_come_back_in_about_20_seconds(response) -> None:
    assert response.status_code == 503, response.text
    retry_after, exact_ms = int(response.headers["retry-after"]), int(response.headers["retry-after-ms"])
    # b's 20 s, the earliest, less what this request and the ones before it took; not a's 100 s.
    assert 10 <= retry_after <= 20 and 10_000 < exact_ms <= 20_000
    assert retry_after * 1000 >= exact_ms > (retry_after - 1) * 1000


def test_the_openai_503_says_when_the_first_breaker_lets_a_call_through(gateway, both_down):
    with pytest.raises(openai.APIStatusError) as refused:
        gateway.client().chat.completions.create(model="down", messages=MESSAGES)
    assert refused.value.code == "no_deployment_available"
    assert_come_back_in_about_20_seconds(refused.value.response)


def test_the_messages_api_503_says_it_too(gateway, both_down):
    client = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    with pytest.raises(anthropic.APIStatusError) as refused:
        client.messages.create(model="down", max_tokens=10, messages=MESSAGES)
    assert refused.value.response.json()["type"] == "error"
    assert_come_back_in_about_20_seconds(refused.value.response)


def test_no_time_is_said_when_an_admin_holds_every_deployment_open(gateway, both_down):
    """An admin's override has no end llmhub knows of: no Retry-After rather than a made-up one."""
    for deployment in both_down:
        deployment.breaker_override = "open"
        deployment.save()
    with pytest.raises(openai.APIStatusError) as refused:
        gateway.client().chat.completions.create(model="down", messages=MESSAGES)
    assert refused.value.status_code == 503 and refused.value.code == "no_deployment_available"
    assert "retry-after" not in refused.value.response.headers
