import django.db.models.deletion
from django.db import migrations, models

# An operations alert rule narrowed to one model follows the model (its pk) across a rename in the catalog: by its
# name alone, the rule watched a name no model had any more, and the renamed model not at all. Each rule narrowed by
# name is given the catalog model so named; one naming no model keeps its name (and watches by it, as before).
# Reversed, each rule's name is its model's name now, so that a rename since is not lost. Nullable: the previous
# release's code, still running during a rolling deploy, saves rules without it.


def rules_model(apps, schema_editor):
    OpsAlertRule = apps.get_model("billing", "OpsAlertRule")
    CatalogModel = apps.get_model("providers", "CatalogModel")
    for pk, name in OpsAlertRule.objects.exclude(model_name="").values_list("pk", "model_name"):
        model_id = CatalogModel.objects.filter(name=name).values_list("pk", flat=True).first()
        if model_id is not None:
            OpsAlertRule.objects.filter(pk=pk).update(model_id=model_id)


def rules_model_name(apps, schema_editor):
    OpsAlertRule = apps.get_model("billing", "OpsAlertRule")
    for pk, name in OpsAlertRule.objects.filter(model__isnull=False).values_list("pk", "model__name"):
        OpsAlertRule.objects.filter(pk=pk).update(model_name=name)


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0044_server_tool_billing_usage_web_search_requests"),
        ("providers", "0027_server_tool_billing_web_search_price"),
    ]

    operations = [
        migrations.AddField(
            model_name="opsalertrule",
            name="model",
            field=models.ForeignKey(
                blank=True,
                help_text="The model it watches, whatever it is named now; empty: the model named by model_name, "
                "or all.",
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="providers.catalogmodel",
            ),
        ),
        migrations.RunPython(rules_model, rules_model_name),
    ]
