"""Provider keys at rest: what the database holds, key rotation, and what reprs show."""

from __future__ import annotations

import copy
import pickle

import pytest
from cryptography.fernet import Fernet
from django.core import serializers
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import override_settings

from providers.fields import TOKEN_PREFIX, Secret
from providers.models import Provider
from providers.selectors import provider_config
from providers.services import provider_rotate_encryption
from tests.factories import ModelFactory, ProviderFactory

pytestmark = pytest.mark.django_db

KEY = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"


def raw_key(provider: Provider) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM providers_provider WHERE id = %s", [provider.pk])
        return cursor.fetchone()[0]


def test_database_holds_a_fernet_token_not_the_key():
    provider = ProviderFactory(api_key=KEY)

    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM providers_provider")
        stored = [row[0] for row in cursor.fetchall()]

    assert stored == [raw_key(provider)]
    assert stored[0].startswith(TOKEN_PREFIX)
    assert KEY not in stored[0] and KEY[-12:] not in stored[0]
    assert Provider.objects.get(pk=provider.pk).api_key.reveal() == KEY


def test_each_save_encrypts_afresh_and_an_empty_key_stays_empty():
    provider = ProviderFactory(api_key=KEY)
    first = raw_key(provider)
    provider.save()
    assert raw_key(provider) != first  # a new IV each time: equal keys do not show as equal tokens

    keyless = ProviderFactory(api_key="")
    assert raw_key(keyless) == ""
    assert Provider.objects.get(pk=keyless.pk).api_key == Secret("")


def test_old_key_still_decrypts_and_rotation_moves_values_to_the_new_key():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with override_settings(FIELD_ENCRYPTION_KEYS=[old]):
        provider = ProviderFactory(api_key=KEY)
        keyless = ProviderFactory(api_key="")
        under_old = raw_key(provider)

    with override_settings(FIELD_ENCRYPTION_KEYS=[new, old]):
        assert Provider.objects.get(pk=provider.pk).api_key.reveal() == KEY
        assert provider_rotate_encryption() == 1  # the keyless row has nothing to rotate
        under_new = raw_key(provider)

    assert under_new.startswith(TOKEN_PREFIX) and under_new != under_old
    assert raw_key(keyless) == ""
    with override_settings(FIELD_ENCRYPTION_KEYS=[new]):
        assert Provider.objects.get(pk=provider.pk).api_key.reveal() == KEY
    with override_settings(FIELD_ENCRYPTION_KEYS=[old]), pytest.raises(ImproperlyConfigured) as excinfo:
        Provider.objects.get(pk=provider.pk)
    assert KEY not in str(excinfo.value)


def test_rotation_is_all_or_nothing_when_a_value_cannot_be_decrypted():
    old, new, lost = (Fernet.generate_key().decode() for _ in range(3))
    with override_settings(FIELD_ENCRYPTION_KEYS=[old]):
        readable = ProviderFactory(name="a-readable", api_key=KEY)
    with override_settings(FIELD_ENCRYPTION_KEYS=[lost]):
        unreadable = ProviderFactory(name="b-unreadable", api_key="sk-under-a-key-nobody-has-anymore")
    before = raw_key(readable)

    with override_settings(FIELD_ENCRYPTION_KEYS=[new, old]), pytest.raises(ImproperlyConfigured) as excinfo:
        provider_rotate_encryption()

    assert f"row {unreadable.pk}" in str(excinfo.value)
    assert raw_key(readable) == before


def test_no_repr_or_str_shows_the_key():
    provider = ProviderFactory(api_key=KEY)
    model = ModelFactory(provider=provider)
    loaded = Provider.objects.get(pk=provider.pk)
    config = provider_config(loaded)
    secret = loaded.api_key

    shown = [
        str(provider),
        repr(provider),
        repr(vars(provider)),
        repr(vars(loaded)),
        str(secret),
        repr(secret),
        f"{secret}",
        repr(config),
        str(config),
        repr(model),
        repr(vars(model)),
        serializers.serialize("json", [loaded]),
    ]
    for text in shown:
        assert KEY not in text
    assert secret.hint == "sk-…wxyz" and secret.hint in repr(secret)
    assert secret.reveal() == KEY


def test_assigned_keys_are_secrets_and_instances_still_copy():
    # A factory-made (never reloaded) instance holds a Secret too, so code that builds a config from it works.
    provider = ProviderFactory(api_key=KEY)
    assert isinstance(provider.api_key, Secret)
    assert provider_config(provider).cache_key[2] == KEY
    assert copy.copy(provider).api_key == provider.api_key
    assert copy.deepcopy(provider).api_key.reveal() == KEY
    with pytest.raises(TypeError):
        pickle.dumps(provider.api_key)
