"""The provider keys page in a real browser (Debian's Chromium through Playwright) against a live llmhub, whose
REST API checks each key live with a fake upstream that accepts only the keys the test gives it.

Playwright's async API, as in tests/chat/test_browser.py: its sync API would keep an event loop running in
the test's thread, where the Django ORM then refuses to run.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from asgiref.sync import sync_to_async
from playwright.async_api import Page, expect

from llmhub.testing.fake_upstream import FakeUpstream, key_digest
from providers.fields import Secret
from providers.models import ByokMode, CredentialStatus, ProviderCredential, ProviderKind
from tests.conftest import LiveServer, free_port
from tests.factories import ProviderFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-for-tests-123"
PLATFORM_KEY = "sk-platform-key-of-the-hub-000000000000"
FIRST_KEY = "sk-ada-own-key-first-1111111111111111AAAA"
SECOND_KEY = "sk-ada-own-key-second-2222222222222222BBBB"
UNKNOWN_KEY = "sk-ada-own-key-unknown-333333333333333CCCC"  # the upstream refuses it (401)


@pytest.fixture(scope="module")
def own_keys_upstream():
    """A fake provider that takes its platform key and, besides, the users' keys set by ``accept``."""
    server = FakeUpstream(api_key=PLATFORM_KEY).start()
    yield server
    server.stop()


@pytest.fixture
def upstream(own_keys_upstream):
    own_keys_upstream.reset()
    response = httpx.post(
        own_keys_upstream.base_url + "/__control", json={"accept_keys": [FIRST_KEY, SECOND_KEY]}, timeout=5
    )
    response.raise_for_status()
    yield own_keys_upstream
    httpx.post(own_keys_upstream.base_url + "/__control", json={"accept_keys": []}, timeout=5)


@pytest.fixture
def provider(upstream):
    ProviderFactory(name="platform-only", kind=ProviderKind.OPENAI, base_url=upstream.base_url + "/v1")
    return ProviderFactory(
        name="byo-openai",
        kind=ProviderKind.OPENAI,
        base_url=upstream.base_url + "/v1",
        api_key=PLATFORM_KEY,
        byok=ByokMode.OPTIONAL,
    )


@pytest.fixture
def user():
    return UserFactory(username="ada")


async def sign_in_to_provider_keys(page: Page, site: LiveServer) -> None:
    await page.goto(site.url + "/provider-keys/")
    await expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/provider-keys/"))
    await page.get_by_label("Username").fill("ada")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(site.url + "/provider-keys/")
    await expect(page.get_by_role("heading", name="Provider keys", level=1)).to_be_visible()


async def assert_no_key_in_page(page: Page, *keys: str) -> None:
    """Neither the markup nor any field's value (which the markup does not show) holds a key."""
    html = await page.content()
    values = await page.evaluate("() => [...document.querySelectorAll('input, select')].map((field) => field.value)")
    for key in keys:
        assert key not in html
        assert key[3:-4] not in html  # nor the middle of it, which no hint shows
        assert all(key not in value for value in values), values


async def stored(user) -> ProviderCredential | None:
    return await ProviderCredential.objects.filter(owner=user).afirst()


async def save_key(page: Page, key: str, *, button: str = "Save key") -> None:
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name=button, exact=True).click()


async def test_no_key_can_be_sent_before_the_providers_have_loaded(live_site, browser, provider, upstream, user):
    """Until the list of providers is in, the form has no provider to name: Save stays disabled (a click
    in that moment sent a key with none, and got "provider: This field may not be blank")."""
    page = await browser.new_page(viewport={"width": 1280, "height": 760})
    await sign_in_to_provider_keys(page, live_site)
    # The first load's own request for the providers must be answered before the route is set: otherwise, on a
    # slow machine, it is the one held, and the reloaded page's request waits behind a route nobody continues.
    await expect(page.get_by_role("button", name="Save key", exact=True)).to_be_enabled(timeout=30_000)
    held: list = []
    asked = asyncio.Event()

    async def hold(route) -> None:
        held.append(route)
        asked.set()

    await page.route("**/api/provider-keys/providers/", hold)
    await page.reload()
    await asyncio.wait_for(asked.wait(), timeout=30)
    await page.get_by_label("API key").fill(FIRST_KEY)
    await expect(page.get_by_role("button", name="Save key", exact=True)).to_be_disabled()
    await held[0].continue_()
    await expect(page.get_by_role("button", name="Save key", exact=True)).to_be_enabled(timeout=30_000)
    await expect(page.locator("#key-provider")).to_have_value("byo-openai")
    await page.close()


