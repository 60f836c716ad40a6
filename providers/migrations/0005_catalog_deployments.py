"""The catalog's new shape: a public model (``CatalogModel``, formerly ``Model``) served by one or more
``Deployment``s. Each existing model becomes a model with one deployment carrying its provider, upstream id
and prices; nothing a client sends changes."""

from decimal import Decimal

import django.core.validators
import django.db.models.deletion
from django.db import migrations, models


def one_deployment_each(apps, schema_editor):
    CatalogModel = apps.get_model("providers", "CatalogModel")
    Deployment = apps.get_model("providers", "Deployment")
    for model in CatalogModel.objects.select_related("provider").iterator():
        Deployment.objects.create(
            model=model,
            name=model.provider.name[:64],
            provider_id=model.provider_id,
            upstream_id=model.upstream_id,
            input_per_mtok=model.input_per_mtok,
            output_per_mtok=model.output_per_mtok,
            cached_input_per_mtok=model.cached_input_per_mtok,
            enabled=True,
        )


def first_deployment_back(apps, schema_editor):
    CatalogModel = apps.get_model("providers", "CatalogModel")
    for model in CatalogModel.objects.all():
        deployment = model.deployments.order_by("priority", "pk").first()
        if deployment is None:
            model.delete()
            continue
        model.provider_id = deployment.provider_id
        model.upstream_id = deployment.upstream_id
        model.input_per_mtok = deployment.input_per_mtok
        model.output_per_mtok = deployment.output_per_mtok
        model.cached_input_per_mtok = deployment.cached_input_per_mtok
        model.save()


def price(label, **kwargs):
    return models.DecimalField(
        label, decimal_places=6, max_digits=12, validators=[django.core.validators.MinValueValidator(0)], **kwargs
    )


