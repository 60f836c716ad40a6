from django.db import migrations, models

from core.migration_operations import AddColumnInPlace


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0028_errrate_invalid_status"),
    ]

    operations = [
        AddColumnInPlace(
            model_name="dailyusage",
            name="cache_write_tokens",
            field=models.PositiveBigIntegerField(
                db_default=0,
                default=0,
                help_text="Prompt tokens written to the provider's prompt cache (part of prompt).",
            ),
        ),
    ]
