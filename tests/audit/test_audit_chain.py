"""The audit log's hash chain and ``manage.py auditverify``: a row edited, deleted (first, middle, last) or
two rows swapped in the database make it fail naming the first bad row; the hash holds across the database's
round trip (JSON, IP spelling, microseconds); two processes appending at once keep one chain.

Runs on SQLite and, through ``scripts/with_postgres.py``, on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
import time_machine
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from audit.context import AuditOrigin, audit_origin
from audit.models import AuditChainHead, AuditEvent
from audit.services import audit_record, audit_verify
from tests.conftest import database_url_for_subprocesses, python_argv

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_audit_log")]
ROOT = Path(__file__).resolve().parent.parent.parent
SWAPPED = ("created_at", "actor_type", "actor_id", "actor_repr", "action", "target_type", "target_id")


@pytest.fixture
def empty_audit_log() -> None:
    """Start from no events: migrating the test database has recorded some (the roles' groups)."""
    AuditEvent.objects.all().delete()
    AuditChainHead.objects.all().delete()


def record_five() -> list[AuditEvent]:
    return [
        audit_record(f"test.step{n}", target_type="thing", target_id=n, changes={"n": [n - 1, n]}, actor=None)
        for n in range(1, 6)
    ]


def auditverify() -> str:
    out = StringIO()
    call_command("auditverify", stdout=out)
    return out.getvalue().strip()


def auditverify_fails() -> str:
    with pytest.raises(CommandError) as failure:
        auditverify()
    return str(failure.value)


def test_an_untouched_chain_is_intact():
    record_five()

    assert auditverify() == "5 events, chain intact"


def test_an_empty_log_is_intact():
    assert auditverify() == "0 events, chain intact"


@pytest.mark.parametrize(
    "edit",
    [
        {"action": "test.innocent"},
        {"changes": {"n": [2, 99]}},
        {"actor_repr": "someone-else"},
        {"ip_address": "10.9.9.9"},
    ],
    ids=["action", "changes", "actor", "ip"],
)
def test_an_edited_row_is_named(edit):
    record_five()
    AuditEvent.objects.filter(seq=3).update(**edit)

    message = auditverify_fails()

    assert "#3 (" in message and "edited" in message
    assert audit_verify().seq == 3


def test_an_edited_row_with_its_hash_recomputed_is_caught_at_the_next_row():
    from audit.services import event_hash, hashed_fields

    record_five()
    event = AuditEvent.objects.get(seq=3)
    event.action = "test.innocent"
    AuditEvent.objects.filter(seq=3).update(action=event.action, hash=event_hash(hashed_fields(event), event.prev_hash))

    assert "#4 (test.step4)" in auditverify_fails()


@pytest.mark.parametrize(("removed", "named"), [(1, "#2 (test.step2)"), (3, "#4 (test.step4)"), (5, "#5")])
def test_a_deleted_row_is_named(removed, named):
    record_five()
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {AuditEvent._meta.db_table} WHERE seq = %s", [removed])

    message = auditverify_fails()

    assert named in message
    assert "removed" in message


def test_two_swapped_rows_are_named_at_the_first():
    record_five()
    two, three = AuditEvent.objects.get(seq=2), AuditEvent.objects.get(seq=3)
    fields = (*SWAPPED, "target_repr", "changes", "ip_address", "user_agent", "prev_hash", "hash")
    # The hash column is unique: park row 2's elsewhere while the two rows trade places.
    AuditEvent.objects.filter(seq=2).update(hash="parked")
    AuditEvent.objects.filter(seq=3).update(**{name: getattr(two, name) for name in fields})
    AuditEvent.objects.filter(seq=2).update(**{name: getattr(three, name) for name in fields})

    message = auditverify_fails()

    assert "#2 (test.step3)" in message and "reordered" in message


def test_the_model_refuses_edits_and_deletes():
    event = audit_record("test.step", actor=None)

    with pytest.raises(PermissionError):
        event.save()
    with pytest.raises(PermissionError):
        event.delete()


@time_machine.travel(datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC), tick=False)
def test_the_hash_holds_after_a_round_trip_through_the_database():
    tricky = {
        "b_nested": [{"z": 1, "a": [None, True, 1.5, 10**15]}, "ünïcødé ✓"],
        "a_decimal": [Decimal("0.1500"), Decimal("1E+2")],
        "when": [datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), None],
        "nul": ["a\x00b", ""],
        "unordered": [{"y": 2, "x": 1}, {"x": 1}],
    }
    for address in ("2001:DB8:0:0:0:0:0:1", "::ffff:10.0.0.1", "127.0.0.1", "fe80::1%eth0", "not-an-address"):
        with audit_origin(AuditOrigin("user", "7", "alice", address, "agent/1.0 ✓")):
            audit_record("test.roundtrip", target_type="thing", target_id="1", target_repr="x", changes=tricky)

    assert audit_verify() is None
    stored = AuditEvent.objects.in_chain_order()
    assert [event.ip_address for event in stored] == ["2001:db8::1", "::ffff:10.0.0.1", "127.0.0.1", "fe80::1", None]
    assert stored[0].created_at == datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert stored[0].changes["nul"] == ["ab", ""]


@pytest.mark.django_db(transaction=True)
def test_two_processes_appending_at_once_keep_one_chain():
    count = 60
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        PYTHONPATH=str(ROOT),
    )
    start_at = time.monotonic() + 3
    workers = [
        subprocess.Popen(
            python_argv(
                None, "tests.audit.append_worker", json.dumps({"tag": tag, "count": count, "start_at": start_at})
            ),
            cwd=ROOT,
            env=env,
        )
        for tag in ("a", "b")
    ]
    assert [worker.wait(timeout=90) for worker in workers] == [0, 0]

    assert audit_verify() is None
    seqs = list(AuditEvent.objects.in_chain_order().values_list("seq", flat=True))
    assert seqs == list(range(1, 2 * count + 1))
    tags = {target_id[0] for target_id in AuditEvent.objects.values_list("target_id", flat=True)}
    assert tags == {"a", "b"}
    assert AuditChainHead.objects.get().last_seq == 2 * count


@pytest.mark.parametrize("appended", [1, 3])
def test_events_recorded_while_the_chain_is_checked_are_no_tampering(monkeypatch, appended):
    """auditverify runs against a live system: a sign-in recorded after it has walked the rows but before it
    reads the chain head is a new row, not rows removed from the end."""
    record_five()
    real_filter = AuditChainHead.objects.filter

    def filter_after_appends(*args, **kwargs):
        for n in range(appended):
            audit_record(f"test.live{n}", actor=None)
        monkeypatch.setattr(AuditChainHead.objects, "filter", real_filter)
        return real_filter(*args, **kwargs)

    monkeypatch.setattr(AuditChainHead.objects, "filter", filter_after_appends)

    assert audit_verify() is None
    assert AuditEvent.objects.count() == 5 + appended
