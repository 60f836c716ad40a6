"""The usage pages: each user's spend per day, per model and per operation and what is left of their limits,
staff's view of everyone, and both in a real browser (Debian's Chromium through Playwright), screenshotted."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import Client
from playwright.async_api import expect

from billing.models import BudgetPeriod, UserPlan
from billing.selectors import usage_breakdown, usage_daily
from billing.services.budgets import api_key_limits_set
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from billing.services.rollups import daily_usage_rebuild
from tests.conftest import LiveServer
from tests.factories import UsageRecordFactory, UserFactory

# "Today", "this month" and "the last 30 days" are checked where they are easiest to get wrong.
pytestmark = pytest.mark.period_instants


def days_ago(days: int, hour: int = 12) -> datetime:
    now = datetime.now(UTC)
    return (now - timedelta(days=days)).replace(hour=hour if days else min(now.hour, 23), minute=0)


# Ada's spend: (days ago, model, provider, cost, prompt tokens, completion tokens, operation).
ADA_SPEND = [
    (3, "claude-test", "fake-anthropic", Decimal("2.50"), 1200, 800, "messages"),
    (10, "gpt-test", "fake-openai", Decimal("0.40"), 300, 200, "chat"),
    (0, "gpt-test", "fake-openai", Decimal("1.00"), 150, 50, "responses"),
    (0, "gpt-test", "fake-openai", Decimal("0.25"), 100, 50, "responses"),
]


def spent_this_month() -> str:
    """Ada's spend in the current UTC calendar month, worked out from the dates alone: on the 1st–10th the
    spend of 3 and 10 days ago belongs to the month before."""
    now = datetime.now(UTC)
    month = sum(
        (
            cost
            for days, _, _, cost, *_ in ADA_SPEND
            if (days_ago(days).year, days_ago(days).month) == (now.year, now.month)
        ),
        Decimal(0),
    )
    return f"${month:.2f}"


@pytest.fixture
def ada(plans):
    """Ada (Pro, with her own $10 monthly budget) spent $2.50 three days ago, $0.40 ten days ago, $1.25 today."""
    user = UserFactory(username="ada", email="ada@example.com")
    plan_assign(user=user, plan=plans["Pro"])
    UserPlan.objects.filter(user=user).update(monthly_budget_usd=Decimal("10"))
    key = api_key_create(user=user, name="notebook").api_key
    api_key_limits_set(api_key=key, budget_usd=Decimal("5"), budget_period=BudgetPeriod.TOTAL)
    for days, model, provider, cost, prompt, completion, operation in ADA_SPEND:
        UsageRecordFactory(
            user=user,
            api_key=key,
            created_at=days_ago(days),
            operation=operation,
            model_name=model,
            provider_name=provider,
            cost=cost,
            prompt_tokens=prompt,
            completion_tokens=completion,
        )
    for days in (3, 10):
        daily_usage_rebuild(day=days_ago(days).date())
    # Someone else's spend shows on the staff page only.
    UsageRecordFactory(user=UserFactory(username="grace"), created_at=days_ago(1), cost=Decimal("7.00"))
    daily_usage_rebuild(day=days_ago(1).date())
    return user


@pytest.mark.django_db
def test_daily_spend_is_the_rollup_plus_todays_ledger(ada):
    today = datetime.now(UTC).date()
    days = usage_daily(days=30, today=today, user_id=ada.pk)
    assert len(days) == 30 and days[-1].day == today
    spent = {d.day: d.cost for d in days if d.cost}
    assert spent == {
        today - timedelta(days=10): Decimal("0.40"),
        today - timedelta(days=3): Decimal("2.50"),
        today: Decimal("1.25"),
    }
    by_model = usage_breakdown(by="model", days=30, today=today, user_id=ada.pk)
    assert [(s.label, s.requests, s.tokens, s.cost) for s in by_model] == [
        ("claude-test", 1, 2000, Decimal("2.50")),
        ("gpt-test", 3, 850, Decimal("1.65")),
    ]
    assert [s.label for s in usage_breakdown(by="user", days=30, today=today)] == ["grace", "ada"]


def chart_data(html: str, chart_id: str) -> dict:
    """The figures a chart of the page is drawn from (its json_script), as the page's script reads them."""
    found = re.search(rf'<script id="chart-{chart_id}-data" type="application/json">(.*?)</script>', html, re.S)
    assert found, f"no data for the {chart_id} chart"
    return json.loads(found[1])


@pytest.mark.django_db
def test_the_usage_page_shows_spend_and_what_is_left(ada):
    client = Client()
    assert client.get("/usage/").status_code == 302  # login first
    client.force_login(ada)

    page = client.get("/usage/")

    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="spent-30d">$4.15<' in html and 'id="spent-today">$1.25<' in html
    # Ada's own monthly budget: only this month's part of the 30 days' spend.
    assert f"<strong>{spent_this_month()}</strong> of $10.00 used this month" in html
    assert "of 100,000 tokens used today" in html  # Pro's daily quota
    assert "<strong>$4.15</strong> of $5.00 used in total" in html  # the key's total budget
    daily = chart_data(html, "daily")  # what the daily chart draws: a label on each day with spend
    assert [label for label in daily["value_labels"] if label] == ["$0.40", "$2.50", "$1.25"]
    assert daily["labels"][-1] == f"{datetime.now(UTC):%b} {datetime.now(UTC).day}"  # today, last
    assert chart_data(html, "models")["labels"] == ["claude-test", "gpt-test"]
    # Per operation, from the rollup (3 and 10 days ago) and today's ledger rows alike.
    operations = chart_data(html, "operations")
    assert (operations["labels"], operations["value_labels"]) == (
        ["Anthropic messages", "OpenAI responses", "Chat completion"],
        ["$2.50", "$1.25", "$0.40"],
    )
    assert '<tr><td>OpenAI responses</td><td class="num">2</td><td class="num">350</td>' in html
    assert "grace" not in html and "$7.00" not in html


