"""The audit log's CSV export served by an ASGI server (llmhub in production) is sent as it is read, a batch at a
time, not read whole into the server's memory first (``core.streaming``)."""

from __future__ import annotations

import csv
import io
import warnings

import httpx
import pytest
from asgiref.sync import sync_to_async

from audit.exports import CSV_COLUMNS, audit_csv_response
from audit.models import AuditEvent
from audit.services import audit_record
from billing.models import KeyScope
from billing.services.keys import api_key_create
from tests.factories import UserFactory

EVENTS = 400
NOTE = "n" * 400  # about 500 bytes a line: the export is a few batches long


def events_recorded(count: int) -> None:
    for n in range(count):
        audit_record(
            "providers.provider.change",
            target_type="providers.provider",
            target_id=str(n),
            changes={"note": ["", NOTE]},
        )


@pytest.mark.django_db(transaction=True)
async def test_an_export_served_over_asgi_is_sent_batch_by_batch_as_the_rows_are_read():
    """Django's StreamingHttpResponse read a synchronous iterator to its end into a list (and warned) before an
    ASGI server sent the first byte: an export of years of the log held whole in memory. Here the first part
    is sent when a fraction of the rows has been read, each read in the request's thread, and the parts make
    the whole CSV."""
    await sync_to_async(events_recorded)(EVENTS)
    read = []

    def counted():
        for event in AuditEvent.objects.order_by("seq").iterator(chunk_size=50):
            read.append(event.seq)
            yield event

    response = await sync_to_async(audit_csv_response)(counted())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Django's "must consume synchronous iterators" is an error here
        parts = aiter(response)  # what Django's ASGIHandler.send_response reads
        first = await anext(parts)
        assert 0 < len(read) < EVENTS / 2, len(read)
        rest = [part async for part in parts]
    assert len(rest) >= 2
    exported = list(csv.DictReader(io.StringIO(b"".join([first, *rest]).decode())))
    assert len(exported) == len(read) == await AuditEvent.objects.acount()
    assert [int(row["seq"]) for row in exported] == read == sorted(read)
    assert list(exported[0]) == list(CSV_COLUMNS)


def test_the_export_downloads_whole_from_a_live_server(llmhub_server):
    """Through uvicorn, with a staff user's key that may read the log: every row, once, in order."""
    events_recorded(EVENTS)
    reader = api_key_create(
        user=UserFactory(username="ops", is_staff=True), name="auditor", scopes=[KeyScope.AUDIT_READ]
    )
    with httpx.stream(
        "GET",
        f"{llmhub_server.url}/api/audit/export.csv",
        headers={"Authorization": f"Bearer {reader.secret}"},
        timeout=30,
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/csv")
        chunks = list(answer.iter_bytes())
    exported = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert [int(row["seq"]) for row in exported] == list(
        AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)
    )
    assert sum(NOTE in row["changes"] for row in exported) == EVENTS
