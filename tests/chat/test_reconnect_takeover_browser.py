"""The chat page's network vanishes mid-reply: the page's socket is gone, the server's is not (it learns so only when
its keepalive gives up, up to 20 s). The page reconnects, and its next send into the conversation goes through."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import WebSocketRoute, expect

from chat.models import Message, MessageStatus, Role
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


async def test_the_page_reconnected_after_its_network_vanished_sends_into_its_conversation(site, browser, user):
    """Until 7 December the send was refused ("A reply is already streaming in this conversation.") and the message
    put back in the box while the server still streamed the old reply into the socket it held. The page names itself
    in every send, the same on its new socket, and the server hands it the conversation: the old reply is kept
    stopped, the new one answered."""
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sockets: list[WebSocketRoute] = []

    def route(page_side: WebSocketRoute) -> None:
        server = page_side.connect_to_server()
        # A close on either side is not passed on: the page's side is cut alone, as a vanished network cuts it.
        page_side.on_close(lambda code, reason: None)
        server.on_close(lambda code, reason: None)
        sockets.append(page_side)

    await page.route_web_socket(re.compile(r"/ws/chat/"), route)
    await sign_in(page, site)
    await send(page, "Tell me a long story [[words=600]] [[tps=20]]")
    old = page.locator(".message.assistant").last
    # Liveness, not speed: a session's first reply can take over 5 s to its first word on a loaded machine.
    await expect(old.locator(".message-body")).to_contain_text("lorem", timeout=30_000)

    await sockets[0].close(code=4000, reason="network gone")
    await expect(old).to_have_attribute("data-status", "cancelled")
    await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open", timeout=15_000)
    assert len(sockets) == 2

    await send(page, "Again [[words=3]]")
    await expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "complete", timeout=15_000)
    await expect(page.locator(".message")).to_have_count(4)  # refused, the send's two were taken back out
    await expect(page.locator("#composer-error")).to_be_hidden()

    async def replies_once_the_old_one_stopped() -> list[tuple[str, int]] | None:
        rows = [(m.status, len(m.content.split())) async for m in Message.objects.filter(role=Role.ASSISTANT)]
        return rows if rows[0][0] != MessageStatus.STREAMING else None

    stored = await wait_until_async(replies_once_the_old_one_stopped, "the old reply's turn stops", timeout=15)
    assert stored[0][0] == MessageStatus.CANCELLED and 0 < stored[0][1] < 600
    assert stored[1] == (MessageStatus.COMPLETE, 3)
    assert errors == []
    await page.close()