class Migration(migrations.Migration):
    dependencies = [
        ("providers", "0004_more_provider_kinds"),
        # The billing tables that point at the catalog are created before it is renamed.
        ("billing", "0007_usage_operation"),
    ]

    operations = [
        migrations.RenameModel("Model", "CatalogModel"),
        migrations.AlterModelOptions(
            name="catalogmodel", options={"ordering": ["name"], "verbose_name": "model", "verbose_name_plural": "models"}
        ),
        migrations.AddField(
            model_name="catalogmodel",
            name="label",
            field=models.CharField(blank=True, help_text="Shown in the chat picker; empty: the name.", max_length=128),
        ),
        migrations.AddField(
            model_name="catalogmodel",
            name="alias_of",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="aliases",
                to="providers.catalogmodel",
                help_text="Make this name an alias: requests for it are served by that model (its deployments, "
                "prices and routing); plan and key allow-lists are checked against that model.",
            ),
        ),
        migrations.AddField(
            model_name="catalogmodel",
            name="strategy",
            field=models.CharField(
                choices=[
                    ("weighted", "Weighted (random by weight)"),
                    ("priority", "Priority (lowest number first)"),
                    ("lowest_latency", "Lowest latency"),
                    ("least_busy", "Least busy (fewest requests in flight)"),
                    ("cheapest", "Cheapest"),
                ],
                default="weighted",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="catalogmodel",
            name="retries",
            field=models.PositiveSmallIntegerField(
                default=2, help_text="Further attempts on this model's other deployments after a retryable failure."
            ),
        ),
        migrations.AddField(
            model_name="catalogmodel",
            name="fallbacks",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text='Other public model names tried in order when every deployment failed, e.g. ["claude-haiku"].',
            ),
        ),
        migrations.AddField(
            model_name="catalogmodel",
            name="context_window_fallbacks",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text="Public model names tried in order when the prompt is too long for this one.",
            ),
        ),
        migrations.AddField(
            model_name="catalogmodel",
            name="resume_on_failure",
            field=models.BooleanField(
                default=False,
                help_text="When a stream fails after it began, continue it on the next deployment with the partial "
                "reply as a prefill (the client sees one stream; the ledger row says it was resumed).",
            ),
        ),
        migrations.AddField(
            model_name="catalogmodel",
            name="stream_idle_timeout_seconds",
            field=models.DecimalField(
                blank=True,
                decimal_places=1,
                max_digits=6,
                null=True,
                validators=[django.core.validators.MinValueValidator(Decimal("0.1"))],
                help_text="A stream that sends nothing for this long is ended with an error. Empty: the server's default.",
            ),
        ),
        migrations.CreateModel(
            name="Deployment",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "name",
                    models.SlugField(
                        blank=True,
                        max_length=64,
                        help_text="Unique within the model; sent as x-llmhub-deployment. Empty: the provider's name.",
                    ),
                ),
                ("upstream_id", models.CharField(help_text="The provider's own model id.", max_length=200)),
                ("input_per_mtok", price("input $/Mtok", default=Decimal("0"))),
                ("output_per_mtok", price("output $/Mtok", default=Decimal("0"))),
                (
                    "cached_input_per_mtok",
                    price(
                        "cached input $/Mtok",
                        blank=True,
                        null=True,
                        help_text="Empty: cached input tokens are priced as input tokens.",
                    ),
                ),
                (
                    "weight",
                    models.PositiveIntegerField(default=1, help_text="Share of traffic under the weighted strategy."),
                ),
                (
                    "priority",
                    models.PositiveSmallIntegerField(default=0, help_text="Lower first, under the priority strategy."),
                ),
                (
                    "rpm_limit",
                    models.PositiveIntegerField(
                        blank=True,
                        null=True,
                        help_text="Requests per minute this deployment takes; at the cap it is skipped.",
                    ),
                ),
                (
                    "tpm_limit",
                    models.PositiveIntegerField(
                        blank=True,
                        null=True,
                        help_text="Tokens per minute this deployment takes; at the cap it is skipped.",
                    ),
                ),
                (
                    "quality",
                    models.DecimalField(
                        blank=True,
                        decimal_places=3,
                        max_digits=6,
                        null=True,
                        help_text="A score (higher is better) for requests sent with x-llmhub-route: quality.",
                    ),
                ),
                (
                    "breaker_override",
                    models.CharField(
                        blank=True,
                        choices=[
                            ("", "None (the breaker decides)"),
                            ("open", "Forced open (no traffic)"),
                            ("closed", "Forced closed (always a candidate)"),
                        ],
                        default="",
                        max_length=8,
                    ),
                ),
                (
                    "paid_health_probe",
                    models.BooleanField(
                        default=False,
                        help_text="Health checks send a one-token completion (billed by the provider) instead of "
                        "listing models.",
                    ),
                ),
                ("enabled", models.BooleanField(default=True)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                (
                    "model",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="deployments",
                        to="providers.catalogmodel",
                    ),
                ),
                (
                    "provider",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="deployments",
                        to="providers.provider",
                    ),
                ),
            ],
            options={
                "ordering": ["model", "priority", "pk"],
                "constraints": [
                    models.UniqueConstraint(fields=("model", "name"), name="deployment_name_unique_in_model")
                ],
            },
        ),
        # The columns about to move to Deployment accept a row without them first, so that going back can
        # add them again to a table that has rows, before first_deployment_back fills them in.
        migrations.AlterField(
            model_name="catalogmodel",
            name="provider",
            field=models.ForeignKey(
                null=True, on_delete=django.db.models.deletion.PROTECT, related_name="models", to="providers.provider"
            ),
        ),
        migrations.AlterField(
            model_name="catalogmodel",
            name="upstream_id",
            field=models.CharField(default="", help_text="The provider's own model id.", max_length=200),
        ),
        migrations.RunPython(one_deployment_each, first_deployment_back),
        migrations.RemoveField(model_name="catalogmodel", name="provider"),
        migrations.RemoveField(model_name="catalogmodel", name="upstream_id"),
        migrations.RemoveField(model_name="catalogmodel", name="input_per_mtok"),
        migrations.RemoveField(model_name="catalogmodel", name="output_per_mtok"),
        migrations.RemoveField(model_name="catalogmodel", name="cached_input_per_mtok"),
        migrations.RemoveField(model_name="provider", name="max_retries"),
        migrations.CreateModel(
            name="HealthCheck",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("checked_at", models.DateTimeField(db_index=True)),
                ("ok", models.BooleanField()),
                ("latency_ms", models.PositiveIntegerField(blank=True, null=True)),
                ("error", models.CharField(blank=True, max_length=500)),
                ("paid", models.BooleanField(default=False)),
                (
                    "deployment",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="health_checks",
                        to="providers.deployment",
                    ),
                ),
            ],
            options={
                "ordering": ["-checked_at"],
                "indexes": [models.Index(fields=["deployment", "-checked_at"], name="healthcheck_recent")],
            },
        ),
        migrations.CreateModel(
            name="Incident",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("started_at", models.DateTimeField()),
                ("ended_at", models.DateTimeField(blank=True, null=True)),
                ("reason", models.CharField(blank=True, max_length=500)),
                (
                    "deployment",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="incidents",
                        to="providers.deployment",
                    ),
                ),
            ],
            options={
                "ordering": ["-started_at"],
                "constraints": [
                    models.UniqueConstraint(
                        condition=models.Q(("ended_at__isnull", True)),
                        fields=("deployment",),
                        name="one_open_incident_per_deployment",
                    )
                ],
            },
        ),
    ]
