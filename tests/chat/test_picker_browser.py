"""The chat page's model picker in a real browser (Debian's Chromium through Playwright): models the plan does
not include are listed greyed out and cannot be picked, even when the page remembers one from before."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from playwright.async_api import expect

from billing.models import Plan
from billing.services.plans import plan_assign
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-for-tests-123"


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
