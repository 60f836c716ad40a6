"""The deployments admin, driven as a superuser through Django's test client: the breaker of each deployment,
its latest health checks, and the actions that force a breaker or reset it, for every process (Redis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from providers.models import BreakerOverride, Deployment, HealthCheck
from providers.routing.breaker_machine import CLOSED, OPEN
from providers.routing.breakers import breaker_is_open, breaker_record, breaker_state
from providers.selectors import resolved_deployment
from providers.services.breakers import deployment_breaker_override_set
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory
from tests.shared_redis import use_redis  # noqa: F401  (a fixture)

pytestmark = pytest.mark.django_db

KEY = "sk-deployments-admin-secret-0123456789ABCD"
CHANGELIST = reverse("admin:providers_deployment_changelist")


def checks(deployment: Deployment, count: int, *, ok: bool = True) -> None:
    now = timezone.now()
    HealthCheck.objects.bulk_create(
        HealthCheck(
            deployment=deployment,
            checked_at=now - timedelta(minutes=count - n),
            ok=ok,
            latency_ms=100 + n,
            error="" if ok else f"probe-{n:02d} refused",
        )
        for n in range(count)
    )


def run_action(client, action: str, *deployments: Deployment) -> list[str]:
    response = client.post(CHANGELIST, {"action": action, "_selected_action": [d.pk for d in deployments]}, follow=True)
    assert response.status_code == 200
    return [message.message for message in response.context["messages"]]


@pytest.mark.usefixtures("use_redis")
def test_the_changelist_shows_each_deployment_its_breaker_and_last_check(admin_client):
    provider = ProviderFactory(name="east", api_key=KEY)
    model = ModelFactory(name="gpt-routed", provider=provider, upstream_id="gpt-east")
    east = model.deployments.get()
    west = DeploymentFactory(model=model, provider=ProviderFactory(name="west", api_key=KEY), upstream_id="gpt-west")
    checks(east, 3, ok=False)
    for _ in range(2):
        breaker_record(west.pk, ok=False)  # no event loop here: sent to Redis at once

    page = admin_client.get(CHANGELIST).content.decode()
    for text in ("gpt-routed/east", "gpt-routed/west", "gpt-east", "gpt-west", "0.15 / 0.6"):
        assert text in page
    assert "failing</span>, 102 ms" in page  # east's latest check
    assert "never checked" in page  # west has none
    assert "2 failures in a row" in page  # west's breaker, read from Redis
    assert KEY not in page


@pytest.mark.usefixtures("use_redis")
def test_the_changelist_costs_the_same_queries_for_many_deployments(admin_client):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(CHANGELIST).status_code == 200
        return len(captured)

    model = ModelFactory()
    checks(model.deployments.get(), 2)
    few = queries()
    for _ in range(5):
        checks(DeploymentFactory(model=model), 2)
    assert queries() == few


@pytest.mark.usefixtures("use_redis")
@pytest.mark.django_db(transaction=True)  # the breaker moves when the override commits
def test_breaker_actions_hold_for_every_process(admin_client):
    model = ModelFactory(provider=ProviderFactory(api_key=KEY))
    deployment = model.deployments.get()

    assert run_action(admin_client, "force_breaker_open", deployment) == [f"Breaker forced open: {deployment}."]
    deployment.refresh_from_db()
    assert deployment.breaker_override == "open"
    assert breaker_state(deployment.pk).state == OPEN  # in Redis: other processes hear of it at once
    assert breaker_is_open(resolved_deployment(deployment))
    assert "forced open" in admin_client.get(CHANGELIST).content.decode()

    assert run_action(admin_client, "force_breaker_closed", deployment)
    deployment.refresh_from_db()
    assert deployment.breaker_override == "closed"
    assert breaker_state(deployment.pk).state == CLOSED
    assert not breaker_is_open(resolved_deployment(deployment))

    for _ in range(5):
        breaker_record(deployment.pk, ok=False)
    assert breaker_state(deployment.pk).state == OPEN
    assert not breaker_is_open(resolved_deployment(deployment))  # the override still holds it closed
    page = admin_client.get(CHANGELIST).content.decode()
    assert "forced closed" in page and "(open)" in page

    assert run_action(admin_client, "clear_breaker_override", deployment) == [
        f"Override cleared and breaker reset: {deployment}."
    ]
    deployment.refresh_from_db()
    assert deployment.breaker_override == ""
    state = breaker_state(deployment.pk)
    assert (state.state, state.failures, state.cooldown_seconds) == (CLOSED, 0, 30)
    assert not breaker_is_open(resolved_deployment(deployment))


class OverrideRefused(Exception):
    pass


@pytest.mark.usefixtures("use_redis")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("override", [BreakerOverride.OPEN, BreakerOverride.CLOSED, BreakerOverride.NONE])
def test_an_override_rolled_back_leaves_the_shared_breaker_as_it_was(override):
    """The breaker moved in Redis before the override's transaction committed: when it rolled back (the admin
    action's request failing after it, say), every process obeyed a forced breaker no saved override explained,
    and nothing showed it. The breaker now moves once the override commits."""
    deployment = ModelFactory(provider=ProviderFactory(api_key=KEY)).deployments.get()
    if override == BreakerOverride.NONE:
        Deployment.objects.filter(pk=deployment.pk).update(breaker_override=BreakerOverride.CLOSED)
        deployment.refresh_from_db()
    breaker_record(deployment.pk, ok=False)
    before = breaker_state(deployment.pk)
    if override == BreakerOverride.CLOSED:  # forced closed moves an open breaker
        for _ in range(5):
            breaker_record(deployment.pk, ok=False)
        before = breaker_state(deployment.pk)
        assert before.state == OPEN

    with pytest.raises(OverrideRefused), transaction.atomic():
        deployment_breaker_override_set(deployment=deployment, override=override)
        raise OverrideRefused

    after = breaker_state(deployment.pk)
    assert (after.state, after.failures) == (before.state, before.failures)
    deployment.refresh_from_db()
    assert deployment.breaker_override == ("closed" if override == BreakerOverride.NONE else "")

    deployment_breaker_override_set(deployment=deployment, override=override)  # committed: it moves
    assert breaker_state(deployment.pk).state == (OPEN if override == BreakerOverride.OPEN else CLOSED)


@pytest.mark.usefixtures("use_redis")
@time_machine.travel(datetime(2026, 12, 1, 9, 0, tzinfo=UTC), tick=False)
def test_the_change_page_shows_the_latest_twenty_checks_read_only(admin_client):
    deployment = ModelFactory(provider=ProviderFactory(api_key=KEY)).deployments.get()
    checks(deployment, 25, ok=False)
    for _ in range(5):
        breaker_record(deployment.pk, ok=False)
    url = reverse("admin:providers_deployment_change", args=[deployment.pk])

    page = admin_client.get(url).content.decode()
    shown = [n for n in range(25) if f"probe-{n:02d} refused" in page]
    assert shown == list(range(5, 25))
    assert "lets a probe through in 30 s" in page
    assert 'name="health_checks-0-error"' not in page  # read-only: no inputs
    assert KEY not in page

    form = {
        "model": deployment.model_id,
        "name": deployment.name,
        "provider": deployment.provider_id,
        "upstream_id": "renamed-upstream",
        "enabled": "on",
        "input_per_mtok": "1",
        "output_per_mtok": "2",
        "cached_input_per_mtok": "",
        "weight": "3",
        "priority": "0",
        "rpm_limit": "",
        "tpm_limit": "",
        "quality": "",
        "breaker_override": "",
        "health_checks-TOTAL_FORMS": "20",
        "health_checks-INITIAL_FORMS": "20",
        "health_checks-MIN_NUM_FORMS": "0",
        "health_checks-MAX_NUM_FORMS": "1000",
    }
    response = admin_client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    deployment.refresh_from_db()
    assert (deployment.upstream_id, deployment.weight) == ("renamed-upstream", 3)
    assert HealthCheck.objects.filter(deployment=deployment).count() == 25


def test_the_admin_shows_since_when_the_upstream_model_is_missing(admin_client, fake_upstream, settings):
    """A deployment whose upstream id the provider's model list lacks (a catalog mistake, found by the health
    round) says so on the list and on its page, with since when; a listed one does not."""
    from providers.services.health import health_check_round

    settings.REDIS_URL = ""
    provider = ProviderFactory(name="east", base_url=fake_upstream.base_url + "/v1")
    wrong = ModelFactory(name="gpt-typo", provider=provider, upstream_id="fake-gpt-typo").deployments.get()
    right = ModelFactory(name="gpt-right", provider=provider, upstream_id="fake-gpt-4o").deployments.get()
    with time_machine.travel(datetime(2026, 12, 1, 9, 0, tzinfo=UTC), tick=False):
        health_check_round(providers=[provider])
        listing = admin_client.get(CHANGELIST).content.decode()
        wrong_page = admin_client.get(reverse("admin:providers_deployment_change", args=[wrong.pk])).content.decode()
        right_page = admin_client.get(reverse("admin:providers_deployment_change", args=[right.pk])).content.decode()

    assert listing.count("upstream model missing since 2026-12-01 09:00") == 1
    assert "upstream model missing since 2026-12-01 09:00" in wrong_page
    assert "upstream model missing" not in right_page
