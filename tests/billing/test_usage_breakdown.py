"""Spend by model and by provider lists models of the catalog only (issue 8, point 4).

A request for a mistyped, disabled or removed model is refused before any provider is chosen and leaves a
``rejected`` ledger row of $0 named after whatever the client typed. The usage pages and the usage summary
once listed each such name as a model with $0 spend. The rows stay in the ledger, its list and its
filters, and count as requests; they are no model.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
import time_machine
from django.test import Client
from rest_framework.test import APIClient

from billing.models import UsageRecord, UsageStatus
from billing.selectors import usage_breakdown
from billing.services.keys import api_key_create
from billing.services.rollups import daily_usage_rebuild
from tests.factories import ModelFactory, ProviderFactory, UsageRecordFactory, UserFactory
from tests.waiting import wait_for_record

NOW = datetime(2026, 11, 20, 15, 30, tzinfo=UTC)
TODAY = NOW.date()
TYPO = "gpt-tset"
RETIRED = "retired-model"


@pytest.fixture
def clock() -> Iterator[datetime]:
    with time_machine.travel(NOW, tick=False):
        yield NOW


def refused_for_its_model(user, model_name: str, created_at: datetime) -> UsageRecord:
    """The row the pipeline writes when the model name resolves to no model (see the pipeline test below)."""
    return UsageRecordFactory(
        user=user,
        created_at=created_at,
        status=UsageStatus.REJECTED,
        error_type="model_not_found",
        model_name=model_name,
        provider_name="",
        prompt_tokens=0,
        completion_tokens=0,
        cost=Decimal(0),
    )


@pytest.fixture
def ada(clock, db):
    """Ada spent $1.00 on gpt-test two days ago (rolled up) and $2.00 on claude-test and $0.50 on gpt-test
    today; one gpt-test request was refused over her budget; and she sent five requests naming no model."""
    user = UserFactory(username="ada")
    two_days_ago = NOW - timedelta(days=2)
    spend = [
        (two_days_ago, "gpt-test", "fake-openai", Decimal("1.00"), 100, 50),
        (NOW, "claude-test", "fake-anthropic", Decimal("2.00"), 300, 100),
        (NOW, "gpt-test", "fake-openai", Decimal("0.50"), 20, 10),
    ]
    for created_at, model, provider, cost, prompt, completion in spend:
        UsageRecordFactory(
            user=user,
            created_at=created_at,
            model_name=model,
            provider_name=provider,
            cost=cost,
            prompt_tokens=prompt,
            completion_tokens=completion,
        )
    # Refused for a real model (over budget): still that model's request.
    UsageRecordFactory(
        user=user,
        created_at=NOW,
        status=UsageStatus.REJECTED,
        error_type="budget_exceeded",
        model_name="gpt-test",
        provider_name="fake-openai",
        prompt_tokens=0,
        completion_tokens=0,
        cost=Decimal(0),
    )
    refused_for_its_model(user, TYPO, two_days_ago)
    refused_for_its_model(user, TYPO, NOW)
    refused_for_its_model(user, TYPO, NOW)
    refused_for_its_model(user, RETIRED, NOW)
    refused_for_its_model(user, "", NOW)  # a body without a model at all
    daily_usage_rebuild(day=two_days_ago.date())
    return user


def table(shares) -> list[tuple[str, int, int, Decimal]]:
    return [(share.label, share.requests, share.tokens, share.cost) for share in shares]


@pytest.mark.django_db
def test_spend_by_model_lists_only_models(ada):
    by_model = usage_breakdown(by="model", days=30, today=TODAY, user_id=ada.pk)

    assert table(by_model) == [
        ("claude-test", 1, 400, Decimal("2.00")),
        ("gpt-test", 3, 180, Decimal("1.50")),
    ]


@pytest.mark.django_db
def test_spend_by_provider_has_no_unknown_provider(ada):
    by_provider = usage_breakdown(by="provider", days=30, today=TODAY, user_id=ada.pk)

    assert table(by_provider) == [
        ("fake-anthropic", 1, 400, Decimal("2.00")),
        ("fake-openai", 3, 180, Decimal("1.50")),
    ]


@pytest.mark.django_db
def test_by_user_every_request_counts(ada):
    assert table(usage_breakdown(by="user", days=30, today=TODAY)) == [("ada", 9, 580, Decimal("3.50"))]


@pytest.mark.django_db
def test_the_usage_page_lists_only_models(ada):
    client = Client()
    client.force_login(ada)

    page = client.get("/usage/")

    assert page.status_code == 200
    assert [row.label for row in page.context["by_model"]] == ["claude-test", "gpt-test"]
    html = page.content.decode()
    assert TYPO not in html and RETIRED not in html and "(unknown)" not in html
    assert page.context["totals"].requests == "9"  # the refused requests were still made


@pytest.mark.django_db
def test_the_staff_page_lists_only_models_and_providers(ada):
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True))

    page = client.get("/usage/admin/")

    assert page.status_code == 200
    html = page.content.decode()
    assert "claude-test" in html and "fake-anthropic" in html
    assert TYPO not in html and RETIRED not in html and "(unknown)" not in html


@pytest.mark.django_db
def test_the_summary_lists_only_models_and_the_ledger_keeps_every_row(ada):
    client = APIClient()
    client.force_authenticate(ada)

    summary = client.get("/api/usage/summary/").json()

    assert [(m["model"], m["requests"], m["cost"]) for m in summary["by_model"]] == [
        ("claude-test", 1, "2.0000000000"),
        ("gpt-test", 3, "1.5000000000"),
    ]
    assert summary["total"]["requests"] == 9
    assert sum(day["requests"] for day in summary["by_day"]) == 9

    refused = client.get("/api/usage/", {"status": "rejected"}).json()["results"]
    assert sorted(row["model"] for row in refused) == sorted(["", RETIRED, TYPO, TYPO, TYPO, "gpt-test"])
    assert len(client.get("/api/usage/", {"model": TYPO}).json()["results"]) == 3
    assert UsageRecord.objects.filter(model_name=TYPO).count() == 3


@pytest.mark.django_db(transaction=True)
def test_requests_the_gateway_refuses_for_their_model_are_no_model(llmhub_server, fake_upstream):
    """Through the live gateway: the rows it writes for a mistyped and a disabled model are left out of
    spend by model, in today's ledger and once rolled up; the real model's spend is there."""
    provider = ProviderFactory(name="fake-openai", base_url=fake_upstream.base_url + "/v1")
    ModelFactory(name="gpt-test", provider=provider)
    ModelFactory(name=RETIRED, provider=provider, enabled=False)
    user = UserFactory(username="grace")
    key = api_key_create(user=user, name="tests").secret

    def chat(model: str) -> httpx.Response:
        return httpx.post(
            llmhub_server.url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "one two three"}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=20,
        )

    # Ticking: the live server's wall clock runs from here, its timeouts on the (unpinned) monotonic clock.
    with time_machine.travel(NOW, tick=True):
        answers = {model: chat(model) for model in ("gpt-test", TYPO, RETIRED)}
        assert [answers[model].status_code for model in ("gpt-test", TYPO, RETIRED)] == [200, 404, 404]
        rows = {model: wait_for_record(answer.headers["x-request-id"]) for model, answer in answers.items()}
        assert rows["gpt-test"].cost > 0
        for model in (TYPO, RETIRED):
            assert (rows[model].status, rows[model].model_name, rows[model].provider_name) == ("rejected", model, "")

        live = usage_breakdown(by="model", days=30, today=TODAY, user_id=user.pk)
        daily_usage_rebuild(day=TODAY)
        rolled = usage_breakdown(by="model", days=30, today=TODAY + timedelta(days=1), user_id=user.pk)

    expected = [
        ("gpt-test", 1, rows["gpt-test"].prompt_tokens + rows["gpt-test"].completion_tokens, rows["gpt-test"].cost)
    ]
    assert table(live) == expected
    assert table(rolled) == expected
