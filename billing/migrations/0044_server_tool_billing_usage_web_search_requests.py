from django.db import migrations, models

from core.migration_operations import AddColumnInPlace


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0043_alerts_left_incident_follows_model"),
    ]

    operations = [
        AddColumnInPlace(
            model_name="usagerecord",
            name="web_search_requests",
            field=models.PositiveIntegerField(
                db_default=0,
                default=0,
                help_text="Web searches the provider billed apart from the tokens (Anthropic's server tool), "
                "priced per 1,000 in cost.",
            ),
        ),
    ]
