"""The users' admin at scale: its list costs the same queries however many users it shows, and any number of
users selected across it can be deleted (docs/ledger.md, "The admin at scale")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.roles import Role, role_set
from billing.models import ApiKey, BudgetAlert
from chat.models import Conversation, StoredResponse
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

User = get_user_model()
NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)


def users_with_their_data(count: int, *, start: int = 0) -> list:
    """``count`` users in bulk, each with two keys, a conversation and a stored response of a key, and a budget alert
    (set to null, not deleted, with its user and its key)."""
    users = User.objects.bulk_create(
        User(username=f"u{start + n}", email=f"u{start + n}@example.com") for n in range(count)
    )
    keys = ApiKey.objects.bulk_create(
        ApiKey(user=user, name=name, prefix=f"{name}{user.pk}", secret_hash=f"{name}{user.pk}")
        for user in users
        for name in ("a", "b")
    )
    Conversation.objects.bulk_create(Conversation(owner=key.user, api_key=key, title="t") for key in keys[::2])
    StoredResponse.objects.bulk_create(
        StoredResponse(
            response_id=f"resp_{key.pk}",
            owner=key.user,
            api_key=key,
            model_name="gpt-test",
            status="completed",
            created_at=NOW,
            expires_at=NOW + timedelta(days=30),
        )
        for key in keys[1::2]
    )
    BudgetAlert.objects.bulk_create(
        BudgetAlert(
            scope_kind="key",
            scope_id=key.pk,
            user=key.user,
            api_key=key,
            metric="usd",
            period="monthly",
            period_start=NOW,
            threshold=80,
            limit=Decimal("1"),
            spent=Decimal("0.8"),
        )
        for key in keys
    )
    return users


def test_the_users_list_reads_the_pages_roles_in_one_query(admin_client):
    url = reverse("admin:auth_user_changelist")
    role_set(UserFactory(username="op"), Role.OPERATOR)
    admin_client.get(url)  # the first view fills Django's caches (content types): not counted
    with CaptureQueriesContext(connection) as few:
        admin_client.get(url)

    for user in users_with_their_data(150):
        if user.pk % 3 == 0:
            user.groups.add(*User.objects.get(username="op").groups.all())
    with CaptureQueriesContext(connection) as many:
        page = admin_client.get(url)

    assert page.status_code == 200 and len(page.context["cl"].result_list) == 100
    assert len(many) == len(few)
    assert page.content.decode().count('<td class="field-role">operator</td>') >= 30


@pytest.mark.usefixtures("sqlite_variable_limit")
def test_the_admin_deletes_more_users_than_a_statement_can_name(admin_client):
    """Users selected across the list (all but the admin) and deleted, with their keys, conversations and responses;
    their alerts stay, without them: the confirmation page and the delete answer (both were a 500, "too many SQL
    variables": the page read every user's groups at once, and Django's delete set the alerts' user and key to null
    in one statement naming every one)."""
    users_with_their_data(1_100)
    url = reverse("admin:auth_user_changelist") + "?is_superuser__exact=0"
    first = User.objects.filter(is_superuser=False).order_by("pk").first()
    action = {"action": "delete_selected", "select_across": "1", "index": "0", "_selected_action": [first.pk]}

    page = admin_client.post(url, action)
    assert page.status_code == 200 and page.context["model_count"]
    assert admin_client.post(url, {**action, "post": "yes"}).status_code == 302

    assert list(User.objects.values_list("is_superuser", flat=True)) == [True]
    assert not ApiKey.objects.exists() and not Conversation.objects.exists() and not StoredResponse.objects.exists()
    assert BudgetAlert.objects.count() == 2_200
    assert not BudgetAlert.objects.filter(user__isnull=False).exists()
    assert not BudgetAlert.objects.filter(api_key__isnull=False).exists()
