"""``Experiment.decided_at``: when an experiment last changed what serves its model. Experiments that exist
already get the best instant there is: a concluded one its ``ends_at``, a running or paused one its
``updated_at`` (its pause or a later edit); drafts have decided nothing."""

from django.db import migrations, models
from django.db.models import F


def decided_at_fill(apps, schema_editor):
    Experiment = apps.get_model("experiments", "Experiment")
    Experiment.objects.filter(status="concluded").update(decided_at=F("ends_at"))
    Experiment.objects.filter(status__in=["running", "paused"]).update(decided_at=F("updated_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0002_feedback_usage_join"),
    ]

    operations = [
        migrations.AddField(
            model_name="experiment",
            name="decided_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.RunPython(decided_at_fill, migrations.RunPython.noop),
    ]
