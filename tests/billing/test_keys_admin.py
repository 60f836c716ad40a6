"""The billing admin, driven as a superuser through Django's test client: keys are created and revoked
through the key services, the secret is shown once, the hash never, and the ledger is read-only."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from billing.models import ApiKey, UsageRecord
from billing.services.keys import api_key_authenticate_sync, api_key_create
from tests.factories import ModelFactory, UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

SECRET = re.compile(r"sk-llmhub-[A-Za-z0-9]+-[A-Za-z0-9]+")


@pytest.fixture
def admin_client() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-for-tests-123"))
    return client


def keys_work(secret: str) -> bool:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client.get("/api/usage/summary/").status_code == 200  # /api/keys/ needs the keys:manage scope


def test_add_creates_a_key_and_shows_the_secret_once(admin_client):
    alice = UserFactory(username="alice")
    model = ModelFactory(name="gpt-only")
    add_url = reverse("admin:billing_apikey_add")
    form = admin_client.get(add_url)
    assert form.status_code == 200
    assert b"secret_hash" not in form.content and b'name="prefix"' not in form.content

    response = admin_client.post(
        add_url,
        {
            "user": alice.pk,
            "name": "from-admin",
            "expires_at_0": "",
            "expires_at_1": "",
            "allowed_models": [model.pk],
            "budget_usd": "2.50",
            "budget_period": "daily",
            "rpm": "30",
        },
        follow=True,
    )

    assert response.status_code == 200
    secrets = set(SECRET.findall(response.content.decode()))  # in the success message on the page
    assert len(secrets) == 1
    secret = secrets.pop()
    principal = api_key_authenticate_sync(secret)
    row = ApiKey.objects.get(pk=principal.key_id)
    assert row.user == alice and row.name == "from-admin"
    assert (row.budget_usd, row.budget_period, row.rpm, row.tpm) == (Decimal("2.50"), "daily", 30, None)
    assert principal.allowed_model_ids == frozenset({model.pk})

    # Shown once: neither the change page nor the list shows it (or its hash) again.
    for page in (reverse("admin:billing_apikey_change", args=[row.pk]), reverse("admin:billing_apikey_changelist")):
        content = admin_client.get(page).content.decode()
        assert secret not in content and row.secret_hash not in content
        assert row.prefix in content


def test_add_refuses_a_rate_limit_of_zero_in_the_form(admin_client):
    """As the API and the key service do: the form says so, nothing is created."""
    alice = UserFactory(username="alice")
    data = {"user": alice.pk, "name": "zero", "expires_at_0": "", "expires_at_1": "", "budget_period": "monthly"}

    response = admin_client.post(reverse("admin:billing_apikey_add"), {**data, "rpm": "0"})

    assert response.status_code == 200
    assert "A rate limit must be at least 1" in response.content.decode()
    assert not ApiKey.objects.filter(name="zero").exists()


def test_add_refuses_a_past_expiry(admin_client):
    alice = UserFactory(username="alice")

    response = admin_client.post(
        reverse("admin:billing_apikey_add"),
        {"user": alice.pk, "name": "late", "expires_at_0": "2001-01-01", "expires_at_1": "00:00:00"},
    )

    assert response.status_code == 200
    assert "expires_at" in response.context["adminform"].form.errors
    assert not ApiKey.objects.exists()


def test_revoke_action_stops_the_selected_keys_at_once(admin_client):
    alice = UserFactory(username="alice")
    doomed = [api_key_create(user=alice, name=f"doomed-{n}") for n in range(2)]
    kept = api_key_create(user=alice, name="kept")
    assert all(keys_work(created.secret) for created in [*doomed, kept])  # all cached now

    response = admin_client.post(
        reverse("admin:billing_apikey_changelist"),
        {"action": "revoke_selected", "_selected_action": [created.api_key.pk for created in doomed]},
        follow=True,
    )

    assert response.status_code == 200
    assert "Revoked 2 key(s)." in [m.message for m in get_messages(response.wsgi_request)]
    assert not any(keys_work(created.secret) for created in doomed)
    assert keys_work(kept.secret)


def test_editing_a_key_in_the_admin_takes_effect_at_once(admin_client):
    created = api_key_create(user=UserFactory(username="alice"), name="edited")
    assert keys_work(created.secret)

    response = admin_client.post(
        reverse("admin:billing_apikey_change", args=[created.api_key.pk]),
        {"name": "edited", "expires_at_0": "2001-01-01", "expires_at_1": "00:00:00", "budget_period": "monthly"},
    )

    assert response.status_code == 302
    assert not keys_work(created.secret)


def test_list_filters_by_status_and_searches_by_prefix_and_user(admin_client):
    active = api_key_create(user=UserFactory(username="alice"), name="active").api_key
    revoked = api_key_create(user=UserFactory(username="bob"), name="revoked").api_key
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at="2025-01-01T00:00:00Z")
    url = reverse("admin:billing_apikey_changelist")

    def listed(**params) -> set[str]:
        page = admin_client.get(url, params)
        assert page.status_code == 200
        return {key.prefix for key in page.context["cl"].result_list}

    assert listed(status="active") == {active.prefix}
    assert listed(status="revoked") == {revoked.prefix}
    assert listed(q=active.prefix) == {active.prefix}
    assert listed(q="bob") == {revoked.prefix}


def test_the_ledger_is_read_only(admin_client):
    record = UsageRecordFactory(cost=Decimal("0.1234567891"))
    changelist = admin_client.get(reverse("admin:billing_usagerecord_changelist"))
    assert changelist.status_code == 200
    assert list(changelist.context["cl"].result_list) == [record]
    assert "0.1234567891" in changelist.content.decode()

    assert admin_client.get(reverse("admin:billing_usagerecord_add")).status_code == 403
    change_url = reverse("admin:billing_usagerecord_change", args=[record.pk])
    assert admin_client.get(change_url).status_code == 200  # view only
    assert admin_client.post(change_url, {"cost": "0"}).status_code == 403
    assert admin_client.post(reverse("admin:billing_usagerecord_delete", args=[record.pk])).status_code == 403
    assert UsageRecord.objects.get(pk=record.pk).cost == Decimal("0.1234567891")


def test_a_child_key_cannot_be_given_more_than_its_parent_in_the_admin(admin_client):
    """What a child may do is bounded by its parent whatever its row says; the change page must not store a
    scope, a budget or a rate its parent does not have, as the API refuses to create them."""
    owner = UserFactory(username="alice")
    parent = api_key_create(
        user=owner, name="app", budget_usd=Decimal("5"), budget_period="daily", rpm=10, scopes=["keys:manage"]
    ).api_key
    child = api_key_create(
        user=owner, name="tool", budget_usd=Decimal("2"), budget_period="daily", rpm=5, parent=parent
    ).api_key
    url = reverse("admin:billing_apikey_change", args=[child.pk])
    form = {"name": "tool", "budget_usd": "2", "budget_period": "daily", "rpm": "5"}

    for change, field in (
        ({"scopes": ["conversations:manage"]}, "scopes"),
        ({"budget_usd": "9"}, "budget_usd"),
        ({"rpm": ""}, "rpm"),  # "no limit" is more than the parent's 10
    ):
        response = admin_client.post(url, {**form, **change})
        assert response.status_code == 200, change
        errors = response.context["adminform"].form.errors
        assert field in errors and "limits it" in str(errors[field]), errors
    child.refresh_from_db()
    assert (child.scopes, child.budget_usd, child.rpm) == ([], Decimal("2"), 5)

    response = admin_client.post(url, {**form, "name": "renamed", "scopes": ["keys:manage"], "rpm": "10"})
    assert response.status_code == 302
    child.refresh_from_db()
    assert (child.name, child.scopes, child.rpm) == ("renamed", ["keys:manage"], 10)

    top = reverse("admin:billing_apikey_change", args=[parent.pk])  # a person's own key: no parent to bound it
    response = admin_client.post(top, {"name": "app", "budget_period": "daily", "scopes": ["conversations:manage"]})
    assert response.status_code == 302
