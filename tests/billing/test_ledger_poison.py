"""One row the database refuses for its own values does not hold up the rest of its batch, nor the spool.

Before, a batch failed whole on one such row (a count past its column's range: ``OverflowError`` on SQLite,
``integer out of range`` on PostgreSQL; a NUL in a text or a numeric overflow on PostgreSQL; a cost that is
no number): the writer spooled every row of it, and the replay put them all back, at every replay, for
ever. Now the others are written once, the refused row is written clamped and flagged, or set aside in the
spool's ``.unreadable`` file for a person, and the spool empties. On SQLite and on PostgreSQL
(``scripts/with_postgres.py``)."""

from __future__ import annotations

import json
import logging
from decimal import Decimal

import pytest
from django.db import connection

from billing.models import UsageRecord
from billing.services.ledger import _spool, ledger_flush, ledger_replay_spool, usage_record_submit
from billing.services.ledger_rows import UsageData
from billing.services.spool import spool_pending

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def spool(tmp_path, settings):
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    return settings.LLMHUB_LEDGER_SPOOL


def row(request_id: str, **values) -> UsageData:
    return UsageData(
        **{
            "request_id": request_id,
            "endpoint": "openai",
            "stream": True,
            "status": "ok",
            "cost": Decimal("0.25"),
            **values,
        }
    )


def past_range() -> int:
    """A token count the database cannot hold (SQLite refuses it in Python, PostgreSQL in its column)."""
    return 2**63 if connection.vendor == "sqlite" else 2**31


def unreadable(spool) -> list[dict]:
    aside = spool.with_name(spool.name + ".unreadable")
    return [json.loads(line) for line in aside.read_text().splitlines()] if aside.exists() else []


async def test_a_row_past_a_columns_range_is_written_clamped_and_the_rest_of_its_batch_with_it(spool, caplog):
    caplog.set_level(logging.WARNING, logger="llmhub.ledger")
    usage_record_submit(row("good-1", prompt_tokens=10))
    usage_record_submit(row("poison", prompt_tokens=past_range(), completion_tokens=7, error_type="bad\x00x"))
    usage_record_submit(row("good-2", completion_tokens=20))
    await ledger_flush()

    records = {
        record.request_id: record
        async for record in UsageRecord.objects.order_by("request_id").only(
            "request_id", "prompt_tokens", "completion_tokens", "error_type", "cost"
        )
    }
    assert sorted(records) == ["good-1", "good-2", "poison"]
    assert (records["good-1"].prompt_tokens, records["good-2"].completion_tokens) == (10, 20)
    assert records["good-1"].error_type == records["good-2"].error_type == ""
    poison = records["poison"]
    assert poison.prompt_tokens == (2**63 - 1 if connection.vendor == "sqlite" else 2**31 - 1)  # the column's most
    assert (poison.completion_tokens, poison.cost) == (7, Decimal("0.25"))
    assert poison.error_type == "ledger_clamped:badx"
    assert not spool_pending()
    assert unreadable(spool) == []
    assert "poison" in caplog.text and "prompt_tokens" in caplog.text
    assert str(past_range()) not in caplog.text


def test_a_spooled_row_no_clamp_can_save_is_set_aside_once_and_the_others_are_replayed(spool, caplog):
    """A cost past its column (20 digits, 10 of them decimals) is never made up: the row goes to a person."""
    _spool(row("good-1"), row("poison", cost=Decimal("1e15")), row("good-2"), row("nan", cost=Decimal("NaN")))
    _spool(row("good-1"))  # spooled twice: written once

    assert ledger_replay_spool() == 5  # every line processed: written, skipped as written, or set aside
    assert ledger_replay_spool() == 0

    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["good-1", "good-2"]
    assert not spool_pending()
    aside = unreadable(spool)
    assert [(line["request_id"], Decimal(line["cost"]).is_nan() or line["cost"]) for line in aside] == [
        ("poison", "1E+15"),
        ("nan", True),
    ]
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any("poison" in message and ".unreadable" in message for message in errors)


async def test_a_negative_count_is_written_clamped_not_dropped(spool):
    """SQLite's ``INSERT OR IGNORE`` skips a row that breaks a CHECK constraint (a count below zero in a
    positive column) as it skips a known request id: the row was lost without a word. PostgreSQL refuses it."""
    usage_record_submit(row("good"))
    usage_record_submit(row("negative", completion_tokens=-3, prompt_tokens=5))
    await ledger_flush()

    values = {
        request_id: (prompt, completion, error_type)
        async for request_id, prompt, completion, error_type in UsageRecord.objects.values_list(
            "request_id", "prompt_tokens", "completion_tokens", "error_type"
        )
    }
    assert values == {"good": (0, 0, ""), "negative": (5, 0, "ledger_clamped")}
    assert not spool_pending()


async def test_a_row_whose_texts_are_past_their_columns_is_written_clamped_and_flagged(spool, caplog):
    """Before: PostgreSQL's batched insert (its arrays cast to each column's ``varchar(n)``) cut such a text without
    a word, and SQLite kept it whole, longer than its column; now both write it cut to its column, flagged
    ``ledger_clamped`` and logged, like any other value a row's column cannot hold."""
    caplog.set_level(logging.WARNING, logger="llmhub.ledger")
    long_model, long_provider = "m" * 300, "p" * 100
    usage_record_submit(row("good-1", model_name="gpt-test"))
    usage_record_submit(
        row("long", model_name=long_model, provider_name=long_provider, error_type="upstream_" + "e" * 100)
    )
    usage_record_submit(row("good-2", model_name="x" * 128, error_type="e" * 64))  # exactly as long as they may be
    await ledger_flush()

    records = {record.request_id: record async for record in UsageRecord.objects.all()}
    assert sorted(records) == ["good-1", "good-2", "long"]
    assert (records["good-2"].model_name, records["good-2"].error_type) == ("x" * 128, "e" * 64)
    long = records["long"]
    assert (long.model_name, long.provider_name) == (long_model[:128], long_provider[:64])
    assert long.error_type == ("ledger_clamped:upstream_" + "e" * 100)[:64]
    assert long.cost == Decimal("0.25")
    assert "long" in caplog.text and "model_name" in caplog.text and "provider_name" in caplog.text
    assert not spool_pending()
