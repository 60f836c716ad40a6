"""Plans: the seeded three, the models each allows (with the key's allow-list on top), the lazy default
plan, per-user overrides, ``manage.py setplan`` and the admin pages."""

from __future__ import annotations

import importlib
from decimal import Decimal
from io import StringIO

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.apps import apps as django_apps
from django.core.management import CommandError, call_command
from django.urls import reverse

from billing.exceptions import BillingMisconfiguredError, ModelNotAllowedError
from billing.models import DailyUsage, Plan, UserPlan
from billing.services.admission import admission_acquire, models_allowed
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from providers.selectors import resolved_model
from tests.factories import ModelFactory, UsageRecordFactory, UserFactory
from tests.waiting import wait_for_record


@pytest.mark.django_db
def test_the_migration_seeds_free_pro_and_enterprise():
    # Run here, on the plans table emptied: the migration's rows are gone from a test database where an earlier
    # transactional test of the same worker ended with its flush, which the order of tests decides.
    seeding = importlib.import_module("billing.migrations.0003_seed_plans")
    Plan.objects.all().delete()
    seeding.seed(django_apps, None)
    seeding.seed(django_apps, None)  # run again (a database where they were kept), nothing doubles
    assert Plan.objects.count() == 3
    seeded = {plan.name: plan for plan in Plan.objects.filter(name__in=["Free", "Pro", "Enterprise"])}
    assert set(seeded) == {"Free", "Pro", "Enterprise"}
    free, pro, enterprise = seeded["Free"], seeded["Pro"], seeded["Enterprise"]
    assert (free.daily_token_quota, free.allow_all_models, free.max_output_price_per_mtok) == (
        1_000,
        False,
        Decimal("1.00"),
    )
    assert (pro.daily_token_quota, pro.allow_all_models) == (100_000, True)
    assert enterprise.allow_all_models and enterprise.daily_token_quota is None
    assert enterprise.monthly_budget_usd is None and enterprise.rpm is None and enterprise.tpm is None


@pytest.fixture
def free_user(plans):
    user = UserFactory(username="freebie")
    plan_assign(user=user, plan=plans["Free"])
    return user


async def acquire(user, model, *, key_allowed_model_ids=None):
    return await admission_acquire(
        user_id=user.pk,
        api_key_id=None,
        key_allowed_model_ids=key_allowed_model_ids,
        model=await sync_to_async(resolved_model)(model),
        body={"model": model.name, "messages": [], "max_tokens": 10},
        request_id=f"req-{model.name}",
        prompt_tokens_upper=10,
    )


@pytest.mark.django_db(transaction=True)
async def test_free_allows_the_cheap_models_only_and_says_why(free_user, catalog):
    assert (await acquire(free_user, catalog["cheap"])).request_id == "req-cheap-model"

    with pytest.raises(ModelNotAllowedError) as refused:
        await acquire(free_user, catalog["premium"])

    error = refused.value
    assert (error.status_code, error.error_type, error.code, error.param) == (
        403,
        "invalid_request_error",
        "model_not_allowed",
        "model",
    )
    assert error.message.startswith("Your plan (Free) does not include the model `premium-model`")
    assert "output price is at most $1.00 per million tokens" in error.message
    # One refusal, two audiences: the API's clients are pointed at GET /v1/models, the chat page at its menu.
    assert "Pick another model (GET /v1/models lists yours)" in error.message
    assert "/v1/" not in error.page_message and "model menu" in error.page_message


@pytest.mark.django_db(transaction=True)
async def test_the_keys_allow_list_narrows_the_plan(free_user, catalog):
    cheap = catalog["cheap"]
    with pytest.raises(ModelNotAllowedError) as refused:
        await acquire(free_user, cheap, key_allowed_model_ids=frozenset({catalog["flat"].pk}))
    assert refused.value.message.startswith("This API key may not use the model `cheap-model`")


@pytest.mark.django_db(transaction=True)
async def test_models_allowed_is_plan_and_key_and_enabled_catalog(free_user, catalog, plans):
    provider = await sync_to_async(lambda: catalog["cheap"].deployments.get().provider)()
    disabled = await sync_to_async(ModelFactory)(
        name="disabled-cheap", provider=provider, output_per_mtok=Decimal("0.10"), enabled=False
    )
    # A model the plan lists by name is allowed whatever its price.
    await sync_to_async(plans["Free"].allowed_models.add)(catalog["premium"])

    names = [m.name for m in await models_allowed(user_id=free_user.pk, key_allowed_model_ids=None)]
    assert names == ["cheap-model", "premium-model"]  # not flat-model ($100/Mtok), not the disabled one
    narrowed = await models_allowed(
        user_id=free_user.pk, key_allowed_model_ids=frozenset({catalog["premium"].pk, catalog["flat"].pk, disabled.pk})
    )
    assert [m.name for m in narrowed] == ["premium-model"]


@pytest.mark.django_db(transaction=True)
async def test_a_changed_plan_applies_at_once(free_user, catalog, plans):
    with pytest.raises(ModelNotAllowedError):
        await acquire(free_user, catalog["premium"])
    await sync_to_async(plan_assign)(user=free_user, plan=plans["Pro"])
    await acquire(free_user, catalog["premium"])