@pytest.mark.django_db
def test_the_staff_page_is_for_staff_and_shows_everyone(ada):
    client = Client()
    client.force_login(ada)
    assert client.get("/usage/admin/").status_code == 403

    client.force_login(UserFactory(username="root", is_staff=True))
    html = client.get("/usage/admin/").content.decode()
    assert 'id="spent-30d">$11.15<' in html
    for text in ("grace", "ada", "fake-anthropic", "fake-openai", "claude-test"):
        assert text in html
    users = chart_data(html, "users")
    assert (users["labels"], users["value_labels"]) == (["grace", "ada"], ["$7.00", "$4.15"])
    assert chart_data(html, "providers")["labels"][:2] == ["fake-openai", "fake-anthropic"]
    operations = chart_data(html, "operations")  # grace's request was a chat completion
    assert (operations["labels"], operations["value_labels"]) == (
        ["Chat completion", "Anthropic messages", "OpenAI responses"],
        ["$7.40", "$2.50", "$1.25"],
    )
    assert '<tr><td>Chat completion</td><td class="num">2</td>' in html


# In a real browser


@pytest.fixture
def site(live_site) -> LiveServer:
    return live_site


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def drawn_labels(canvas) -> list[str]:
    """The category labels of the Chart.js chart drawn in ``canvas``."""
    return await canvas.evaluate("node => Chart.getChart(node).data.labels")


async def drawn_value_labels(canvas) -> list[str]:
    """The amounts written on the chart's bars (empty days have none)."""
    return await canvas.evaluate(
        """node => {
          const chart = Chart.getChart(node), labels = chart.data.datasets[0].valueLabels;
          return chart.getDatasetMeta(0).data.map((bar, i) => labels[i]).filter(Boolean);
        }"""
    )


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
async def test_dashboard_in_a_browser(site, browser, ada, artifacts_dir):
    staff = await sync_to_async(UserFactory)(username="root", is_staff=True)
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    cookie = {"name": settings.SESSION_COOKIE_NAME, "domain": "127.0.0.1", "path": "/"}
    await context.add_cookies([{**cookie, "value": await sync_to_async(session_cookie)(ada)}])
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    await page.goto(site.url + "/usage/")

    daily = page.locator("canvas.chart-columns")
    await expect(daily).to_have_attribute("data-drawn", "true")
    assert await drawn_value_labels(daily) == ["$0.40", "$2.50", "$1.25"]
    box = await daily.bounding_box()
    assert box["width"] > 800 and box["height"] > 200  # drawn at the card's width, not icon-sized
    await expect(page.locator("#spent-30d")).to_have_text("$4.15")
    assert await drawn_labels(page.locator("#chart-models")) == ["claude-test", "gpt-test"]
    operations = page.locator("#chart-operations")
    await expect(operations).to_have_attribute("data-drawn", "true")
    assert await drawn_labels(operations) == ["Anthropic messages", "OpenAI responses", "Chat completion"]
    assert await drawn_value_labels(operations) == ["$2.50", "$1.25", "$0.40"]
    await expect(page.locator(".meter-figures").first).to_contain_text(
        f"{spent_this_month()} of $10.00 used this month"
    )
    # The meter's fill and the bar chart's height are sized by usage.js (the CSP allows no style attribute).
    meter = page.locator(".meter").first
    fill, track = await meter.locator(".meter-fill").bounding_box(), await meter.locator(".meter-track").bounding_box()
    percent = int(await meter.locator(".meter-fill").get_attribute("data-percent"))
    assert abs(fill["width"] - max(track["width"] * min(percent, 100) / 100, 2)) < 2, (fill, track, percent)
    bars = await page.locator(".chart-canvas-bars").first.bounding_box()
    assert bars["height"] == 2 * 34 + 16  # two rows (billing/charts.py, BAR_ROW_PX)
    await page.screenshot(path=str(artifacts_dir / "dashboard.png"), full_page=True)

    await context.add_cookies([{**cookie, "value": await sync_to_async(session_cookie)(staff)}])
    await page.goto(site.url + "/usage/admin/")
    await expect(page.locator("#spent-30d")).to_have_text("$11.15")
    operations = page.locator("#chart-operations")
    await expect(operations).to_have_attribute("data-drawn", "true")
    assert await drawn_labels(operations) == ["Chat completion", "Anthropic messages", "OpenAI responses"]
    users = page.locator("canvas.chart-bars").last
    await expect(users).to_have_attribute("data-drawn", "true")
    assert await drawn_labels(users) == ["grace", "ada"]
    assert await drawn_value_labels(users) == ["$7.00", "$4.15"]
    await page.screenshot(path=str(artifacts_dir / "dashboard-admin.png"), full_page=True)
    assert errors == []
    await context.close()
