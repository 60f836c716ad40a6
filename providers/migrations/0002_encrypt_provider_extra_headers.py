"""A provider's extra headers are encrypted at rest, like its API key: they may carry a credential.

The column becomes text (PostgreSQL casts the jsonb to its JSON text; SQLite copies the text), then each
row's JSON is replaced by a Fernet token of it ("" for no headers). Backwards, the tokens are decrypted to
JSON again before the column goes back to JSON. Raw values are read and written through a text cast, so
that neither step passes through the field's own encryption or decryption.
"""

from __future__ import annotations

import json

from django.db import migrations, models
from django.db.models.functions import Cast

import providers.fields


def _raw_values(Provider):
    return Provider._base_manager.annotate(raw=Cast("extra_headers", models.TextField())).values_list("pk", "raw")


def _store(Provider, pk, text):
    Provider._base_manager.filter(pk=pk).update(extra_headers=models.Value(text, output_field=models.TextField()))


def encrypt_headers(apps, schema_editor):
    Provider = apps.get_model("providers", "Provider")
    for pk, raw in list(_raw_values(Provider)):
        if not raw or raw.startswith(providers.fields.TOKEN_PREFIX):
            continue
        headers = json.loads(raw)
        plaintext = json.dumps(headers, sort_keys=True, separators=(",", ":")) if headers else ""
        _store(Provider, pk, providers.fields.encrypt(plaintext) if plaintext else "")


def decrypt_headers(apps, schema_editor):
    Provider = apps.get_model("providers", "Provider")
    for pk, raw in list(_raw_values(Provider)):
        _store(Provider, pk, providers.fields.decrypt(raw) if raw else "{}")


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0001_initial"),
    ]

    operations = [
        migrations.AlterField(
            model_name="provider",
            name="extra_headers",
            field=providers.fields.EncryptedMappingField(
                blank=True,
                default=dict,
                help_text=(
                    "Sent with every upstream request. Values are encrypted at rest and shown masked (…abcd): "
                    "leave a masked value as it is to keep it, type a new value to replace it, remove the name "
                    "to drop it."
                ),
            ),
        ),
        migrations.RunPython(encrypt_headers, decrypt_headers),
    ]
