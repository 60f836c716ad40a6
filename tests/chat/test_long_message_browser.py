"""A message longer than the socket takes, on the chat page, against a live llmhub whose uvicorn bounds WebSocket
messages as the production command does (``--ws-max-size``, docs/deployment.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.async_api import expect

from chat import consumers
from chat.models import Conversation
from llmhub.devserver import WEBSOCKET_MAX_BYTES
from tests.chat.test_browser import sign_in
from tests.conftest import LiveServer
from tests.factories import ModelFactory, ProviderFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


class ProductionSizedServer(LiveServer):
    """The live server with production's WebSocket message limit (the Dockerfile's ``--ws-max-size``): a larger
    message closes the socket (1009) before the consumer sees it."""

    def __init__(self) -> None:
        super().__init__(static_files=True)
        self.ws_ping = {**self.ws_ping, "ws_max_size": WEBSOCKET_MAX_BYTES}


@pytest.fixture
def site(transactional_db, fake_upstream) -> Iterator[LiveServer]:
    server = ProductionSizedServer().start()
    yield server
    server.stop()


@pytest.fixture
def user(fake_upstream):
    provider = ProviderFactory(name="fake-openai-browser", base_url=fake_upstream.base_url + "/v1")
    ModelFactory(name="gpt-browser", provider=provider)
    return UserFactory(username="ada")


@pytest.mark.parametrize(
    "text",
    [
        # Past what the server takes in one message (1.25 MiB): until 7 December the socket was closed (1009), the
        # page said the connection had dropped and to send the message again once reconnected, which dropped it again.
        "lorem " * (WEBSOCKET_MAX_BYTES // 6 + 1),
        # One character past the limit, counted as the server counts it (code points): an emoji is one, not two.
        "😀" * (consumers.MAX_CONTENT_CHARS + 1),
    ],
    ids=["past-the-server", "emoji-past-the-limit"],
)
async def test_a_message_too_long_is_kept_in_the_box_with_the_limit(site, browser, user, text):
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda frame: sent.append(str(frame)[:200])))
    await sign_in(page, site)
    await page.locator("#prompt").fill(text)
    await page.locator("#send").click()
    await expect(page.locator("#composer-error")).to_be_visible()
    await expect(page.locator("#composer-error")).to_contain_text(f"{consumers.MAX_CONTENT_CHARS:,}")
    assert await page.locator("#prompt").input_value() == text
    await expect(page.locator(".message")).to_have_count(0)
    # The socket held: no frame went, and the page is still connected, ready for a shorter message.
    assert not any("chat.send" in frame for frame in sent)
    await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    await page.locator("#prompt").fill("Hello [[words=3]]")
    await page.locator("#send").click()
    await expect(page.locator("#composer-error")).to_be_hidden()
    await expect(page.locator(".message.assistant")).to_have_attribute("data-status", "complete", timeout=15_000)
    assert await Conversation.objects.filter(owner=user).acount() == 1
    assert errors == []
    await page.close()


async def test_a_message_at_the_limit_is_sent(site, browser, user):
    """The page's own check counts as the server does (code points, not JavaScript's UTF-16 units): a message of
    exactly the limit, in characters outside the BMP, goes."""
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda frame: sent.append(str(frame)[:200])))
    await sign_in(page, site)
    text = "😀" * consumers.MAX_CONTENT_CHARS
    await page.locator("#prompt").fill(text)
    await page.locator("#send").click()
    await expect(page.locator(".message.assistant")).to_have_count(1)
    assert await page.locator("#prompt").input_value() == ""
    assert any("chat.send" in frame for frame in sent)
    await page.close()
