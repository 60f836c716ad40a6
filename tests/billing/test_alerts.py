"""Budget alerts: 50 %, 80 % and 100 %, each once per period, by email and to a Slack-compatible webhook
(a real HTTP server started here), recorded in ``BudgetAlert``."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.core import mail

from billing.models import BudgetAlert, BudgetPeriod
from billing.services.alerts import Crossing, budget_alerts_raise
from billing.services.budgets import CounterRef, CounterSpec, api_key_limits_set
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.selectors import resolved_model
from tests.billing.conftest import FLAT_TOKEN, spend_settled
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.period_instants]

TOKEN = FLAT_TOKEN


@pytest.fixture
def account(plans, catalog):
    """Alice's key has a $0.01 monthly budget: 100 tokens of the flat model."""
    user = UserFactory(username="alice", email="alice@example.com")
    plan_assign(user=user, plan=plans["Enterprise"])
    api_key = api_key_create(user=user, name="ci").api_key
    api_key_limits_set(api_key=api_key, budget_usd=100 * TOKEN, budget_period=BudgetPeriod.MONTHLY)
    return {"user": user, "key": api_key, "flat": resolved_model(catalog["flat"])}


def alerts() -> list[tuple[int, list[str]]]:
    return list(BudgetAlert.objects.order_by("threshold").values_list("threshold", "channels"))


async def test_each_threshold_alerts_once_per_period_by_email_and_webhook(store, account, webhook):
    await spend_settled(account, "a", 40)
    assert mail.outbox == [] and webhook.received == []

    await spend_settled(account, "b", 15)  # 55 %
    await spend_settled(account, "c", 5)  # 60 %: 50 % already alerted
    assert len(mail.outbox) == 1 and len(webhook.received) == 1

    await spend_settled(account, "d", 40)  # 100 %: crosses 80 and 100 at once
    assert len(mail.outbox) == 3 and len(webhook.received) == 3
    assert await sync_to_async(alerts)() == [
        (50, ["email", "webhook"]),
        (80, ["email", "webhook"]),
        (100, ["email", "webhook"]),
    ]

    first = mail.outbox[0]
    assert first.to == ["alice@example.com"]
    assert first.subject.startswith(f"[llmhub] the monthly budget of API key {account['key'].prefix}… (ci) of alice")
    assert first.subject.endswith("is at 50%")
    assert "has reached 50%: $0.0055 of $0.01 used in the period that began" in first.body
    assert "Requests are refused" in mail.outbox[2].body
    assert set(webhook.received[0]) == {"text"}
    assert webhook.received[0]["text"].startswith("llmhub: the monthly budget of API key")
    assert "reached 100%: $0.01 of $0.01 used" in webhook.received[2]["text"]
    alert = await BudgetAlert.objects.aget(threshold=100)
    assert alert.sent_at is not None and alert.spent == 100 * TOKEN and alert.limit == 100 * TOKEN


async def test_raising_a_budget_after_its_100_percent_alert_re_arms_the_thresholds_now_ahead(store, account, webhook):
    """The user raises the budget they reached: the thresholds of the new budget that the spend has not reached
    alert again when it does, in the same period; those it is already past stay quiet."""
    await spend_settled(account, "a", 100)  # 100 %: crosses 50, 80 and 100 at once
    assert len(mail.outbox) == 3

    await sync_to_async(api_key_limits_set)(
        api_key=account["key"], budget_usd=200 * TOKEN, budget_period=BudgetPeriod.MONTHLY
    )
    await spend_settled(account, "b", 10)  # 55 % of the new budget: its 50 % was passed when it was raised
    assert len(mail.outbox) == 3
    await spend_settled(account, "c", 50)  # 80 % of the new budget
    assert len(mail.outbox) == 4 and mail.outbox[3].subject.endswith("is at 80%")
    assert "$0.016 of $0.02 used" in mail.outbox[3].body
    await spend_settled(account, "d", 40)  # 100 % of the new budget
    assert len(mail.outbox) == 5 and mail.outbox[4].subject.endswith("is at 100%")
    assert "$0.02 of $0.02 used" in mail.outbox[4].body
    assert len(webhook.received) == 5

    rows = await sync_to_async(list)(BudgetAlert.objects.order_by("pk").values_list("threshold", "limit"))
    assert rows == [(50, 100 * TOKEN), (80, 100 * TOKEN), (100, 100 * TOKEN), (80, 200 * TOKEN), (100, 200 * TOKEN)]


async def test_a_failing_webhook_is_retried(store, account, webhook):
    webhook.fail_next = 2
    await spend_settled(account, "big", 50)
    assert [entry["text"][:40] for entry in webhook.received] == ["llmhub: the monthly budget of API key sk"]
    assert await sync_to_async(alerts)() == [(50, ["email", "webhook"])]


async def test_without_a_webhook_only_email_is_sent(store, account, settings):
    settings.LLMHUB_ALERT_WEBHOOK_URL = ""
    await spend_settled(account, "big", 80)
    assert len(mail.outbox) == 2
    assert await sync_to_async(alerts)() == [(50, ["email"]), (80, ["email"])]


def crossing(user, period_start: datetime, threshold: int) -> Crossing:
    ref = CounterRef("user", user.pk, "cost", BudgetPeriod.MONTHLY, period_start)
    return Crossing(CounterSpec(ref, Decimal("10"), "the monthly budget"), threshold, Decimal("5"))


def test_the_same_threshold_fires_again_in_the_next_period_only():
    user = UserFactory(username="bob", email="bob@example.com")
    march, april = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)

    assert len(budget_alerts_raise(crossings=[crossing(user, march, 50)], user_id=user.pk)) == 1
    assert budget_alerts_raise(crossings=[crossing(user, march, 50)], user_id=user.pk) == []
    assert len(budget_alerts_raise(crossings=[crossing(user, april, 50)], user_id=user.pk)) == 1

    assert BudgetAlert.objects.count() == 2
    assert [m.subject for m in mail.outbox] == ["[llmhub] bob's monthly budget is at 50%"] * 2
    assert "in the period that began 2026-04-01" in mail.outbox[1].body


def test_concurrent_settlements_record_a_crossing_once():
    """Two processes settling at once may both see the crossing: the unique constraint keeps one."""
    user = UserFactory(username="carol", email="carol@example.com")
    march = datetime(2026, 3, 1, tzinfo=UTC)
    barrier = threading.Barrier(4)
    created: list[int] = []

    def settle_in_thread() -> None:
        from django.db import connection

        barrier.wait()
        created.append(len(budget_alerts_raise(crossings=[crossing(user, march, 80)], user_id=user.pk)))
        connection.close()

    threads = [threading.Thread(target=settle_in_thread) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(created) == [0, 0, 0, 1]
    assert BudgetAlert.objects.count() == 1 and len(mail.outbox) == 1
