"""Users' keys stored before providers 0020: agreed for the host their provider points at then, so that they
stay in use there and are paused only by a later move (docs/byok.md)."""

from __future__ import annotations

import pytest

from providers.models import ProviderCredential
from tests.migrating import latest, migrate, migrated_to

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("providers", "0019_tasks2_credential_invalid_notice_due")]


def test_stored_keys_are_agreed_for_their_providers_host_of_then():
    with migrated_to(BEFORE) as apps:
        Provider = apps.get_model("providers", "Provider")
        Credential = apps.get_model("providers", "ProviderCredential")
        owner = apps.get_model("auth", "User").objects.create(username="owner")
        proxy = Provider.objects.create(name="proxy", kind="openai", base_url="https://Proxy.example.com:8443/v1")
        default = Provider.objects.create(name="default", kind="openai", base_url="")
        for provider in (proxy, default):
            Credential.objects.create(owner_id=owner.pk, provider=provider, api_key="sk-x-00000000", hint="sk-…0000")

        migrate(latest())

        rows = ProviderCredential.objects.select_related("provider").order_by("provider__name")
        assert [(c.provider.name, c.confirmed_origin, c.host_paused) for c in rows] == [
            ("default", "https://api.openai.com", False),
            ("proxy", "https://proxy.example.com:8443", False),
        ]
