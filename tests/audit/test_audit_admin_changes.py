"""Admin changes are recorded (issue 11, point 3): each audited model changed, created and deleted through the
real admin by a superuser (Django's test client), many-to-many changes, a user's role, and that no secret
(a provider's api_key, an extra_headers value, a password) appears in any event."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.urls import reverse

from audit.models import AuditEvent
from audit.services import SECRET_MASK, audit_verify
from billing.models import Plan, UserPlan
from providers.models import CatalogModel, Deployment, ModerationPolicy, Provider
from tests.audit.conftest import AGENT, admin_submit, events, last_event
from tests.factories import ModelFactory, ProviderFactory, UserFactory

pytestmark = pytest.mark.django_db

CANARY_KEY = "sk-canary-audit-4f9e1c2b7a6d5e3f"
CANARY_HEADER = "hdr-canary-audit-8b7c6d5e4f3a"
CANARY_PASSWORD = "pw-canary-audit-Zq81!xv"


def change_url(instance) -> str:
    return reverse(f"admin:{instance._meta.app_label}_{instance._meta.model_name}_change", args=[instance.pk])


def assert_by_root(event: AuditEvent, root) -> None:
    assert (event.actor_type, event.actor_id, event.actor_repr) == ("user", str(root.pk), "root")
    assert event.ip_address == "127.0.0.1"
    assert event.user_agent == AGENT


def test_changing_a_provider_records_the_changed_fields_only(admin_client, root):
    provider = ProviderFactory(name="acme")

    admin_submit(admin_client, change_url(provider), timeout_seconds="42.5", base_url="http://127.0.0.1:9/v2")

    event = last_event("providers.provider.change")
    assert event.target_type == "providers.provider"
    assert (event.target_id, event.target_repr) == (str(provider.pk), "acme")
    assert set(event.changes) == {"timeout_seconds", "base_url"}
    assert event.changes["base_url"] == ["http://127.0.0.1:9/v1", "http://127.0.0.1:9/v2"]
    old, new = event.changes["timeout_seconds"]
    assert (Decimal(old), Decimal(new)) == (Decimal("10"), Decimal("42.5"))
    assert_by_root(event, root)
    assert audit_verify() is None


def test_saving_a_provider_unchanged_records_nothing(admin_client):
    provider = ProviderFactory()
    before = AuditEvent.objects.count()

    admin_submit(admin_client, change_url(provider))

    assert AuditEvent.objects.count() == before


def test_a_providers_key_and_headers_are_masked(admin_client):
    provider = ProviderFactory()

    admin_submit(
        admin_client, change_url(provider), api_key=CANARY_KEY, extra_headers=json.dumps({"X-Canary": CANARY_HEADER})
    )

    event = last_event("providers.provider.change")
    assert event.changes["api_key"] == [SECRET_MASK, SECRET_MASK]
    assert event.changes["extra_headers"] == ["", SECRET_MASK]
    assert Provider.objects.get(pk=provider.pk).extra_headers["X-Canary"].reveal() == CANARY_HEADER  # it happened


def test_creating_a_provider(admin_client, root):
    admin_submit(
        admin_client,
        reverse("admin:providers_provider_add"),
        name="brand-new",
        kind="openai_compatible",
        base_url="http://127.0.0.1:9/v1",
        api_key=CANARY_KEY,
        timeout_seconds="30",
        byok="optional",
    )

    event = last_event("providers.provider.create")
    provider = Provider.objects.get(name="brand-new")
    assert (event.target_id, event.target_repr) == (str(provider.pk), "brand-new")
    assert event.changes["name"] == [None, "brand-new"]
    assert event.changes["byok"] == [None, "optional"]
    assert event.changes["api_key"] == ["", SECRET_MASK]
    assert_by_root(event, root)


def test_deleting_a_provider(admin_client, root):
    provider = ProviderFactory(name="doomed")

    response = admin_client.post(reverse("admin:providers_provider_delete", args=[provider.pk]), {"post": "yes"})

    assert response.status_code == 302
    assert not Provider.objects.filter(pk=provider.pk).exists()
    event = last_event("providers.provider.delete")
    assert (event.target_id, event.target_repr) == (str(provider.pk), "doomed")
    assert event.changes["name"] == ["doomed", None]
    assert event.changes["api_key"] == [SECRET_MASK, ""]
    assert_by_root(event, root)


def test_changing_a_deployment(admin_client, root):
    model = ModelFactory(name="gpt-x")
    deployment = model.deployments.get()

    admin_submit(admin_client, change_url(deployment), weight="7", output_per_mtok="0.9")

    event = last_event("providers.deployment.change")
    assert event.target_id == str(deployment.pk)
    assert set(event.changes) == {"weight", "output_per_mtok"}
    assert event.changes["weight"] == [1, 7]
    assert_by_root(event, root)


def test_changing_a_catalog_model_and_its_inline_deployment(admin_client, root):
    model = ModelFactory(name="gpt-y", context_window=1000)
    deployment = model.deployments.get()

    admin_submit(admin_client, change_url(model), context_window="2000", **{"deployments-0-priority": "3"})

    event = last_event("providers.catalogmodel.change")
    assert (event.target_id, event.target_repr) == (str(model.pk), "gpt-y")
    assert event.changes == {"context_window": [1000, 2000]}
    inline = last_event("providers.deployment.change")
    assert (inline.target_id, inline.changes) == (str(deployment.pk), {"priority": [0, 3]})
    assert_by_root(event, root)


def test_deleting_a_catalog_model_records_its_deployments_too(admin_client):
    model = ModelFactory(name="gpt-gone")
    deployment_id = model.deployments.get().pk

    response = admin_client.post(reverse("admin:providers_catalogmodel_delete", args=[model.pk]), {"post": "yes"})

    assert response.status_code == 302
    assert not CatalogModel.objects.filter(pk=model.pk).exists()
    assert last_event("providers.catalogmodel.delete").target_repr == "gpt-gone"
    assert last_event("providers.deployment.delete").target_id == str(deployment_id)


def test_changing_a_moderation_policy(admin_client, root):
    policy = ModerationPolicy.objects.create(name="strict")

    admin_submit(admin_client, change_url(policy), blocklist="forbidden\nwords", action="flag")

    event = last_event("providers.moderationpolicy.change")
    assert event.changes == {"blocklist": ["", "forbidden\nwords"], "action": ["block", "flag"]}
    assert_by_root(event, root)


def test_changing_a_plan_and_its_allowed_models(admin_client, root, django_capture_on_commit_callbacks):
    plan = Plan.objects.create(name="Audited starter", allow_all_models=False, rpm=10)
    kept, added = ModelFactory(name="model-kept"), ModelFactory(name="model-added")
    with django_capture_on_commit_callbacks(execute=True):
        plan.allowed_models.add(kept)

    with django_capture_on_commit_callbacks(execute=True):
        admin_submit(admin_client, change_url(plan), rpm="20", allowed_models=[str(kept.pk), str(added.pk)])

    changes = [event.changes for event in events("billing.plan.change")]
    assert {"rpm": [10, 20]} in changes
    assert {"allowed_models": [["model-kept"], ["model-added", "model-kept"]]} in changes
    assert_by_root(last_event("billing.plan.change"), root)


def test_a_plan_change_outside_a_request_is_by_the_system(django_capture_on_commit_callbacks):
    plan = Plan.objects.create(name="Scripted", allow_all_models=False)
    model = ModelFactory(name="model-scripted")

    with django_capture_on_commit_callbacks(execute=True):
        plan.allowed_models.add(model)
    plan.rpm = 5
    plan.save()

    for event in (last_event("billing.plan.create"), *events("billing.plan.change")):
        assert (event.actor_type, event.actor_repr, event.ip_address) == ("system", "system", None)
    assert [e.changes for e in events("billing.plan.change")] == [
        {"allowed_models": [[], ["model-scripted"]]},
        {"rpm": [None, 5]},
    ]


def test_assigning_a_plan_to_a_user(admin_client, root):
    alice = UserFactory(username="alice")
    plan = Plan.objects.create(name="Audited pro")

    admin_submit(admin_client, reverse("admin:billing_userplan_add"), user=str(alice.pk), plan=str(plan.pk), rpm="60")

    event = last_event("billing.userplan.create")
    user_plan = UserPlan.objects.get(user=alice)
    assert event.target_id == str(user_plan.pk)
    assert event.changes["plan"] == [None, plan.pk]
    assert event.changes["rpm"] == [None, 60]
    assert_by_root(event, root)


def test_a_role_change_names_the_groups_old_and_new(admin_client, root, django_capture_on_commit_callbacks):
    member, admin_group = Group.objects.get_or_create(name="member")[0], Group.objects.get_or_create(name="admin")[0]
    bob = UserFactory(username="bob")
    with django_capture_on_commit_callbacks(execute=True):
        bob.groups.add(member)
    before = len(events("role.change"))

    with django_capture_on_commit_callbacks(execute=True):
        admin_submit(admin_client, change_url(bob), groups=[str(admin_group.pk)], email="bob@new.example")

    assert len(events("role.change")) == before + 1  # set() removes then adds: one event, old set → new set
    event = last_event("role.change")
    assert (event.target_type, event.target_id, event.target_repr) == ("auth.user", str(bob.pk), "bob")
    assert event.changes == {"groups": [["member"], ["admin"]]}
    assert_by_root(event, root)
    # (The admin's form also drops date_joined's microseconds, a change it records too.)
    edit = [event for event in events("auth.user.change") if "email" in event.changes][-1]
    assert edit.changes["email"] == ["bob@example.com", "bob@new.example"]


def test_a_role_given_from_the_groups_side_is_a_role_change(django_capture_on_commit_callbacks):
    operator = Group.objects.get_or_create(name="operator")[0]
    carol = UserFactory(username="carol")

    with django_capture_on_commit_callbacks(execute=True):
        operator.user_set.add(carol)

    event = last_event("role.change")
    assert (event.target_id, event.changes) == (str(carol.pk), {"groups": [[], ["operator"]]})


def test_a_rolled_back_role_change_is_not_recorded(django_capture_on_commit_callbacks):
    from django.db import transaction

    viewer = Group.objects.get_or_create(name="viewer")[0]
    dave = UserFactory(username="dave")
    before = len(events("role.change"))

    with django_capture_on_commit_callbacks(execute=True):
        with pytest.raises(RuntimeError), transaction.atomic():
            dave.groups.add(viewer)
            raise RuntimeError("abandoned")

    assert len(events("role.change")) == before


def test_changing_a_groups_permissions(admin_client, root, django_capture_on_commit_callbacks):
    group = Group.objects.create(name="auditors")
    url = change_url(group)
    permission = Permission.objects.get(codename="view_auditevent")

    with django_capture_on_commit_callbacks(execute=True):
        admin_submit(admin_client, url, permissions=[str(permission.pk)])

    event = last_event("auth.group.change")
    assert event.changes == {"permissions": [[], [str(permission)]]}
    assert_by_root(event, root)


def test_creating_and_deleting_a_user_through_the_admin(admin_client, root):
    response = admin_client.post(
        reverse("admin:auth_user_add"),
        {"username": "erin", "password1": CANARY_PASSWORD, "password2": CANARY_PASSWORD, "usable_password": "true"},
    )
    assert response.status_code == 302
    erin = get_user_model().objects.get(username="erin")
    created = last_event("auth.user.create")
    assert created.target_repr == "erin"
    assert created.changes["password"] == ["", SECRET_MASK]

    response = admin_client.post(reverse("admin:auth_user_delete", args=[erin.pk]), {"post": "yes"})

    assert response.status_code == 302
    deleted = last_event("auth.user.delete")
    assert (deleted.target_id, deleted.target_repr) == (str(erin.pk), "erin")
    assert_by_root(deleted, root)


def test_a_password_change_is_recorded_masked(admin_client, root):
    frank = UserFactory(username="frank")

    response = admin_client.post(
        reverse("admin:auth_user_password_change", args=[frank.pk]),
        {"password1": CANARY_PASSWORD, "password2": CANARY_PASSWORD, "usable_password": "true"},
    )

    assert response.status_code == 302
    event = last_event("auth.user.change")
    assert event.target_repr == "frank"
    assert event.changes == {"password": [SECRET_MASK, SECRET_MASK]}
    assert_by_root(event, root)


def test_no_secret_appears_in_any_event(admin_client, django_capture_on_commit_callbacks):
    provider = ProviderFactory(api_key=CANARY_KEY)
    with django_capture_on_commit_callbacks(execute=True):
        admin_submit(admin_client, change_url(provider), extra_headers=json.dumps({"X-Canary": CANARY_HEADER}))
        admin_submit(admin_client, change_url(provider), api_key=CANARY_KEY + "-2")
        admin_client.post(
            reverse("admin:auth_user_add"),
            {"username": "gina", "password1": CANARY_PASSWORD, "password2": CANARY_PASSWORD, "usable_password": "true"},
        )
        admin_client.post(reverse("admin:providers_provider_delete", args=[provider.pk]), {"post": "yes"})
    assert Deployment.objects.count() == 0  # nothing else interferes

    recorded = json.dumps(list(AuditEvent.objects.values()), default=str)
    assert "providers.provider.delete" in recorded and "auth.user.create" in recorded
    for secret in (CANARY_KEY, CANARY_HEADER, CANARY_PASSWORD, "canary"):
        assert secret not in recorded
    # Nor its hash: Django's hasher output starts with the algorithm's name.
    assert "md5$" not in recorded and "pbkdf2" not in recorded


def test_changing_a_gateway_key_in_the_admin_is_recorded(admin_client, root, django_capture_on_commit_callbacks):
    """Raising a key's budget, lifting its expiry, giving it the keys:manage scope or more models are acts an
    auditor must see, like the key services' own events (key.create, key.revoke)."""
    from billing.models import KeyScope
    from billing.services.keys import api_key_create

    alice = UserFactory(username="alice")
    kept, added = ModelFactory(name="model-kept"), ModelFactory(name="model-added")
    key = api_key_create(user=alice, name="ci", allowed_models=[kept]).api_key

    with django_capture_on_commit_callbacks(execute=True):
        admin_submit(
            admin_client,
            change_url(key),
            name="ci-main",
            budget_usd="250",
            rpm="600",
            scopes=KeyScope.KEYS_MANAGE.value,
            allowed_models=[str(kept.pk), str(added.pk)],
        )

    event = last_event("key.change")
    key.refresh_from_db()
    assert (event.target_type, event.target_id, event.target_repr) == ("billing.apikey", str(key.pk), str(key))
    old_budget, new_budget = event.changes.pop("budget_usd")
    assert (old_budget, Decimal(new_budget)) == (None, Decimal("250"))
    assert event.changes == {
        "name": ["ci", "ci-main"],
        "rpm": [None, 600],
        "scopes": [[], ["keys:manage"]],
        "allowed_models": [["model-kept"], ["model-added", "model-kept"]],
    }
    assert_by_root(event, root)
    assert audit_verify() is None


