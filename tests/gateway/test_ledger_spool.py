"""The ledger's safety net: rows that could not be written in the background are spooled to disk and
replayed exactly once."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async

from billing.models import UsageRecord
from billing.services import ledger
from billing.services.ledger import ledger_flush, ledger_replay_spool, usage_record_submit
from billing.services.ledger_rows import UsageData
from billing.tasks import ledger_spool_replay

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def spool(tmp_path, settings):
    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    return settings.LLMHUB_LEDGER_SPOOL


def data(request_id: str) -> UsageData:
    return UsageData(
        request_id=request_id,
        endpoint="rest",
        stream=False,
        status="ok",
        model_name="m",
        prompt_tokens=10,
        completion_tokens=5,
        cost=Decimal("0.0000123456"),
    )


async def test_a_write_cut_short_by_shutdown_is_spooled_then_replayed_once(spool):
    await ledger_flush()  # nothing of an earlier test still in this loop's writer
    usage_record_submit(data("req_cut"))
    # The loop's writer is cancelled before it could run, as when a server's loop is torn down.
    writer_task = ledger._writers[asyncio.get_running_loop()].task
    writer_task.cancel()
    await asyncio.gather(writer_task, return_exceptions=True)
    await ledger_flush()
    assert spool.exists() and "req_cut" in spool.read_text()

    assert await sync_to_async(ledger_replay_spool)() == 1
    assert await sync_to_async(ledger_replay_spool)() == 0
    record = await UsageRecord.objects.aget(request_id="req_cut")
    assert record.cost == Decimal("0.0000123456") and record.completion_tokens == 5
    assert await UsageRecord.objects.filter(request_id="req_cut").acount() == 1
    assert not spool.exists()


def test_replay_never_duplicates_a_row_already_written(spool):
    ledger._write_rows([data("req_twice")])
    ledger._spool(data("req_twice"))
    ledger._spool(data("req_new"))
    assert ledger_spool_replay() == 2
    assert UsageRecord.objects.filter(request_id="req_twice").count() == 1
    assert UsageRecord.objects.filter(request_id="req_new").count() == 1
    assert ledger_spool_replay() == 0


def test_a_row_whose_model_and_key_were_deleted_meanwhile_is_still_written(spool):
    """An admin deleted the model (or the key) while its request ran: the row's foreign keys would break
    the batch's insert, every retry and every replay; it is written without them, and the batch with it."""
    from dataclasses import replace

    from tests.factories import ModelFactory, UserFactory

    model = ModelFactory(name="kept-model")
    user = UserFactory()
    provider_id = model.deployments.get().provider_id
    kept = replace(data("req_kept"), user_id=user.pk, model_id=model.pk, provider_id=provider_id)
    orphan = replace(
        data("req_orphan"),
        user_id=user.pk,
        api_key_id=987_654,
        provider_id=provider_id,
        model_id=model.pk + 1000,
        model_name="deleted-model",
    )
    ledger._write_rows([kept, orphan])

    rows = {row.request_id: row for row in UsageRecord.objects.all()}
    assert set(rows) == {"req_kept", "req_orphan"}
    assert rows["req_kept"].model_id == model.pk
    assert rows["req_orphan"].model_id is None and rows["req_orphan"].api_key_id is None
    assert rows["req_orphan"].model_name == "deleted-model" and rows["req_orphan"].cost == Decimal("0.0000123456")
    assert rows["req_orphan"].user_id == user.pk and rows["req_orphan"].provider_id == provider_id


def test_a_spooled_row_whose_model_is_gone_is_replayed(spool):
    ledger._spool(replace_model(data("req_spooled_orphan"), 424_242))
    assert ledger_replay_spool() == 1
    row = UsageRecord.objects.get(request_id="req_spooled_orphan")
    assert row.model_id is None and row.model_name == "m"
    assert not spool.exists()


def replace_model(usage: UsageData, model_id: int) -> UsageData:
    from dataclasses import replace

    return replace(usage, model_id=model_id)


