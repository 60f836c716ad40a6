"""The catalog's change of shape (providers 0005, billing 0008) on a database with rows in it: each model
becomes a public model with one deployment carrying its old provider, upstream id and prices, and the
allow-lists and the ledger still point at the same public models; back and forward again keep them."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.migrating import latest, migrate, migrated_to

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("providers", "0004_more_provider_kinds"), ("billing", "0007_usage_operation")]
AFTER = [("providers", "0005_catalog_deployments"), ("billing", "0008_usage_deployment_attempts")]


def old_shape_rows(apps) -> dict[str, int]:
    """Rows as the catalog held them before deployments, through the models of that time."""
    Provider = apps.get_model("providers", "Provider")
    Model = apps.get_model("providers", "Model")
    User = apps.get_model("auth", "User")
    Plan = apps.get_model("billing", "Plan")
    ApiKey = apps.get_model("billing", "ApiKey")
    UsageRecord = apps.get_model("billing", "UsageRecord")

    east = Provider.objects.create(name="east", kind="openai_compatible", base_url="http://127.0.0.1:9/v1")
    west = Provider.objects.create(name="west", kind="anthropic", base_url="http://127.0.0.1:9", max_retries=4)
    mini = Model.objects.create(
        name="gpt-4o-mini",
        provider=east,
        upstream_id="gpt-4o-mini-2024-07-18",
        input_per_mtok=Decimal("0.15"),
        output_per_mtok=Decimal("0.60"),
        cached_input_per_mtok=Decimal("0.075"),
        context_window=128_000,
    )
    haiku = Model.objects.create(
        name="claude-haiku",
        provider=west,
        upstream_id="claude-3-5-haiku-latest",
        input_per_mtok=Decimal("0.80"),
        output_per_mtok=Decimal("4"),
        context_window=200_000,
        enabled=False,
    )
    user = User.objects.create(username="migrated")
    plan = Plan.objects.create(name="Migrated plan", allow_all_models=False)
    plan.allowed_models.add(haiku)
    key = ApiKey.objects.create(user=user, name="narrow", prefix="sk-llmhub-mig", secret_hash="0" * 64)
    key.allowed_models.add(mini)
    record = UsageRecord.objects.create(
        request_id="req-before-deployments",
        user=user,
        api_key=key,
        provider=east,
        model=mini,
        provider_name="east",
        model_name="gpt-4o-mini",
        endpoint="rest",
        cost=Decimal("0.0000123"),
    )
    return {"mini": mini.pk, "haiku": haiku.pk, "plan": plan.pk, "key": key.pk, "record": record.pk}


def assert_one_deployment_each(apps, ids: dict[str, int]) -> None:
    CatalogModel = apps.get_model("providers", "CatalogModel")
    Deployment = apps.get_model("providers", "Deployment")
    Plan = apps.get_model("billing", "Plan")
    ApiKey = apps.get_model("billing", "ApiKey")
    UsageRecord = apps.get_model("billing", "UsageRecord")

    expected = {
        ids["mini"]: ("east", "gpt-4o-mini-2024-07-18", Decimal("0.15"), Decimal("0.60"), Decimal("0.075")),
        ids["haiku"]: ("west", "claude-3-5-haiku-latest", Decimal("0.80"), Decimal("4"), None),
    }
    for pk, (provider, upstream, inp, out, cached) in expected.items():
        [deployment] = Deployment.objects.filter(model_id=pk).select_related("provider")
        assert (deployment.provider.name, deployment.name, deployment.upstream_id) == (provider, provider, upstream)
        assert (deployment.input_per_mtok, deployment.output_per_mtok) == (inp, out)
        assert deployment.cached_input_per_mtok == cached and deployment.enabled
    assert dict(CatalogModel.objects.values_list("pk", "name")) == {
        ids["mini"]: "gpt-4o-mini",
        ids["haiku"]: "claude-haiku",
    }
    assert not CatalogModel.objects.get(pk=ids["haiku"]).enabled  # the model's own switch is kept
    assert list(Plan.objects.get(pk=ids["plan"]).allowed_models.values_list("name", flat=True)) == ["claude-haiku"]
    assert list(ApiKey.objects.get(pk=ids["key"]).allowed_models.values_list("name", flat=True)) == ["gpt-4o-mini"]
    record = UsageRecord.objects.get(pk=ids["record"])
    assert record.model_id == ids["mini"] and record.model.name == "gpt-4o-mini"
    assert record.deployment_id is None and record.attempts == 0  # what the ledger did not know then
    assert record.cost == Decimal("0.0000123")


def assert_old_shape(apps, ids: dict[str, int]) -> None:
    Model = apps.get_model("providers", "Model")
    Plan = apps.get_model("billing", "Plan")
    UsageRecord = apps.get_model("billing", "UsageRecord")
    mini = Model.objects.select_related("provider").get(pk=ids["mini"])
    assert (mini.provider.name, mini.upstream_id, mini.input_per_mtok, mini.cached_input_per_mtok) == (
        "east",
        "gpt-4o-mini-2024-07-18",
        Decimal("0.15"),
        Decimal("0.075"),
    )
    assert Model.objects.get(pk=ids["haiku"]).provider.name == "west"
    assert list(Plan.objects.get(pk=ids["plan"]).allowed_models.values_list("pk", flat=True)) == [ids["haiku"]]
    assert UsageRecord.objects.get(pk=ids["record"]).model_id == ids["mini"]


def test_models_become_one_deployment_each_and_references_survive_back_and_forth():
    with migrated_to(BEFORE) as apps:
        ids = old_shape_rows(apps)

        assert_one_deployment_each(migrate(AFTER), ids)

        # Back: each model takes its deployment's provider, upstream id and prices again.
        assert_old_shape(migrate(BEFORE), ids)

        # And forward again, to the latest state of every app.
        assert_one_deployment_each(migrate(latest()), ids)
