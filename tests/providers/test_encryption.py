"""Provider secrets at rest (API keys and extra header values): what the database holds, key rotation, the
migration that encrypted the headers, and what reprs show."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from cryptography.fernet import Fernet
from django.core import serializers
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import override_settings

from providers.adapters.common import scrub
from providers.fields import TOKEN_PREFIX, Secret
from providers.models import Provider
from providers.selectors import provider_config
from providers.services.catalog_file import providers_dump
from providers.services.encryption import provider_rotate_encryption
from providers.services.health import provider_health_check
from tests.factories import ModelFactory, ProviderFactory
from tests.migrating import migrate, migrated_to

pytestmark = pytest.mark.django_db

KEY = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"
HEADER_TOKEN = "upstream-token-0123456789-QRSTUVWXYZ"


def raw_key(provider: Provider) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM providers_provider WHERE id = %s", [provider.pk])
        return cursor.fetchone()[0]


def raw_headers(provider: Provider) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT extra_headers FROM providers_provider WHERE id = %s", [provider.pk])
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


def test_a_value_no_key_decrypts_stops_the_rotation_before_its_batch_is_written():
    # The readable row is in the unreadable one's batch (more: tests/providers/test_encryption_rotation.py).
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
    provider = ProviderFactory(api_key=KEY, extra_headers={"X-Upstream-Token": HEADER_TOKEN})
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
        assert KEY not in text and HEADER_TOKEN not in text
    assert "X-Upstream-Token" in repr(vars(loaded))  # the name is not secret, its value is
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


# Extra headers ----------------------------------------------------------------------------------------


def test_header_values_are_encrypted_at_rest():
    provider = ProviderFactory(extra_headers={"X-Upstream-Token": HEADER_TOKEN, "X-Team": "research"})
    headerless = ProviderFactory(extra_headers={})

    stored = raw_headers(provider)

    assert stored.startswith(TOKEN_PREFIX)
    assert HEADER_TOKEN not in stored and HEADER_TOKEN[-12:] not in stored and "research" not in stored
    assert raw_headers(headerless) == ""
    loaded = Provider.objects.get(pk=provider.pk)
    assert {name: value.reveal() for name, value in loaded.extra_headers.items()} == {
        "X-Upstream-Token": HEADER_TOKEN,
        "X-Team": "research",
    }
    assert Provider.objects.get(pk=headerless.pk).extra_headers == {}


def test_dumpdata_writes_the_headers_encrypted_and_loaddata_reads_them_back():
    provider = ProviderFactory(extra_headers={"X-Upstream-Token": HEADER_TOKEN})

    dumped = serializers.serialize("json", [Provider.objects.get(pk=provider.pk)])
    [restored] = serializers.deserialize("json", dumped)

    assert HEADER_TOKEN not in dumped and TOKEN_PREFIX in json.loads(dumped)[0]["fields"]["extra_headers"]
    assert restored.object.extra_headers == {"X-Upstream-Token": Secret(HEADER_TOKEN)}


def test_the_adapter_still_sends_the_decrypted_header_upstream(fake_upstream):
    provider = ProviderFactory(
        base_url=fake_upstream.base_url + "/v1", extra_headers={"X-Upstream-Token": HEADER_TOKEN}
    )

    result = provider_health_check(provider=Provider.objects.get(pk=provider.pk))

    assert result.ok
    assert fake_upstream.requests[-1]["headers"]["x-upstream-token"] == HEADER_TOKEN


def test_rotation_re_encrypts_the_headers_too():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with override_settings(FIELD_ENCRYPTION_KEYS=[old]):
        provider = ProviderFactory(api_key="", extra_headers={"X-Upstream-Token": HEADER_TOKEN})
        under_old = raw_headers(provider)

    with override_settings(FIELD_ENCRYPTION_KEYS=[new, old]):
        assert provider_rotate_encryption() == 1

    assert raw_headers(provider) != under_old and raw_headers(provider).startswith(TOKEN_PREFIX)
    with override_settings(FIELD_ENCRYPTION_KEYS=[new]):
        assert Provider.objects.get(pk=provider.pk).extra_headers["X-Upstream-Token"].reveal() == HEADER_TOKEN


def test_an_upstream_message_quoting_a_credential_header_is_scrubbed():
    provider = ProviderFactory(api_key=KEY, extra_headers={"X-Upstream-Token": HEADER_TOKEN, "X-Team": "red"})
    config = provider_config(Provider.objects.get(pk=provider.pk))

    text = scrub(f"token {HEADER_TOKEN} and key {KEY} refused for the requested team red", config)

    assert HEADER_TOKEN not in text and KEY not in text
    assert "…WXYZ" in text and "sk-…wxyz" in text
    assert "requested team red" in text  # a value this short is no credential, and is left alone


def test_a_dump_refers_credential_headers_to_the_environment():
    ProviderFactory(name="azure", extra_headers={"X-Upstream-Token": HEADER_TOKEN, "X-Region": "east"})

    [dumped] = providers_dump()["providers"]

    assert dumped["extra_headers"] == {"X-Region": "east", "X-Upstream-Token": "${AZURE_HEADER_X_UPSTREAM_TOKEN}"}


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_existing_headers_and_reverses():
    before, after = [("providers", "0001_initial")], [("providers", "0002_encrypt_provider_extra_headers")]
    with migrated_to(before):
        with connection.cursor() as cursor:
            for name, headers in (("with-headers", {"X-Upstream-Token": HEADER_TOKEN}), ("without", {})):
                cursor.execute(
                    "INSERT INTO providers_provider (name, kind, base_url, api_key, organization, extra_headers,"
                    " timeout_seconds, max_retries, enabled, last_health_status, last_health_error, created_at,"
                    " updated_at) VALUES (%s, 'openai', '', '', '', %s, 60, 2, %s, 'unknown', '', %s, %s)",
                    [name, json.dumps(headers), True, "2026-01-01 00:00:00+00:00", "2026-01-01 00:00:00+00:00"],
                )

        # The model as it stands at that migration: later migrations add columns today's model reads.
        historical = migrate(after).get_model("providers", "Provider")
        encrypted, empty = historical.objects.get(name="with-headers"), historical.objects.get(name="without")
        assert raw_headers(encrypted).startswith(TOKEN_PREFIX) and HEADER_TOKEN not in raw_headers(encrypted)
        assert encrypted.extra_headers["X-Upstream-Token"].reveal() == HEADER_TOKEN
        assert raw_headers(empty) == "" and empty.extra_headers == {}

        migrate(before)
        with connection.cursor() as cursor:
            cursor.execute("SELECT name, extra_headers FROM providers_provider ORDER BY name")
            rows = {name: value if isinstance(value, dict) else json.loads(value) for name, value in cursor.fetchall()}
        assert rows == {"with-headers": {"X-Upstream-Token": HEADER_TOKEN}, "without": {}}