def test_saving_a_gateway_key_unchanged_in_the_admin_records_nothing(admin_client):
    from billing.services.keys import api_key_create

    key = api_key_create(user=UserFactory(username="alice"), name="ci").api_key
    before = AuditEvent.objects.count()

    admin_submit(admin_client, change_url(key))

    assert AuditEvent.objects.count() == before


def test_importing_a_providers_models_in_the_admin_is_recorded(admin_client, root, fake_upstream):
    """The import adds catalog models and deployments in bulk (no save signals): it records them itself."""
    from llmhub.testing.fake_upstream import EMBEDDING_MODELS, MODELS

    provider = ProviderFactory(name="acme", base_url=fake_upstream.base_url + "/v1")
    imported = sorted(model_id for model_id, _ in MODELS + EMBEDDING_MODELS)

    response = admin_client.post(
        reverse("admin:providers_provider_changelist"),
        {"action": "import_models", "_selected_action": [str(provider.pk)]},
    )

    assert response.status_code == 302
    assert sorted(CatalogModel.objects.values_list("name", flat=True)) == imported
    event = last_event("provider.import_models")
    assert (event.target_type, event.target_id, event.target_repr) == ("providers.provider", str(provider.pk), "acme")
    assert event.changes == {"models": [[], imported]}
    assert_by_root(event, root)
    assert audit_verify() is None


