"""A rule's webhook URL is its credential: encrypted at rest like the providers' keys. The AlterField makes
the column text; the rows already holding a URL are encrypted in place, read and written as raw SQL because
the field now decrypts what it reads."""

from django.db import migrations

import providers.fields


def _rewrite(apps, schema_editor, convert):
    table = apps.get_model("billing", "OpsAlertRule")._meta.db_table
    quote = schema_editor.quote_name
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"SELECT id, {quote('webhook_url')} FROM {quote(table)} WHERE {quote('webhook_url')} <> ''")
        for pk, value in cursor.fetchall():
            converted = convert(value)
            if converted != value:
                cursor.execute(
                    f"UPDATE {quote(table)} SET {quote('webhook_url')} = %s WHERE id = %s", [converted, pk]
                )


def encrypt_urls(apps, schema_editor):
    def convert(value):
        return value if value.startswith(providers.fields.TOKEN_PREFIX) else providers.fields.encrypt(value)

    _rewrite(apps, schema_editor, convert)


def decrypt_urls(apps, schema_editor):
    def convert(value):
        return providers.fields.decrypt(value) if value.startswith(providers.fields.TOKEN_PREFIX) else value

    _rewrite(apps, schema_editor, convert)


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0024_daily_usage_scan_mark"),
    ]

    operations = [
        migrations.AlterField(
            model_name="opsalertrule",
            name="webhook_url",
            field=providers.fields.EncryptedUrlField(
                blank=True,
                default="",
                help_text="A Slack-compatible webhook; empty: LLMHUB_ALERT_WEBHOOK_URL. Encrypted at rest; only "
                "its host is shown back.",
            ),
        ),
        migrations.RunPython(encrypt_urls, decrypt_urls),
    ]
