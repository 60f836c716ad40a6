"""An account, a gateway key or a user's own provider key deleted outside the admin and the services (``user.delete()``
in the shell, a management command, a cascade of its owner's, parent's or provider's delete) is in the audit log as the
admin's delete puts it there, by ``system`` where no request acts; no secret in it; an admin's delete still once."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from audit.models import AuditEvent
from audit.services import audit_verify
from billing.services.keys import api_key_create
from providers.fields import Secret
from providers.models import ByokMode, ProviderCredential
from tests.audit.conftest import events
from tests.factories import ProviderFactory, UserFactory

pytestmark = pytest.mark.django_db

OWN_KEY = "sk-own-key-canary-0123456789abcdefOWNK"


@pytest.fixture
def alice():
    """Alice with a gateway key, a key created under it, and her own key for a provider."""
    user = UserFactory(username="alice")
    top = api_key_create(user=user, name="ci")
    below = api_key_create(user=user, name="ci-child", parent=top.api_key)
    provider = ProviderFactory(name="byo", byok=ByokMode.OPTIONAL)
    own = ProviderCredential.objects.create(owner=user, provider=provider, api_key=OWN_KEY, hint=Secret(OWN_KEY).hint)
    return user, [top, below], own


def recorded(action: str) -> list[tuple[str, str, str, dict]]:
    return [(event.actor_type, event.target_id, event.target_repr, event.changes) for event in events(action)]


def assert_no_secret(*secrets: str) -> None:
    """Neither a key nor its middle (what a hint leaves out), nor a gateway key's hash (passed among ``secrets``)."""
    log = json.dumps(list(AuditEvent.objects.values()), default=str)
    for secret in secrets:
        assert secret not in log and secret[3:-4] not in log


def test_a_user_deleted_in_the_shell_is_recorded_with_the_keys_their_delete_takes(alice):
    user, (top, below), own = alice
    repr_top, repr_below, repr_own = str(top.api_key), str(below.api_key), str(own)
    hashes = [top.api_key.secret_hash, below.api_key.secret_hash]

    user.delete()

    assert [(actor, name) for actor, _id, name, _changes in recorded("auth.user.delete")] == [("system", "alice")]
    assert sorted(recorded("key.delete")) == sorted(
        [
            ("system", str(top.api_key.pk), repr_top, {"prefix": [top.api_key.prefix, None]}),
            ("system", str(below.api_key.pk), repr_below, {"prefix": [below.api_key.prefix, None]}),
        ]
    )
    assert recorded("provider_key.delete") == [
        ("system", str(own.pk), repr_own, {"api_key": ["[secret]", ""], "hint": [own.hint, None]})
    ]
    assert_no_secret(OWN_KEY, top.secret, below.secret, *hashes)
    assert audit_verify() is None


def test_a_key_and_a_provider_key_deleted_in_the_shell_are_recorded(alice):
    _user, (top, below), own = alice
    hashes = [top.api_key.secret_hash, below.api_key.secret_hash]
    ids = {str(top.api_key.pk), str(below.api_key.pk)}

    top.api_key.delete()  # and the key created under it with it
    ProviderCredential.objects.get(pk=own.pk).delete()

    assert {target for _actor, target, *_ in recorded("key.delete")} == ids
    assert [(actor, target) for actor, target, *_ in recorded("provider_key.delete")] == [("system", str(own.pk))]
    assert_no_secret(OWN_KEY, top.secret, below.secret, *hashes)


def test_a_provider_deleted_in_the_shell_records_its_users_own_keys(alice):
    _user, _keys, own = alice

    own.provider.delete()

    assert [(actor, target) for actor, target, *_ in recorded("provider_key.delete")] == [("system", str(own.pk))]
    assert len(events("providers.provider.delete")) == 1


def test_an_admins_delete_is_recorded_once(admin_client, alice):
    user, (top, below), own = alice
    other = api_key_create(user=UserFactory(username="bob"), name="bobs")

    assert (
        admin_client.post(reverse("admin:billing_apikey_delete", args=[other.api_key.pk]), {"post": "yes"}).status_code
        == 302
    )
    assert admin_client.post(reverse("admin:auth_user_delete", args=[user.pk]), {"post": "yes"}).status_code == 302

    assert recorded("key.delete") == [
        (
            "user",
            str(other.api_key.pk),
            str(other.api_key),
            {"prefix": [other.api_key.prefix, None], "keys_below": [[], []]},
        ),
        (
            "user",
            str(top.api_key.pk),
            str(top.api_key),
            {"prefix": [top.api_key.prefix, None], "keys_below": [[below.api_key.prefix], []]},
        ),
    ]
    assert [(actor, target) for actor, target, *_ in recorded("provider_key.delete")] == [("user", str(own.pk))]
    assert len(events("auth.user.delete")) == 1
    assert audit_verify() is None
