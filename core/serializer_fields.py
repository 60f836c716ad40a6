"""DRF fields shared by the management APIs."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers


@extend_schema_field(
    {
        "type": "string",
        "description": "An ISO 8601 date (`2025-01-31`, the whole UTC day) or date-time (`2025-01-31T12:00:00Z`).",
    }
)
class DateOrDateTimeField(serializers.Field):
    """A date or an aware date-time (a naive one is UTC); which one the client gave is kept, so that a view
    can read a date as a whole day."""

    default_error_messages = {
        "invalid": "Give an ISO 8601 date (2025-01-31) or date-time (2025-01-31T12:00:00Z).",
        "out_of_range": "This date-time is out of range once in UTC: give one between 0001-01-02 and 9999-12-30.",
    }

    def to_internal_value(self, data: Any) -> date | datetime:
        if not isinstance(data, str):
            self.fail("invalid")
        try:
            # A date first: Python's fromisoformat would also read "2025-01-31" as a midnight datetime.
            parsed: date | datetime | None = parse_date(data) or parse_datetime(data)
        except ValueError:
            self.fail("invalid")
        if parsed is None:
            self.fail("invalid")
        if isinstance(parsed, datetime):
            if timezone.is_naive(parsed):
                parsed = timezone.make_aware(parsed, UTC)
            try:
                # The database compares in UTC: an offset that takes the instant past year 1 or 9999 would
                # overflow there, as a 500.
                parsed.astimezone(UTC)
            except OverflowError:
                self.fail("out_of_range")
        return parsed

    def to_representation(self, value: date | datetime) -> str:
        return value.isoformat()


@extend_schema_field(
    {
        "type": "string",
        "description": (
            "An ISO 8601 date (`2026-01-31`, the start of that UTC day) or date-time (`2026-01-31T12:00:00Z`)."
        ),
    }
)
class InstantField(DateOrDateTimeField):
    """``DateOrDateTimeField`` as an instant: a date means the start of that UTC day."""

    def to_internal_value(self, data: Any) -> datetime:
        parsed = super().to_internal_value(data)
        if not isinstance(parsed, datetime):
            parsed = datetime.combine(parsed, time.min, tzinfo=UTC)
        return parsed
