"""The chat page in a real browser (Debian's Chromium through Playwright) against a live llmhub.

Playwright's async API: its sync API keeps an event loop marked as running in the test's thread, which
makes every Django ORM call of the test (and the database flush after it) refuse to run.
"""

from __future__ import annotations

import re

import pytest
from asgiref.sync import sync_to_async
from playwright.async_api import Page, expect

from billing.models import ApiKey
from billing.services.keys import api_key_authenticate
from chat.models import Conversation, Message, MessageStatus, Role
from tests.conftest import LiveServer
from tests.factories import ModelFactory, ProviderFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-for-tests-123"

CODE_REPLY = """Here is one way to do it:

```python
def reverse(text: str) -> str:
    \"\"\"Return text backwards.\"\"\"
    return text[::-1]


print(reverse("llmhub"))  # buhmll
```

- Slicing with a step of **-1** walks the string from the end.
- It works for any sequence, not only `str`.
"""


@pytest.fixture
def site(live_site, fake_upstream) -> LiveServer:
    return live_site


@pytest.fixture
def user(fake_upstream):
    provider = ProviderFactory(name="fake-openai-browser", base_url=fake_upstream.base_url + "/v1")
    ModelFactory(name="gpt-browser", provider=provider)
    return UserFactory(username="ada")


async def sign_in(page: Page, site: LiveServer) -> None:
    await page.goto(site.url + "/")
    await expect(page).to_have_url(re.compile(r"/accounts/login/"))
    await page.get_by_label("Username").fill("ada")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(site.url + "/")
    await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")


async def send(page: Page, text: str) -> None:
    await page.locator("#prompt").fill(text)
    await page.locator("#prompt").press("Enter")


async def test_chat_page_streams_stops_and_remembers(site, browser, user):
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await sign_in(page, site)
    await expect(page.locator("#provider-badge")).to_have_text("fake-openai-browser")

    # A reply grows while it streams.
    await send(page, "Tell me about Lisbon [[words=80]] [[tps=20]]")
    reply = page.locator(".message.assistant").last
    await expect(reply).to_have_attribute("aria-busy", "true")
    body = reply.locator(".message-body")
    await expect(body).to_contain_text("lorem")
    first = len(await body.inner_text())
    await page.wait_for_timeout(700)
    second = len(await body.inner_text())
    assert second > first, (first, second)
    await expect(page.locator("#stop")).to_be_visible()
    await expect(reply).to_have_attribute("data-status", "complete", timeout=15_000)
    assert len((await body.inner_text()).split()) == 80
    await expect(page.locator("#send")).to_be_visible()
    await expect(page).to_have_url(re.compile(r"/c/\d+/$"))
    conversation_id = int(page.url.rstrip("/").rsplit("/", 1)[1])

    # Thumbs up is saved.
    await reply.get_by_role("button", name="Good reply").click()
    await expect(reply.get_by_role("button", name="Good reply")).to_have_attribute("aria-pressed", "true")
    first_reply = await Message.objects.aget(conversation_id=conversation_id, role=Role.ASSISTANT)
    assert first_reply.feedback == 1

    # The stop button ends a long reply.
    await send(page, "Now a very long one [[words=400]] [[tps=20]]")
    long_reply = page.locator(".message.assistant").last
    await expect(long_reply.locator(".message-body")).to_contain_text("lorem")
    await page.get_by_role("button", name="Stop generating").click()
    await expect(long_reply).to_have_attribute("data-status", "cancelled")
    await expect(long_reply).to_contain_text("Stopped.")
    stopped = await Message.objects.filter(conversation_id=conversation_id, role=Role.ASSISTANT).alast()
    assert stopped.status == MessageStatus.CANCELLED
    assert 0 < len(stopped.content.split()) < 400

    # After a reload the conversation is in the sidebar and on screen.
    await page.reload()
    await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    item = page.locator(f'.conv-item[data-conversation-id="{conversation_id}"]')
    await expect(item).to_have_text("Tell me about Lisbon [[words=80]] [[tps=20]]")
    await expect(item).to_have_attribute("aria-current", "true")
    await expect(page.locator(".message")).to_have_count(4)
    thumbs_up = page.locator(".message.assistant").first.get_by_role("button", name="Good reply")
    await expect(thumbs_up).to_have_attribute("aria-pressed", "true")
    assert errors == []
    await page.close()


async def test_model_output_is_rendered_safely(site, browser, user):
    page = await browser.new_page()
    await sign_in(page, site)
    await send(page, '[[reply=<script>window.__pwned=1</script> and <img src=x onerror="window.__pwned=2"> end]]')
    reply = page.locator(".message.assistant").last
    await expect(reply).to_have_attribute("data-status", "complete")
    body = reply.locator(".message-body")
    await expect(body).to_contain_text("<script>window.__pwned=1</script>")
    await expect(body).to_contain_text('<img src=x onerror="window.__pwned=2">')
    assert await body.locator("script, img").count() == 0
    assert await page.evaluate("window.__pwned") is None
    await page.close()