def test_an_import_that_adds_nothing_records_nothing(admin_client, fake_upstream):
    from providers.services.model_import import provider_import_models

    provider = ProviderFactory(name="acme", base_url=fake_upstream.base_url + "/v1")
    provider_import_models(provider=provider)
    before = AuditEvent.objects.count()

    provider_import_models(provider=provider)

    assert AuditEvent.objects.count() == before


def test_a_token_quota_or_limit_is_recorded_as_a_number_not_as_a_secret(admin_client, root):
    """A plan's daily token quota, a user's own quota and a model's output limit are what an auditor checks
    after a bill: only credentials (a password, an API key, an access token) are masked."""
    plan = Plan.objects.create(name="Quota plan", daily_token_quota=10_000)
    model = ModelFactory(name="model-limited")
    alice = UserFactory(username="alice")

    admin_submit(admin_client, change_url(plan), daily_token_quota="10000000")
    add_user_plan = reverse("admin:billing_userplan_add")
    admin_submit(admin_client, add_user_plan, user=str(alice.pk), plan=str(plan.pk), daily_token_quota="5")
    model.max_output_tokens = 4096
    model.save()

    assert last_event("billing.plan.change").changes == {"daily_token_quota": [10_000, 10_000_000]}
    assert last_event("billing.userplan.create").changes["daily_token_quota"] == [None, 5]
    assert last_event("providers.catalogmodel.change").changes["max_output_tokens"][1] == 4096


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("api_key", True),
        ("secret_hash", True),
        ("previous_secret_hash", True),
        ("extra_headers", True),
        ("key_hash", True),
        ("token", True),
        ("access_token", True),
        ("refresh_token", True),
        ("token_hash", True),
        ("daily_token_quota", False),
        ("max_output_tokens", False),
        ("prompt_tokens", False),
        ("webhook_url", True),
        ("email_recipients", False),
        ("name", False),
    ],
)
def test_which_field_names_say_secret(name, secret):
    from audit.services import is_secret_field

    assert is_secret_field(name) is secret


