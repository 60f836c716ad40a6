"""Users' own provider keys in the admin: the Provider admin's ``byok`` and the ProviderCredential admin, driven
as a superuser through Django's test client."""

from __future__ import annotations

import pytest
from django.urls import reverse

from providers.models import ByokMode, Provider
from tests.factories import ProviderFactory

pytestmark = pytest.mark.django_db


def provider_form(provider: Provider, **overrides: object) -> dict[str, object]:
    data = {
        "name": provider.name,
        "kind": provider.kind,
        "enabled": "on",
        "base_url": provider.base_url,
        "api_key": "",
        "organization": provider.organization,
        "extra_headers": "{}",
        "timeout_seconds": str(provider.timeout_seconds),
        "byok": provider.byok,
    }
    data.update(overrides)
    return data


# Provider.byok --------------------------------------------------------------------------------------


def test_the_provider_admin_edits_byok(admin_client):
    provider = ProviderFactory()
    url = reverse("admin:providers_provider_change", args=[provider.pk])

    page = admin_client.get(url).content.decode()
    assert 'name="byok"' in page and "Users&#x27; own keys" in page

    response = admin_client.post(url, provider_form(provider, byok=ByokMode.REQUIRED))

    assert response.status_code == 302, response.content.decode()[:2000]
    provider.refresh_from_db()
    assert provider.byok == ByokMode.REQUIRED


def test_the_provider_admin_refuses_an_unknown_byok(admin_client):
    provider = ProviderFactory()

    response = admin_client.post(
        reverse("admin:providers_provider_change", args=[provider.pk]), provider_form(provider, byok="sometimes")
    )

    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    provider.refresh_from_db()
    assert provider.byok == ByokMode.DISABLED


def test_the_provider_list_shows_and_filters_by_byok(admin_client):
    ProviderFactory(name="welcomes-own-keys", byok=ByokMode.OPTIONAL)
    ProviderFactory(name="platform-key-only")
    changelist = reverse("admin:providers_provider_changelist")

    page = admin_client.get(changelist).content.decode()
    assert "users&#x27; own keys" in page.lower() and ">optional</span>" in page

    filtered = admin_client.get(changelist, {"byok__exact": "optional"}).content.decode()
    assert "welcomes-own-keys" in filtered and "platform-key-only" not in filtered
