"""The cost calculator, ``/api/cost/estimate``: token counts (GET), or messages or a text completion's prompt (POST),
priced by the ledger's own function, per deployment of the model; and the ledger admin's breakdown of a row's cost."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from billing.models import Operation, UsageRecord
from billing.pricing import cost_for
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.models import Deployment
from providers.selectors import resolved_model
from providers.tokens import prompt_tokens
from tests.factories import ModelFactory, ProviderFactory, UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

URL = "/api/cost/estimate"


@pytest.fixture
def models() -> dict:
    provider = ProviderFactory(name="openai-main")
    return {
        "mini": ModelFactory(
            name="gpt-mini",
            provider=provider,
            upstream_id="gpt-4o-mini-2024-07-18",
            input_per_mtok=Decimal("0.15"),
            cached_input_per_mtok=Decimal("0.075"),
            output_per_mtok=Decimal("0.60"),
        ),
        "big": ModelFactory(
            name="gpt-big", provider=provider, input_per_mtok=Decimal("2.50"), output_per_mtok=Decimal("10.00")
        ),
        "off": ModelFactory(name="gpt-off", provider=provider, enabled=False),
    }


@pytest.fixture
def user():
    return UserFactory(username="estimator")


@pytest.fixture
def client(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user, name='t').secret}")
    return client


def test_token_counts_are_priced_exactly_with_their_breakdown(client, models):
    response = client.get(
        URL, {"model": "gpt-mini", "input_tokens": 1_200_000, "cached_input_tokens": 200_000, "output_tokens": 30_000}
    )

    assert response.status_code == 200, response.content
    # 1,000,000 × $0.15/M + 200,000 × $0.075/M + 30,000 × $0.60/M
    assert response.json() == {
        "model": "gpt-mini",
        "currency": "USD",
        "deployments": [
            {
                "provider": "openai-main",
                "upstream": "gpt-4o-mini-2024-07-18",
                "input_tokens": 1_200_000,
                "cached_input_tokens": 200_000,
                "cache_write_input_tokens": 0,
                "cache_write_1h_input_tokens": 0,
                "output_tokens": 30_000,
                "input_per_mtok": "0.1500000000",
                "cached_input_per_mtok": "0.0750000000",
                "cache_write_per_mtok": None,
                "cache_write_1h_per_mtok": None,
                "output_per_mtok": "0.6000000000",
                "input_cost": "0.1500000000",
                "cached_input_cost": "0.0150000000",
                "cache_write_cost": "0.0000000000",
                "cache_write_1h_cost": "0.0000000000",
                "output_cost": "0.0180000000",
                "price_factor": "1.0000",
                "total_cost": "0.1830000000",
            }
        ],
        "min_total": "0.1830000000",
        "max_total": "0.1830000000",
    }


def test_a_service_tier_is_priced_at_each_deployments_factor(client, models):
    """OpenAI's priority and flex tiers at the deployment's factor of every token price; a deployment without one
    charges the tier its standard prices, as the ledger does."""
    Deployment.objects.filter(model=models["mini"]).update(
        priority_price_factor=Decimal(2), flex_price_factor=Decimal("0.5")
    )
    counts = {"model": "gpt-mini", "input_tokens": 1_000_000, "output_tokens": 100_000}

    def priced(model: str, tier: str) -> dict:
        response = client.get(URL, {**counts, "model": model, "service_tier": tier})
        assert response.status_code == 200, response.content
        return response.json()["deployments"][0]

    assert (priced("gpt-mini", "default")["total_cost"], priced("gpt-mini", "default")["price_factor"]) == (
        "0.2100000000",
        "1.0000",
    )
    assert (priced("gpt-mini", "priority")["total_cost"], priced("gpt-mini", "priority")["price_factor"]) == (
        "0.4200000000",
        "2.0000",
    )
    assert priced("gpt-mini", "flex")["total_cost"] == "0.1050000000"
    assert priced("gpt-big", "priority")["total_cost"] == "3.5000000000"  # no factor: its standard prices
    assert client.get(URL, {**counts, "service_tier": "turbo"}).status_code == 400


def test_the_total_is_what_the_ledger_would_record(client, models):
    """Odd counts whose parts round in the last place: the total is still the ledger's own figure."""
    response = client.get(URL, {"model": "gpt-mini", "input_tokens": 7, "cached_input_tokens": 3, "output_tokens": 1})

    deployment = response.json()["deployments"][0]
    expected = cost_for(model=resolved_model(models["mini"]), prompt_tokens=7, completion_tokens=1, cached_tokens=3)
    assert Decimal(deployment["total_cost"]) == expected == Decimal("0.0000014250")
    assert (deployment["input_cost"], deployment["cached_input_cost"], deployment["output_cost"]) == (
        "0.0000006000",
        "0.0000002250",
        "0.0000006000",
    )