def test_how_a_request_was_served_survives_the_spool_and_a_deleted_deployment(spool):
    """The routing fields (deployment, the name the client asked for, attempts, a resumed stream) are written,
    spooled and replayed like the others; a deployment deleted meanwhile leaves its name on the row."""
    from dataclasses import replace

    from tests.factories import DeploymentFactory, ModelFactory

    model = ModelFactory(name="routed-model")
    kept, gone = DeploymentFactory(model=model, name="kept"), DeploymentFactory(model=model, name="gone")
    served = replace(
        data("req_served"),
        model_id=model.pk,
        deployment_id=kept.pk,
        deployment_name="kept",
        requested_model="routed-alias",
        attempts=3,
        resumed=True,
    )
    ledger._spool(served, replace(served, request_id="req_gone", deployment_id=gone.pk, deployment_name="gone"))
    gone.delete()

    assert ledger_replay_spool() == 2
    rows = {row.request_id: row for row in UsageRecord.objects.all()}
    fields = ("deployment_id", "deployment_name", "requested_model", "attempts", "resumed")
    assert [getattr(rows["req_served"], name) for name in fields] == [kept.pk, "kept", "routed-alias", 3, True]
    assert [getattr(rows["req_gone"], name) for name in fields] == [None, "gone", "routed-alias", 3, True]
    assert rows["req_gone"].model_id == model.pk


def test_a_line_spooled_before_rows_counted_cache_writes_replays_with_none(spool):
    """A spool written by the previous release has no ``cache_write_tokens``: it replays, the count 0 (it was
    priced in ``cost`` already); a line of this release keeps its count."""
    import json
    from dataclasses import replace

    ledger._spool(data("req_old_release"))
    ledger._spool(replace(data("req_this_release"), cached_tokens=2, cache_write_tokens=3))
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert all("cache_write_tokens" in line for line in lines)  # the field is spooled...
    del lines[0]["cache_write_tokens"]  # ...but was not by the previous release
    spool.write_text("".join(json.dumps(line) + "\n" for line in lines))

    assert ledger_spool_replay() == 2
    old = UsageRecord.objects.get(request_id="req_old_release")
    assert (old.cache_write_tokens, old.cost) == (0, Decimal("0.0000123456"))
    new = UsageRecord.objects.get(request_id="req_this_release")
    assert (new.cached_tokens, new.cache_write_tokens) == (2, 3)


def test_a_line_torn_by_a_crash_is_set_aside_and_holds_back_no_row(spool, caplog):
    """A process killed in the middle of an append leaves half a line, which the next append runs on from.
    Every replay stopped at it, for good: the rows before and after it, and every row spooled since (a claimed
    file is replayed again first), never reached the ledger, and reconciliation could not read the spool.
    The line is set aside for a person now, and the rows around it are written once."""
    from billing.services.spool import spool_rows

    ledger._spool(data("req_before"))
    with open(spool, "a", encoding="utf-8") as torn:
        torn.write('{"request_id": "req_torn", "endpo')  # killed here: no newline
    ledger._spool(data("req_glued"))  # runs on from the torn half: one unreadable line
    ledger._spool(data("req_after"))
    assert [row["request_id"] for row in spool_rows()] == ["req_before", "req_after"]

    assert ledger_spool_replay() == 2
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["req_after", "req_before"]
    aside = spool.with_name(spool.name + ".unreadable")
    assert aside.read_text().startswith('{"request_id": "req_torn", "endpo{"request_id": "req_glued"')
    assert any(record.levelname == "ERROR" and str(aside) in record.getMessage() for record in caplog.records)

    ledger._spool(data("req_later"))
    assert ledger_spool_replay() == 1
    assert UsageRecord.objects.filter(request_id__in=["req_before", "req_after", "req_later"]).count() == 3
    assert ledger_spool_replay() == 0
    assert [path.name for path in spool.parent.glob("ledger-spool.jsonl*") if path.suffix != ".lock"] == [aside.name]
