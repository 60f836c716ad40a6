"""A plan's limit of 0 (or a user's own 0 over a plan without that limit) is a deliberate "none", not "unlimited":
requests per minute, tokens per minute or a daily token quota of 0 admit no request, a monthly budget of 0 admits
only models that cost nothing. The gateway answers each with a 429 saying which limit is 0, that the official SDKs do
not retry (``x-should-retry: false``), and one rejected ledger row; never a server error, never an answer. The admin
says so beside each field, where until 7 December it said only "empty: unlimited"."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from django.test import Client
from django.urls import reverse

from billing.models import Plan, UsageRecord
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.models import Provider
from tests.factories import ModelFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

REFUSALS = {
    "rpm": ("rate_limit_exceeded", "Your account admits no requests: its limit is 0 requests per minute."),
    "tpm": ("rate_limit_exceeded", "Your account admits no tokens: its limit is 0 tokens per minute."),
    "daily_token_quota": ("insufficient_quota", "the daily token quota of your plan (zero) is 0 tokens"),
    "monthly_budget_usd": ("insufficient_quota", "the monthly budget of your plan (zero) is $0.00"),
}


def completion(gateway, model: str = "gpt-test") -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {gateway.key}"},
        timeout=20,
    )


@pytest.mark.parametrize("where", ["plan", "the user's own"])
@pytest.mark.parametrize("field", list(REFUSALS))
def test_a_limit_of_zero_admits_nothing_and_says_so(gateway, field, where):
    on_plan = where == "plan"
    plan = Plan.objects.create(name="zero", allow_all_models=True, **({field: 0} if on_plan else {}))
    user_plan = plan_assign(user=gateway.user, plan=plan)
    if not on_plan:
        setattr(user_plan, field, 0)
        user_plan.save()

    response = completion(gateway)

    code, says = REFUSALS[field]
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == code and says in error["message"], error
    assert response.headers["x-should-retry"] == "false"
    row = wait_for_record(response.headers["x-request-id"])
    assert (row.status, row.error_type, row.cost) == ("rejected", code, Decimal(0))
    assert UsageRecord.objects.count() == 1


def test_a_monthly_budget_of_zero_admits_a_model_that_costs_nothing(gateway):
    openai_provider = Provider.objects.get(name="fake-openai")
    ModelFactory(name="free", provider=openai_provider, input_per_mtok=Decimal(0), output_per_mtok=Decimal(0))
    plan_assign(user=gateway.user, plan=Plan.objects.create(name="zero", allow_all_models=True, monthly_budget_usd=0))

    assert completion(gateway, "free").status_code == 200
    assert completion(gateway, "gpt-test").status_code == 429


@pytest.mark.parametrize(
    ("page", "legend", "empty"),
    [
        ("admin:billing_plan_add", "Limits (empty: unlimited; 0: none)", "Empty: unlimited."),
        ("admin:billing_userplan_add", "0: none, whatever the plan says", "Empty: as the plan says."),
    ],
)
def test_the_admin_says_what_a_limit_of_zero_does(admin_user, page, legend, empty):
    client = Client()
    client.force_login(admin_user)

    html = client.get(reverse(page)).content.decode()

    assert legend in html
    assert f"{empty} Tokens a day, prompts and replies. 0: no request is admitted." in html
    assert f"{empty} 0: only models that cost nothing." in html
    assert html.count("0: no request is admitted.") == 3


@pytest.mark.parametrize("limit", ["rpm", "tpm"])
def test_a_keys_change_page_refuses_a_rate_limit_of_zero_as_its_add_page_does(admin_user, limit):
    """A key's own rate limit of 0 would be a key that can make no request: the add page, the API and the key
    service refused it, and until 7 December the change page saved it."""
    client = Client()
    client.force_login(admin_user)
    api_key = api_key_create(user=admin_user, name="app", rpm=60, tpm=10_000).api_key
    url = reverse("admin:billing_apikey_change", args=[api_key.pk])
    form = {"name": "app", "budget_period": "monthly", "rpm": "60", "tpm": "10000"}

    response = client.post(url, {**form, limit: "0"})

    assert response.status_code == 200
    assert list(response.context["adminform"].form.errors) == [limit]
    assert "A rate limit must be at least 1" in response.content.decode()
    api_key.refresh_from_db()
    assert (api_key.rpm, api_key.tpm) == (60, 10_000)
    assert client.post(url, {**form, limit: "1"}).status_code == 302
