from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0011_ops_alerts"),
    ]

    operations = [
        migrations.CreateModel(
            name="DailyUsageSeal",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("day", models.DateField(unique=True)),
                (
                    "through_id",
                    models.BigIntegerField(help_text="The last ledger row of the day the sealed rollup holds."),
                ),
                ("sealed_at", models.DateTimeField(auto_now_add=True)),
            ],
            options={"ordering": ["-day"]},
        ),
    ]
