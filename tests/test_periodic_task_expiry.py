"""Beat sends each periodic task on time whether or not a worker takes it: while the workers are down (a deploy
gone wrong, a crash loop, an hour without a host) its copies pile up in the broker's queue, and a worker that comes
back would run every one of them back to back (an hour's outage: 120 lost-request sweeps, 60 alert evaluations,
12 health rounds with their paid probes), the current runs queued behind them. Each schedule ``setupschedules``
makes has an expiry: a copy not started within its interval (a day, for the daily ones) is dropped by the worker,
and the next copy runs. docs/reliability.md, "Celery: the copies beat sent while no worker ran".

Beat's own entries (``django_celery_beat``'s ``ModelEntry`` of each ``PeriodicTask`` row) are sent as beat sends
them, with the test's clock set back to when beat sent them, to a real Redis broker; a real worker then takes them."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
import time_machine
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import ModelEntry

from billing.models import TaskRun
from chat.management.commands.setupschedules import SCHEDULES
from llmhub.celery import app
from tests.billing.test_task_runs import worker  # noqa: F401  (the fixture)
from tests.waiting import wait_until

ROLLUP = "billing.tasks.usage_rollup"  # every 10 minutes
RETENTION = "billing.tasks.ledger_retention"  # daily
LOST_SWEEP = "billing.tasks.reservations_lost_settle"  # every 30 seconds


def beat_sends(task: str, *, queue: str, ago: timedelta) -> None:
    """Send the periodic task ``task`` as beat sends it (its entry's options), as if ``ago`` before now."""
    row = PeriodicTask.objects.get(task=task)
    row.queue = queue  # the test's worker consumes from a queue of its own
    entry = ModelEntry(row, app=app)
    with time_machine.travel(timezone.now() - ago, tick=True):
        app.send_task(entry.task, entry.args, entry.kwargs, **entry.options)


@pytest.mark.django_db(transaction=True)
def test_copies_beat_sent_while_no_worker_ran_are_dropped_and_a_current_one_runs(worker):  # noqa: F811
    queue, log_path = worker
    call_command("setupschedules", stdout=io.StringIO())
    # Two days without a worker: every schedule's copy of then is stale, the daily ones' too.
    for _name, task, _when in SCHEDULES:
        beat_sends(task, queue=queue, ago=timedelta(days=2))
    # Sent within their interval: still due, so they run.
    beat_sends(ROLLUP, queue=queue, ago=timedelta(minutes=8))
    beat_sends(RETENTION, queue=queue, ago=timedelta(hours=22))
    # Past its 30 seconds, within the 5 minutes every copy is given: a worker whose clock is ahead of beat's reads
    # a copy sent now as this old, and dropped every one.
    beat_sends(LOST_SWEEP, queue=queue, ago=timedelta(minutes=4))
    current = {ROLLUP, RETENTION, LOST_SWEEP}

    def current_ones_ran() -> bool:
        return TaskRun.objects.filter(task__in=current).count() == len(current)

    wait_until(current_ones_ran, lambda: f"the current copies run; its log:\n{log_path.read_text()}", timeout=90)
    # The queue is first in, first out: the stale copies, sent before, were taken before them, and none ran (a run
    # is recorded whatever its outcome). Before, each ran: one TaskRun row a task, the current ones run twice.
    ran = {run.task: run for run in TaskRun.objects.all()}
    assert set(ran) == current, sorted(ran)
    assert all(run.succeeded for run in ran.values())


@pytest.mark.django_db
def test_an_admins_end_date_is_kept_and_the_other_schedules_get_their_expiry():
    """django-celery-beat refuses a row with both an end date (``expires``) and an expiry; an admin's end date stays,
    and ``setupschedules`` still writes every other schedule (it failed whole on that row)."""
    call_command("setupschedules", stdout=io.StringIO())
    ends = timezone.now() + timedelta(days=30)
    PeriodicTask.objects.filter(task=ROLLUP).update(expires=ends, expire_seconds=None)
    PeriodicTask.objects.exclude(task=ROLLUP).update(expire_seconds=None)

    call_command("setupschedules", stdout=io.StringIO())

    rollup = PeriodicTask.objects.get(task=ROLLUP)
    assert (rollup.expires, rollup.expire_seconds) == (ends, None)
    expiries = dict(PeriodicTask.objects.exclude(task=ROLLUP).values_list("task", "expire_seconds"))
    assert expiries[LOST_SWEEP] == 300 and expiries[RETENTION] == 86_400
    assert expiries["providers.tasks.providers_health_check_all"] == 300
    assert None not in expiries.values()
