"""Every page at phone width (360 px) in a real browser (Debian's Chromium through Playwright), with data
that is hard to fit: a long code line, a wide table, long model and key names, a chart with many rows.

A page fits when ``document.documentElement.scrollWidth`` is at most the viewport's width: what is wider
than the screen (code, tables) scrolls inside its own box, not the page. Each page is screenshotted into
test-artifacts/ at phone and desktop width. Loading a page must not cost a failed request either (the
browser asks for /favicon.ico on its own).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import Client
from django.utils import timezone
from playwright.async_api import Browser, BrowserContext, Page, Response, expect

from billing.models import BudgetPeriod, Plan
from billing.services.budgets import api_key_limits_set
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from billing.services.rollups import daily_usage_rebuild
from chat.models import Conversation, Message, MessageStatus, Role
from providers.fields import Secret
from providers.models import ByokMode, CredentialStatus, ProviderCredential
from tests.conftest import LiveServer
from tests.factories import ModelFactory, ProviderFactory, UsageRecordFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PHONE = {"width": 360, "height": 740}
DESKTOP = {"width": 1280, "height": 860}

LONG_LINE = "result = " + " + ".join(f"compute_the_{n}th_intermediate_value(argument_{n})" for n in range(12))
WIDE_REPLY = f"""Here is the whole pipeline in one line:

```python
{LONG_LINE}
```

| model | context window | input $/Mtok | output $/Mtok | cached input $/Mtok | notes |
|---|---|---|---|---|---|
| claude-3-5-sonnet-20241022-long-context | 200000 | 3.00 | 15.00 | 0.30 | the default for long documents |

