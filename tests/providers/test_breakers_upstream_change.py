"""A deployment's breaker opened by the health round for an upstream id the provider lacks (a catalog mistake)
stayed open after the admin corrected the id, up to LLMHUB_BREAKER_MAX_COOLDOWN_SECONDS of 503s, unless they also
used "Clear override and reset breaker". Changing a deployment's upstream id now resets its breaker (closed,
failures forgotten), from every path that changes it (``deployment_upstream_changed``), unless an admin's override
is set."""

from __future__ import annotations

import textwrap
from io import StringIO

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from providers.models import BreakerOverride, Deployment, Provider
from providers.routing.breaker_machine import CLOSED, OPEN
from providers.routing.breakers import breaker_state
from providers.services.breakers import deployment_breaker_override_set
from providers.services.health import health_check_round
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.shared_redis import use_redis  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("use_redis")]


def found_missing(fake_upstream, *, upstream_id: str = "fake-gpt-typo") -> Deployment:
    """A deployment whose upstream id the fake upstream does not list, after a health round: its breaker open."""
    provider = ProviderFactory(name="east", base_url=fake_upstream.base_url + "/v1")
    deployment = ModelFactory(name="gpt-typo", provider=provider, upstream_id=upstream_id).deployments.get()
    health_check_round(providers=[provider])
    assert breaker_state(deployment.pk).state == OPEN
    return deployment


def admin_cookie() -> str:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


async def admin_page(browser, live_site, path: str):
    cookie = await sync_to_async(admin_cookie)()
    context = await browser.new_context()
    await context.add_cookies([{"name": django_settings.SESSION_COOKIE_NAME, "value": cookie, "url": live_site.url}])
    page = await context.new_page()
    await page.goto(f"{live_site.url}{path}")
    return context, page


@pytest.mark.browser
async def test_correcting_the_upstream_id_on_the_deployment_page_closes_its_breaker(live_site, browser, fake_upstream):
    deployment = await sync_to_async(found_missing)(fake_upstream)
    context, page = await admin_page(browser, live_site, f"/admin/providers/deployment/{deployment.pk}/change/")
    try:
        await page.fill("#id_upstream_id", "fake-gpt-4o")
        await page.click('input[name="_save"]')
        await page.wait_for_url(f"{live_site.url}/admin/providers/deployment/")
    finally:
        await context.close()

    state = await sync_to_async(breaker_state)(deployment.pk)
    assert (state.state, state.failures) == (CLOSED, 0)


@pytest.mark.browser
async def test_correcting_the_upstream_id_in_the_models_deployments_closes_its_breaker(
    live_site, browser, fake_upstream
):
    deployment = await sync_to_async(found_missing)(fake_upstream)
    context, page = await admin_page(browser, live_site, f"/admin/providers/catalogmodel/{deployment.model_id}/change/")
    try:
        await page.fill("#id_deployments-0-upstream_id", "fake-gpt-4o")
        await page.click('input[name="_save"]')
        await page.wait_for_url(f"{live_site.url}/admin/providers/catalogmodel/")
    finally:
        await context.close()

    assert (await sync_to_async(breaker_state)(deployment.pk)).state == CLOSED


@pytest.mark.browser
async def test_an_admins_forced_open_breaker_stays_open_when_the_upstream_id_changes(live_site, browser, fake_upstream):
    deployment = await sync_to_async(found_missing)(fake_upstream)
    await sync_to_async(deployment_breaker_override_set)(deployment=deployment, override=BreakerOverride.OPEN)
    context, page = await admin_page(browser, live_site, f"/admin/providers/deployment/{deployment.pk}/change/")
    try:
        await page.fill("#id_upstream_id", "fake-gpt-4o")
        await page.click('input[name="_save"]')
        await page.wait_for_url(f"{live_site.url}/admin/providers/deployment/")
    finally:
        await context.close()

    assert (await sync_to_async(breaker_state)(deployment.pk)).state == OPEN


def test_saving_a_deployment_without_changing_its_upstream_id_leaves_its_breaker_open(fake_upstream):
    deployment = found_missing(fake_upstream)
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    url = reverse("admin:providers_deployment_change", args=[deployment.pk])
    form = {
        "model": deployment.model_id,
        "name": deployment.name,
        "provider": deployment.provider_id,
        "upstream_id": deployment.upstream_id,
        "enabled": "on",
        "input_per_mtok": "1",
        "output_per_mtok": "2",
        "weight": "3",
        "priority": "0",
        "breaker_override": "",
        "health_checks-TOTAL_FORMS": "1",
        "health_checks-INITIAL_FORMS": "1",
        "health_checks-MIN_NUM_FORMS": "0",
        "health_checks-MAX_NUM_FORMS": "1000",
    }

    assert client.post(url, form).status_code == 302

    assert Deployment.objects.get(pk=deployment.pk).weight == 3
    assert breaker_state(deployment.pk).state == OPEN


CATALOG = """
providers:
  - {{name: east, kind: openai_compatible, base_url: {base_url}, api_key: sk-east-0000000000000000000000}}
models:
  - name: gpt-typo
    deployments:
      - {{provider: east, upstream: {upstream}, input_per_mtok: "0.15", output_per_mtok: "0.60"{extra}}}
"""


def load(tmp_path, fake_upstream, upstream: str, extra: str = "") -> str:
    path = tmp_path / "providers.yaml"
    path.write_text(
        textwrap.dedent(CATALOG.format(base_url=fake_upstream.base_url + "/v1", upstream=upstream, extra=extra))
    )
    out = StringIO()
    call_command("loadproviders", str(path), stdout=out)
    return out.getvalue()


def test_loadproviders_correcting_the_upstream_id_closes_its_breaker(tmp_path, fake_upstream, settings):
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    load(tmp_path, fake_upstream, "fake-gpt-typo")
    deployment = Deployment.objects.get()
    health_check_round(providers=[Provider.objects.get()])
    assert breaker_state(deployment.pk).state == OPEN

    load(tmp_path, fake_upstream, "fake-gpt-typo", ", weight: 2")  # the id unchanged: the breaker as it was
    assert breaker_state(deployment.pk).state == OPEN

    load(tmp_path, fake_upstream, "fake-gpt-4o")
    state = breaker_state(deployment.pk)
    assert (state.state, state.failures) == (CLOSED, 0)


def test_loadproviders_changing_the_upstream_id_keeps_an_admins_forced_open_breaker(tmp_path, fake_upstream, settings):
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    load(tmp_path, fake_upstream, "fake-gpt-typo", ", breaker_override: open")
    deployment = Deployment.objects.get()
    deployment_breaker_override_set(deployment=deployment, override=BreakerOverride.OPEN)

    load(tmp_path, fake_upstream, "fake-gpt-4o", ", breaker_override: open")

    assert breaker_state(deployment.pk).state == OPEN