def test_a_gateway_keys_limits_are_recorded_when_it_is_created(admin_client, root):
    """A key made with a $5,000 budget and no rate limit is not the same act as one made with $5: key.create
    says which, in the admin and over the API alike."""
    from rest_framework.test import APIClient

    from billing.models import KeyScope
    from billing.services.keys import api_key_create

    alice = UserFactory(username="alice")
    admin_submit(
        admin_client,
        reverse("admin:billing_apikey_add"),
        user=str(alice.pk),
        name="from-admin",
        budget_usd="5000",
        budget_period="daily",
        rpm="60",
        tpm="",
    )
    manager = api_key_create(user=alice, name="manager", scopes=[KeyScope.KEYS_MANAGE])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {manager.secret}")
    response = client.post("/api/keys/", {"name": "from-api", "budget_usd": "5", "tpm": 1000}, format="json")
    assert response.status_code == 201, response.content

    by_name = {event.changes["name"][1]: event.changes for event in events("key.create")}
    admin_made, api_made = by_name["from-admin"], by_name["from-api"]
    assert Decimal(admin_made["budget_usd"][1]) == Decimal("5000")
    limits = ("budget_period", "rpm", "tpm")
    assert [admin_made[name] for name in limits] == [[None, "daily"], [None, 60], [None, None]]
    assert Decimal(api_made["budget_usd"][1]) == Decimal("5")
    assert [api_made[name] for name in limits] == [[None, "monthly"], [None, None], [None, 1000]]
    assert_by_root(events("key.create")[0], root)


