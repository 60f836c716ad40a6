"""The ledger writer's batched insert (on PostgreSQL one ``INSERT ... SELECT FROM unnest(...)`` per batch,
elsewhere ``bulk_create``) writes every field of every row as submitted, skips request ids already in the
ledger, and keeps a batch whole. On SQLite and on PostgreSQL (Makefile ``POSTGRES_TESTS``)."""

from __future__ import annotations

from dataclasses import fields, replace
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


def test_sqlites_insert_stores_what_bulk_create_stores(ids):
    """``_insert_many`` hands SQLite most values as they are, without their fields' preparation: the stored
    columns are the same as ``bulk_create``'s, for every field, for enum members, Decimals with more places
    than the column keeps, None, and a datetime in another time zone than UTC."""
    from datetime import timedelta, timezone

    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("SQLite's insert (PostgreSQL's is one INSERT ... SELECT FROM unnest)")
    from billing.models import Endpoint, UsageStatus
    from billing.services.ledger_rows import _INSERTED, _insert_many

    variants = [
        every_field("plain", **ids),
        replace(
            every_field("enums", **ids),
            endpoint=Endpoint.REST,
            status=UsageStatus.UPSTREAM_ERROR,
            cost=Decimal("0.12345678901234"),
            user_key_cost=None,
            ttft_ms=None,
            experiment_id=None,
            user_id=None,
            created_at=datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=-5))),
        ),
        replace(every_field("zero", **ids), cost=Decimal(0), attempts=0, stream=False, resumed=False),
    ]
    _insert_many(variants)
    UsageRecord.objects.bulk_create(
        [
            UsageRecord(**{**{name: getattr(data, name) for name in _INSERTED}, "request_id": "orm-" + data.request_id})
            for data in variants
        ]
    )
    columns = [field.column for field in UsageRecord._meta.concrete_fields if field.name not in ("id", "request_id")]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT request_id, {', '.join(columns)} FROM billing_usagerecord")
        stored = {row[0]: row[1:] for row in cursor.fetchall()}
    assert len(stored) == 2 * len(variants)
    for data in variants:
        assert stored[data.request_id] == stored["orm-" + data.request_id], data.request_id


def test_sqlites_insert_converts_or_refuses_a_value_of_another_type_as_its_field_does(ids):
    """A value whose type its column does not take as it is goes through the field: a numeric string in an
    integer column is stored as the number, and one that is not a number fails the batch, as with
    ``bulk_create``, instead of being stored as text."""
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("SQLite's insert (PostgreSQL's is one INSERT ... SELECT FROM unnest)")
    from billing.services.ledger_rows import _insert_many

    _insert_many([replace(every_field("numeric", **ids), prompt_tokens="12")])
    with connection.cursor() as cursor:
        cursor.execute("SELECT prompt_tokens, typeof(prompt_tokens) FROM billing_usagerecord")
        assert cursor.fetchall() == [(12, "integer")]
    with pytest.raises(ValueError, match="expected a number"):
        _insert_many([replace(every_field("words", **ids), prompt_tokens="twelve")])
    assert not UsageRecord.objects.filter(request_id="words").exists()
