"""The Django admin and the API docs under the Content-Security-Policy (core/csp.py) in a real browser (Debian's
Chromium through Playwright): pages of ours that a browser test did not open otherwise, with what they carry
that a CSP could refuse (the breakers' colours, the prompt diff's stylesheet, the autocomplete widget). A
refusal fails the test (tests/conftest.py, ``_no_csp_violations``)."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import Client
from playwright.async_api import expect

from billing.models import ApiKey
from prompts.models import PromptTemplate
from prompts.services import prompt_version_create
from providers.models import Deployment
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def seed() -> tuple[dict[str, str], str]:
    """Rows for every admin page below; the superuser's session cookie."""
    deployment = DeploymentFactory(model=ModelFactory(provider=ProviderFactory()), breaker_override="open")
    template = PromptTemplate.objects.create(slug="post", description="A post")
    for text in ("Write about {{ topic }}.", "Write a short post about {{ topic }}."):
        prompt_version_create(
            template=template,
            messages=[{"role": "user", "content": text}],
            variables=[{"name": "topic", "type": "string", "example": "boots"}],
        )
    root = UserFactory(username="root", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(root)
    pages = {
        "deployments": "/admin/providers/deployment/",
        "deployment": f"/admin/providers/deployment/{deployment.pk}/change/",
        "compare": f"/admin/prompts/prompttemplate/{template.pk}/compare/",
        "api key add": f"/admin/{ApiKey._meta.app_label}/apikey/add/",
        "audit": "/admin/audit/auditevent/",
        "api docs": "/api/docs/",
        "redoc": "/api/redoc/",
    }
    assert Deployment.objects.filter(breaker_override="open").exists()
    return pages, client.cookies[settings.SESSION_COOKIE_NAME].value


async def test_the_admin_and_the_api_docs_break_no_rule_of_the_policy(live_site, browser):
    pages, cookie = await sync_to_async(seed)()
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    await context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": live_site.url}])
    page = await context.new_page()

    for name, path in pages.items():
        response = await page.goto(live_site.url + path, wait_until="networkidle")
        assert response is not None and response.status == 200, name
        assert "content-security-policy" in response.headers, name
        if name == "deployments":
            # The breaker's colour comes from a class of admin_breakers.css, not a style attribute.
            forced = page.locator("strong.breaker-open").first
            await expect(forced).to_have_css("color", "rgb(198, 40, 40)")
        if name == "compare":
            await expect(page.locator(".prompt-diff table.diff").first).to_have_css("border-collapse", "collapse")
        if name == "api key add":
            # The user field's autocomplete widget (Select2) opens and lists the users.
            await page.locator(".select2-selection").first.click()
            await expect(page.locator(".select2-results__option").first).to_be_visible()

    await context.close()