async def test_add_replace_refuse_and_delete_a_key(live_site, browser, provider, upstream, user, artifacts_dir):
    page = await browser.new_page(viewport={"width": 1280, "height": 760})
    page.on("dialog", lambda dialog: dialog.accept())
    await sign_in_to_provider_keys(page, live_site)

    # Only the providers that take users' keys are offered, with how their keys start.
    await expect(page.locator("#key-provider option")).to_have_text(["byo-openai"])
    await expect(page.get_by_label("API key")).to_have_attribute("placeholder", "sk-…")
    await expect(page.locator("#key-mode")).to_contain_text("when you have one")
    await expect(page.locator("#keys-body")).to_contain_text("No keys of your own yet")

    # Add: checked live with the provider (with this key), listed by its hint, the form emptied.
    await page.get_by_label("Label").fill("personal account")
    await save_key(page, FIRST_KEY)
    row = page.locator("#keys-body tr", has_text="byo-openai")
    await expect(row.locator(".key-hint")).to_have_text(Secret(FIRST_KEY).hint)
    await expect(row.locator(".status")).to_have_text("Valid")
    await expect(row).to_contain_text("personal account")
    await expect(page.locator("#save-done")).to_have_text(
        f"Saved your byo-openai key {Secret(FIRST_KEY).hint} (valid)."
    )
    await expect(page.get_by_label("API key")).to_have_value("")
    await assert_no_key_in_page(page, FIRST_KEY, PLATFORM_KEY)
    credential = await stored(user)
    assert credential.api_key.reveal() == FIRST_KEY and credential.status == CredentialStatus.VALID
    assert key_digest(FIRST_KEY) in {entry["key_sha256"] for entry in upstream.requests}
    await page.screenshot(path=str(artifacts_dir / "provider-keys.png"))

    # A key the provider refuses: its reason in words beside the form, the field emptied, nothing changed.
    await page.get_by_role("button", name="Replace your byo-openai key").click()
    await expect(page.get_by_label("API key")).to_be_focused()
    await expect(page.get_by_role("button", name="Replace key", exact=True)).to_be_visible()
    await save_key(page, UNKNOWN_KEY, button="Replace key")
    error = page.locator("#save-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("byo-openai refused the key")
    await expect(error).to_contain_text("not a valid API key")
    await expect(page.get_by_label("API key")).to_have_value("")
    await assert_no_key_in_page(page, UNKNOWN_KEY, FIRST_KEY)
    assert (await stored(user)).api_key.reveal() == FIRST_KEY

    # Replace in one step: the same row, the new key's hint, replaced now.
    await save_key(page, SECOND_KEY, button="Replace key")
    await expect(row.locator(".key-hint")).to_have_text(Secret(SECOND_KEY).hint)
    await expect(row).to_contain_text("replaced")
    await expect(error).to_be_hidden()
    await expect(page.locator("#keys-body tr")).to_have_count(1)
    await assert_no_key_in_page(page, SECOND_KEY, FIRST_KEY)
    replaced = await stored(user)
    assert replaced.pk == credential.pk and replaced.api_key.reveal() == SECOND_KEY
    assert replaced.rotated_at is not None and replaced.label == "personal account"

    # Checked again: still valid, with the time of the check.
    async with page.expect_response(lambda response: response.url.endswith("/validate/")) as answer:
        await page.get_by_role("button", name="Check your byo-openai key again").click()
    assert (await answer.value).status == 200
    await expect(row.locator(".status")).to_have_text("Valid")
    assert (await stored(user)).last_validated_at > replaced.last_validated_at

    # Delete.
    await page.get_by_role("button", name="Delete your byo-openai key").click()
    await expect(page.locator("#keys-body")).to_contain_text("No keys of your own yet")
    assert await stored(user) is None
    await page.reload()
    await expect(page.locator("#keys-body")).to_contain_text("No keys of your own yet")
    await page.close()


async def test_a_key_the_provider_stopped_accepting_shows_why_when_checked_again(
    live_site, browser, provider, upstream, user
):
    page = await browser.new_page(viewport={"width": 1280, "height": 760})
    await sign_in_to_provider_keys(page, live_site)
    await save_key(page, FIRST_KEY)
    row = page.locator("#keys-body tr", has_text="byo-openai")
    await expect(row.locator(".status")).to_have_text("Valid", timeout=30_000)

    # The account behind the key is closed: the provider refuses it from now on.
    httpx.post(upstream.base_url + "/__control", json={"accept_keys": [SECOND_KEY]}, timeout=5).raise_for_status()
    await page.get_by_role("button", name="Check your byo-openai key again").click()

    # The check is a call to the provider: on a loaded machine it may take longer than expect's 5 s default.
    await expect(row.locator(".status")).to_have_text("Invalid", timeout=30_000)
    await expect(row.locator(".status-detail")).to_contain_text("not a valid API key")
    await expect(page.locator("#keys-error")).to_contain_text("byo-openai refused your key")
    assert (await stored(user)).status == CredentialStatus.INVALID
    await assert_no_key_in_page(page, FIRST_KEY)
    await page.close()


async def test_with_no_provider_taking_own_keys_the_page_says_so(live_site, browser, user):
    await sync_to_async(ProviderFactory)(name="platform-only")
    page = await browser.new_page(viewport={"width": 1280, "height": 760})
    await sign_in_to_provider_keys(page, live_site)

    await expect(page.locator("#no-providers")).to_be_visible()
    await expect(page.get_by_role("button", name="Save key", exact=True)).to_be_disabled()
    await page.close()


async def test_a_key_paused_by_the_providers_move_is_shown_and_confirmed_with_its_button(
    live_site, browser, provider, upstream, user
):
    page = await browser.new_page(viewport={"width": 1280, "height": 760})
    page.on("dialog", lambda dialog: dialog.accept())
    await sign_in_to_provider_keys(page, live_site)
    await save_key(page, FIRST_KEY)
    row = page.locator("#keys-body tr", has_text="byo-openai")
    await expect(row.locator(".status")).to_have_text("Valid", timeout=30_000)

    # The administrator points the provider at another host (another port).
    moved = f"http://127.0.0.1:{free_port()}"
    provider.base_url = moved + "/v1"
    await sync_to_async(provider.save)()
    await page.reload()

    await expect(row.locator(".status")).to_have_text("Paused", timeout=30_000)
    await expect(row.locator(".status-detail")).to_contain_text(
        f"moved the provider byo-openai from {upstream.base_url}"
    )
    await row.get_by_role("button", name=f"Confirm that your byo-openai key may be sent to {moved}").click()

    await expect(row.locator(".status")).to_have_text("Valid", timeout=30_000)
    await expect(row.get_by_role("button", name=re.compile("Confirm that"))).to_have_count(0)
    assert (await stored(user)).confirmed_origin == moved
    await assert_no_key_in_page(page, FIRST_KEY)
    await page.close()
