"""An admin address whose query carries a NUL byte (``%00``) is refused with a 400, never a server error.

PostgreSQL's text cannot hold U+0000: a list filter's value with one (``?kind=a%00b``, ``?status__exact=…``) went into
the list's query as it came, and the database refused it (``DataError``, a 500) on nearly every list of the admin:
providers, models, deployments, the ledger, keys' alerts and counters, the audit log, experiments, prompts,
conversations, scheduled tasks. Django's own search form already refuses a NUL in ``q``. SQLite stores one, and its
lists answered 200. This module runs on PostgreSQL too (the Makefile's ``POSTGRES_TESTS``)."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import AsyncClient, Client
from django.urls import reverse

from tests.factories import ModelFactory, UsageRecordFactory

pytestmark = pytest.mark.django_db(transaction=True)

LISTS = [
    ("admin:providers_provider_changelist", {"kind": "openai\x00"}),
    ("admin:providers_catalogmodel_changelist", {"mode__exact": "chat\x00"}),
    ("admin:providers_deployment_changelist", {"breaker_override": "\x00"}),
    ("admin:billing_usagerecord_changelist", {"status": "ok\x00x"}),
    ("admin:audit_auditevent_changelist", {"action": "\x00"}),
    ("admin:django_celery_beat_periodictask_changelist", {"task": "a\x00b"}),
    ("admin:billing_usagerecord_changelist", {"\x00": "ok"}),
]


@pytest.mark.parametrize(("name", "query"), LISTS)
def test_a_nul_in_a_lists_query_is_a_400(admin_client, name, query):
    ModelFactory()
    UsageRecordFactory()

    response = admin_client.get(reverse(name), query)

    assert response.status_code == 400
    assert "NUL" in response.content.decode()


def test_a_nul_is_refused_to_a_staff_user_who_may_only_view():
    staff = get_user_model().objects.create_user("viewer", "viewer@example.com", "pw-for-tests-123", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_provider"))
    url = reverse("admin:providers_provider_changelist")
    client = Client()
    client.force_login(staff)

    assert client.get(url, {"kind": "openai"}).status_code == 200
    assert client.get(url, {"kind": "openai\x00"}).status_code == 400


async def test_the_asynchronous_stack_refuses_it_too(admin_user):
    async_client = AsyncClient()
    await async_client.aforce_login(admin_user)
    url = reverse("admin:providers_provider_changelist")

    response = await async_client.get(url, {"byok__exact": "optional\x00"})

    assert response.status_code == 400