See https://example.com/a/very/long/path/that/does/not/break/anywhere/by/itself/at/all/0123456789abcdef
"""
LONG_MODELS = ("claude-3-5-sonnet-20241022-long-context", "gpt-4o-mini-2024-07-18-with-a-long-suffix", "o3-mini-high")


def seed(user) -> Conversation:
    """A conversation with wide content, keys with long names and limits, and a month of usage."""
    provider = ProviderFactory(name="fake-openai-mobile")
    ModelFactory(name=LONG_MODELS[0], provider=provider)
    plan = Plan.objects.create(
        name="Team with a long plan name", allow_all_models=True, daily_token_quota=100_000, rpm=600, tpm=100_000
    )
    plan_assign(user=user, plan=plan)
    user.billing_plan.monthly_budget_usd = Decimal("25")
    user.billing_plan.save()
    keys = [api_key_create(user=user, name=name).api_key for name in ("laptop", "continuous-integration-nightly")]
    own_provider = ProviderFactory(name="bring-your-own-openai-account", byok=ByokMode.OPTIONAL)
    own_key = "sk-mobile-own-key-0123456789abcdefWXYZ"
    ProviderCredential.objects.create(
        owner=user,
        provider=own_provider,
        api_key=own_key,
        hint=Secret(own_key).hint,
        label="personal account, billed to my card",
        status=CredentialStatus.INVALID,
        status_detail="bring-your-own-openai-account refused the key sk-…WXYZ: it is not a valid API key (wrong key).",
    )
    api_key_limits_set(api_key=keys[1], budget_usd=Decimal("5"), budget_period=BudgetPeriod.TOTAL)

    conversation = Conversation.objects.create(owner=user, title="One very long line", model_name=LONG_MODELS[0])
    Message.objects.create(
        conversation=conversation,
        role=Role.USER,
        content="Put it on one line: " + "averyveryverylongwordwithoutanyspaces" * 4,
    )
    Message.objects.create(
        conversation=conversation,
        role=Role.ASSISTANT,
        content=WIDE_REPLY,
        model_name=LONG_MODELS[0],
        provider_name=provider.name,
        request_id="req_wide_reply",
        usage_record_id="req_wide_reply",
        status=MessageStatus.CANCELLED,
    )
    UsageRecordFactory(  # a long usage line under the reply
        request_id="req_wide_reply",
        user=user,
        model_name=LONG_MODELS[0],
        provider_name=provider.name,
        prompt_tokens=123_456,
        completion_tokens=65_432,
        cost=Decimal("12.3456789"),
        usage_estimated=True,
    )

    now = timezone.now()
    grace = UserFactory(username="grace.hopper.with.a.long.username")
    for day in range(0, 30, 2):
        for n, model in enumerate(LONG_MODELS):
            UsageRecordFactory(
                user=user if n < 2 else grace,
                api_key=keys[n % 2] if n < 2 else None,
                created_at=now - timedelta(days=day),
                model_name=model,
                provider_name=provider.name,
                cost=Decimal("1.2345") * (n + 1),
                prompt_tokens=12_000 + day,
                completion_tokens=3_400,
            )
    for day in range(1, 30):
        daily_usage_rebuild(day=(now - timedelta(days=day)).date())
    return conversation


@pytest.fixture
def ada(live_site, fake_upstream):
    return UserFactory(username="ada", is_staff=True)


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def signed_in(browser: Browser, site: LiveServer, user) -> BrowserContext:
    context = await browser.new_context(viewport=PHONE)
    value = await sync_to_async(session_cookie)(user)
    await context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": value, "url": site.url}])
    return context


@contextlib.asynccontextmanager
async def chat_on_a_phone(browser: Browser, site: LiveServer, user) -> AsyncIterator[Page]:
    """The chat page, ``user`` signed in, on a 375 px wide screen, its socket open; closed afterwards."""
    context = await signed_in(browser, site, user)
    try:
        page = await context.new_page()
        await page.set_viewport_size({"width": 375, "height": 812})
        await page.goto(site.url + "/")
        await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
        yield page
    finally:
        await context.close()


def failed_requests(page: Page) -> list[str]:
    failed: list[str] = []

    def check(response: Response) -> None:
        if response.status >= 400:
            failed.append(f"{response.status} {response.url}")

    page.on("response", check)
    return failed


async def scroll_width(page: Page) -> int:
    return await page.evaluate("document.documentElement.scrollWidth")


# The page's own scrolling boxes (the main column, the chat's messages) must not scroll sideways either:
# that is the page scrolling, only hidden from the document's width.
SIDEWAYS_JS = """() => [...document.querySelectorAll("#main, .messages")]
  .filter((node) => node.scrollWidth > node.clientWidth)
  .map((node) => `#${node.id || node.className}: ${node.scrollWidth} px in ${node.clientWidth} px`)"""


# The outermost elements that stick out to the right of the viewport: what to fix when a page is too wide.
OVERFLOWING_JS = """() => {
  const width = document.documentElement.clientWidth;
  const name = (node) => node.tagName.toLowerCase() + (node.id ? "#" + node.id : "")
    + [...node.classList].map((c) => "." + c).join("");
  return [...document.body.querySelectorAll("*")]
    .filter((node) => node.getBoundingClientRect().right > width + 0.5)
    .filter((node) => !(node.parentElement.getBoundingClientRect().right > width + 0.5))
    .map((node) => `${name(node)} in ${name(node.parentElement)} to ${node.getBoundingClientRect().right} px`);
}"""


async def check_page(page: Page, name: str, artifacts_dir, ready) -> None:
    """At phone width the page fits; screenshots at both widths."""
    await page.set_viewport_size(PHONE)
    await ready()
    width = await scroll_width(page)
    await page.screenshot(path=str(artifacts_dir / f"mobile-{name}.png"), full_page=True)
    if width > PHONE["width"]:
        culprits = await page.evaluate(OVERFLOWING_JS)
        pytest.fail(f"{name}: the page is {width} px wide at {PHONE['width']} px; too wide: {culprits}")
    assert await page.evaluate(SIDEWAYS_JS) == [], name
    await page.set_viewport_size(DESKTOP)
    await page.screenshot(path=str(artifacts_dir / f"desktop-{name}.png"), full_page=True)
    assert await scroll_width(page) <= DESKTOP["width"]
    await page.set_viewport_size(PHONE)


async def scrolls_inside(page: Page, selector: str) -> None:
    """The wide thing is really wider than the screen, and scrolls inside its own box."""
    box = page.locator(selector).first
    await expect(box).to_be_visible()
    sizes = await box.evaluate("node => [node.scrollWidth, node.clientWidth, getComputedStyle(node).overflowX]")
    scroll, client, overflow = sizes
    assert scroll > PHONE["width"] and client < PHONE["width"] and overflow in ("auto", "scroll"), (selector, sizes)


async def chat_ready(page: Page) -> None:
    await expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    await expect(page.locator(".conv-item")).to_have_count(1)


async def conversation_ready(page: Page) -> None:
    await chat_ready(page)
    await expect(page.locator(".message-footer .usage")).to_have_text("≈ 123456 + 65432 tokens · $12.3456789")
    await expect(page.locator(".code-block pre code.hljs")).to_have_count(1)
    await scrolls_inside(page, ".code-block pre code")  # highlight.js makes the code its scroll box
    await scrolls_inside(page, ".message-body table")


async def sidebar_open(page: Page) -> None:
    await conversation_ready(page)
    await page.get_by_role("button", name="Show conversations").click()
    await expect(page.locator("#sidebar")).to_be_in_viewport()
    await page.wait_for_timeout(300)  # the slide-in transition


async def keys_ready(page: Page) -> None:
    await expect(page.locator("#keys-body tr")).to_have_count(2)
    await scrolls_inside(page, ".table-wrap")


async def provider_keys_ready(page: Page) -> None:
    await expect(page.locator("#keys-body tr .status")).to_have_text("Invalid")
    await expect(page.locator("#key-provider option")).to_have_count(1)
    await scrolls_inside(page, ".table-wrap")


async def usage_ready(page: Page) -> None:
    await expect(page.locator("canvas.chart-columns")).to_have_attribute("data-drawn", "true")
    # Two models' rows, then the one operation's (chat completions) of the table per operation.
    await expect(page.locator(".usage-table tbody tr")).to_have_count(3)
    await scrolls_inside(page, ".chart-scroll")
    # The daily chart starts scrolled to its end: today's column (Chart.js's last bar) is in the visible part
    # of its box.
    shown = await page.locator("canvas.chart-columns").evaluate(
        """node => {
          const today = Chart.getChart(node).getDatasetMeta(0).data.at(-1);
          const canvas = node.getBoundingClientRect(), box = node.closest(".chart-scroll").getBoundingClientRect();
          const left = canvas.left + today.x - today.width / 2, right = canvas.left + today.x + today.width / 2;
          return left >= box.left && right <= box.right;
        }"""
    )
    assert shown, "today's column is scrolled out of view"


async def usage_admin_ready(page: Page) -> None:
    # By provider, by model, by user and by operation; the operations' table (one row) and the top users' (two).
    await expect(page.locator("canvas.chart-bars[data-drawn]")).to_have_count(4)
    await expect(page.locator(".usage-table tbody tr")).to_have_count(3)


async def ops_ready(page: Page) -> None:
    await expect(page.locator("#chart-errors")).to_have_attribute("data-drawn", "1")
    await expect(page.locator("#deployments-body tr")).to_have_count(1)
    await scrolls_inside(page, ".table-wrap")


async def experiments_ready(page: Page) -> None:
    await expect(page.get_by_role("heading", name="Experiments", exact=True)).to_be_visible()
    await expect(page.locator(".empty-note")).to_be_visible()


async def menu_open(page: Page) -> None:
    """The top bar's links and "Sign out" are in its menu, inside the screen."""
    menu = page.get_by_role("button", name="Menu")
    await menu.click()
    await expect(menu).to_have_attribute("aria-expanded", "true")
    for link in ("Chat", "API keys", "Provider keys", "Usage", "Admin"):
        await expect(page.get_by_role("link", name=link, exact=True)).to_be_in_viewport(ratio=1)
    await expect(page.get_by_role("button", name="Sign out")).to_be_in_viewport(ratio=1)


