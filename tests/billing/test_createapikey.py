"""``manage.py createapikey``: the last line printed is a working key."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from rest_framework.test import APIClient

from billing.models import ApiKey, KeyScope
from billing.services.keys import api_key_authenticate_sync
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def run(*args: str) -> list[str]:
    out = StringIO()
    call_command("createapikey", *args, stdout=out)
    return out.getvalue().splitlines()


def test_the_last_line_is_a_working_key_for_the_user():
    alice = UserFactory(username="alice")

    lines = run("alice")

    secret = lines[-1]
    principal = api_key_authenticate_sync(secret)
    assert principal.user_id == alice.pk and principal.username == "alice"
    row = ApiKey.objects.get(pk=principal.key_id)
    assert row.name == "default" and row.expires_at is None
    # The lines before it describe the key without the secret.
    assert len(lines) >= 2
    assert row.prefix in lines[0] and "never" in lines[0]
    assert not any(secret in line for line in lines[:-1])


@pytest.mark.period_instants
def test_name_and_expiry():
    UserFactory(username="alice")
    before = timezone.now()

    secret = run("alice", "--name", "ci runner", "--expires-days", "7")[-1]

    row = ApiKey.objects.get(pk=api_key_authenticate_sync(secret).key_id)
    assert row.name == "ci runner"
    assert row.expires_at == before + timedelta(days=7)  # the clock is pinned: exactly seven days


def test_each_run_makes_a_new_key():
    UserFactory(username="alice")

    assert run("alice")[-1] != run("alice")[-1]
    assert ApiKey.objects.count() == 2


def test_unknown_user_is_an_error():
    with pytest.raises(CommandError, match="nobody"):
        run("nobody")
    assert not ApiKey.objects.exists()


@pytest.mark.parametrize("days", ["0", "-3", "soon"])
def test_bad_expiry_is_an_error(days):
    UserFactory(username="alice")

    with pytest.raises(CommandError, match="expires-days"):
        run("alice", "--expires-days", days)
    assert not ApiKey.objects.exists()


def test_scope_grants_any_scope_and_repeats():
    """An operator scripting a key for automation gives it the scopes it needs, not only keys:manage."""
    UserFactory(username="ops", is_staff=True)

    lines = run("ops", "--name", "auditor", "--scope", "audit:read", "--scope", "usage:read")

    row = ApiKey.objects.get(pk=api_key_authenticate_sync(lines[-1]).key_id)
    assert row.scopes == ["audit:read", "usage:read"]
    assert "Scopes: audit:read, usage:read." in lines[0]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {lines[-1]}")
    assert client.get("/api/audit/").status_code == 200


def test_manage_keys_still_works_beside_scope():
    UserFactory(username="alice")

    both = run("alice", "--manage-keys", "--scope", "usage:read")[-1]
    twice = run("alice", "--manage-keys", "--scope", "keys:manage")[-1]

    assert ApiKey.objects.get(pk=api_key_authenticate_sync(both).key_id).scopes == ["keys:manage", "usage:read"]
    assert ApiKey.objects.get(pk=api_key_authenticate_sync(twice).key_id).scopes == ["keys:manage"]


def test_an_unknown_scope_is_refused_naming_the_valid_ones():
    UserFactory(username="alice")

    with pytest.raises(CommandError) as refused:
        run("alice", "--scope", "everything")

    message = str(refused.value)
    assert "--scope" in message and "everything" in message
    assert all(scope in message for scope in KeyScope.values)
    assert not ApiKey.objects.exists()
