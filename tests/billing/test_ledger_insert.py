"""The ledger writer's batched insert (on PostgreSQL one ``INSERT ... SELECT FROM unnest(...)`` per batch,
elsewhere ``bulk_create``) writes every field of every row as submitted, skips request ids already in the
ledger, and keeps a batch whole. On SQLite and on PostgreSQL (Makefile ``POSTGRES_TESTS``)."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.models import UsageRecord
from billing.services.keys import api_key_create
from billing.services.ledger import BATCH_SIZE, ledger_flush, usage_record_submit
from billing.services.ledger_rows import UsageData
from providers.models import CatalogModel, Deployment, Provider
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


def every_field(request_id: str, **ids) -> UsageData:
    """A row with no field left at its default, so that a column written wrong or not at all shows."""
    return UsageData(
        request_id=request_id,
        endpoint="websocket",
        stream=True,
        status="client_disconnected",
        operation="messages",
        provider_name="fake-anthropic",
        model_name="claude-test",
        deployment_name="eu",
        requested_model="claude-alias",
        attempts=3,
        resumed=True,
        prompt_tokens=1234,
        completion_tokens=567,
        cached_tokens=89,
        cost=Decimal("0.0123456789"),
        usage_estimated=True,
        upstream_latency_ms=321,
        ttft_ms=45,
        duration_ms=6789,
        error_type="overloaded",
        billing_source="user_key",
        user_key_cost=Decimal("0.5000000001"),
        moderation="flagged input: violence",
        experiment_id=7,
        experiment_variant_id=8,
        created_at=datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC),
        **ids,
    )


@pytest.fixture
def ids():
    user = UserFactory()
    provider = Provider.objects.create(name="fake-anthropic", kind="anthropic", base_url="http://127.0.0.1:9")
    model = CatalogModel.objects.create(name="claude-test")
    deployment = Deployment.objects.create(model=model, provider=provider, name="eu", upstream_id="claude-x")
    return {
        "user_id": user.pk,
        "api_key_id": api_key_create(user=user, name="k").api_key.pk,
        "provider_id": provider.pk,
        "model_id": model.pk,
        "deployment_id": deployment.pk,
    }


async def test_every_field_of_every_row_is_written_once(ids):
    rows = [every_field(f"req-{n}", **ids) for n in range(BATCH_SIZE + 3)]  # two batches
    for data in rows:
        usage_record_submit(data)
    usage_record_submit(every_field("req-0", **ids))  # a duplicate id: skipped, as a replayed row is
    await ledger_flush()

    written = {row["request_id"]: row async for row in UsageRecord.objects.values()}
    assert len(written) == len(rows)
    for data in rows:
        row = written[data.request_id]
        assert {item.name: row[item.name] for item in fields(UsageData) if item.name != "key_hash"} == {
            item.name: getattr(data, item.name) for item in fields(UsageData) if item.name != "key_hash"
        }
