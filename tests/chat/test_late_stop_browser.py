"""Stop pressed as a reply ends: the server has finished it when the cancel arrives, and answers that no such reply
is streaming. The page, which has it finished too once the completion reaches it, says nothing of it."""

from __future__ import annotations

import json
import re

import pytest
from playwright.async_api import WebSocketRoute, expect

from tests.chat.test_browser import send, sign_in
from tests.conftest import LiveServer
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def site(live_site, fake_upstream) -> LiveServer:
    return live_site


@pytest.fixture
def user(fake_upstream):
    provider = ProviderFactory(name="fake-openai-browser", base_url=fake_upstream.base_url + "/v1")
    ModelFactory(name="gpt-browser", provider=provider)
    return UserFactory(username="ada")


async def test_stop_pressed_as_the_reply_ends_shows_no_error(site, browser, user):
    """The completion is held on its way to the page (a slow network) until the page has sent its cancel; the server,
    done with the reply, answers the cancel ``not_found``. Until 7 December the page showed that answer as a toast,
    in the protocol's words ("No reply with this request_id is streaming."), for a reply shown whole."""
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    held: list[str] = []
    answered: list[dict] = []

    def route(page_side: WebSocketRoute) -> None:
        server = page_side.connect_to_server()

        def from_server(message: str | bytes) -> None:
            event = json.loads(message) if isinstance(message, str) else {}
            if event.get("type") == "chat.completed" and not answered:
                held.append(message)  # the first reply's completion, late
                return
            if event.get("type") == "error":
                answered.append(event)
                for late in held:
                    page_side.send(late)
                held.clear()
            page_side.send(message)

        server.on_message(from_server)
        page_side.on_message(lambda message: server.send(message))

    await page.route_web_socket(re.compile(r"/ws/chat/"), route)
    await sign_in(page, site)
    # Every toast the page shows, kept (a toast goes after a few seconds).
    await page.evaluate(
        """() => {
            window.shownToasts = [];
            new MutationObserver((changes) => {
                for (const change of changes)
                    for (const node of change.addedNodes)
                        if (node.classList?.contains("toast")) window.shownToasts.push(node.textContent);
            }).observe(document.body, { childList: true });
        }"""
    )
    await send(page, "Short [[words=5]]")
    await wait_until_async(lambda: held, "the completion, held back")
    await page.get_by_role("button", name="Stop generating").click()
    reply = page.locator(".message.assistant").last
    await expect(reply).to_have_attribute("data-status", "complete")
    assert [(e["code"], e["message"]) for e in answered] == [
        ("not_found", "No reply with this request_id is streaming.")
    ]
    # The socket's events are handled in order: once the next reply has ended, the answer to the cancel was handled.
    await send(page, "Next [[words=3]]")
    await expect(page.locator(".message.assistant")).to_have_count(2)
    await expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "complete")
    assert await page.evaluate("() => window.shownToasts") == []
    await expect(page.locator("#composer-error")).to_be_hidden()
    assert errors == []
    await page.close()
