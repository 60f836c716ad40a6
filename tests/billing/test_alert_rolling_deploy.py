"""The columns this release added to the incident tables have database defaults: the previous release's code,
still serving during a rolling deploy, inserts incidents without naming them, and such an insert must not fail
(an alert lost for the length of the deploy)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.utils import timezone

from billing.models import OpsAlertIncident, OpsAlertRule
from providers.models import Incident
from tests.factories import DeploymentFactory

pytestmark = pytest.mark.django_db

ADDED = {
    OpsAlertIncident: {
        "closed_because",
        "kept_recipients",
        "kept_webhook_url",
        "model",
        "renamed_from",
        "rule_name",
        "threshold",
        "under_since",
    },
    Incident: {"ended_because", "kept_deployment", "kept_model", "kept_provider", "kept_upstream_id"},
}


def insert_as_the_previous_release(instance) -> int:
    model = type(instance)
    fields = [f for f in model._meta.concrete_fields if not f.primary_key and f.name not in ADDED[model]]
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    values = [f.get_db_prep_save(getattr(instance, f.attname), connection) for f in fields]
    marks = ", ".join(["%s"] * len(fields))
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {model._meta.db_table} ({columns}) VALUES ({marks})", values)
    return model.objects.latest("pk").pk


def test_an_ops_incident_inserted_without_the_new_columns_reads_empty():
    rule = OpsAlertRule.objects.create(name="errors", kind="error_rate", threshold=10)
    incident = OpsAlertIncident(rule=rule, subject="model x", opened_at=timezone.now(), value_at_open=20, peak=20)
    saved = OpsAlertIncident.objects.get(pk=insert_as_the_previous_release(incident))
    assert (saved.closed_because, saved.kept_recipients, saved.rule_name, saved.renamed_from) == ("", "", "", "")
    assert (saved.model_id, saved.threshold) == (None, None)
    assert not saved.kept_webhook_url.reveal()


def test_a_deployment_incident_inserted_without_the_new_column_reads_empty():
    deployment = DeploymentFactory()
    incident = Incident(deployment=deployment, reason="down", started_at=timezone.now())
    saved = Incident.objects.get(pk=insert_as_the_previous_release(incident))
    assert (saved.ended_because, saved.kept_deployment, saved.kept_model, saved.kept_provider) == ("", "", "", "")
    assert saved.kept_upstream_id == ""
