"""Admin actions that write need the model's change permission: a staff user who may only view a list (a group
given ``view_*`` alone, as the roles' groups are for the ledger) is not offered them and cannot post them.

Django offers an action with no ``permissions`` to whoever may view the list. Until 7 December every writing action
of llmhub's admin but the experiments' and the provider keys' re-check was such an action: a staff user with
``view_apikey`` alone could rotate any user's gateway key and read the new secret in the confirmation (and spend on
it), or revoke everyone's keys; ``view_deployment`` alone forced breakers open (no traffic to a deployment);
``view_provider`` imported models into the catalog; ``view_userplan`` cleared users' own limits; and
``view_periodictask`` disabled or ran the scheduled tasks (the ledger's spool replay, the alert sweeps)."""

from __future__ import annotations

import re

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client, RequestFactory
from django.urls import reverse
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from billing.models import ApiKey
from billing.services.keys import api_key_create
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

WHOLE_KEY = re.compile(r"sk-llmhub-[A-Za-z0-9]+-[A-Za-z0-9]+")
# Actions that only read (a download of what the list shows): a viewer's, like the list.
READING_ACTIONS = {("audit", "auditevent", "export_csv")}


def staff_who_may_only_view(*models: type) -> object:
    user = get_user_model().objects.create_user("viewing-staff", "viewer@example.com", "pw-for-tests-123")
    user.is_staff = True
    user.save()
    for model in models:
        user.user_permissions.add(
            Permission.objects.get(
                content_type__app_label=model._meta.app_label, codename=f"view_{model._meta.model_name}"
            )
        )
    return get_user_model().objects.get(pk=user.pk)  # permissions are cached on the instance


def signed_in(user: object) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_staff_user_who_may_only_view_keys_can_neither_rotate_nor_revoke_them():
    alice = UserFactory(username="alice")
    created = api_key_create(user=alice, name="alices-app")
    before = ApiKey.objects.get(pk=created.api_key.pk)
    client = signed_in(staff_who_may_only_view(ApiKey))
    url = reverse("admin:billing_apikey_changelist")
    assert client.get(url).status_code == 200  # the list is theirs to read

    for action in ("rotate_selected", "revoke_selected"):
        response = client.post(url, {"action": action, "_selected_action": [created.api_key.pk]}, follow=True)
        assert not WHOLE_KEY.search(response.content.decode())  # a prefix is listed; a whole key never
    after = ApiKey.objects.get(pk=created.api_key.pk)
    assert (after.secret_hash, after.prefix, after.rotated_at, after.revoked_at) == (
        before.secret_hash,
        before.prefix,
        None,
        None,
    )
    page = client.get(url).content.decode()
    assert "rotate_selected" not in page and "revoke_selected" not in page  # not offered either


def test_a_staff_user_who_may_only_view_scheduled_tasks_can_neither_disable_nor_run_them():
    every_minute = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.MINUTES)
    task = PeriodicTask.objects.create(
        name="spool replay", task="billing.tasks.ledger_spool_replay", interval=every_minute
    )
    client = signed_in(staff_who_may_only_view(PeriodicTask))
    url = reverse("admin:django_celery_beat_periodictask_changelist")

    client.post(url, {"action": "disable_tasks", "_selected_action": [task.pk]}, follow=True)

    assert PeriodicTask.objects.get(pk=task.pk).enabled


def test_every_action_a_view_only_staff_user_is_offered_only_reads():
    """Over every model of the admin: with the view permission alone, the actions offered are the reading ones,
    and those of lists no one may change (the rollups, alerts, incidents, counters: a rebuild, a delivery sent
    again), which are operations on what the list shows rather than changes of it."""
    offered = []
    for model, model_admin in admin.site._registry.items():
        request = RequestFactory().get("/")
        request.user = staff_who_may_only_view(model)
        superuser = get_user_model()(is_staff=True, is_superuser=True, is_active=True)
        superuser_request = RequestFactory().get("/")
        superuser_request.user = superuser
        if not model_admin.has_change_permission(superuser_request):
            get_user_model().objects.filter(pk=request.user.pk).delete()
            continue  # nobody changes its rows: its actions are a viewer's by design
        for name in model_admin.get_actions(request):
            if (model._meta.app_label, model._meta.model_name, name) not in READING_ACTIONS:
                offered.append(f"{model._meta.label}.{name}")
        get_user_model().objects.filter(pk=request.user.pk).delete()
    assert offered == []