WEBHOOK_CANARY = "https://hooks.example.com/services/T0/B0/canary-webhook-7c1e"


def test_disabling_an_operations_alert_rule_is_recorded(admin_client, root):
    """An operator who switches an alert rule off (or raises its threshold) silences the pages meant to catch an
    outage: the log says who did it. Its webhook (a Slack-style URL is its own credential) is masked."""
    from billing.models import OpsAlertKind, OpsAlertRule

    rule = OpsAlertRule.objects.create(name="errors", kind=OpsAlertKind.ERROR_RATE, threshold=Decimal("5"))
    created = last_event("billing.opsalertrule.create")
    assert created.changes["threshold"] == [None, "5"]

    admin_submit(admin_client, change_url(rule), enabled=None, threshold="50", webhook_url=WEBHOOK_CANARY)

    event = last_event("billing.opsalertrule.change")
    assert (event.target_type, event.target_id, event.target_repr) == ("billing.opsalertrule", str(rule.pk), str(rule))
    assert event.changes == {
        "enabled": [True, False],
        "threshold": ["5.0000", "50"],
        "webhook_url": ["", SECRET_MASK],
    }
    assert_by_root(event, root)
    assert "canary-webhook" not in json.dumps(list(AuditEvent.objects.values()), default=str)

    admin_client.post(reverse("admin:billing_opsalertrule_delete", args=[rule.pk]), {"post": "yes"})
    assert last_event("billing.opsalertrule.delete").target_id == str(rule.pk)


