from django.db import migrations, models
from django.db.models import F

# The model_name an operations alert rule's model was bound for: a model_name edited since (a queryset's update(),
# which no save sees) binds the rule again to the model it names at the evaluator's next run. Each rule now is
# taken as bound for its name, so that a stale copy (its model renamed since) keeps its model, as before.


def rules_bound_for_their_name(apps, schema_editor):
    apps.get_model("billing", "OpsAlertRule").objects.update(model_name_bound=F("model_name"))


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0049_search_followups_reserved_web_searches"),
    ]

    operations = [
        migrations.AddField(
            model_name="opsalertrule",
            name="model_name_bound",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                editable=False,
                help_text="The model name the rule's model was bound for; another model_name binds it again.",
                max_length=128,
            ),
        ),
        migrations.RunPython(rules_bound_for_their_name, migrations.RunPython.noop),
    ]
