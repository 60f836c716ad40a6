from django.db import migrations, models

# The threshold an operations incident opened under, quoted by its alerts (an admin may edit the rule's while it is
# open). Nullable: the previous release's code, still running during a rolling deploy, inserts incidents without it.
# The incidents open now opened under their rule's present threshold, or one edited since that nothing kept: the
# rule's is the best there is.


def open_incidents_threshold(apps, schema_editor):
    OpsAlertIncident = apps.get_model("billing", "OpsAlertIncident")
    OpsAlertRule = apps.get_model("billing", "OpsAlertRule")
    for rule_id, threshold in OpsAlertRule.objects.values_list("pk", "threshold"):
        OpsAlertIncident.objects.filter(rule_id=rule_id, cleared_at__isnull=True).update(threshold=threshold)


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0041_rollup_figures"),
    ]

    operations = [
        migrations.AddField(
            model_name="opsalertincident",
            name="threshold",
            field=models.DecimalField(
                blank=True,
                decimal_places=4,
                help_text="The rule's threshold when it opened; empty: opened before it was kept.",
                max_digits=14,
                null=True,
            ),
        ),
        migrations.RunPython(open_incidents_threshold, migrations.RunPython.noop),
    ]
