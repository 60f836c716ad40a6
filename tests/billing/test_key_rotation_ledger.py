"""A row refused while the database was down is kept under its key's hash and attributed when the writer
gets the database back: a rotated key's previous secret, used during its grace, is that key too; used
after the grace (a 401 with the database up) it gets no row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from billing.models import UsageStatus
from billing.services.keys import api_key_create, api_key_rotate, hash_key
from billing.services.ledger_rows import UsageData, _keys_resolved
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 6, 10, 12, 0, 0, tzinfo=UTC)


def _row(request_id: str, secret: str, at: datetime) -> UsageData:
    return UsageData(
        request_id=request_id,
        endpoint="openai",
        stream=False,
        status=UsageStatus.REJECTED,
        key_hash=hash_key(secret),
        created_at=at,
    )


def test_previous_secret_rows_are_attributed_during_the_grace_only():
    user = UserFactory()
    with time_machine.travel(NOW, tick=False):
        created = api_key_create(user=user)
        rotated = api_key_rotate(api_key=created.api_key, grace_seconds=3600)
    rows = [
        _row("new", rotated.secret, NOW + timedelta(minutes=5)),
        _row("old-in-grace", created.secret, NOW + timedelta(minutes=5)),
        _row("old-after-grace", created.secret, NOW + timedelta(hours=2)),
        _row("unknown", "sk-llmhub-nothing-" + "x" * 32, NOW),
    ]

    resolved = {data.request_id: data for data in _keys_resolved(rows)}

    assert set(resolved) == {"new", "old-in-grace"}
    for data in resolved.values():
        assert (data.api_key_id, data.user_id, data.key_hash) == (created.api_key.pk, user.pk, "")