def test_without_a_cached_price_cached_tokens_cost_the_input_price(client, models):
    response = client.get(URL, {"model": "gpt-big", "input_tokens": 1000, "cached_input_tokens": 400})

    deployment = response.json()["deployments"][0]
    assert deployment["cached_input_per_mtok"] is None
    assert (deployment["input_cost"], deployment["cached_input_cost"], deployment["output_cost"]) == (
        "0.0015000000",
        "0.0010000000",
        "0.0000000000",
    )
    assert deployment["output_tokens"] == 0


def test_cache_writes_are_priced_at_the_cache_write_price(client, models):
    """An Anthropic-style deployment: writes at 1.25× input, shown with the price the ledger charges."""
    ModelFactory(
        name="claude-sonnet",
        provider=ProviderFactory(name="anthropic-main"),
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("15"),
        cached_input_per_mtok=Decimal("0.30"),
        cache_write_per_mtok=Decimal("3.75"),
    )
    params = {"input_tokens": 10_000, "cached_input_tokens": 2_000, "cache_write_input_tokens": 6_000}
    response = client.get(URL, {"model": "claude-sonnet", **params, "output_tokens": 500})

    assert response.status_code == 200, response.content
    deployment = response.json()["deployments"][0]
    assert (deployment["cache_write_input_tokens"], deployment["cache_write_per_mtok"]) == (6_000, "3.7500000000")
    # 2,000 × $3/M + 2,000 × $0.30/M + 6,000 × $3.75/M + 500 × $15/M
    assert (deployment["input_cost"], deployment["cached_input_cost"], deployment["cache_write_cost"]) == (
        "0.0060000000",
        "0.0006000000",
        "0.0225000000",
    )
    assert deployment["total_cost"] == "0.0366000000"


def test_writes_to_the_1_hour_cache_are_priced_at_their_own_price(client, models):
    """Anthropic bills writes to its 1-hour cache at 2× input, those to the 5-minute cache at 1.25×: of 6,000
    written, 4,000 to the 1-hour cache are priced apart, as the ledger prices them."""
    ModelFactory(
        name="claude-sonnet",
        provider=ProviderFactory(name="anthropic-main"),
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("15"),
        cached_input_per_mtok=Decimal("0.30"),
        cache_write_per_mtok=Decimal("3.75"),
        cache_write_1h_per_mtok=Decimal("6"),
    )
    params = {"input_tokens": 10_000, "cache_write_input_tokens": 6_000, "cache_write_1h_input_tokens": 4_000}
    response = client.get(URL, {"model": "claude-sonnet", **params})

    assert response.status_code == 200, response.content
    deployment = response.json()["deployments"][0]
    assert (deployment["cache_write_1h_input_tokens"], deployment["cache_write_1h_per_mtok"]) == (4_000, "6.0000000000")
    # 4,000 × $3/M + 2,000 × $3.75/M + 4,000 × $6/M
    assert (deployment["input_cost"], deployment["cache_write_cost"], deployment["cache_write_1h_cost"]) == (
        "0.0120000000",
        "0.0315000000",
        "0.0240000000",
    )
    assert deployment["total_cost"] == "0.0435000000"


def test_messages_are_counted_with_the_estimator_and_max_tokens_is_the_output(client, models):
    text = "How much does a question of about this many characters cost?"
    body = {"model": "gpt-big", "messages": [{"role": "user", "content": text}], "max_tokens": 500}

    response = client.post(URL, body, format="json")

    assert response.status_code == 200, response.content
    deployment = response.json()["deployments"][0]
    input_tokens = math.ceil(len(text) / 4) + 3  # four characters a token, three for the message's framing
    assert (deployment["input_tokens"], deployment["output_tokens"]) == (input_tokens, 500)
    expected = (Decimal(input_tokens) * Decimal("2.50") + 500 * Decimal("10.00")) / 1_000_000
    assert Decimal(response.json()["min_total"]) == expected


