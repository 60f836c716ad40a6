from decimal import Decimal

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0026_ops_explore_incident_outlives_deployment"),
    ]

    operations = [
        migrations.AddField(
            model_name="deployment",
            name="web_search_per_1k",
            field=models.DecimalField(
                blank=True,
                decimal_places=6,
                default=Decimal("0"),
                help_text="Per 1,000 web searches the provider reports (Anthropic's "
                "server_tool_use.web_search_requests: $10 per 1,000), billed beside the tokens. "
                "Empty or 0: searches cost nothing but their tokens.",
                max_digits=12,
                validators=[django.core.validators.MinValueValidator(0)],
                verbose_name="web search $/1,000",
            ),
        ),
    ]
