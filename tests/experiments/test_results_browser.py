"""The results page of the demo experiment in a real browser (Debian's Chromium through Playwright) against
a live llmhub: from the index to the page, the three charts drawn by Chart.js (canvases with pixels on
them, holding the figures the page embeds), a full-page screenshot in test-artifacts/, and the winner
promoted with its button (after the confirmation)."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import Client
from playwright.async_api import expect

from accounts.roles import Role, role_set
from chat.management.commands.demo_setup import demo_catalog_load
from experiments.assignment import assignment_cache
from experiments.demo import experiments_demo_install
from experiments.models import Experiment
from tests.factories import UserFactory
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 360, "height": 780}
CHARTS = ("chart-primary", "chart-cost-per-positive", "chart-daily")

# What a canvas holds once Chart.js has drawn on it: its chart's data, and how many of its pixels are not
# transparent (an undrawn canvas has none).
CANVAS_STATE = """(canvas) => {
  const chart = window.Chart && window.Chart.getChart(canvas);
  const context = canvas.getContext("2d");
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) painted++;
  return {
    painted, width: canvas.width, height: canvas.height,
    labels: chart ? chart.data.labels : null,
    datasets: chart ? chart.data.datasets.map((d) => d.data) : null,
  };
}"""


def demo_experiment() -> Experiment:
    demo_catalog_load(east_url="http://127.0.0.1:28080", west_url="http://127.0.0.1:28082", environ={})
    experiment = experiments_demo_install()
    assignment_cache.invalidate()
    return experiment


def operator_session() -> str:
    user = UserFactory(username="olga")
    role_set(user, Role.OPERATOR)
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def test_the_demo_experiments_results_page_draws_its_charts(live_site, browser, artifacts_dir):
    experiment = await sync_to_async(demo_experiment)()
    context = await browser.new_context(viewport=DESKTOP)
    await context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": await sync_to_async(operator_session)(),
                "domain": "127.0.0.1",
                "path": "/",
            }
        ]
    )
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    await page.goto(live_site.url + "/experiments/")
    await page.get_by_role("link", name=experiment.name).first.click()

    await expect(page).to_have_url(f"{live_site.url}/experiments/{experiment.pk}/results/")
    await expect(page.locator("#winner")).to_contain_text("Winner: west")
    for chart_id in CHARTS:
        await expect(page.locator(f"#{chart_id}")).to_have_attribute("data-drawn", "true")
    embedded = json.loads(await page.locator("#experiment-charts").text_content())
    states = {chart_id: await page.locator(f"#{chart_id}").evaluate(CANVAS_STATE) for chart_id in CHARTS}
    for chart_id, state in states.items():
        assert state["width"] > 300 and state["height"] > 150, chart_id  # drawn at the card's size
        assert state["painted"] > 2000, chart_id  # bars, points, axes and labels: not a blank canvas
    primary = states["chart-primary"]
    assert primary["labels"] == ["east", "west"]
    assert primary["datasets"] == [
        [[low, high] for low, high in zip(embedded["primary"]["low"], embedded["primary"]["high"], strict=True)],
        embedded["primary"]["values"],
    ]
    assert states["chart-cost-per-positive"]["datasets"][1] == embedded["cost_per_positive"]["values"]
    assert states["chart-daily"]["labels"] == embedded["daily"]["days"] and len(embedded["daily"]["days"]) >= 21
    assert states["chart-daily"]["datasets"] == [s["requests"] for s in embedded["daily"]["variants"]]
    # The table says what the charts draw: west's positive rate and its verdict.
    west = page.locator('section[data-metric="positive_rate"] tr[data-variant="west"]')
    await expect(west.locator('[data-field="verdict"]')).to_have_text("Better")
    await page.screenshot(path=str(artifacts_dir / "experiment-results.png"), full_page=True)

    # On a phone the page fits its width: the wide tables scroll inside their own boxes, the charts shrink.
    await page.set_viewport_size(PHONE)
    # Chart.js redraws its canvases at the new width on its resize observer's next turn: wait for it.
    # Polled with evaluate, not wait_for_function, whose predicate is a string eval that the CSP refuses.
    await wait_until_async(
        lambda: page.evaluate(f"document.querySelector('#main').scrollWidth <= {PHONE['width']}"), "page fits a phone"
    )
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    await page.screenshot(path=str(artifacts_dir / "experiment-results-phone.png"), full_page=True)
    await page.set_viewport_size(DESKTOP)

    # Promote: a dismissed confirmation changes nothing; an accepted one promotes and says so.
    page.once("dialog", lambda dialog: dialog.dismiss())
    await page.get_by_role("button", name="Promote west").click()
    await expect(page.locator("#promoted")).to_have_count(0)
    page.once("dialog", lambda dialog: dialog.accept())
    await page.get_by_role("button", name="Promote west").click()
    await expect(page.locator(".flash")).to_contain_text("west promoted: it now serves 100 % of demo-gpt-4o-mini")
    await expect(page.locator("#promoted")).to_contain_text("west promoted")
    await page.screenshot(path=str(artifacts_dir / "experiment-results-promoted.png"), full_page=True)
    promoted = await sync_to_async(lambda: Experiment.objects.get(pk=experiment.pk).promoted_variant.name)()
    assert promoted == "west"
    assert errors == []
    await context.close()
