import django.core.validators
from django.db import migrations, models

# OpenAI's service tiers priced apart: a factor of every token price for each of priority and flex. Nullable, empty
# on every deployment: each tier keeps costing the standard prices until an admin sets its factor.


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0028_search_models_searches_every_request"),
    ]

    operations = [
        migrations.AddField(
            model_name="deployment",
            name="priority_price_factor",
            field=models.DecimalField(
                blank=True,
                decimal_places=4,
                help_text="Every token price is multiplied by this for a request the provider served at OpenAI's "
                "Priority processing (its reply's service_tier: priority; e.g. 2). Empty: priority costs the "
                "standard prices.",
                max_digits=8,
                null=True,
                validators=[django.core.validators.MinValueValidator(0)],
                verbose_name="priority price ×",
            ),
        ),
        migrations.AddField(
            model_name="deployment",
            name="flex_price_factor",
            field=models.DecimalField(
                blank=True,
                decimal_places=4,
                help_text="Every token price is multiplied by this for a request the provider served at OpenAI's "
                "Flex processing (its reply's service_tier: flex; e.g. 0.5). Empty: flex costs the standard prices.",
                max_digits=8,
                null=True,
                validators=[django.core.validators.MinValueValidator(0)],
                verbose_name="flex price ×",
            ),
        ),
    ]
