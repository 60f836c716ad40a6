"""The staff usage page's "spend per day" chart in a real browser (Debian's Chromium through Playwright): the
amounts written above the columns never run into each other, even when neighbouring days spent about the
same, at desktop and at phone width (where the chart scrolls in its box at its minimum width)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import Client
from django.utils import timezone
from playwright.async_api import expect

from billing.services.rollups import daily_usage_rebuild
from tests.factories import UsageRecordFactory, UserFactory
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 360, "height": 740}

# Every text drawn on a canvas, with its box as the browser measures it (implementation-independent: what
# the chart really draws, whichever code draws it).
RECORD_TEXT_JS = """(() => {
  const fillText = CanvasRenderingContext2D.prototype.fillText;
  window.drawnTexts = [];
  CanvasRenderingContext2D.prototype.fillText = function (text, x, y, ...rest) {
    const m = this.measureText(text), t = this.getTransform(), scale = window.devicePixelRatio || 1;
    const px = (x * t.a + t.e) / scale, py = (y * t.d + t.f) / scale;
    window.drawnTexts.push({
      canvas: this.canvas.id, text: String(text),
      left: px - m.actualBoundingBoxLeft, right: px + m.actualBoundingBoxRight,
      top: py - m.actualBoundingBoxAscent, bottom: py + m.actualBoundingBoxDescent,
    });
    return fillText.call(this, text, x, y, ...rest);
  };
})();"""

# The value labels of the last drawing of #chart-daily (texts inside its plot area, above the x axis), and the
# pairs of them whose boxes overlap.
OVERLAPS_JS = """() => {
  const canvas = document.getElementById("chart-daily"), chart = Chart.getChart(canvas);
  window.drawnTexts = [];
  chart.draw();
  const area = chart.chartArea;
  const labels = window.drawnTexts.filter((t) => t.canvas === "chart-daily"
    && t.left >= area.left && t.right <= area.right + 24 && t.bottom <= area.bottom);
  const overlaps = [], at = (t) => `${t.text} @${Math.round(t.left)},${Math.round(t.top)}`;
  labels.forEach((a, i) => labels.slice(i + 1).forEach((b) => {
    if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom) {
      overlaps.push(`${at(a)} / ${at(b)}`);
    }
  }));
  return { shown: labels.map((t) => t.text), overlaps };
}"""


def seed() -> str:
    """A month of about $10 a day, a few dimes apart from one day to the next: columns of about one height."""
    user = UserFactory(username="ada", is_staff=True)
    now = timezone.now()
    for day in range(30):
        cost = Decimal("10") + Decimal("0.35") * (day % 4) + Decimal("1.10") * (day % 3)
        UsageRecordFactory(user=user, created_at=now - timedelta(days=day), cost=cost)
    for day in range(1, 30):
        daily_usage_rebuild(day=(now - timedelta(days=day)).date())
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def test_the_daily_spend_labels_never_overlap(live_site, browser, artifacts_dir):
    cookie = await sync_to_async(seed)()
    context = await browser.new_context(viewport=DESKTOP)
    await context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": live_site.url}])
    await context.add_init_script(RECORD_TEXT_JS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(live_site.url + "/usage/admin/")
        await expect(page.locator("#chart-daily")).to_have_attribute("data-drawn", "true")
        today = await page.evaluate(
            "JSON.parse(document.getElementById('chart-daily-data').textContent).value_labels.at(-1)"
        )
        # The labels are thinned out where they do not fit, not dropped: at desktop width most columns keep
        # theirs, today's among them; at the chart's minimum width (a phone) a label is about two columns
        # wide, and about one in three fits. Every amount is in its column's tooltip too.
        for name, viewport, fewest in (("desktop", DESKTOP, 20), ("phone", PHONE, 8)):
            await page.set_viewport_size(viewport)
            # Polled with evaluate, not wait_for_function, whose predicate is a string eval the CSP refuses.
            await wait_until_async(
                lambda: page.evaluate(
                    "Math.abs(Chart.getChart(document.getElementById('chart-daily')).width"
                    " - document.getElementById('chart-daily').parentElement.clientWidth) < 2"
                ),
                "chart redrawn at the new width",
            )
            card = page.locator(".card", has=page.locator("#chart-daily"))
            await card.screenshot(path=str(artifacts_dir / f"usage-admin-daily-{name}.png"))
            drawn = await page.evaluate(OVERLAPS_JS)
            assert drawn["overlaps"] == [], (name, drawn["overlaps"])
            assert len(drawn["shown"]) >= fewest, (name, drawn["shown"])
            if name == "desktop":
                assert today in drawn["shown"], (today, drawn["shown"])
        assert errors == []
    finally:
        await context.close()
