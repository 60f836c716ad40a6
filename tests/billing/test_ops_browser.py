"""The operations dashboard in a real browser (Debian's Chromium through Playwright) during a fault: model
``chat`` has two deployments, ``west`` (tried first) on a fake upstream answering 503 and ``east`` on a
healthy one. Requests through the gateway fail on ``west`` until its breaker opens, then ``east`` answers;
the dashboard must mark ``west`` failing (colour, sign and words), redraw itself on its timer without
reloading (a background task that begins to fail in between included), and fit a phone. Screenshots go to
test-artifacts/."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import Client
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from playwright.async_api import Page, expect

from accounts.roles import Role, role_set
from billing.models import UsageStatus
from billing.services.keys import api_key_create
from billing.services.task_runs import task_run_record
from providers.models import CatalogModel, Deployment
from tests.factories import ProviderFactory, UsageRecordFactory, UserFactory
from tests.waiting import wait_for_ledger_rows_async, wait_until_async

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PHONE = {"width": 360, "height": 740}
MESSAGES = [{"role": "user", "content": "hello [[words=5]]"}]


def build(upstreams) -> dict:
    west_cloud = ProviderFactory(name="west-cloud", base_url=upstreams["west"].base_url + "/v1")
    east_cloud = ProviderFactory(name="east-cloud", base_url=upstreams["east"].base_url + "/v1")
    chat = CatalogModel.objects.create(name="chat", strategy="priority", retries=0)
    prices = {"input_per_mtok": Decimal("0.15"), "output_per_mtok": Decimal("0.60")}
    Deployment.objects.create(model=chat, name="west", provider=west_cloud, upstream_id="fake-gpt-4o-mini", **prices)
    Deployment.objects.create(
        model=chat, name="east", provider=east_cloud, upstream_id="fake-gpt-4o-mini", priority=1, **prices
    )
    every_minute = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.MINUTES)
    PeriodicTask.objects.create(name="alerts", task="billing.tasks.ops_alerts_evaluate_task", interval=every_minute)
    alerts_ran(None)
    caller = UserFactory(username="caller")
    operator = UserFactory(username="operator")
    role_set(operator, Role.OPERATOR)
    client = Client()
    client.force_login(operator)
    return {
        "secret": api_key_create(user=caller, name="load").secret,
        "cookie": client.cookies[settings.SESSION_COOKIE_NAME].value,
    }


def alerts_ran(error: BaseException | None) -> None:
    task_run_record(
        task="billing.tasks.ops_alerts_evaluate_task", finished_at=timezone.now(), duration_seconds=0.5, error=error
    )


async def send(site, secret: str, count: int) -> list[int]:
    async with httpx.AsyncClient(base_url=site.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as http:
        statuses = []
        for _ in range(count):
            response = await http.post("/v1/chat/completions", json={"model": "chat", "messages": MESSAGES})
            statuses.append(response.status_code)
        return statuses


def refused_by_rate_limit() -> None:
    """A request the gateway refused, as the pipeline writes its row (the rate limit itself is
    tests/billing's; here only the dashboard's reading of the row matters)."""
    UsageRecordFactory(
        model_name="chat", status=UsageStatus.REJECTED, error_type="rate_limit_exceeded", cost=Decimal(0)
    )


async def charts_drawn(page: Page) -> None:
    for chart in ("errors", "latency", "rpm", "rejections", "operations", "spend"):
        await expect(page.locator(f"#chart-{chart}")).to_have_attribute("data-drawn", "1")


async def test_the_dashboard_marks_the_failing_deployment(live_site, browser, fake_upstreams, artifacts_dir):
    upstreams = fake_upstreams("west", "east")
    upstreams["west"].set_fault("status=503")
    setup = await sync_to_async(build)(upstreams)

    statuses = await send(live_site, setup["secret"], 12)
    # west fails until its breaker opens (5 consecutive failures), then east answers everything.
    assert statuses[:5] == [503] * 5 and statuses[5:] == [200] * 7, statuses
    await wait_for_ledger_rows_async(12, timeout=10)  # the ledger is written after the replies

    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    await context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": setup["cookie"], "url": live_site.url}])
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url))
    await page.clock.install()
    await page.goto(live_site.url + "/ops/")
    await charts_drawn(page)

    west = page.locator('tr[data-deployment="chat / west"]')
    east = page.locator('tr[data-deployment="chat / east"]')
    await expect(west).to_have_class("is-failing")
    await expect(west.locator(".state")).to_have_text("⚠ Failing: breaker open, 100 % errors")
    await expect(west.locator("td.num").nth(2)).to_have_text("100.0 %")
    await expect(east).not_to_have_class("is-failing")
    await expect(east.locator(".state")).to_have_text("✓ OK")
    await expect(page.locator("#total-failing")).to_have_text("1")
    alerts = page.locator('tr[data-task="alerts"]')
    await expect(alerts).not_to_have_class("is-failing")
    await expect(alerts.locator(".state")).to_have_text("✓ OK")
    await expect(page.locator("#total-tasks-attention")).to_have_text("0")
    # On the charts: west's bars in the danger colour, and its name with the warning sign (not colour alone).
    drawn = await page.locator("#chart-errors").evaluate(
        """canvas => {
          const chart = Chart.getChart(canvas), danger = getComputedStyle(document.documentElement)
            .getPropertyValue("--danger").trim();
          return { labels: chart.data.labels, data: chart.data.datasets[0].data,
                   danger: chart.data.datasets[0].backgroundColor.map((colour) => colour === danger) };
        }"""
    )
    assert drawn == {"labels": ["⚠ chat / west", "chat / east"], "data": [100, 0], "danger": [True, False]}
    # The requests per operation: all chat completions, on the chart and in its table.
    assert await page.locator("#chart-operations").evaluate("canvas => Chart.getChart(canvas).data.labels") == [
        "Chat completion"
    ]
    await expect(page.locator('#operations-body tr[data-operation="chat"] td').first).to_have_text("12")
    # Nothing refused yet: the table says so, and no empty chart stands above it.
    await expect(page.locator("#rejections-body")).to_have_text("No request refused in the last hour.")
    await expect(page.locator("#rejections-figure")).to_be_hidden()
    await page.screenshot(path=str(artifacts_dir / "ops-fault.png"), full_page=True)

    # Nothing from elsewhere: every request the page made went to the gateway itself.
    assert fetched and all(url.startswith(live_site.url) for url in fetched), fetched

    # The page redraws itself from /ops/data.json on its timer, without a reload.
    await page.evaluate("window.sameDocument = true")
    upstreams["west"].set_fault(None)
    assert await send(live_site, setup["secret"], 3) == [200] * 3
    await wait_for_ledger_rows_async(15, timeout=10)  # the ledger is written after the replies
    await sync_to_async(refused_by_rate_limit)()
    await sync_to_async(alerts_ran)(TimeoutError("the SMTP server did not answer"))
    await page.clock.run_for(15_500)
    await expect(page.locator("#main")).to_have_attribute("data-refreshes", "1")
    await expect(page.locator("#total-requests")).to_have_text("15")
    # A refusal came: its chart appears, drawn with it, and the table lists it.
    await expect(page.locator("#rejections-figure")).to_be_visible()
    assert await page.locator("#chart-rejections").evaluate(
        "canvas => [Chart.getChart(canvas).data.labels, Chart.getChart(canvas).data.datasets[0].data]"
    ) == [["Rate limit"], [1]]
    await expect(page.locator("#rejections-body tr")).to_have_text(["Rate limitrate_limit_exceeded1"])
    await expect(east.locator("td.num").first).to_have_text("10")
    await expect(page.locator('#operations-body tr[data-operation="chat"] td').first).to_have_text("16")
    await expect(page.locator("#chart-rpm")).to_have_attribute("data-drawn", "2")
    await expect(alerts).to_have_class("is-failing")
    await expect(alerts.locator(".state")).to_have_text("⚠ Failing: TimeoutError")
    await expect(page.locator("#total-tasks-attention")).to_have_text("1")
    await expect(page.locator("#total-tasks-attention")).to_have_class("stat-value stat-danger")
    assert await page.evaluate("window.sameDocument") is True
    assert sum("/ops/data.json" in url for url in fetched) == 1

    # On a phone: nothing wider than the screen; the tables scroll in their own boxes.
    await page.set_viewport_size(PHONE)
    # Chart.js redraws its canvases at the new width on its resize observer's next turn: wait for it.
    # Polled with evaluate, not wait_for_function, whose predicate is a string eval that the CSP refuses.
    await wait_until_async(
        lambda: page.evaluate(f"document.querySelector('#main').scrollWidth <= {PHONE['width']}"), "page fits a phone"
    )
    width = await page.evaluate("document.documentElement.scrollWidth")
    await page.screenshot(path=str(artifacts_dir / "ops-fault-phone.png"), full_page=True)
    assert width <= PHONE["width"]
    assert errors == []
    await context.close()
