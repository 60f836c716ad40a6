"""The ledger writer's batched insert (on PostgreSQL one ``INSERT ... SELECT FROM unnest(...)`` per batch, on
SQLite a few multi-row ``INSERT OR IGNORE`` statements) writes every field of every row as submitted, skips
request ids already in the ledger, and keeps a batch whole. On SQLite and on PostgreSQL (Makefile
``POSTGRES_TESTS``)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import fields, replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.models import UsageRecord
from billing.services.keys import api_key_create
from billing.services.ledger import BATCH_SIZE, ledger_flush, usage_record_submit
from billing.services.ledger_rows import UsageData, statement_sizes
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
        cache_write_tokens=144,
        cache_write_1h_tokens=55,
        service_tier="priority",
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


@contextmanager
def sqlite_statements():
    """The statements SQLite itself runs on the test's connection (its trace callback: once for each row of an
    ``executemany``, once for a multi-row statement), as their first words."""
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("SQLite's insert (PostgreSQL's is one INSERT ... SELECT FROM unnest)")
    connection.ensure_connection()
    ran: list[str] = []
    connection.connection.set_trace_callback(lambda sql: ran.append(sql[:40]))
    try:
        yield ran
    finally:
        connection.connection.set_trace_callback(None)


def test_sqlites_insert_writes_a_batch_in_a_few_statements(ids):
    """Each statement is one hand-over of the GIL between the writer's thread and the event loop's, so a batch
    of 500 goes in six, not 500 (``_insert_many``'s docstring says what 500 cost the server). A request id
    twice in the batch is written once, as the one-row statement run for each row did."""
    from billing.services.ledger_rows import _insert_many

    rows = [every_field(f"req-{n}", **ids) for n in range(BATCH_SIZE)]
    with sqlite_statements() as ran:
        _insert_many([*rows, every_field("req-7", **ids)])
    inserts = [sql for sql in ran if sql.startswith("INSERT OR IGNORE")]
    assert len(inserts) == len(statement_sizes(BATCH_SIZE + 1, 256)) == 7  # 256, 128, 64, 32, 16, 4, 1
    assert set(UsageRecord.objects.values_list("request_id", flat=True)) == {data.request_id for data in rows}


def test_sqlites_insert_needs_no_placeholder_rewritten_and_still_logs_its_values(ids):
    """Django's SQLite cursor rewrites each ``%s`` of a statement at every execute (a regular expression: about 7
    µs of CPU a row of the batch): the insert is in SQLite's own ``?``. Where Django logs the queries (``DEBUG``,
    ``CaptureQueriesContext``), its log fills the values into ``%s``: the insert is then in those, and logged."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from billing.services.ledger_rows import _insert_many

    if connection.vendor != "sqlite":
        pytest.skip("SQLite's insert (PostgreSQL's is one INSERT ... SELECT FROM unnest)")
    handed: list[str] = []

    def spy(execute, sql, params, many, context):
        handed.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(spy):
        _insert_many([every_field(f"req-{n}", **ids) for n in range(3)])
    inserts = [sql for sql in handed if sql.startswith("INSERT OR IGNORE")]
    assert len(inserts) == 2  # 2, 1
    assert all("%s" not in sql and "?" in sql for sql in inserts)

    with CaptureQueriesContext(connection) as logged:
        _insert_many([every_field("logged", **ids)])
    assert any("'logged'" in query["sql"] for query in logged.captured_queries)
    assert UsageRecord.objects.count() == 4


def test_sqlites_insert_keeps_under_the_builds_limit_of_variables(ids):
    """A SQLite built with the old limit of 999 variables a statement (16 rows of these 32 columns: the largest
    power of two under 31) still takes the whole batch: smaller statements, not "too many SQL variables"."""
    import sqlite3

    from billing.services.ledger_rows import _insert_many

    rows = [every_field(f"req-{n}", **ids) for n in range(100)]
    with sqlite_statements() as ran:
        from django.db import connection

        before = connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        try:
            _insert_many(rows)
        finally:
            connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, before)
    assert len([sql for sql in ran if sql.startswith("INSERT OR IGNORE")]) == 7  # 16 × 6, 4
    assert UsageRecord.objects.count() == len(rows)


@given(rows=st.integers(min_value=0, max_value=5000), power=st.integers(min_value=0, max_value=10))
def test_statement_sizes_add_up_to_the_batch_in_sizes_sqlite_keeps_compiled(rows, power):
    most = 1 << power
    sizes = statement_sizes(rows, most)
    assert sum(sizes) == rows
    assert all(size <= most and size & (size - 1) == 0 for size in sizes)  # powers of two, at most ``most``
    assert len(sizes) <= rows // most + power  # the full ones, then one a binary digit of the rest
    assert sizes == sorted(sizes, reverse=True)


def test_a_writer_that_names_the_columns_of_the_previous_release_still_inserts(ids):
    """During a rolling deploy the previous release's writers insert rows without ``cache_write_tokens`` once
    its migration has run: the database fills in 0 rather than refuse the row."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing_usagerecord (request_id, endpoint, operation, stream, prompt_tokens, "
            "completion_tokens, cached_tokens, cost, usage_estimated, duration_ms, status, error_type, "
            "requested_model, provider_name, model_name, deployment_name, attempts, resumed, billing_source, "
            "moderation, created_at) VALUES ('req-previous', 'rest', 'chat', false, 10, 5, 0, 0.01, false, 0, "
            "'ok', '', '', '', 'm', '', 1, false, 'platform', '', %s)",
            [datetime(2026, 3, 4, tzinfo=UTC)],
        )
    previous = UsageRecord.objects.get(request_id="req-previous")
    assert (previous.cache_write_tokens, previous.service_tier) == (0, "")
