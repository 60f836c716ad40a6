"""Issue 9, point 2: a gateway key cannot escape its own limits.

A key manages keys only with the ``keys:manage`` scope; a key it creates (a child) never has a larger
budget, a longer lifetime, more models, higher rate limits or more scopes, and works only while the key
above it works; the child's spend and requests count against the parent's budget and limits too, in
both admission stores. Each reproduction of the issue is one test here."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
import time_machine
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from billing.exceptions import QuotaExceededError, RateLimitExceededError
from billing.models import ApiKey, BudgetPeriod, KeyScope, UsageRecord
from billing.services.admission import admission_acquire, admission_settle
from billing.services.budgets import CounterRef, period_bounds
from billing.services.counters import budget_counters_reconcile, counter_state
from billing.services.keys import api_key_change, api_key_create, api_key_revoke
from billing.services.ledger import ledger_flush
from billing.services.plans import plan_assign
from core.exceptions import ApplicationError
from providers.models import CatalogModel
from providers.selectors import resolved_model
from tests.factories import ModelFactory, UsageRecordFactory, UserFactory

TOKEN = Decimal("0.0001")  # one completion token of the flat model (input is free)
MANAGE = [KeyScope.KEYS_MANAGE.value]


def key_client(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["param"] == param, error
    return error


@pytest.fixture
def alice(db):
    return UserFactory(username="alice")


# WHO MAY MANAGE KEYS


@pytest.mark.django_db
def test_a_key_with_a_tiny_budget_cannot_mint_an_unlimited_key(alice):
    """The reproduction: a key with a $0.0001 daily budget minted a key with no budget at all."""
    tiny = api_key_create(user=alice, name="tiny", budget_usd=Decimal("0.0001"), budget_period=BudgetPeriod.DAILY)

    response = key_client(tiny.secret).post("/api/keys/", {"name": "escape"}, format="json")

    error = assert_error(response, 403)
    assert error["type"] == "permission_error" and "keys:manage" in error["message"]
    assert ApiKey.objects.filter(user=alice).count() == 1


@pytest.mark.django_db
def test_a_key_restricted_to_one_model_cannot_mint_a_key(alice):
    only = ModelFactory(name="only-this")
    ModelFactory(name="another")
    narrow = api_key_create(user=alice, name="narrow", allowed_models=[only])

    response = key_client(narrow.secret).post("/api/keys/", {"name": "wide"}, format="json")

    assert_error(response, 403)
    assert ApiKey.objects.filter(user=alice).count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/keys/"),
        ("get", "/api/keys/{id}/"),
        ("post", "/api/keys/{id}/revoke/"),
        ("delete", "/api/keys/{id}/"),
    ],
)
def test_a_key_without_the_scope_is_refused_every_key_endpoint(alice, method, path):
    plain = api_key_create(user=alice, name="plain")
    sibling = api_key_create(user=alice, name="sibling")

    response = getattr(key_client(plain.secret), method)(path.format(id=sibling.api_key.pk))

    assert_error(response, 403)
    sibling.api_key.refresh_from_db()
    assert sibling.api_key.revoked_at is None


@pytest.mark.django_db
def test_a_minted_key_cannot_see_or_revoke_its_siblings_or_its_parent(alice):
    """The reproduction: a minted key listed and revoked its siblings. A managing key sees its subtree only."""
    parent = api_key_create(user=alice, name="parent", scopes=MANAGE)
    first = key_client(parent.secret).post("/api/keys/", {"name": "first", "scopes": MANAGE}, format="json").json()
    second = key_client(parent.secret).post("/api/keys/", {"name": "second"}, format="json").json()
    unrelated = api_key_create(user=alice, name="from-the-web")
    as_first = key_client(first["secret"])

    listed = as_first.get("/api/keys/").json()
    assert [key["name"] for key in listed["results"]] == ["first"]
    for other in (second["id"], parent.api_key.pk, unrelated.api_key.pk):
        assert_error(as_first.get(f"/api/keys/{other}/"), 404)
        assert_error(as_first.post(f"/api/keys/{other}/revoke/"), 404)
        assert_error(as_first.delete(f"/api/keys/{other}/"), 404)
    assert not ApiKey.objects.filter(revoked_at__isnull=False).exists()
    # The parent sees and manages its children; the session sees everything.
    assert {key["name"] for key in key_client(parent.secret).get("/api/keys/").json()["results"]} == {
        "parent",
        "first",
        "second",
    }
    session = APIClient()
    session.force_login(alice)
    assert session.get("/api/keys/").json()["count"] == 4


@pytest.mark.django_db
def test_a_child_created_by_a_key_belongs_to_it(alice):
    parent = api_key_create(user=alice, name="parent", scopes=MANAGE)

    body = key_client(parent.secret).post("/api/keys/", {"name": "child"}, format="json").json()

    assert body["parent"] == parent.api_key.pk and body["scopes"] == []
    child = ApiKey.objects.get(pk=body["id"])
    assert child.parent_id == parent.api_key.pk and child.user_id == alice.pk
    # Without the scope of its own, the child manages nothing, not even its own children.
    assert_error(key_client(body["secret"]).post("/api/keys/", {"name": "grandchild"}, format="json"), 403)


# WHAT A CHILD MAY BE GIVEN


@pytest.fixture
def limited_parent(alice):
    """A managing key with every kind of limit: budget, expiry, models, rate limits."""
    ModelFactory(name="model-a")
    ModelFactory(name="model-b")
    ModelFactory(name="model-c")
    return api_key_create(
        user=alice,
        name="parent",
        scopes=MANAGE,
        budget_usd=Decimal("1.00"),
        budget_period=BudgetPeriod.DAILY,
        expires_at=timezone.now() + timedelta(days=7),
        allowed_models=CatalogModel.objects.filter(name__in=["model-a", "model-b"]),
        rpm=10,
        tpm=1000,
    )


def within(parent, **overrides) -> dict:
    """A child request that fits ``parent`` exactly, with ``overrides``."""
    body = {
        "name": "child",
        "budget_usd": "1.00",
        "budget_period": "daily",
        "expires_at": parent.api_key.expires_at.isoformat(),
        "allowed_models": ["model-a"],
        "rpm": 10,
        "tpm": 1000,
    }
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not None}


@pytest.mark.django_db
def test_a_child_within_its_parent_is_created(limited_parent):
    response = key_client(limited_parent.secret).post("/api/keys/", within(limited_parent), format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["budget_usd"], body["budget_period"], body["allowed_models"]) == ("1.0000", "daily", ["model-a"])
    # A total budget never resets, so it is never more than the same amount per day.
    total = within(limited_parent, budget_usd="0.50", budget_period="total")
    assert key_client(limited_parent.secret).post("/api/keys/", total, format="json").status_code == 201


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        # The reproduction: a key with a budget minted a key without one.
        ({"budget_usd": None}, "budget_usd"),
        ({"budget_usd": "1.0001"}, "budget_usd"),
        ({"budget_period": "monthly"}, "budget_period"),
        ({"expires_at": None}, "expires_at"),
        ({"expires_at": "+1s"}, "expires_at"),
        # The reproduction: a key restricted to some models minted a key that could use all.
        ({"allowed_models": None}, "allowed_models"),
        ({"allowed_models": ["model-a", "model-c"]}, "allowed_models"),
        ({"rpm": None}, "rpm"),
        ({"rpm": 11}, "rpm"),
        ({"tpm": 1001}, "tpm"),
    ],
)
def test_a_child_that_would_exceed_its_parent_is_refused_naming_the_field(limited_parent, overrides, param):
    if overrides.get("expires_at") == "+1s":
        overrides = {"expires_at": (limited_parent.api_key.expires_at + timedelta(seconds=1)).isoformat()}

    response = key_client(limited_parent.secret).post("/api/keys/", within(limited_parent, **overrides), format="json")

    error = assert_error(response, 400, param)
    assert error["type"] == "invalid_request_error"
    assert ApiKey.objects.count() == 1


@pytest.mark.django_db
def test_a_child_cannot_be_given_a_scope_its_parent_lacks(alice):
    """A managing key may pass keys:manage on; a child without it holds nothing to pass."""
    parent = api_key_create(user=alice, name="parent", scopes=MANAGE)
    manager = key_client(parent.secret).post("/api/keys/", {"name": "m", "scopes": MANAGE}, format="json")
    assert manager.status_code == 201 and manager.json()["scopes"] == MANAGE

    child = api_key_create(user=alice, name="plain", parent=parent.api_key)
    with pytest.raises(ApplicationError) as refused:
        api_key_create(user=alice, name="grandchild", parent=child.api_key, scopes=MANAGE)
    assert refused.value.param == "scopes"


@pytest.mark.django_db
def test_a_scope_taken_from_a_parent_is_taken_from_the_keys_it_created(alice):
    """An administrator takes keys:manage from a key that already passed it on: its children lose it too."""
    parent = api_key_create(user=alice, name="parent", scopes=MANAGE)
    child = key_client(parent.secret).post("/api/keys/", {"name": "child", "scopes": MANAGE}, format="json").json()
    as_child = key_client(child["secret"])
    assert as_child.get("/api/keys/").status_code == 200  # cached now

    parent.api_key.scopes = []
    api_key_change(api_key=parent.api_key)

    error = assert_error(as_child.get("/api/keys/"), 403)
    assert "keys:manage" in error["message"]
    assert_error(as_child.post("/api/keys/", {"name": "grandchild"}, format="json"), 403)


@pytest.mark.django_db
def test_a_revoked_key_creates_nothing(alice):
    parent = api_key_create(user=alice, name="parent", scopes=MANAGE)
    api_key_revoke(api_key=parent.api_key)

    with pytest.raises(ApplicationError) as refused:
        api_key_create(user=alice, name="late", parent=parent.api_key)
    assert refused.value.param == "parent"


# A CHILD WORKS ONLY WHILE ITS PARENT WORKS


@pytest.mark.django_db
def test_revoking_a_parent_stops_its_children_at_once(alice):
    parent = api_key_create(user=alice, name="parent", scopes=MANAGE)
    child = key_client(parent.secret).post("/api/keys/", {"name": "child", "scopes": MANAGE}, format="json").json()
    grandchild = key_client(child["secret"]).post("/api/keys/", {"name": "grandchild"}, format="json").json()
    as_child = key_client(child["secret"])
    assert as_child.get("/api/keys/").status_code == 200  # cached now

    api_key_revoke(api_key=parent.api_key)

    assert_error(as_child.get("/api/keys/"), 401)
    assert_error(key_client(grandchild["secret"]).get("/api/usage/summary/"), 401)


@pytest.mark.django_db
def test_a_child_expires_with_its_parent(alice):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        parent = api_key_create(user=alice, name="parent", scopes=MANAGE, expires_at=start + timedelta(hours=1))
        child = api_key_create(
            user=alice, name="child", parent=parent.api_key, scopes=MANAGE, expires_at=start + timedelta(hours=1)
        )
        # Made longer by hand (the admin): the parent's expiry still ends it.
        ApiKey.objects.filter(pk=child.api_key.pk).update(expires_at=None)
        assert key_client(child.secret).get("/api/keys/").status_code == 200
    with time_machine.travel(start + timedelta(hours=1, seconds=1), tick=False):
        error = assert_error(key_client(child.secret).get("/api/keys/"), 401)
    assert "expired" in error["message"]


# SPEND AND REQUESTS OF CHILDREN COUNT AGAINST THE PARENT (both admission stores)


@pytest.fixture
def family(db, plans, catalog):
    """An Enterprise user (no plan limits) with a managing key whose daily budget pays for 10 flat-model
    tokens, and two children each given that whole budget."""
    user = UserFactory(username="family")
    plan_assign(user=user, plan=plans["Enterprise"])
    parent = api_key_create(
        user=user, name="parent", scopes=MANAGE, budget_usd=10 * TOKEN, budget_period=BudgetPeriod.DAILY
    )
    children = [
        api_key_create(
            user=user, name=f"child-{n}", parent=parent.api_key, budget_usd=10 * TOKEN, budget_period=BudgetPeriod.DAILY
        )
        for n in (1, 2)
    ]
    return {"user": user, "parent": parent, "children": children, "flat": resolved_model(catalog["flat"])}


async def acquire(family, api_key, request_id: str, max_tokens: int):
    return await admission_acquire(
        user_id=family["user"].pk,
        api_key_id=api_key.pk,
        key_allowed_model_ids=None,
        model=family["flat"],
        body={"model": "flat-model", "messages": [], "max_tokens": max_tokens},
        request_id=request_id,
        prompt_tokens_upper=0,
    )


def daily_ref(api_key) -> CounterRef:
    return CounterRef("key", api_key.pk, "cost", BudgetPeriod.DAILY, period_bounds("daily", timezone.now())[0])


@pytest.mark.django_db(transaction=True)
@pytest.mark.period_instants(only=["last-second-of-month"])  # daily budgets: a midnight mid-test moves every counter
async def test_children_together_never_spend_more_than_their_parents_budget(store, family):
    first, second = (child.api_key for child in family["children"])
    spent = await acquire(family, first, "a1", max_tokens=6)
    await admission_settle(admission=spent, cost=6 * TOKEN, prompt_tokens=0, completion_tokens=6, ok=True)
    held = await acquire(family, second, "b1", max_tokens=3)

    # Each child alone has 4 and 7 tokens left of its own budget, but the parent only 1.
    with pytest.raises(QuotaExceededError) as refused:
        await acquire(family, second, "b2", max_tokens=2)
    assert refused.value.code == "insufficient_quota"
    assert f"the daily budget of the key {family['parent'].api_key.prefix}" in refused.value.message
    with pytest.raises(QuotaExceededError):
        await acquire(family, first, "a2", max_tokens=2)

    await admission_settle(admission=held, cost=3 * TOKEN, prompt_tokens=0, completion_tokens=3, ok=True)
    parent_state = await sync_to_async(counter_state)(daily_ref(family["parent"].api_key))
    assert parent_state == (9 * TOKEN, Decimal(0))  # each settle charged the parent once
    assert await sync_to_async(counter_state)(daily_ref(first)) == (6 * TOKEN, Decimal(0))
    assert await sync_to_async(counter_state)(daily_ref(second)) == (3 * TOKEN, Decimal(0))


@pytest.mark.django_db(transaction=True)
@pytest.mark.period_instants(only=["last-second-of-month"])  # daily budgets: a midnight mid-test moves every counter
async def test_a_parents_counter_starts_from_and_reconciles_to_its_childrens_ledger(store, family):
    first, second = (child.api_key for child in family["children"])
    await sync_to_async(UsageRecordFactory)(user=family["user"], api_key=first, cost=5 * TOKEN)
    await sync_to_async(UsageRecordFactory)(user=family["user"], api_key=second, cost=4 * TOKEN)

    # Seeded from the ledger: 9 of the parent's 10 are gone, though each child spent under half its own.
    with pytest.raises(QuotaExceededError):
        await acquire(family, first, "over", max_tokens=2)
    assert (await acquire(family, second, "fits", max_tokens=1)).reserved_cost == TOKEN

    # A child's ledger row whose settle was lost is found by reconciliation, on the parent's counter too.
    await sync_to_async(UsageRecordFactory)(user=family["user"], api_key=second, cost=TOKEN)
    await sync_to_async(budget_counters_reconcile)(now=timezone.now() + timedelta(seconds=1))
    assert (await sync_to_async(counter_state)(daily_ref(family["parent"].api_key)))[0] == 10 * TOKEN


@pytest.mark.django_db(transaction=True)
async def test_a_parents_rate_limit_holds_across_its_children(store, plans, catalog):
    user = await sync_to_async(UserFactory)(username="rates")
    await sync_to_async(plan_assign)(user=user, plan=plans["Enterprise"])
    parent = await sync_to_async(api_key_create)(user=user, name="parent", scopes=MANAGE, rpm=2)
    children = [
        (await sync_to_async(api_key_create)(user=user, name=f"c{n}", parent=parent.api_key, rpm=2)).api_key
        for n in (1, 2)
    ]
    family = {"user": user, "flat": await sync_to_async(resolved_model)(catalog["flat"])}

    await acquire(family, children[0], "r1", max_tokens=1)
    await acquire(family, children[1], "r2", max_tokens=1)
    with pytest.raises(RateLimitExceededError) as limited:
        await acquire(family, children[0], "r3", max_tokens=1)
    assert f"on the key {parent.api_key.prefix}… that this key was created under" in limited.value.message


@pytest.mark.django_db(transaction=True)
def test_a_child_spending_through_the_gateway_stops_at_its_parents_budget(store, family, llmhub_server):
    """End to end: real HTTP, the real pipeline and the fake upstream. Each request costs exactly 4 tokens."""
    body = {"model": "flat-model", "messages": [{"role": "user", "content": "[[words=4]] go"}], "max_tokens": 4}

    def complete(created) -> httpx.Response:
        return httpx.post(
            f"{llmhub_server.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {created.secret}"},
            timeout=30,
        )

    first, second = family["children"]
    assert [complete(first).status_code, complete(second).status_code] == [200, 200]
    refused = complete(first)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert complete(second).status_code == 429

    async_to_sync(ledger_flush)()
    spent = sum(
        UsageRecord.objects.filter(api_key__in=[first.api_key, second.api_key]).values_list("cost", flat=True),
        Decimal(0),
    )
    assert spent == 8 * TOKEN <= family["parent"].api_key.budget_usd


# OTHER WAYS IN


@pytest.mark.django_db
def test_createapikey_grants_the_manage_scope_only_when_asked(alice, capsys):
    call_command("createapikey", "alice", "--name", "plain")
    call_command("createapikey", "alice", "--name", "manager", "--manage-keys")

    assert ApiKey.objects.get(name="plain").scopes == []
    assert ApiKey.objects.get(name="manager").scopes == MANAGE
    assert "keys:manage" in capsys.readouterr().out


@pytest.mark.django_db
def test_the_admin_grants_the_scope_and_shows_the_parent(alice):
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-for-tests-123"))
    response = admin.post(
        reverse("admin:billing_apikey_add"),
        {"user": alice.pk, "name": "manager", "budget_period": "monthly", "scopes": ["keys:manage"]},
        follow=True,
    )
    assert response.status_code == 200
    manager = ApiKey.objects.get(name="manager")
    assert manager.scopes == MANAGE
    child = api_key_create(user=alice, name="child", parent=manager)

    page = admin.get(reverse("admin:billing_apikey_change", args=[child.api_key.pk])).content.decode()
    assert manager.prefix in page  # the parent, read-only
    listing = admin.get(reverse("admin:billing_apikey_changelist")).content.decode()
    # Its own row's action checkbox names it, and so does the child's parent column.
    assert listing.count(str(manager)) == 2
