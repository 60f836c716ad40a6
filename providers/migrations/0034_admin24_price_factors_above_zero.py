# A tier's price factor is empty (the standard prices) or above 0: a 0 charged that tier's tokens nothing.

import django.core.validators
from decimal import Decimal
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('providers', '0033_admin24_catalog_sizes_at_least_one'),
    ]

    operations = [
        migrations.AlterField(
            model_name='deployment',
            name='flex_price_factor',
            field=models.DecimalField(blank=True, decimal_places=4, help_text="Every token price is multiplied by this for a request the provider served at OpenAI's Flex processing (its reply's service_tier: flex; e.g. 0.5). Empty: flex costs the standard prices.", max_digits=8, null=True, validators=[django.core.validators.MinValueValidator(Decimal('0.0001'), message='0 would charge this tier nothing: leave it empty to charge it the standard prices.')], verbose_name='flex price ×'),
        ),
        migrations.AlterField(
            model_name='deployment',
            name='priority_price_factor',
            field=models.DecimalField(blank=True, decimal_places=4, help_text="Every token price is multiplied by this for a request the provider served at OpenAI's Priority processing (its reply's service_tier: priority; e.g. 2). Empty: priority costs the standard prices.", max_digits=8, null=True, validators=[django.core.validators.MinValueValidator(Decimal('0.0001'), message='0 would charge this tier nothing: leave it empty to charge it the standard prices.')], verbose_name='priority price ×'),
        ),
    ]
