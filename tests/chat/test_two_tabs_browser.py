"""Two tabs (or windows) on one conversation: what one of them adds reaches the other when the user comes back to it,
so that the transcript on screen is the history the model is sent."""

from __future__ import annotations

import pytest
from playwright.async_api import Page, expect

from tests.chat.test_browser import back_to, send, sign_in
from tests.conftest import LiveServer
from tests.factories import ModelFactory, ProviderFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def site(live_site, fake_upstream) -> LiveServer:
    return live_site


@pytest.fixture
def user(fake_upstream):
    provider = ProviderFactory(name="fake-openai-browser", base_url=fake_upstream.base_url + "/v1")
    ModelFactory(name="gpt-browser", provider=provider)
    return UserFactory(username="ada")


async def turn(page: Page, text: str, count: int) -> None:
    await send(page, text)
    await expect(page.locator(".message")).to_have_count(count)
    await expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "complete", timeout=15_000)


async def test_a_turn_taken_in_another_tab_shows_when_coming_back(site, browser, user):
    """The second tab showed the conversation as it was when opened: the first tab's later turn was missing from it
    until a reload, though the model was sent it with the second tab's next message (whose reply could answer what
    the screen did not show). Coming back to the tab reads the conversation again when it has changed."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    first = await context.new_page()
    errors: list[str] = []
    first.on("pageerror", lambda exc: errors.append(str(exc)))
    await sign_in(first, site)
    await turn(first, "First question [[words=3]]", 2)
    conversation_id = int(first.url.rstrip("/").rsplit("/", 1)[1])

    second = await context.new_page()
    second.on("pageerror", lambda exc: errors.append(str(exc)))
    await second.goto(f"{site.url}/c/{conversation_id}/")
    await expect(second.locator("#connection-status")).to_have_attribute("data-state", "open")
    await expect(second.locator(".message")).to_have_count(2)
    await second.locator("#prompt").fill("Half typed")

    await turn(first, "Second question [[words=3]]", 4)

    await back_to(second)
    await expect(second.locator(".message")).to_have_count(4)
    await expect(second.locator(".message.user")).to_have_text(
        ["First question [[words=3]]", "Second question [[words=3]]"]
    )
    await expect(second.locator("#prompt")).to_have_value("Half typed")  # what was being typed stays

    # Nothing changed since: coming back again redraws nothing (the reply's view is the same element).
    marker = await second.locator(".message.assistant").last.evaluate("node => { node.dataset.seen = '1'; return 1; }")
    assert marker == 1
    await back_to(second)
    await second.wait_for_timeout(500)
    await expect(second.locator(".message.assistant").last).to_have_attribute("data-seen", "1")

    await second.locator("#prompt").fill("Third question [[words=3]]")
    await second.locator("#prompt").press("Enter")
    await expect(second.locator(".message")).to_have_count(6)
    await expect(second.locator(".message.assistant").last).to_have_attribute("data-status", "complete", timeout=15_000)
    await expect(second.locator(".message.user")).to_have_text(
        ["First question [[words=3]]", "Second question [[words=3]]", "Third question [[words=3]]"]
    )
    assert errors == []
    await context.close()
