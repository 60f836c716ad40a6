"""The catalog model's admin change page in a real browser (Debian's Chromium through Playwright): its
deployments inline has a column per setting, wider than the admin's content column; the table scrolls inside
its own fieldset, so the page is no wider than a desktop window, and each row's "Enabled" is in view."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import Client
from playwright.async_api import Response, expect

from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DESKTOP = {"width": 1280, "height": 860}
# A deployment name as operators write them: region, model and role, longer than the column's 13em.
LONG_NAME = "azure-sweden-central-gpt-4o-mini-backup"


def seed() -> tuple[int, str]:
    provider = ProviderFactory(name="azure-openai-sweden-central")
    model = ModelFactory(name="gpt-4o-mini-2024-07-18", provider=provider)
    DeploymentFactory(
        model=model,
        name=LONG_NAME,
        provider=ProviderFactory(name="openai"),
        upstream_id="anthropic.claude-3-5-sonnet-20241022-v2:0",
    )
    root = UserFactory(username="root", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(root)
    return model.pk, client.cookies[settings.SESSION_COOKIE_NAME].value


async def test_the_model_change_page_fits_a_desktop_window(live_site, browser, artifacts_dir):
    pk, cookie = await sync_to_async(seed)()
    context = await browser.new_context(viewport=DESKTOP)
    await context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": live_site.url}])
    page = await context.new_page()
    failed: list[str] = []

    def check(response: Response) -> None:
        if response.status >= 400:
            failed.append(f"{response.status} {response.url}")

    page.on("response", check)
    try:
        await page.goto(f"{live_site.url}/admin/providers/catalogmodel/{pk}/change/")
        rows = page.locator("#deployments-group tbody tr.has_original")
        await expect(rows).to_have_count(2)
        await page.screenshot(path=str(artifacts_dir / "admin-model-change.png"), full_page=True)

        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= DESKTOP["width"], f"the page is {width} px wide in a {DESKTOP['width']} px window"
        # The table is really wider than its box, and scrolls inside it.
        box = page.locator("#deployments-group fieldset.module")
        scroll, client, overflow = await box.evaluate(
            "node => [node.scrollWidth, node.clientWidth, getComputedStyle(node).overflowX]"
        )
        assert scroll > client and overflow in ("auto", "scroll"), (scroll, client, overflow)
        # Each row's on/off switch shows without scrolling the table sideways.
        shown = await box.evaluate(
            """node => {
              const inside = node.getBoundingClientRect();
              return [...node.querySelectorAll("tr.has_original td.field-enabled input")].map((input) => {
                const rect = input.getBoundingClientRect();
                return node.scrollLeft === 0 && rect.left >= inside.left && rect.right <= inside.right;
              });
            }"""
        )
        assert shown == [True, True]
        # A name or an upstream id longer than the column shows whole, not cut off inside its input.
        cut = await box.evaluate(
            """node => [...node.querySelectorAll("tr.has_original td input.vTextField")]
              .filter((input) => input.scrollWidth > input.clientWidth).map((input) => input.value)"""
        )
        assert cut == []
        assert failed == []
    finally:
        await context.close()
