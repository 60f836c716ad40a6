"""The audit log as CSV, streamed (a log of years need not fit in memory: ``core.streaming``): the admin's export
action and ``/api/audit/export.csv`` write the same columns."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC
from typing import Any

from core.streaming import ThreadedStreamingHttpResponse, csv_lines

from .models import AuditEvent

CSV_COLUMNS = (
    "seq",
    "created_at",
    "actor_type",
    "actor_id",
    "actor_repr",
    "action",
    "target_type",
    "target_id",
    "target_repr",
    "changes",
    "ip_address",
    "user_agent",
    "prev_hash",
    "hash",
)
# A cell starting with one of these is a formula to a spreadsheet; a user name or a user agent is anyone's
# to choose, so such text is written with a leading apostrophe (OWASP's "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(event: AuditEvent, column: str) -> Any:
    value = getattr(event, column)
    if column == "created_at":
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if column == "changes":
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def audit_csv_lines(events: Iterable[AuditEvent]) -> Iterator[str]:
    return csv_lines(CSV_COLUMNS, ([_cell(event, column) for column in CSV_COLUMNS] for event in events))


def audit_csv_response(events: Any, *, filename: str = "audit-log.csv") -> ThreadedStreamingHttpResponse:
    rows = events.iterator(chunk_size=2000) if hasattr(events, "iterator") else events
    response = ThreadedStreamingHttpResponse(audit_csv_lines(rows), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
