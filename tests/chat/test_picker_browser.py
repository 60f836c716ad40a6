"""The chat page's model picker in a real browser (Debian's Chromium through Playwright): models the plan does
not include, or that only the user's own provider key could serve while they have none, are listed greyed out
and cannot be picked, even when the page remembers one from before."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from playwright.async_api import expect

from billing.models import Plan
from billing.services.plans import plan_assign
from providers.models import ByokMode, Provider, ProviderCredential
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-for-tests-123"
User = get_user_model()


def starter_user_and_catalog(base_url: str) -> None:
    east = ProviderFactory(name="east-browser", base_url=base_url)
    west = ProviderFactory(name="west-browser", base_url=base_url)
    mini = ModelFactory(name="gpt-mini-browser", label="GPT mini", provider=east)
    DeploymentFactory(model=mini, provider=west, input_per_mtok=Decimal("0.30"))
    # Sorted first, so a picker that ignored the lock would select it by default.
    premium = ModelFactory(name="gpt-a-premium", label="GPT premium", provider=west, output_per_mtok=Decimal("40"))
    plan = Plan.objects.create(name="Starter", allow_all_models=False)
    plan.allowed_models.set([mini])
    plan_assign(user=UserFactory(username="ada"), plan=plan)
    assert premium.enabled


async def test_a_locked_model_is_shown_disabled_and_cannot_be_picked(live_site, browser, fake_upstream):
    await sync_to_async(starter_user_and_catalog)(fake_upstream.base_url + "/v1")
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    await page.goto(live_site.url + "/")
    await expect(page).to_have_url(re.compile(r"/accounts/login/"))
    await page.get_by_label("Username").fill("ada")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")

    picker = page.locator("#model-picker")
    locked = picker.locator('option[value="gpt-a-premium"]')
    await expect(locked).to_be_disabled()
    await expect(locked).to_have_text("GPT premium · not in your plan")
    await expect(picker.locator('option[value="gpt-mini-browser"]')).to_be_enabled()
    await expect(picker).to_have_value("gpt-mini-browser")  # the first usable model, not the first listed
    await expect(page.locator("#provider-badge")).to_have_text("east-browser · west-browser")
    await expect(page.locator("#send")).to_be_enabled()

    # A model remembered from before the plan changed is not brought back.
    await page.evaluate("localStorage.setItem('llmhub.model', 'gpt-a-premium')")
    await page.reload()
    await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    await expect(picker).to_have_value("gpt-mini-browser")
    assert errors == []


def own_key_user_and_catalog(base_url: str) -> None:
    UserFactory(username="grace")
    platform = ProviderFactory(name="platform-browser", base_url=base_url)
    ModelFactory(name="gpt-mini-browser", label="GPT mini", provider=platform)
    # Sorted first, so a picker that offered it would select it by default.
    own_only = ProviderFactory(name="Anthropic-own", base_url=base_url, byok=ByokMode.REQUIRED)
    ModelFactory(name="claude-a-own", label="Claude own", provider=own_only)


def own_key_add() -> None:
    ProviderCredential.objects.create(
        owner=User.objects.get(username="grace"),
        provider=Provider.objects.get(name="Anthropic-own"),
        api_key="sk-ant-grace-own-key-0001",
    )


async def test_a_model_that_needs_the_users_own_key_is_locked_until_they_add_one(live_site, browser, fake_upstream):
    await sync_to_async(own_key_user_and_catalog)(fake_upstream.base_url + "/v1")
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    await page.goto(live_site.url + "/")
    await page.get_by_label("Username").fill("grace")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")

    picker = page.locator("#model-picker")
    locked = picker.locator('option[value="claude-a-own"]')
    await expect(locked).to_be_disabled()
    await expect(locked).to_have_text("Claude own · needs your own Anthropic-own key")
    await expect(picker).to_have_value("gpt-mini-browser")
    await expect(page.locator("#model-picker-hint")).to_have_text(
        "Greyed-out models are usable only with your own provider key."
    )
    link = page.get_by_role("link", name="Add your own key")
    await link.click()
    await expect(page).to_have_url(re.compile(r"/provider-keys/$"))

    # Once they have a key for that provider, the model is theirs to pick.
    await sync_to_async(own_key_add)()
    await page.goto(live_site.url + "/")
    await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    await expect(locked).to_be_enabled()
    await expect(locked).to_have_text("Claude own")
    await expect(page.get_by_role("link", name="Add your own key")).to_have_count(0)
    await picker.select_option("claude-a-own")
    await expect(page.locator("#provider-badge")).to_have_text("Anthropic-own")
    assert errors == []
