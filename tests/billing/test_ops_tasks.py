"""The operations dashboard's background tasks (``billing.selectors_ops.ops_periodic_tasks``, ``/ops/`` and
its JSON): every enabled schedule of celery beat with the latest run a worker recorded, and its state (ok,
overdue, failing, never run), with the clock pinned so that the overdue windows have known edges. Runs are
recorded through the service the workers call."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.test import Client
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from accounts.roles import Role, role_set
from billing.selectors_ops import OVERDUE_GRACE, TaskState, ops_periodic_tasks
from billing.services.task_runs import task_run_record
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 6, 15, 12, 30, tzinfo=UTC)
NIGHTLY = "billing.tasks.ledger_retention"  # 03:17 UTC every day, in these tests


@pytest.fixture
def clock():
    with time_machine.travel(NOW, tick=False):
        yield NOW


def every(minutes: int = 0, seconds: int = 0) -> IntervalSchedule:
    if minutes:
        return IntervalSchedule.objects.get_or_create(every=minutes, period=IntervalSchedule.MINUTES)[0]
    return IntervalSchedule.objects.get_or_create(every=seconds, period=IntervalSchedule.SECONDS)[0]


def scheduled(name: str, task: str, **when) -> PeriodicTask:
    return PeriodicTask.objects.create(name=name, task=task, **when)


def ran(task: str, at: datetime, error: BaseException | None = None) -> None:
    task_run_record(task=task, finished_at=at, duration_seconds=0.25, error=error)


def states(now: datetime) -> dict[str, tuple[str, bool]]:
    return {row.name: (row.state, row.overdue) for row in ops_periodic_tasks(now=now)}


def test_interval_tasks_ok_overdue_failing_and_never_run(clock):
    scheduled("fresh", "billing.tasks.usage_rollup", interval=every(minutes=5))
    scheduled("just in time", "billing.tasks.reservations_reconcile", interval=every(minutes=5))
    scheduled("late", "providers.tasks.providers_health_check_all", interval=every(minutes=5))
    scheduled("settle", "billing.tasks.reservations_lost_settle", interval=every(seconds=30))
    scheduled("broken", "billing.tasks.ops_alerts_evaluate_task", interval=every(minutes=1))
    scheduled("broken from the start", "billing.tasks.alerts_undelivered_send", interval=every(minutes=1))
    scheduled("new", "experiments.tasks.rollout_steps_apply_due_task", interval=every(minutes=1))
    scheduled("switched off", "billing.tasks.ledger_spool_replay", interval=every(minutes=1), enabled=False)
    # 5 minutes: an allowance of 2 × 5 + 5 = 15 minutes since the last success.
    ran("billing.tasks.usage_rollup", NOW - timedelta(minutes=9))
    ran("billing.tasks.reservations_reconcile", NOW - 2 * timedelta(minutes=5) - OVERDUE_GRACE)
    ran("providers.tasks.providers_health_check_all", NOW - timedelta(minutes=15, seconds=1))
    # 30 seconds: 6 minutes.
    ran("billing.tasks.reservations_lost_settle", NOW - timedelta(minutes=6, seconds=1))
    # It succeeded a minute ago, then failed: failing, not (yet) overdue.
    ran("billing.tasks.ops_alerts_evaluate_task", NOW - timedelta(minutes=2))
    ran("billing.tasks.ops_alerts_evaluate_task", NOW - timedelta(minutes=1), TimeoutError("slow"))
    # Never succeeded: failing and overdue at once.
    ran("billing.tasks.alerts_undelivered_send", NOW - timedelta(seconds=20), ConnectionError("refused"))

    assert states(NOW) == {
        "fresh": (TaskState.OK, False),
        "just in time": (TaskState.OK, False),
        "late": (TaskState.OVERDUE, True),
        "settle": (TaskState.OVERDUE, True),
        "broken": (TaskState.FAILING, False),
        "broken from the start": (TaskState.FAILING, True),
        "new": (TaskState.NEVER_RUN, False),  # nothing says it was expected yet
    }  # the disabled one is not listed
    (broken,) = [row for row in ops_periodic_tasks(now=NOW) if row.name == "broken"]
    assert broken.error_class == "TimeoutError" and broken.last_success_at == NOW - timedelta(minutes=2)
    # A success puts it back; the failure before it is forgotten.
    ran("billing.tasks.ops_alerts_evaluate_task", NOW)
    assert states(NOW)["broken"] == (TaskState.OK, False)


def test_a_crontab_task_is_overdue_from_its_last_due_time_and_the_grace(clock):
    nightly = CrontabSchedule.objects.create(minute="17", hour="3", timezone="UTC")
    scheduled("nightly", NIGHTLY, crontab=nightly)
    # Last night's run succeeded: ok all day, and until tonight's run is due and its grace is over.
    ran(NIGHTLY, datetime(2026, 6, 15, 3, 19, tzinfo=UTC))
    assert states(NOW)["nightly"] == (TaskState.OK, False)
    tomorrow = datetime(2026, 6, 16, 3, 17, tzinfo=UTC)
    assert states(tomorrow + OVERDUE_GRACE)["nightly"] == (TaskState.OK, False)
    assert states(tomorrow + OVERDUE_GRACE + timedelta(seconds=1))["nightly"] == (TaskState.OVERDUE, True)
    # A run that began at 03:17 and ended later is this night's.
    ran(NIGHTLY, tomorrow + timedelta(minutes=40))
    assert states(tomorrow + timedelta(minutes=41))["nightly"] == (TaskState.OK, False)


def test_a_crontab_task_in_another_time_zone_and_one_that_missed_last_night(clock):
    # 01:00 in Paris is 23:00 UTC in June: last due at 2026-06-14 23:00 UTC.
    paris = CrontabSchedule.objects.create(minute="0", hour="1", timezone="Europe/Paris")
    scheduled("paris", "providers.tasks.providers_rotate_encryption_task", crontab=paris)
    ran("providers.tasks.providers_rotate_encryption_task", datetime(2026, 6, 14, 23, 2, tzinfo=UTC))
    scheduled("missed", NIGHTLY, crontab=CrontabSchedule.objects.create(minute="17", hour="3", timezone="UTC"))
    ran(NIGHTLY, datetime(2026, 6, 14, 3, 20, tzinfo=UTC))  # the night before last
    assert states(NOW) == {"paris": (TaskState.OK, False), "missed": (TaskState.OVERDUE, True)}
    assert states(datetime(2026, 6, 14, 22, 59, tzinfo=UTC))["paris"] == (TaskState.OK, False)


# THE PAGE


def client_for(role: Role) -> Client:
    user = UserFactory(username=f"a-{role}")
    role_set(user, role)
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def tasks(clock):
    scheduled("billing: roll up usage", "billing.tasks.usage_rollup", interval=every(minutes=10))
    scheduled("providers: health check", "providers.tasks.providers_health_check_all", interval=every(minutes=5))
    scheduled("billing: evaluate alerts", "billing.tasks.ops_alerts_evaluate_task", interval=every(minutes=1))
    scheduled("billing: retention", NIGHTLY, crontab=CrontabSchedule.objects.create(minute="17", hour="3"))
    ran("billing.tasks.usage_rollup", NOW - timedelta(minutes=3))
    ran("providers.tasks.providers_health_check_all", NOW - timedelta(hours=2))
    for minutes in (3, 2, 1):
        ran("billing.tasks.ops_alerts_evaluate_task", NOW - timedelta(minutes=minutes), KeyError("sk-secret-1"))
    PeriodicTask.objects.filter(task="billing.tasks.usage_rollup").update(last_run_at=NOW - timedelta(minutes=4))


def test_the_page_and_its_json_list_the_tasks_and_mark_the_late_and_the_failing(tasks):
    client = client_for(Role.OPERATOR)
    data = client.get("/ops/data.json").json()
    rows = {t["name"]: t for t in data["tasks"]}
    assert list(rows) == [
        "billing: evaluate alerts",
        "billing: retention",
        "billing: roll up usage",
        "providers: health check",
    ]
    rollup = rows["billing: roll up usage"]
    assert (rollup["state"], rollup["status"], rollup["schedule"]) == ("ok", "OK", "every 10 minutes")
    assert rollup["sent_text"] == "12:26:00 UTC" and rollup["finished_text"] == "12:27:00 UTC, ok (0.2 s)"
    assert rows["providers: health check"]["status"] == "Overdue: no success since 10:30:00 UTC"
    alerts = rows["billing: evaluate alerts"]
    assert alerts["status"] == "Failing: KeyError, 3 runs in a row; never succeeded"
    assert alerts["finished_text"] == "12:29:00 UTC, failed: KeyError (0.2 s)" and alerts["attention"] is True
    retention = rows["billing: retention"]
    assert (retention["state"], retention["status"], retention["sent_text"]) == ("never_run", "Never run", "never")
    assert retention["schedule"] == "At 03:17 AM UTC"
    assert data["totals"]["tasks_attention"] == 2

    html = client.get("/ops/").content.decode()
    assert "sk-secret-1" not in html and "sk-secret-1" not in json.dumps(data)
    assert '<h2 id="tasks-heading">Background tasks</h2>' in html
    row = re.search(r'<tr data-task="billing: evaluate alerts" class="([^"]*)">(.*?)</tr>', html, re.S)
    assert row[1] == "is-failing" and "⚠" in row[2] and "Failing: KeyError, 3 runs in a row" in row[2]
    row = re.search(r'<tr data-task="providers: health check" class="([^"]*)">(.*?)</tr>', html, re.S)
    assert row[1] == "is-failing" and "⚠" in row[2] and "Overdue: no success since 10:30:00 UTC" in row[2]
    row = re.search(r'<tr data-task="billing: roll up usage" class="([^"]*)">(.*?)</tr>', html, re.S)
    assert row[1] == "" and "✓" in row[2] and "<code>billing.tasks.usage_rollup</code>" in row[2]
    assert re.search(r'<span class="stat-value stat-danger" id="total-tasks-attention">2</span>', html)


def test_those_who_may_not_read_the_dashboard_do_not_see_the_tasks(tasks):
    for role in (Role.MEMBER, Role.VIEWER):
        client = client_for(role)
        assert client.get("/ops/").status_code == 403
        assert client.get("/ops/data.json").status_code == 403
    anonymous = Client()
    assert anonymous.get("/ops/").status_code == 302
    assert anonymous.get("/ops/data.json").status_code == 401


def test_without_schedules_the_page_says_how_to_make_them(clock):
    html = client_for(Role.ADMIN).get("/ops/").content.decode()
    assert "No periodic task is enabled: run <code>manage.py setupschedules</code>." in html
