from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('billing', '0048_tier_prices_usage_service_tier'),
    ]

    operations = [
        migrations.AddField(
            model_name='requestreservation',
            name='web_search_requests',
            field=models.PositiveIntegerField(db_default=0, default=0, help_text='The web searches reserved (the most the request may run), at the search price in the reserved cost.'),
        ),
    ]
