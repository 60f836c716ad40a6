import importlib

from django.db import migrations, models

# The column is added in place, without copying the table, as 0035 adds its own (see ``AddColumnInPlace``).
AddColumnInPlace = importlib.import_module(
    "billing.migrations.0035_money3_daily_usage_cache_write_1h_tokens"
).AddColumnInPlace


class Migration(migrations.Migration):
    """Rows rolled up before keep ``operation`` empty (read as "unknown"): their days are not re-folded here, as a
    day sealed by retention has no raw rows left to fold, and the others are rebuilt by the rollup task (today,
    yesterday) or the admin's rebuild action (docs/ledger.md, "Per operation")."""

    dependencies = [
        ("billing", "0036_resp_operation_responses"),
    ]

    operations = [
        AddColumnInPlace(
            model_name="dailyusage",
            name="operation",
            field=models.CharField(
                blank=True,
                choices=[
                    ("chat", "Chat completion"),
                    ("messages", "Anthropic messages"),
                    ("embeddings", "Embeddings"),
                    ("responses", "OpenAI responses"),
                ],
                db_default="",
                default="",
                help_text="What the requests asked for (the ledger's operation); empty: rolled up before it was kept.",
                max_length=16,
            ),
        ),
    ]
