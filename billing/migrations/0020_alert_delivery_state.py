from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0019_ledger_autovacuum_inserts"),
    ]

    operations = [
        migrations.AddField(
            model_name="budgetalert",
            name="delivery",
            field=models.JSONField(
                blank=True,
                default=dict,
                help_text="Deliveries not made yet: being sent, failed (the error), queued again (core/outbox.py).",
            ),
        ),
        migrations.AddField(
            model_name="opsalertincident",
            name="delivery",
            field=models.JSONField(
                blank=True,
                default=dict,
                help_text="Deliveries not made yet: being sent, failed (the error), queued again (core/outbox.py).",
            ),
        ),
    ]