def seed_conversations(user) -> Conversation:
    conversation = Conversation.objects.create(owner=user, title="Reverse a string in Python", model_name="gpt-browser")
    Message.objects.create(conversation=conversation, role=Role.USER, content="How do I reverse a string in Python?")
    Message.objects.create(
        conversation=conversation,
        role=Role.ASSISTANT,
        content=CODE_REPLY,
        model_name="gpt-browser",
        provider_name="fake-openai-browser",
        status=MessageStatus.COMPLETE,
    )
    for title in ("Trip to Lisbon", "Weekly report draft", "SQL window functions"):
        Conversation.objects.create(owner=user, title=title, model_name="gpt-browser")
    return conversation


async def test_markdown_code_and_phone_layout(site, browser, user, artifacts_dir):
    conversation = await sync_to_async(seed_conversations)(user)
    context = await browser.new_context(
        viewport={"width": 1280, "height": 860}, permissions=["clipboard-read", "clipboard-write"]
    )
    page = await context.new_page()
    await sign_in(page, site)
    await page.locator(".conv-link", has_text="Reverse a string in Python").click()
    await expect(page).to_have_url(f"{site.url}/c/{conversation.pk}/")
    code = page.locator(".code-block pre code")
    await expect(code).to_have_class(re.compile(r"\bhljs\b"))
    await expect(code.locator(".hljs-keyword").first).to_have_text("def")
    await expect(page.locator(".message-body strong")).to_have_text("-1")
    await page.screenshot(path=str(artifacts_dir / "chat.png"))
    await page.get_by_role("button", name="Copy code").click()
    assert (await page.evaluate("navigator.clipboard.readText()")).startswith("def reverse(text: str) -> str:")

    # Phone width: the sidebar is off-screen until the menu button opens it.
    await page.set_viewport_size({"width": 390, "height": 844})
    sidebar = page.locator("#sidebar")
    await expect(sidebar).not_to_be_in_viewport()
    await page.get_by_role("button", name="Show conversations").click()
    await expect(sidebar).to_be_in_viewport()
    await expect(page.locator("#sidebar-toggle")).to_have_attribute("aria-expanded", "true")
    await expect(page.locator("#sidebar-scrim")).to_be_visible()
    await page.wait_for_timeout(300)  # the slide-in transition
    await page.screenshot(path=str(artifacts_dir / "chat-phone.png"))
    await page.keyboard.press("Escape")
    await expect(sidebar).not_to_be_in_viewport()
    await context.close()


async def test_sidebar_rename_and_delete(site, browser, user):
    conversation = await sync_to_async(seed_conversations)(user)
    page = await browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    await sign_in(page, site)
    item = page.locator(f'.conv-item[data-conversation-id="{conversation.pk}"]')
    await item.get_by_role("button", name="Rename “Reverse a string in Python”").click()
    title = page.get_by_label("New title")
    await title.fill("Strings, backwards")
    await title.press("Enter")
    await expect(item).to_have_text("Strings, backwards")
    await conversation.arefresh_from_db()
    assert conversation.title == "Strings, backwards"

    await item.locator(".conv-link").click()
    await expect(page.locator(".message")).to_have_count(2)
    await item.get_by_role("button", name="Delete “Strings, backwards”").click()
    await expect(item).to_have_count(0)
    await expect(page).to_have_url(site.url + "/")
    await expect(page.locator("#empty-state")).to_be_visible()
    assert await Conversation.objects.filter(pk=conversation.pk).aexists() is False
    await page.close()


async def test_api_keys_page(site, browser, user, artifacts_dir):
    page = await browser.new_page(viewport={"width": 1280, "height": 760})
    page.on("dialog", lambda dialog: dialog.accept())
    await sign_in(page, site)
    await page.get_by_role("link", name="API keys").click()
    await expect(page.get_by_role("heading", name="API keys", level=1)).to_be_visible()
    await expect(page.locator("#base-url")).to_have_text(site.url + "/v1")

    await page.get_by_label("Name").fill("laptop")
    await page.get_by_role("button", name="Create key").click()
    secret = page.locator("#secret-value")
    await expect(secret).to_have_text(re.compile(r"^sk-llmhub-"))
    row = page.locator("#keys-body tr", has_text="laptop")
    await expect(row.locator(".status")).to_have_text("Active")
    principal = await api_key_authenticate(await secret.inner_text())
    assert principal.user_id == user.pk
    await page.screenshot(path=str(artifacts_dir / "keys.png"))

    await row.get_by_role("button", name="Revoke key “laptop”").click()
    await expect(row.locator(".status")).to_have_text("Revoked")
    assert await ApiKey.objects.filter(user=user, revoked_at__isnull=False).acount() == 1
    await page.reload()
    await expect(page.locator("#secret-value")).to_be_hidden()
    await page.close()
