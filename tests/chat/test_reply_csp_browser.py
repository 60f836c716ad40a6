"""The Content-Security-Policy (core/csp.py) as defence in depth on the chat page, in a real browser (Debian's
Chromium through Playwright): markup a model wrote that got past the Markdown sanitizing still runs no script.
"""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from tests.chat.test_browser import send, sign_in
from tests.factories import ModelFactory, ProviderFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# What a model might be made to write: an inline event handler and an inline script (no "]]" in it, which
# would end the fake upstream's directive).
HOSTILE_REPLY = (
    "<img src=\"/no-such-image.png\" onerror=\"window.pwned = 'handler'\"><script>window.pwned = 'script'</script>"
)


@pytest.fixture
def user(fake_upstream):
    provider = ProviderFactory(name="fake-openai-csp", base_url=fake_upstream.base_url + "/v1")
    ModelFactory(name="gpt-csp", provider=provider)
    return UserFactory(username="ada")


async def test_script_in_a_model_reply_does_not_run_even_past_the_sanitizer(live_site, browser, user):
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    await sign_in(page, live_site)

    await send(page, f"[[reply={HOSTILE_REPLY}]]")
    reply = page.locator(".message.assistant").last
    await expect(reply).to_have_attribute("data-status", "complete", timeout=15_000)
    body = reply.locator(".message-body")
    await expect(body).to_contain_text("onerror")  # the sanitizer shows the markup as text

    # As if the sanitizer had let it through: the reply's text parsed as HTML into the page, and its script
    # added as a script element.
    await body.evaluate(
        """(body) => {
            const markup = body.textContent;
            body.innerHTML = markup;
            const script = document.createElement("script");
            script.textContent = markup.match(/<script>(.*)<\\/script>/)[1];
            document.body.append(script);
        }"""
    )
    await expect(body.locator("img")).to_have_count(1)
    await page.wait_for_timeout(500)  # the image's error event and the script would have run by now

    assert await page.evaluate("window.pwned") is None
    refused = browser.take_csp_violations()
    assert any(re.search(r"inline event handler.*script-src", text) for text in refused), refused
    assert any(re.search(r"inline script.*script-src", text) for text in refused), refused
    await page.close()