def test_a_request_with_tools_is_counted_as_the_ledger_counts_it(client, models):
    """The calculator had a simpler estimate of its own: a chat completion's tool calls (and a legacy function
    call and functions) counted for nothing, an Anthropic server or MCP tool's call too, and non-ASCII tool input
    and schemas as escaped JSON. It now counts what the ledger's estimate of the same request does."""
    weather = {"name": "weather", "description": "Le temps à une ville", "parameters": {"type": "object"}}
    body = {
        "model": "gpt-big",
        "max_tokens": 0,
        "tools": [{"type": "function", "function": weather}],
        "functions": [weather],
        "messages": [
            {"role": "user", "content": "Quel temps fait-il à Zürich ?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
                "function_call": {"name": "weather", "arguments": '{"city": "Zürich, Schweiz"}'},
            },
            {"role": "tool", "tool_call_id": "c1", "content": "Sonnig, 21 °C"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Malmö"}},
                    {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {"query": "Malmö"}},
                ],
            },
            {"role": "user", "content": [{"type": "mcp_tool_result", "tool_use_id": "s1", "content": "Regn"}]},
        ],
    }

    response = client.post(URL, body, format="json")

    assert response.status_code == 200, response.content
    counted = response.json()["deployments"][0]["input_tokens"]
    assert counted == prompt_tokens({k: v for k, v in body.items() if k != "model"}, operation=Operation.CHAT)


def test_images_in_messages_count(client, models):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with_image = {"role": "user", "content": [{"type": "text", "text": "what is it"}, image]}
    plain = {"role": "user", "content": [{"type": "text", "text": "what is it"}]}

    tokens = [
        client.post(URL, {"model": "gpt-big", "messages": [message], "max_tokens": 0}, format="json").json()[
            "deployments"
        ][0]["input_tokens"]
        for message in (with_image, plain)
    ]
    assert tokens[0] - tokens[1] == 1_600


def test_a_text_completion_is_counted_and_its_output_is_every_reply_it_may_be_billed_for(client, models):
    """A ``/v1/completions`` body: its prompts and suffix counted by the ledger's estimator, and as output
    ``max_tokens`` for every reply the completions pipeline reserves: ``best_of`` when larger than ``n``, for each
    prompt."""
    body = {
        "model": "gpt-big",
        "prompt": ["def add(a, b):", "def sub(a, b):"],
        "suffix": "\n",
        "max_tokens": 50,
        "n": 2,
        "best_of": 3,
    }

    response = client.post(URL, body, format="json")

    assert response.status_code == 200, response.content
    deployment = response.json()["deployments"][0]
    # Fourteen characters a prompt, four characters a token (rounded up), and one for the suffix.
    assert (deployment["input_tokens"], deployment["output_tokens"]) == (4 + 4 + 1, 50 * 3 * 2)
    assert deployment["input_tokens"] == prompt_tokens(body, operation=Operation.COMPLETIONS)
    assert response.json()["min_total"] == "0.0030225000"  # (9 × $2.50 + 300 × $10.00) / 1,000,000


