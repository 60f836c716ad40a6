"""Deployments with an rpm or tpm cap of 0 before 0011 refuses it: the router never sent them anything.

Whether the admin meant "no cap" or "no traffic" cannot be told from the row, and reading it as "no cap"
would start sending paid traffic to a deployment that may have been drained on purpose. So what the row
did is kept and said plainly: the deployment is disabled (still no traffic) and the 0 cleared (no cap once
an admin enables it again). The other cap, when it is set, stays."""

from django.db import migrations


def zero_caps_disable(apps, schema_editor):
    Deployment = apps.get_model("providers", "Deployment")
    for cap in ("rpm_limit", "tpm_limit"):
        Deployment.objects.filter(**{cap: 0}).update(**{cap: None, "enabled": False})


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0009_alert_sweep_indexes"),
    ]

    operations = [
        migrations.RunPython(zero_caps_disable, migrations.RunPython.noop),
    ]
