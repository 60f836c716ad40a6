"""Each role sees exactly what its row says: one table of endpoints × roles (the management API, the usage
pages, the admin, /v1), each cell the status the role gets, checked through the real URL stack with a
signed-in session (and a gateway key for /v1)."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model

from accounts.roles import Role, role_for_user_id, role_of, role_set
from billing.services.keys import api_key_create
from tests.factories import ModelFactory, UserFactory
from tests.transactions import read_before_commit

pytestmark = pytest.mark.django_db

A, OP, M, V = Role.ADMIN, Role.OPERATOR, Role.MEMBER, Role.VIEWER
ROLES = (A, OP, M, V)
LOGIN = 302  # a redirect: the admin sends whoever is not staff to its login page, the chat page a viewer to /usage/

# (method, path, body, {role: status}); "{other}" is another user's username.
TABLE: list[tuple[str, str, dict | None, dict[Role, int]]] = [
    ("get", "/api/keys/", None, {A: 200, OP: 200, M: 200, V: 403}),
    ("post", "/api/keys/", {"name": "new"}, {A: 201, OP: 201, M: 201, V: 403}),
    ("get", "/api/usage/", None, {A: 200, OP: 200, M: 200, V: 200}),
    ("get", "/api/usage/summary/", None, {A: 200, OP: 200, M: 200, V: 200}),
    ("get", "/api/usage/?user={other}", None, {A: 200, OP: 200, M: 403, V: 403}),
    ("get", "/api/usage/summary/?user={other}", None, {A: 200, OP: 200, M: 403, V: 403}),
    ("get", "/api/conversations/", None, {A: 200, OP: 200, M: 200, V: 403}),
    ("get", "/api/models/", None, {A: 200, OP: 200, M: 200, V: 403}),
    ("get", "/api/provider-keys/", None, {A: 200, OP: 200, M: 200, V: 403}),
    ("get", "/usage/", None, {A: 200, OP: 200, M: 200, V: 200}),
    ("get", "/", None, {A: 200, OP: 200, M: 200, V: 302}),  # a viewer's page is their usage
    ("get", "/keys/", None, {A: 200, OP: 200, M: 200, V: 403}),
    ("get", "/provider-keys/", None, {A: 200, OP: 200, M: 200, V: 403}),
    ("get", "/usage/admin/", None, {A: 200, OP: 200, M: 403, V: 403}),
    ("get", "/admin/", None, {A: 200, OP: 200, M: LOGIN, V: LOGIN}),
    ("get", "/admin/providers/provider/", None, {A: 200, OP: 200, M: LOGIN, V: LOGIN}),
    ("get", "/admin/providers/provider/add/", None, {A: 200, OP: 200, M: LOGIN, V: LOGIN}),
    ("get", "/admin/providers/catalogmodel/", None, {A: 200, OP: 200, M: LOGIN, V: LOGIN}),
    ("get", "/admin/providers/deployment/", None, {A: 200, OP: 200, M: LOGIN, V: LOGIN}),
    ("get", "/admin/providers/moderationpolicy/add/", None, {A: 200, OP: 200, M: LOGIN, V: LOGIN}),
    ("get", "/admin/billing/usagerecord/", None, {A: 200, OP: 200, M: LOGIN, V: LOGIN}),
    ("get", "/admin/audit/auditevent/", None, {A: 200, OP: 200, M: LOGIN, V: LOGIN}),
    ("get", "/admin/billing/plan/", None, {A: 200, OP: 200, M: LOGIN, V: LOGIN}),
    ("get", "/admin/billing/plan/add/", None, {A: 200, OP: 403, M: LOGIN, V: LOGIN}),
    ("get", "/admin/auth/user/", None, {A: 200, OP: 403, M: LOGIN, V: LOGIN}),
    ("get", "/admin/auth/user/add/", None, {A: 200, OP: 403, M: LOGIN, V: LOGIN}),
    ("get", "/admin/auth/group/", None, {A: 200, OP: 403, M: LOGIN, V: LOGIN}),
    ("get", "/admin/billing/apikey/", None, {A: 200, OP: 403, M: LOGIN, V: LOGIN}),
]


@pytest.fixture
def other_user():
    return UserFactory(username="grace")


def signed_in(client, role: Role):
    user = UserFactory(username=f"{role.value}-user")
    role_set(user, role)
    client.force_login(user)
    return user


@pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
@pytest.mark.parametrize(("method", "path", "body", "expected"), TABLE, ids=[f"{m} {p}" for m, p, _, _ in TABLE])
def test_each_role_sees_what_its_row_says(client, other_user, role, method, path, body, expected):
    signed_in(client, role)

    response = getattr(client, method)(path.format(other=other_user.username), body, content_type="application/json")

    assert response.status_code == expected[role], response.content[:300]
    if expected[role] == LOGIN:
        assert response["Location"].startswith("/admin/login/" if path.startswith("/admin/") else "/usage/")


@pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
def test_only_a_viewer_is_refused_the_gateway(client, role):
    user = signed_in(client, role)
    key = api_key_create(user=user, name="gateway").secret
    ModelFactory(name="gpt-test")

    response = client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key}")

    if role == V:
        assert response.status_code == 403
        error = response.json()["error"]
        assert error["code"] == "permission_denied"
        assert "viewer" in error["message"]
    else:
        assert response.status_code == 200
        assert [m["id"] for m in response.json()["data"]] == ["gpt-test"]


def test_an_operator_reads_another_users_usage_and_a_member_only_their_own(client, other_user):
    operator = signed_in(client, OP)
    response = client.get(f"/api/usage/?user={other_user.pk}")
    assert response.status_code == 200
    assert client.get("/api/usage/?user=nobody").status_code == 404

    client.force_login(UserFactory(username="member-user"))
    response = client.get(f"/api/usage/?user={operator.username}")
    assert response.status_code == 403
    assert "operators and admins" in response.json()["error"]["message"]


def test_a_user_in_no_role_group_is_a_member_or_an_operator_if_staff_and_a_superuser_an_admin():
    assert role_of(UserFactory(username="plain")) == M
    assert role_of(UserFactory(username="staff", is_staff=True)) == OP
    assert role_of(UserFactory(username="root", is_superuser=True, is_staff=True)) == A


def test_putting_a_user_in_a_role_group_from_the_admin_makes_them_staff_or_not(admin_client):
    from django.contrib.auth.models import Group

    user = UserFactory(username="ops")
    operator_group = Group.objects.get(name="operator")

    response = admin_client.post(
        f"/admin/auth/user/{user.pk}/change/",
        {
            "username": "ops",
            "email": "ops@example.com",
            "is_active": "on",
            "groups": [operator_group.pk],
            "date_joined_0": "2026-01-01",
            "date_joined_1": "00:00:00",
            "initial-date_joined_0": "2026-01-01",
            "initial-date_joined_1": "00:00:00",
            "external_identities-TOTAL_FORMS": "0",
            "external_identities-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 302, response.content[:500]
    user = get_user_model().objects.get(pk=user.pk)
    assert role_of(user) == OP
    assert user.is_staff
    role_set(user, V)
    user = get_user_model().objects.get(pk=user.pk)
    assert not user.is_staff
    assert list(user.groups.values_list("name", flat=True)) == ["viewer"]


def test_the_user_admin_lists_each_users_role_and_their_identity_provider_identities(admin_client):
    from accounts.models import ExternalIdentity

    for role in (OP, M, V):
        role_set(UserFactory(username=f"{role.value}-user"), role)
    UserFactory(username="old-staff", is_staff=True)
    signed_in_with_jwt = UserFactory(username="jwt-user")
    ExternalIdentity.objects.create(issuer="https://idp.example", subject="sub-42", user=signed_in_with_jwt)

    listing = admin_client.get("/admin/auth/user/").content.decode()
    change_form = admin_client.get(f"/admin/auth/user/{signed_in_with_jwt.pk}/change/").content.decode()

    for username, role in [("operator-user", OP), ("member-user", M), ("viewer-user", V), ("old-staff", OP)]:
        row = listing[listing.index(f">{username}</a>") :]
        row = row[: row.index("</tr>")]
        assert f'<td class="field-role">{role.value}</td>' in row, row
    assert "sub-42" in change_form
    assert "https://idp.example" in change_form


@pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
def test_the_navigation_shows_a_role_only_the_pages_it_may_use(client, role):
    signed_in(client, role)

    page = client.get("/usage/").content.decode()

    shown = {path for path in ("/", "/keys/", "/provider-keys/", "/usage/") if f'href="{path}"' in page}
    # The brand links home ("/") for everyone; the Chat link is the second one.
    chat_links = page.count('href="/"')
    if role == V:
        assert shown == {"/", "/usage/"} and chat_links == 1
    else:
        assert shown == {"/", "/keys/", "/provider-keys/", "/usage/"} and chat_links == 2


@pytest.mark.django_db(transaction=True)
def test_a_request_that_reads_a_role_while_its_change_commits_does_not_keep_it_for_the_next():
    """Demoting a user drops their cached role before it commits; a request that reads the role in between (another
    connection: the user still has the old one for it) must not keep that copy, or the demoted user would keep
    what the old role let them do (here: the gateway) for the cache's TTL."""
    user = UserFactory(username="demoted")
    role_set(user, Role.MEMBER)
    assert async_to_sync(role_for_user_id)(user.pk) == Role.MEMBER

    meanwhile = read_before_commit(
        lambda: role_set(user, Role.VIEWER), lambda: async_to_sync(role_for_user_id)(user.pk)
    )

    assert meanwhile == Role.MEMBER  # the change was not committed yet
    assert async_to_sync(role_for_user_id)(user.pk) == Role.VIEWER