@pytest.mark.django_db(transaction=True)
async def test_a_user_without_a_plan_gets_the_default_one_lazily(settings, plans, catalog):
    settings.LLMHUB_DEFAULT_PLAN = "Free"
    newcomer = await sync_to_async(UserFactory)(username="newcomer")

    names = [m.name for m in await models_allowed(user_id=newcomer.pk, key_allowed_model_ids=None)]

    assert names == ["cheap-model"]
    user_plan = await UserPlan.objects.select_related("plan").aget(user=newcomer)
    assert user_plan.plan.name == "Free"


@pytest.mark.django_db(transaction=True)
async def test_a_missing_default_plan_fails_closed(settings, catalog):
    settings.LLMHUB_DEFAULT_PLAN = "Gold"
    newcomer = await sync_to_async(UserFactory)(username="newcomer")
    with pytest.raises(BillingMisconfiguredError) as refused:
        await acquire(newcomer, catalog["cheap"])
    assert refused.value.status_code == 503
    assert "'Gold' (LLMHUB_DEFAULT_PLAN) does not exist" in refused.value.message
    assert not await UserPlan.objects.filter(user=newcomer).aexists()


@pytest.mark.django_db(transaction=True)
async def test_without_a_default_plan_users_are_unrestricted(settings, catalog):
    settings.LLMHUB_DEFAULT_PLAN = ""
    newcomer = await sync_to_async(UserFactory)(username="newcomer")
    admission = await acquire(newcomer, catalog["premium"])
    assert admission.handle is None and admission.headers == {}  # nothing to hold, no I/O
    assert not await UserPlan.objects.filter(user=newcomer).aexists()


@pytest.mark.django_db(transaction=True)
async def test_a_users_own_limits_win_over_the_plans(free_user, catalog):
    await UserPlan.objects.filter(user=free_user).aupdate(rpm=1, daily_token_quota=50)
    admission = await acquire(free_user, catalog["cheap"])
    assert admission.headers["x-ratelimit-limit-requests"] == "1"
    assert admission.max_tokens is None  # the request set max_tokens: 10 + 10 fits in 50


# setplan


def setplan(*args: str) -> str:
    out = StringIO()
    call_command("setplan", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_setplan_puts_a_user_on_a_plan(plans):
    UserFactory(username="alice")
    assert setplan("alice", "pro") == "alice is now on the Pro plan.\n"
    assert UserPlan.objects.get(user__username="alice").plan.name == "Pro"

    UserPlan.objects.filter(user__username="alice").update(rpm=5)
    assert setplan("alice", "Enterprise") == "alice is now on the Enterprise plan (own limits: rpm 5).\n"
    assert setplan("alice", "Enterprise", "--clear-overrides") == "alice is now on the Enterprise plan.\n"
    assert UserPlan.objects.get(user__username="alice").rpm is None


@pytest.mark.django_db
def test_setplan_refuses_unknown_users_and_plans(plans):
    UserFactory(username="alice")
    with pytest.raises(CommandError, match="No user named 'nobody'"):
        setplan("nobody", "Pro")
    with pytest.raises(CommandError, match=r"There is no plan named 'Gold' \(plans: Enterprise, Free, Pro\)"):
        setplan("alice", "Gold")
    assert not UserPlan.objects.exists()


# /v1/models and /v1/chat/completions as a client sees them


@pytest.mark.django_db(transaction=True)
def test_a_free_key_lists_and_uses_only_its_models(llmhub_server, free_user, catalog, fake_upstream):
    secret = api_key_create(user=free_user, name="free").secret
    headers = {"Authorization": f"Bearer {secret}"}

    listed = httpx.get(f"{llmhub_server.url}/v1/models", headers=headers, timeout=10).json()
    refused = httpx.post(
        f"{llmhub_server.url}/v1/chat/completions",
        json={"model": "premium-model", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
        timeout=10,
    )

    assert [m["id"] for m in listed["data"]] == ["cheap-model"]
    # Answered as a model that does not exist, as OpenAI does; the rejected row says why.
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert wait_for_record(refused.headers["x-request-id"]).error_type == "model_not_allowed"
    assert fake_upstream.stats["requests"] == 0


# admin


@pytest.mark.django_db
def test_admin_pages_of_plans_counters_alerts_and_rollups_load(admin_client, free_user):
    for name in ("plan", "userplan", "budgetcounter", "budgetalert", "dailyusage"):
        assert admin_client.get(reverse(f"admin:billing_{name}_changelist")).status_code == 200
    plan = Plan.objects.get(name="Free")
    page = admin_client.get(reverse("admin:billing_plan_change", args=[plan.pk]))
    assert page.status_code == 200 and b"max_output_price_per_mtok" in page.content


@pytest.mark.django_db
def test_admin_actions_call_the_services(admin_client, free_user):
    UserPlan.objects.filter(user=free_user).update(rpm=3)
    user_plan = UserPlan.objects.get(user=free_user)
    admin_client.post(
        reverse("admin:billing_userplan_changelist"),
        {"action": "clear_overrides", "_selected_action": [user_plan.pk]},
    )
    assert UserPlan.objects.get(user=free_user).rpm is None

    record = UsageRecordFactory(user=free_user, cost=Decimal("0.25"))
    DailyUsage.objects.create(day=record.created_at.date(), user=free_user, model_name="stale", cost=Decimal("9"))
    stale = DailyUsage.objects.get()
    admin_client.post(
        reverse("admin:billing_dailyusage_changelist"), {"action": "rebuild", "_selected_action": [stale.pk]}
    )
    rebuilt = DailyUsage.objects.get()
    assert (rebuilt.model_name, rebuilt.cost, rebuilt.requests) == ("gpt-test", Decimal("0.25"), 1)