async def login_ready(page: Page) -> None:
    await expect(page.get_by_role("button", name="Sign in")).to_be_visible()


# name: (path, signed in, wait until the page is ready and check what is special to it)
PAGES: dict[str, tuple[str, bool, Callable[[Page], Awaitable[None]]]] = {
    "chat-empty": ("/", True, chat_ready),
    "chat": ("/c/{conversation}/", True, conversation_ready),
    "chat-sidebar": ("/c/{conversation}/", True, sidebar_open),
    "keys": ("/keys/", True, keys_ready),
    "provider-keys": ("/provider-keys/", True, provider_keys_ready),
    "usage": ("/usage/", True, usage_ready),
    "usage-admin": ("/usage/admin/", True, usage_admin_ready),
    "experiments": ("/experiments/", True, experiments_ready),
    "ops": ("/ops/", True, ops_ready),
    "menu": ("/keys/", True, menu_open),
    "login": ("/accounts/login/", False, login_ready),
}


@pytest.mark.parametrize("name", PAGES)
async def test_the_page_fits_a_phone(name, live_site, browser, ada, artifacts_dir):
    path, signed_in_page, ready = PAGES[name]
    conversation = await sync_to_async(seed)(ada)
    context = await (signed_in(browser, live_site, ada) if signed_in_page else browser.new_context(viewport=PHONE))
    page = await context.new_page()
    failed = failed_requests(page)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(live_site.url + path.format(conversation=conversation.pk))
        await check_page(page, name, artifacts_dir, lambda: ready(page))
        assert failed == []
        assert errors == []
    finally:
        await context.close()