def test_an_alert_rule_watching_another_model_is_recorded_by_its_name_alone(admin_client, root):
    """The rule's ``model_name`` change is the act; ``model_name_bound`` (the name its binding was made for, which
    follows it) is bookkeeping, not a second change in the log."""
    from billing.models import OpsAlertKind, OpsAlertRule
    from tests.factories import ModelFactory

    watched = ModelFactory(name="gpt-watched")
    rule = OpsAlertRule.objects.create(name="errors", kind=OpsAlertKind.ERROR_RATE, threshold=Decimal("5"))
    assert "model_name_bound" not in last_event("billing.opsalertrule.create").changes

    admin_submit(admin_client, change_url(rule), model_name="gpt-watched")

    changes = last_event("billing.opsalertrule.change").changes
    assert changes == {"model_name": ["", "gpt-watched"], "model": [None, watched.pk]}


def test_the_staff_flag_a_role_group_gives_is_recorded(admin_client, root, django_capture_on_commit_callbacks):
    """Putting a user in the operator group from the admin's user form makes them staff (``role_staff_sync``):
    that flip, which opens the admin and the staff pages to them, is in the log beside the role.change."""
    operator = Group.objects.get_or_create(name="operator")[0]
    hana = UserFactory(username="hana")

    with django_capture_on_commit_callbacks(execute=True):
        admin_submit(admin_client, change_url(hana), groups=[str(operator.pk)])

    hana.refresh_from_db()
    assert hana.is_staff
    flips = [event for event in events("auth.user.change") if "is_staff" in event.changes]
    assert [(event.target_id, event.changes["is_staff"]) for event in flips] == [(str(hana.pk), [False, True])]
    assert_by_root(flips[0], root)
    assert last_event("role.change").changes == {"groups": [[], ["operator"]]}

    member = Group.objects.get_or_create(name="member")[0]
    with django_capture_on_commit_callbacks(execute=True):
        hana.groups.set([member])

    hana.refresh_from_db()
    assert not hana.is_staff
    event = last_event("auth.user.change")
    assert (event.changes, event.actor_type) == ({"is_staff": [True, False]}, "system")


