from django.db import migrations, models

from core.migration_operations import AddColumnInPlace


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0029_money_daily_usage_cache_write_tokens"),
    ]

    operations = [
        AddColumnInPlace(
            model_name="usagerecord",
            name="cache_write_1h_tokens",
            field=models.PositiveIntegerField(
                db_default=0,
                default=0,
                help_text="Of the cache writes, those to Anthropic's 1-hour cache (part of cache_write_tokens).",
            ),
        ),
    ]