async def test_sign_out_from_the_phone_menu(live_site, browser, ada):
    context = await signed_in(browser, live_site, ada)
    page = await context.new_page()
    await page.goto(live_site.url + "/keys/")
    sign_out = page.get_by_role("button", name="Sign out")
    await expect(sign_out).to_be_hidden()
    await menu_open(page)
    await page.keyboard.press("Escape")
    await expect(sign_out).to_be_hidden()
    await expect(page.get_by_role("button", name="Menu")).to_be_focused()
    await page.get_by_role("button", name="Menu").click()
    await sign_out.click()
    await expect(page).to_have_url(live_site.url + "/accounts/login/")
    await context.close()


async def test_the_favicon(live_site, browser):
    page = await browser.new_page()
    failed = failed_requests(page)
    await page.goto(live_site.url + "/accounts/login/")
    icon = await page.locator('link[rel="icon"]').get_attribute("href")
    async with httpx.AsyncClient(base_url=live_site.url, follow_redirects=True) as client:
        linked = await client.get(icon)
        legacy = await client.get("/favicon.ico")  # what browsers ask for by themselves, on pages without a link
    assert linked.status_code == 200 and linked.headers["content-type"] == "image/svg+xml"
    assert legacy.status_code == 200 and legacy.content == linked.content
    assert failed == []
    await page.close()


async def test_the_top_bar_keeps_each_link_on_one_line_between_phone_and_desktop(live_site, browser):
    """Just above the width where the links fold into the menu (980 px), and wider: a staff user's seven
    links and a long user name (which gives way with an ellipsis) still fit, each link on one line."""
    user = await sync_to_async(UserFactory)(username="grace.hopper.with.a.long.username", is_staff=True)
    context = await signed_in(browser, live_site, user)
    page = await context.new_page()
    await page.goto(live_site.url + "/provider-keys/")
    for width in (981, 1024, 1280):
        await page.set_viewport_size({"width": width, "height": 600})
        heights = await page.evaluate(
            """() => [...document.querySelectorAll(".topnav a, .signout .btn")].map(
                 (node) => [node.textContent.trim(), node.getBoundingClientRect().height])"""
        )
        single_line = await page.evaluate(
            """() => [...document.querySelectorAll(".topnav a, .signout .btn")].every((node) => {
                 const style = getComputedStyle(node);
                 const line = parseFloat(style.lineHeight) || parseFloat(style.fontSize) * 1.6;
                 return node.getBoundingClientRect().height < 2 * line;
               })"""
        )
        assert single_line, (width, heights)
        assert await scroll_width(page) <= width
    await context.close()


# Each stat tile's figure, and whether its text stays inside its tile and the tile inside the screen.
TILE_FIGURES_JS = """() => [...document.querySelectorAll(".stat")].map((tile) => {
  const value = tile.querySelector(".stat-value");
  const text = document.createRange();
  text.selectNodeContents(value);
  const box = tile.getBoundingClientRect();
  return [
    value.textContent.trim(),
    text.getBoundingClientRect().right <= box.right && box.right <= document.documentElement.clientWidth,
  ];
})"""


@pytest.mark.parametrize("path", ["/ops/", "/usage/", "/usage/admin/"])
async def test_a_small_amount_with_many_decimals_stays_inside_its_tile(path, live_site, browser, ada):
    """Amounts under a dollar are shown with as many decimals as they need ($0.0493221751): on the
    operations dashboard's five tiles a row such a figure ran past its tile's edge, and on a phone's two
    tiles a row it pushed the tiles past the screen's."""

    def spend() -> None:
        UsageRecordFactory(user=ada, cost=Decimal("0.0493221751"), created_at=timezone.now() - timedelta(minutes=5))

    await sync_to_async(spend)()
    context = await signed_in(browser, live_site, ada)
    page = await context.new_page()
    try:
        await page.goto(live_site.url + path)
        for viewport in (DESKTOP, PHONE):
            await page.set_viewport_size(viewport)
            tiles = await page.evaluate(TILE_FIGURES_JS)
            assert any(figure == "$0.0493221751" for figure, _ in tiles), tiles
            assert all(inside for _, inside in tiles), (viewport, tiles)
    finally:
        await context.close()