@pytest.mark.parametrize(("extra", "output"), [({}, 16), ({"n": 4}, 64), ({"max_tokens": 0}, 0)])
def test_a_text_completion_without_max_tokens_is_priced_at_openais_default_of_16(client, models, extra, output):
    """As the completions pipeline sends it (and reserves for it): 16 tokens a reply unless ``max_tokens`` says."""
    response = client.post(URL, {"model": "gpt-mini", "prompt": [[1, 2, 3]], **extra}, format="json")

    assert response.status_code == 200, response.content
    deployment = response.json()["deployments"][0]
    assert (deployment["input_tokens"], deployment["output_tokens"]) == (3, output)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": [[1], "a"]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": "x", "suffix": 3}, "suffix"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "best_of": 21}, "best_of"),
        ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ],
)
def test_a_bad_text_completion_body_is_a_400_naming_the_parameter(client, models, body, param):
    response = client.post(URL, {"model": "gpt-mini", **body}, format="json")

    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"input_tokens": 10}, "model"),
        ({"model": "gpt-mini"}, "input_tokens"),
        ({"model": "gpt-mini", "input_tokens": "ten"}, "input_tokens"),
        ({"model": "gpt-mini", "input_tokens": -1}, "input_tokens"),
        ({"model": "gpt-mini", "input_tokens": 10, "output_tokens": 1.5}, "output_tokens"),
        ({"model": "gpt-mini", "input_tokens": 10, "cached_input_tokens": 11}, "cached_input_tokens"),
        (
            {"model": "gpt-mini", "input_tokens": 10, "cached_input_tokens": 4, "cache_write_input_tokens": 7},
            "cache_write_input_tokens",
        ),
        ({"model": "gpt-mini", "input_tokens": 10, "cache_write_input_tokens": -1}, "cache_write_input_tokens"),
        (
            {"model": "gpt-mini", "input_tokens": 10, "cache_write_input_tokens": 4, "cache_write_1h_input_tokens": 5},
            "cache_write_1h_input_tokens",
        ),
        ({"model": "gpt-mini", "input_tokens": 10**13}, "input_tokens"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_parameter(client, models, params, param):
    response = client.get(URL, params)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-mini", "messages": [], "max_tokens": 10}, "messages"),
        ({"model": "gpt-mini", "messages": "hello", "max_tokens": 10}, "messages"),
        ({"model": "gpt-mini", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"model": "gpt-mini", "messages": [{"content": [{"type": "text", "text": 5}]}], "max_tokens": 1}, "messages"),
        (
            {
                "model": "gpt-mini",
                "messages": [{"content": [{"type": "tool_result", "content": [{"type": "text", "text": [1]}]}]}],
                "max_tokens": 1,
            },
            "messages",
        ),
        (
            {"model": "gpt-mini", "messages": [{"content": "x"}], "system": [{"text": {"a": 1}}], "max_tokens": 1},
            "system",
        ),
    ],
)
def test_a_bad_messages_body_is_a_400(client, models, body, param):
    response = client.post(URL, body, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("name", ["no-such-model", "gpt-off"])
def test_an_unknown_or_disabled_model_is_a_404(client, models, name):
    response = client.get(URL, {"model": name, "input_tokens": 10})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_authentication_is_required(models):
    assert APIClient().get(URL, {"model": "gpt-mini", "input_tokens": 10}).status_code == 401
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Bearer sk-llmhub-nope-nope")
    assert bad.get(URL, {"model": "gpt-mini", "input_tokens": 10}).status_code == 401


def test_the_web_session_works_too(user, models):
    session = Client()
    session.force_login(user)

    response = session.get(URL, {"model": "gpt-mini", "input_tokens": 10})

    assert response.status_code == 200
    assert response.json()["deployments"][0]["total_cost"] == "0.0000015000"


def test_a_model_outside_the_plan_is_a_403(client, user, models, plans):
    plan_assign(user=user, plan=plans["Free"])  # models whose output costs at most $1.00 per million

    assert client.get(URL, {"model": "gpt-mini", "input_tokens": 10}).status_code == 200
    response = client.get(URL, {"model": "gpt-big", "input_tokens": 10})

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "model_not_allowed"
    assert "Free" in error["message"]


def test_a_model_outside_the_keys_list_is_a_403(user, models):
    key = api_key_create(user=user, name="mini only", allowed_models=[models["mini"]]).secret
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")

    assert client.get(URL, {"model": "gpt-mini", "input_tokens": 10}).status_code == 200
    response = client.get(URL, {"model": "gpt-big", "input_tokens": 10})

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_allowed"


# The ledger admin


@pytest.fixture
def admin_client() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-for-tests-123"))
    return client


def test_the_ledger_admin_shows_each_rows_breakdown_at_current_prices(admin_client, models):
    record = UsageRecordFactory(
        model=models["mini"],
        model_name="gpt-mini",
        prompt_tokens=1_200_000,
        cached_tokens=200_000,
        completion_tokens=30_000,
        cost=Decimal("0.1830000000"),
    )

    page = admin_client.get(reverse("admin:billing_usagerecord_change", args=[record.pk]))

    assert page.status_code == 200
    text = page.content.decode()
    assert "cost breakdown (current prices)" in text.lower()
    assert "input $0.1500000000 (1000000 tokens at $0.150000/M)" in text
    assert "cached input $0.0150000000 (200000 tokens at $0.075000/M)" in text
    assert "output $0.0180000000 (30000 tokens at $0.600000/M) = $0.1830000000" in text
    assert "may have changed since the request" in text


def test_the_ledger_admin_shows_the_tier_a_row_was_charged_at(admin_client, models):
    Deployment.objects.filter(model=models["mini"]).update(priority_price_factor=Decimal(2))
    record = UsageRecordFactory(
        model=models["mini"],
        model_name="gpt-mini",
        prompt_tokens=1_000_000,
        completion_tokens=0,
        service_tier="priority",
        cost=Decimal("0.3000000000"),
    )

    text = admin_client.get(reverse("admin:billing_usagerecord_change", args=[record.pk])).content.decode()

    assert "input $0.3000000000 (1000000 tokens at $0.150000/M)" in text
    assert "every token price × 2.0000 (priority tier) = $0.3000000000" in text


def test_the_admin_says_so_when_the_rows_model_is_gone(admin_client):
    record = UsageRecordFactory(model=None, model_name="retired-model")

    page = admin_client.get(reverse("admin:billing_usagerecord_change", args=[record.pk]))

    assert page.status_code == 200
    assert "no longer in the catalog" in page.content.decode()
    assert UsageRecord.objects.filter(pk=record.pk).exists()
