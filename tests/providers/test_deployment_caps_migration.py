"""Deployments with a cap of 0 (providers 0010, before 0011 refuses it): they got no traffic, and still get
none, now as disabled deployments with that cap cleared; other rows are left as they were."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from providers.models import Deployment
from tests.factories import DeploymentFactory
from tests.migrating import latest, migrate, migrated_to

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("providers", "0009_alert_sweep_indexes")]


def test_a_cap_of_0_becomes_a_disabled_deployment_without_that_cap_and_the_database_refuses_a_new_0():
    with migrated_to(BEFORE) as apps:
        Provider = apps.get_model("providers", "Provider")
        CatalogModel = apps.get_model("providers", "CatalogModel")
        Rows = apps.get_model("providers", "Deployment")
        provider = Provider.objects.create(name="east", kind="openai_compatible", base_url="http://127.0.0.1:9/v1")
        model = CatalogModel.objects.create(name="m")
        caps = {
            "no-requests": (0, 90_000),
            "no-tokens": (600, 0),
            "both": (0, 0),
            "capped": (600, 90_000),
            "uncapped": (None, None),
        }
        for name, (rpm, tpm) in caps.items():
            Rows.objects.create(
                model=model, provider=provider, name=name, upstream_id=name, rpm_limit=rpm, tpm_limit=tpm
            )

        migrate(latest())

        rows = {d.name: (d.rpm_limit, d.tpm_limit, d.enabled) for d in Deployment.objects.all()}
        assert rows == {
            "no-requests": (None, 90_000, False),
            "no-tokens": (600, None, False),
            "both": (None, None, False),
            "capped": (600, 90_000, True),
            "uncapped": (None, None, True),
        }
        for cap in ("rpm_limit", "tpm_limit"):
            with pytest.raises(IntegrityError), transaction.atomic():
                DeploymentFactory(**{cap: 0})
