"""The users' admin at scale: its list costs the same queries however many users it shows, and any number of
users selected across it can be deleted (docs/ledger.md, "The admin at scale")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
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


def test_the_delete_page_of_users_selected_across_the_list_lists_the_first_and_counts_the_rest(admin_client):
    """The confirmation page of users selected across the list costs the same queries for 50 users as for 2,000
    (Django's read and rendered every row the delete cascades to: past 120 s at 68,000 stored responses); it lists
    the first rows, names each model's total and how many more it takes, and confirming deletes every one."""
    url = reverse("admin:auth_user_changelist") + "?is_superuser__exact=0"
    users_with_their_data(50)
    first = User.objects.filter(is_superuser=False).order_by("pk").first()
    action = {"action": "delete_selected", "select_across": "1", "index": "0", "_selected_action": [first.pk]}
    admin_client.post(url, action)  # the first view fills Django's caches (content types): not counted
    with CaptureQueriesContext(connection) as few:
        page = admin_client.post(url, action)
    assert dict(page.context["model_count"])["users"] == 50

    users_with_their_data(1_950, start=50)
    with CaptureQueriesContext(connection) as many:
        page = admin_client.post(url, action)
    assert page.status_code == 200 and len(many) == len(few)
    counts = dict(page.context["model_count"])
    assert counts["users"] == 2_000 and counts["API keys"] == 4_000
    assert counts["conversations"] == 2_000 and counts["stored responses"] == 2_000
    content = page.content.decode()
    assert "… and 1900 more users" in content and "… and 3900 more API keys" in content
    assert not page.context["perms_lacking"] and not page.context["protected"]

    assert admin_client.post(url, {**action, "post": "yes"}).status_code == 302
    assert list(User.objects.values_list("is_superuser", flat=True)) == [True]
    assert not ApiKey.objects.exists() and not Conversation.objects.exists() and not StoredResponse.objects.exists()


def test_the_delete_page_of_a_user_keeps_djangos_protected_check_over_every_row_it_takes(admin_client):
    """A user's chain of 150 responses, each continuing the one before, all go with them: not protected, though the
    page lists only the first 100 of them. A response of another user continuing one of theirs (RESTRICT) is named
    protected, and the delete is refused on the page (the delete itself would be a 500, RestrictedError)."""
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    chain: list[StoredResponse] = []
    for number in range(150):
        chain.append(
            StoredResponse.objects.create(
                response_id=f"resp_{number}",
                owner=alice,
                model_name="gpt-test",
                status="completed",
                previous=chain[-1] if chain else None,
                created_at=NOW,
                expires_at=NOW + timedelta(days=30),
            )
        )
    url = reverse("admin:auth_user_delete", args=[alice.pk])
    page = admin_client.get(url)
    assert page.status_code == 200 and not page.context["protected"]
    assert dict(page.context["model_count"])["stored responses"] == 150
    assert "… and 50 more stored responses" in page.content.decode()

    StoredResponse.objects.create(
        response_id="resp_bob",
        owner=bob,
        model_name="gpt-test",
        status="completed",
        previous=chain[120],
        created_at=NOW,
        expires_at=NOW + timedelta(days=30),
    )
    page = admin_client.get(url)
    assert page.status_code == 200 and len(page.context["protected"]) == 1
    assert "resp_bob" in str(page.context["protected"][0])
    assert admin_client.post(url, {"post": "yes"}).status_code == 200  # the "cannot delete" page again
    assert User.objects.filter(pk=alice.pk).exists() and StoredResponse.objects.count() == 151


def test_the_delete_page_asks_the_permission_of_every_model_it_takes_rows_of_not_only_those_listed(client):
    """Staff who may delete users but not conversations, deleting 150 users of whom only the last 50 have one (none
    of the first 100 the page lists): the page names conversations as lacking permission and the delete is refused,
    as Django refuses it when it lists every row."""
    staff = UserFactory(username="staff", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["view_user", "delete_user"]))
    client.force_login(staff)
    users = User.objects.bulk_create(User(username=f"v{n}", email=f"v{n}@example.com") for n in range(150))
    listed_last = sorted(users, key=lambda user: user.username)[100:]  # the list's order, by username
    Conversation.objects.bulk_create(Conversation(owner=user, title="t") for user in listed_last)
    url = reverse("admin:auth_user_changelist") + "?username__startswith=v"
    action = {"action": "delete_selected", "_selected_action": [user.pk for user in users]}

    page = client.post(url, action)
    assert page.status_code == 200 and dict(page.context["model_count"])["conversations"] == 50
    assert list(page.context["perms_lacking"]) == ["conversation"]
    assert client.post(url, {**action, "post": "yes"}).status_code == 403
    assert User.objects.filter(username__startswith="v").count() == 150 and Conversation.objects.count() == 50


def test_the_delete_page_of_a_role_lists_its_first_members_and_counts_the_rest(admin_client):
    """A role is a group every user of it is in: its delete page listed a row a member (2,000 here; every user of a
    deployment for the default role); it lists the first 100, counts the rest, and confirming deletes the group,
    not the users."""
    from django.contrib.auth.models import Group

    group = Group.objects.create(name="crowd")
    users = User.objects.bulk_create(User(username=f"m{n}", email=f"m{n}@example.com") for n in range(2_000))
    group.user_set.add(*users)
    url = reverse("admin:auth_group_delete", args=[group.pk])
    page = admin_client.get(url)
    assert page.status_code == 200 and not page.context["protected"]
    assert dict(page.context["model_count"]) == {"groups": 1, "user-group relationships": 2_000}
    content = page.content.decode()
    assert content.count("<li>User-group relationship: ") == 100
    assert "… and 1900 more user-group relationships" in content
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not Group.objects.filter(pk=group.pk).exists()
    assert User.objects.filter(username__startswith="m").count() == 2_000
