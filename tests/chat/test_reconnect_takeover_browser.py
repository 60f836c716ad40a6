"""The chat page's network vanishes mid-reply: the page's socket is gone, the server's is not (it learns so only when
its keepalive gives up, up to 20 s). The page reconnects, or is reloaded, and its next send into the conversation goes
through; a duplicated tab is another client, refused while the original streams."""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest
from playwright.async_api import WebSocketRoute, expect

from chat import services
from chat.models import Message, MessageStatus, Role
from tests.chat.test_browser import send, sign_in
from tests.conftest import LiveServer
from tests.factories import ModelFactory, ProviderFactory, UserFactory
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Where the page keeps its client id (chat/static/chat/chat.js).
CLIENT_STORAGE_KEY = "llmhub.client"


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


class VanishingRelay:
    """A TCP relay in front of the live server whose WebSocket links can vanish as a network does: ``vanish()`` stops
    relaying anything, either way, on the sockets open now, yet keeps both of their ends open (no close, no reset), so
    the server learns of it only when its keepalive gives up. Pages and new sockets go through as before. (Playwright's
    WebSocket route closes the server's side when the page reloads.)"""

    def __init__(self, target: LiveServer) -> None:
        self.target_port = target.port
        self.url = ""
        self._sockets: list[list[bool]] = []  # per WebSocket link: [vanished]
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> VanishingRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((client_writer, server_writer))
        vanished = [False]
        first = await client_reader.read(65536)
        if first.startswith(b"GET /ws/"):
            self._sockets.append(vanished)
        server_writer.write(first)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    if not vanished[0]:
                        writer.write(data)
                        await writer.drain()
                if not vanished[0]:
                    writer.write_eof()

        with contextlib.suppress(OSError):
            await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    def vanish(self) -> None:
        for vanished in self._sockets:
            vanished[0] = True

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_page_reloaded_mid_reply_after_its_network_vanished_sends_into_its_conversation(site, browser, user):
    """A reload is the same tab, so the same client: its send takes over the reply its old socket still streams on the
    server, which its close never reached. Until 8 December each page load was a new client, and the send was
    refused ("A reply is already streaming in this conversation.") until the server's keepalive gave that socket up
    (up to 20 s)."""
    relay = await VanishingRelay(site).start()
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await sign_in(page, relay)
        await send(page, "Tell me a long story [[words=600]] [[tps=20]]")
        old = page.locator(".message.assistant").last
        await expect(old.locator(".message-body")).to_contain_text("lorem", timeout=30_000)

        relay.vanish()
        await page.reload()
        await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open", timeout=15_000)
        await send(page, "Again [[words=3]]")
        await expect(page.locator(".message.assistant").last).to_have_attribute(
            "data-status", "complete", timeout=15_000
        )
        await expect(page.locator("#composer-error")).to_be_hidden()
        await expect(page.locator(".message")).to_have_count(4)
        # The old reply, shown as written elsewhere after the reload, is read again until it has ended: stopped.
        await expect(page.locator(".message.assistant").first).to_have_attribute(
            "data-status", "cancelled", timeout=15_000
        )

        replies = [
            (m.status, m.error_message, len(m.content.split()))
            async for m in Message.objects.filter(role=Role.ASSISTANT)
        ]
        assert replies[0][:2] == (MessageStatus.CANCELLED, services.TAKEN_OVER_NOTE) and 0 < replies[0][2] < 600
        assert replies[1] == (MessageStatus.COMPLETE, "", 3)
        assert errors == []
    finally:
        await page.close()
        await relay.close()


async def test_a_duplicated_tab_is_another_client_and_waits_for_the_reply_of_the_original(site, browser, user):
    """A duplicated tab starts with a copy of the original's sessionStorage, where the page keeps its client id for
    reloads; while the original is open, the copy is another client: its send into the conversation the original
    streams in is refused, and the original's reply streams on."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    # What each page load finds in its sessionStorage before the page's script runs.
    await context.add_init_script(f"window.clientAtLoad = sessionStorage.getItem({CLIENT_STORAGE_KEY!r});")
    page = await context.new_page()
    try:
        await sign_in(page, site)
        await send(page, "Tell me a long story [[words=600]] [[tps=20]]")
        original = page.locator(".message.assistant").last
        await expect(original.locator(".message-body")).to_contain_text("lorem", timeout=30_000)

        # window.open copies the opener's sessionStorage, as duplicating a tab does.
        async with page.expect_popup() as opened:
            await page.evaluate("window.open(location.href)")
        twin = await opened.value
        await expect(twin.locator("#connection-status")).to_have_attribute("data-state", "open", timeout=15_000)
        original_client = await page.evaluate(f"sessionStorage.getItem({CLIENT_STORAGE_KEY!r})")
        assert original_client and await twin.evaluate("window.clientAtLoad") == original_client

        await send(twin, "Me too [[words=3]]")
        await expect(twin.locator("#composer-error")).to_have_text("A reply is already streaming in this conversation.")
        await expect(twin.locator("#prompt")).to_have_value("Me too [[words=3]]")
        await expect(original).to_have_attribute("data-status", "streaming")
        reply = await Message.objects.aget(role=Role.ASSISTANT)
        assert (reply.status, reply.error_message) == (MessageStatus.STREAMING, "")

        await page.locator("#stop").click()
        await expect(original).to_have_attribute("data-status", "cancelled")
    finally:
        await context.close()
