"""The provider keys page (``/provider-keys/``) as the server renders it; the browser tests drive it."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from accounts.roles import Role, role_set
from providers.models import ByokMode, ProviderCredential
from providers.services.credentials import KEY_MAX_LENGTH
from tests.factories import ProviderFactory, UserFactory

pytestmark = pytest.mark.django_db

STORED_KEY = "sk-stored-own-key-0123456789abcdefQRST"


def test_signing_in_is_required(client):
    response = client.get("/provider-keys/")

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next=/provider-keys/"


def test_the_page_has_a_form_that_keeps_no_key_and_no_key_is_rendered(client):
    user = UserFactory(username="ada")
    provider = ProviderFactory(byok=ByokMode.OPTIONAL)
    ProviderCredential.objects.create(owner=user, provider=provider, api_key=STORED_KEY, hint="sk-…QRST")
    client.force_login(user)

    response = client.get("/provider-keys/")

    page = response.content.decode()
    assert response.status_code == 200
    assert STORED_KEY not in page and STORED_KEY[3:-4] not in page
    assert '<form id="save-key" class="inline-form" autocomplete="off">' in page
    assert '<input type="password" id="key-secret" name="api_key" autocomplete="off"' in page
    assert "providers/provider_keys.js" in page and "providers/provider_keys.css" in page
    # Its place in the site's navigation, marked as the current page.
    assert '<a href="/provider-keys/" aria-current="page">Provider keys</a>' in page


def test_the_other_pages_link_to_it(client):
    client.force_login(UserFactory(username="ada"))

    page = client.get("/keys/").content.decode()

    assert re.search(r'<a href="/provider-keys/"\s*>Provider keys</a>', page)


def test_a_role_without_keys_of_its_own_is_refused_as_by_the_api(client):
    viewer = UserFactory(username="vera")
    role_set(viewer, Role.VIEWER)
    client.force_login(viewer)

    assert client.get("/provider-keys/").status_code == 403
    assert client.get("/api/provider-keys/").status_code == 403


def test_the_key_field_takes_every_key_length_the_server_accepts(client):
    """A browser cuts a pasted value at the field's maxlength without a word: a key longer than the field but
    within the server's limit would arrive cut short and be refused as a wrong key."""
    client.force_login(UserFactory(username="ada"))

    page = client.get("/provider-keys/").content.decode()

    field = re.search(r'<input type="password" id="key-secret"[^>]*>', page).group(0)
    assert re.search(r'maxlength="(\d+)"', field).group(1) == str(KEY_MAX_LENGTH)
