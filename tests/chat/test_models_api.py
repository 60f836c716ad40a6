"""``GET /api/models/``: the catalog a picker shows, with the models the caller's plan or key leaves out marked
locked rather than hidden, and the chat page's picker built from the same list."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.test import Client
from rest_framework.test import APIClient

from billing.models import Plan
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.models import ByokMode, CatalogModel, CredentialStatus, ModelMode, ProviderCredential
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UserFactory
from tests.test_openapi_schema import validator_for

pytestmark = pytest.mark.django_db

URL = "/api/models/"


@pytest.fixture
def catalog() -> dict[str, CatalogModel]:
    east = ProviderFactory(name="east")
    west = ProviderFactory(name="west")
    mini = ModelFactory(
        name="gpt-4o-mini",
        label="GPT-4o mini",
        provider=east,
        input_per_mtok=Decimal("0.15"),
        output_per_mtok=Decimal("0.60"),
        max_output_tokens=16_384,
    )
    # A second deployment, dearer: the model's prices are a range.
    DeploymentFactory(model=mini, provider=west, input_per_mtok=Decimal("0.30"), output_per_mtok=Decimal("1.20"))
    big = ModelFactory(
        name="gpt-4o", provider=west, input_per_mtok=Decimal("2.5"), output_per_mtok=Decimal("10"), supports_vision=True
    )
    alias = CatalogModel.objects.create(name="chat-default", alias_of=mini)
    ModelFactory(name="embedder", provider=east, mode=ModelMode.EMBEDDING)  # never in a chat picker
    ModelFactory(name="switched-off", provider=east, enabled=False)
    return {"mini": mini, "big": big, "alias": alias}


@pytest.fixture
def user():
    return UserFactory(username="picker")


def starter_plan(*models: CatalogModel) -> Plan:
    plan = Plan.objects.create(name="Starter", allow_all_models=False)
    plan.allowed_models.set(models)
    return plan


def listed(response) -> dict[str, dict]:
    assert response.status_code == 200, response.content
    return {entry["id"]: entry for entry in response.json()}


def test_every_chat_model_with_providers_capabilities_and_price_range(catalog, user):
    client = APIClient()
    client.force_authenticate(user)

    models = listed(client.get(URL))

    assert set(models) == {"chat-default", "gpt-4o", "gpt-4o-mini"}
    mini = models["gpt-4o-mini"]
    assert mini["label"] == "GPT-4o mini" and mini["providers"] == ["east", "west"]
    assert mini["input_per_mtok"] == {"min": "0.150000", "max": "0.300000"}
    assert mini["output_per_mtok"] == {"min": "0.600000", "max": "1.200000"}
    assert mini["context_window"] == 128_000 and mini["max_output_tokens"] == 16_384
    assert mini["capabilities"] == {
        "streaming": True,
        "tools": True,
        "vision": False,
        "json_mode": True,
        "reasoning": False,
    }
    assert mini["locked"] is False and mini["locked_reason"] is None
    big = models["gpt-4o"]
    assert big["input_per_mtok"] == {"min": "2.500000", "max": "2.500000"} and big["capabilities"]["vision"]
    # An alias under its own name, with its model's deployments and prices.
    alias = models["chat-default"]
    assert alias["label"] == "chat-default" and alias["providers"] == ["east", "west"]
    assert alias["input_per_mtok"] == mini["input_per_mtok"]


def test_a_plan_allow_list_locks_the_other_models_instead_of_hiding_them(catalog, user):
    plan_assign(user=user, plan=starter_plan(catalog["mini"]))
    client = APIClient()
    client.force_authenticate(user)

    models = listed(client.get(URL))

    assert {name: entry["locked"] for name, entry in models.items()} == {
        "chat-default": False,  # an alias is allowed when its model is
        "gpt-4o": True,
        "gpt-4o-mini": False,
    }
    assert models["gpt-4o"]["locked_reason"] == "plan"
    assert models["gpt-4o"]["input_per_mtok"]["min"] == "2.500000"  # still priced: an upsell


def test_an_api_keys_own_list_locks_models_for_that_key(catalog, user):
    key = api_key_create(user=user, name="narrow", allowed_models=[catalog["big"]]).secret
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")

    models = listed(client.get(URL))

    assert models["gpt-4o"]["locked"] is False
    assert models["gpt-4o-mini"]["locked"] is True and models["gpt-4o-mini"]["locked_reason"] == "key"
    assert models["chat-default"]["locked"] is True


def test_a_model_only_the_users_own_key_could_serve_is_locked_until_they_have_a_usable_one(catalog, user):
    own_only = ProviderFactory(name="Anthropic", byok=ByokMode.REQUIRED)
    ModelFactory(name="claude-own", provider=own_only)
    # Served on the user's key where they have one, else on the platform's: never locked for them.
    both = ModelFactory(name="claude-either", provider=own_only)
    DeploymentFactory(model=both, provider=catalog["big"].deployments.get().provider)
    client = APIClient()
    client.force_authenticate(user)

    models = listed(client.get(URL))
    assert models["claude-own"]["locked"] is True and models["claude-own"]["locked_reason"] == "own_key"
    assert models["claude-own"]["own_key_providers"] == ["Anthropic"]
    assert models["claude-either"]["locked"] is False and models["claude-either"]["own_key_providers"] == []

    # A key the provider refused does not unlock it (as /v1/models); one not known to be refused does.
    credential = ProviderCredential.objects.create(
        owner=user, provider=own_only, api_key="sk-ant-own-0001", status=CredentialStatus.INVALID
    )
    assert listed(client.get(URL))["claude-own"]["locked_reason"] == "own_key"
    credential.status = CredentialStatus.VALID
    credential.save()
    assert listed(client.get(URL))["claude-own"]["locked"] is False


def test_sessions_and_keys_only(catalog, user):
    assert APIClient().get(URL).status_code in (401, 403)
    assert APIClient().get(URL, HTTP_AUTHORIZATION="Bearer sk-llmhub-nope").status_code == 401
    client = Client()
    client.force_login(user)
    assert set(listed(client.get(URL))) == {"chat-default", "gpt-4o", "gpt-4o-mini"}


def test_the_response_matches_its_openapi_schema(catalog, user):
    plan_assign(user=user, plan=starter_plan(catalog["mini"]))
    client = APIClient()
    client.force_authenticate(user)
    schema = APIClient().get("/api/schema/", {"format": "json"}).json()

    operation = schema["paths"][URL]["get"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/CatalogModel"},
    }
    validator = validator_for(schema, "CatalogModel")
    entries = client.get(URL).json()
    assert {entry["locked"] for entry in entries} == {True, False}
    for entry in entries:
        validator.validate(entry)


def test_the_chat_page_offers_locked_models_disabled_with_a_hint(catalog, user):
    plan_assign(user=user, plan=starter_plan(catalog["mini"]))
    client = Client()
    client.force_login(user)

    page = client.get("/").content.decode()

    locked = next(line for line in page.splitlines() if 'value="gpt-4o"' in line)
    assert "disabled" in locked and "not in your plan" in locked
    usable = next(line for line in page.splitlines() if 'value="gpt-4o-mini"' in line)
    assert "disabled" not in usable and "GPT-4o mini" in usable


def test_a_page_whose_every_model_needs_the_users_own_key_says_to_add_one(user):
    own_only = ProviderFactory(name="Anthropic", byok=ByokMode.REQUIRED)
    ModelFactory(name="claude-own", provider=own_only)
    client = Client()
    client.force_login(user)

    page = client.get("/").content.decode()

    assert "No model is available to you yet" not in page
    assert "Add your own Anthropic key on the" in page
    assert '<a href="/provider-keys/">Provider keys</a> page' in page
