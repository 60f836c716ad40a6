from django.db import migrations, models

from core.migration_operations import AddColumnInPlace

# The service tier a row's tokens were charged at (OpenAI's priority and flex, priced at the deployment's factor).
# Added in place (no table rewritten), db_default "": the rows before it were charged the standard prices.


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0047_alerts_followups_help_text"),
    ]

    operations = [
        AddColumnInPlace(
            model_name="usagerecord",
            name="service_tier",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                help_text="The service tier the tokens were charged at: priority or flex (OpenAI's, as its reply "
                "said it served the request, else as asked), at the deployment's factor of it; empty: the standard "
                "prices.",
                max_length=16,
            ),
        ),
    ]