def test_taking_a_user_out_of_the_operator_group_in_the_admin_takes_the_operator_role_away(
    admin_client, root, django_capture_on_commit_callbacks
):
    """Unticking the operator group on the admin's user form (the staff box still ticked, as the form shows it)
    demotes the user: they are no longer staff, so neither an operator by the no-role-group fallback."""
    from accounts.roles import Role, role_of

    operator = Group.objects.get_or_create(name="operator")[0]
    hana = UserFactory(username="hana")
    with django_capture_on_commit_callbacks(execute=True):
        admin_submit(admin_client, change_url(hana), groups=[str(operator.pk)])
    hana = get_user_model().objects.get(pk=hana.pk)
    assert (hana.is_staff, role_of(hana)) == (True, Role.OPERATOR)

    with django_capture_on_commit_callbacks(execute=True):
        admin_submit(admin_client, change_url(hana), groups=None)

    hana = get_user_model().objects.get(pk=hana.pk)
    assert list(hana.groups.all()) == []
    assert (hana.is_staff, role_of(hana)) == (False, Role.MEMBER)
    assert last_event("role.change").changes == {"groups": [["operator"], []]}
    flips = [event.changes["is_staff"] for event in events("auth.user.change") if "is_staff" in event.changes]
    assert flips == [[False, True], [True, False]]


def test_a_staff_user_in_no_role_group_stays_an_operator_when_the_admin_saves_them(admin_client, root):
    """The fallback for staff accounts from before roles stays: saving such a user's form untouched (no group
    removed) leaves them staff and operator."""
    from accounts.roles import Role, role_of

    legacy = UserFactory(username="legacy-ops", is_staff=True)

    admin_submit(admin_client, change_url(legacy), first_name="Lee")

    legacy = get_user_model().objects.get(pk=legacy.pk)
    assert (legacy.is_staff, role_of(legacy)) == (True, Role.OPERATOR)


def test_adding_and_removing_users_from_the_groups_side_syncs_their_staff_flag(
    root, django_capture_on_commit_callbacks
):
    """``group.user_set.add(...)`` (the reverse side, as code or a group page would) makes the users staff, and
    removing or clearing them takes it away, each flip in the log like a change from the user's side."""
    from asgiref.sync import async_to_sync

    from accounts.roles import Role, role_for_user_id, role_of

    operator = Group.objects.get_or_create(name="operator")[0]
    admin = Group.objects.get_or_create(name="admin")[0]
    ana, ben = UserFactory(username="ana"), UserFactory(username="ben")
    assert async_to_sync(role_for_user_id)(ana.pk) == Role.MEMBER

    with django_capture_on_commit_callbacks(execute=True):
        operator.user_set.add(ana, ben)

    ana, ben = (get_user_model().objects.get(pk=u.pk) for u in (ana, ben))
    assert (ana.is_staff, ben.is_staff) == (True, True)
    assert (role_of(ana), async_to_sync(role_for_user_id)(ana.pk)) == (Role.OPERATOR, Role.OPERATOR)
    flips = {(event.target_id, tuple(event.changes["is_staff"])) for event in events("auth.user.change")}
    assert flips == {(str(ana.pk), (False, True)), (str(ben.pk), (False, True))}
    assert {event.target_id for event in events("role.change")} == {str(ana.pk), str(ben.pk)}

    with django_capture_on_commit_callbacks(execute=True):
        operator.user_set.remove(ana)
        admin.user_set.add(ben)
        operator.user_set.clear()

    ana, ben = (get_user_model().objects.get(pk=u.pk) for u in (ana, ben))
    assert (ana.is_staff, role_of(ana)) == (False, Role.MEMBER)
    assert (ben.is_staff, role_of(ben)) == (True, Role.ADMIN)

    with django_capture_on_commit_callbacks(execute=True):
        admin.user_set.clear()
    ben = get_user_model().objects.get(pk=ben.pk)
    assert (ben.is_staff, role_of(ben)) == (False, Role.MEMBER)
    assert [event.changes["is_staff"] for event in events("auth.user.change") if event.target_id == str(ben.pk)] == [
        [False, True],
        [True, False],
    ]
