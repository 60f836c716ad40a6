from django.db import migrations, models


def incidents_delivered_before(apps, schema_editor):
    """Incidents from before deliveries were recorded had their alerts queued by then: recorded as delivered, so
    the alert sweep does not send them a second time."""
    Incident = apps.get_model("providers", "Incident")
    Incident.objects.filter(ended_at__isnull=True).update(delivered=["down:email", "down:webhook"])
    Incident.objects.filter(ended_at__isnull=False).update(
        delivered=["down:email", "down:webhook", "recovered:email", "recovered:webhook"]
    )


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0007_encryption_rotation_progress"),
    ]

    operations = [
        migrations.AddField(
            model_name="incident",
            name="delivered",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text='Deliveries made: "down:email", "down:webhook", "recovered:email", …',
            ),
        ),
        migrations.AddField(
            model_name="incident",
            name="delivery",
            field=models.JSONField(
                blank=True,
                default=dict,
                help_text="Deliveries not made yet: being sent, failed (the error), queued again (core/outbox.py).",
            ),
        ),
        migrations.RunPython(incidents_delivered_before, migrations.RunPython.noop),
    ]