async def test_the_chat_page_takes_long_names_at_375_px(live_site, browser, ada, fake_upstream, artifacts_dir):
    """On a 375 px screen, with a long model name (of a model that reasons: its effort control shares the toolbar),
    a long provider name and long conversation titles, the page does not scroll sideways and the model picker, the
    composer and the conversation list's buttons are on the screen. The reply's line naming its model and provider
    ran past the screen: the provider's badge did not wrap, and the conversation scrolled sideways."""
    model = "anthropic.claude-3-5-sonnet-20241022-v2:0-with-an-extra-long-deployment-suffix"
    titles = ("Planning the quarterly marketing campaign for the north European region, budget and timeline", "x" * 120)

    def conversations() -> None:
        provider = ProviderFactory(
            name="openai-compatible-gateway-of-the-research-team", base_url=fake_upstream.base_url + "/v1"
        )
        ModelFactory(name=model, provider=provider, supports_reasoning=True)
        for title in titles:
            Conversation.objects.create(owner=ada, title=title, model_name=model)

    await sync_to_async(conversations)()
    async with chat_on_a_phone(browser, live_site, ada) as page:
        for control in ("#model-picker", "#reasoning-effort", "#prompt", "#send"):
            await expect(page.locator(control)).to_be_in_viewport(ratio=1)
        await page.locator("#prompt").fill("Plan it [[words=30]]")
        await page.locator("#prompt").press("Enter")
        reply = page.locator(".message.assistant").last
        await expect(reply).to_have_attribute("data-status", "complete", timeout=15_000)
        await expect(reply.locator(".badge")).to_have_text("openai-compatible-gateway-of-the-research-team")
        await page.screenshot(path=str(artifacts_dir / "mobile-375-chat-long-names.png"))
        assert await scroll_width(page) <= 375, await page.evaluate(OVERFLOWING_JS)
        assert await page.evaluate(SIDEWAYS_JS) == []

        await page.get_by_role("button", name="Show conversations").click()
        await expect(page.locator("#sidebar")).to_be_in_viewport()
        await page.wait_for_timeout(300)  # the slide-in transition
        for title in titles:
            item = page.locator(".conv-item").filter(has_text=title[:20])
            for button in ("Rename", "Delete"):
                await expect(item.get_by_role("button", name=re.compile(f"^{button}"))).to_be_in_viewport(ratio=1)
        await page.screenshot(path=str(artifacts_dir / "mobile-375-chat-long-titles.png"))
        assert await scroll_width(page) <= 375, await page.evaluate(OVERFLOWING_JS)


async def test_the_toolbars_provider_badge_cut_at_375_px_ends_with_an_ellipsis_and_names_it_whole(
    live_site, browser, ada, fake_upstream
):
    """On a 375 px screen the toolbar's provider badge, cut at its room, was cut with no ellipsis (the badge is
    inline-flex, whose text text-overflow does not cut), and its title said only "Provider": the name could not be
    read in full. It ends with an ellipsis, and its title is the provider's whole name, for the model chosen."""
    long_name, other = "openai-compatible-gateway-of-the-research-team", "second-provider-with-a-long-enough-name"

    def models() -> None:
        for name in (long_name, other):
            provider = ProviderFactory(name=name, base_url=fake_upstream.base_url + "/v1")
            ModelFactory(name=f"model-of-{name}", provider=provider)

    await sync_to_async(models)()
    async with chat_on_a_phone(browser, live_site, ada) as page:
        badge = page.locator("#provider-badge")
        for model, provider in ((f"model-of-{long_name}", long_name), (f"model-of-{other}", other)):
            await page.locator("#model-picker").select_option(model)
            await expect(badge).to_have_text(provider)
            await expect(badge).to_have_attribute("title", f"Provider: {provider}")
            cut = await badge.evaluate(
                """(badge) => {
                    const style = getComputedStyle(badge);
                    return {cut: badge.scrollWidth > badge.clientWidth, overflow: style.textOverflow,
                            display: style.display, right: badge.getBoundingClientRect().right};
                }"""
            )
            assert cut["cut"] and cut["overflow"] == "ellipsis", cut
            assert cut["display"] not in ("flex", "inline-flex") and cut["right"] <= 375, cut  # text-overflow acts
