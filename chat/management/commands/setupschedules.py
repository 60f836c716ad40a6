"""``manage.py setupschedules``: create or update the periodic tasks celery beat runs.

Idempotent: tasks are matched by name. A task an admin disabled stays disabled; its task path,
schedule and expiry are brought back to what is listed here. To add a schedule, add an entry to ``SCHEDULES``.

Each copy beat sends expires (``expire_seconds``, ``schedule_expiry``): one no worker started within its interval
(a day for the daily ones) is dropped by the worker that takes it, and the next copy runs. Beat sends on time
whether or not a worker takes the copies; without an expiry, the copies sent while the workers were down piled up
in the broker and a worker back from an hour's outage ran each of them back to back (120 lost-request sweeps, 60
alert evaluations, 12 health rounds with their paid probes), the current runs queued behind them
(docs/reliability.md, "Celery: the copies beat sent while no worker ran").
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab, schedule
from django.core.management.base import BaseCommand
from django.db import transaction
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

# (name shown in the admin, dotted task path, when): a timedelta runs at that interval, a crontab at those times.
SCHEDULES: list[tuple[str, str, timedelta | crontab]] = [
    ("providers: health check", "providers.tasks.providers_health_check_all", timedelta(minutes=5)),
    ("providers: re-encrypt secrets", "providers.tasks.providers_rotate_encryption_task", crontab(minute=17, hour=3)),
    (
        "providers: re-check users' own provider keys",
        "providers.tasks_credentials.provider_credentials_revalidate_all",
        crontab(minute=41, hour=4),
    ),
    ("billing: roll up today's and yesterday's usage", "billing.tasks.usage_rollup", timedelta(minutes=10)),
    ("billing: reconcile budgets with the ledger", "billing.tasks.reservations_reconcile", timedelta(minutes=5)),
    ("billing: settle requests of dead processes", "billing.tasks.reservations_lost_settle", timedelta(seconds=30)),
    ("billing: replay the ledger spool", "billing.tasks.ledger_spool_replay", timedelta(minutes=1)),
    ("billing: delete ledger rows past retention", "billing.tasks.ledger_retention", crontab(minute=23, hour=2)),
    ("billing: evaluate the operations alerts", "billing.tasks.ops_alerts_evaluate_task", timedelta(minutes=1)),
    ("billing: send alerts not yet delivered", "billing.tasks.alerts_undelivered_send", timedelta(minutes=1)),
    (
        "chat: close replies a stopped server left streaming",
        "chat.tasks.messages_close_abandoned_task",
        timedelta(minutes=5),
    ),
    (
        "chat: delete stored responses past retention",
        "chat.tasks.stored_responses_expire_task",
        timedelta(hours=1),
    ),
    ("experiments: apply due rollout steps", "experiments.tasks.rollout_steps_apply_due_task", timedelta(minutes=1)),
]


# The daily runs (a crontab): a copy a worker takes within the day still runs, late; the next day's replaces it.
DAILY = timedelta(days=1)
# The least expiry: the message's expiry is an instant of beat's clock, read by the worker's, so a worker whose
# clock is ahead of beat's by more than the expiry would drop every copy (a 30-second sweep, 40 seconds of skew).
EXPIRY_AT_LEAST = timedelta(minutes=5)


def schedule_expiry(when: timedelta | crontab) -> int:
    """Seconds after beat sends it that a copy of a task scheduled ``when`` is dropped unstarted: its interval (at
    least ``EXPIRY_AT_LEAST``), or a day for a crontab (every one listed here runs daily)."""
    return int(max(when if isinstance(when, timedelta) else DAILY, EXPIRY_AT_LEAST).total_seconds())


def _stored(row: IntervalSchedule | CrontabSchedule) -> IntervalSchedule | CrontabSchedule:
    # from_schedule() finds a matching row or returns an unsaved new one.
    if row.pk is None:
        row.save()
    return row


class Command(BaseCommand):
    help = "Create or update the celery beat periodic tasks (health checks, key rotation, billing jobs)."

    @transaction.atomic
    def handle(self, *args: Any, **options: Any) -> None:
        for name, task, when in SCHEDULES:
            if isinstance(when, timedelta):
                timing = _stored(IntervalSchedule.from_schedule(schedule(when)))
                fields = {"interval": timing, "crontab": None}
            else:
                timing = _stored(CrontabSchedule.from_schedule(when))
                fields = {"crontab": timing, "interval": None}
            # An admin's end date for the task (``expires``, an instant) is theirs to keep; django-celery-beat refuses
            # a row with both.
            ends = PeriodicTask.objects.filter(name=name).values_list("expires", flat=True).first()
            fields["expire_seconds"] = None if ends else schedule_expiry(when)
            _, created = PeriodicTask.objects.update_or_create(
                name=name, defaults={"task": task, **fields}, create_defaults={"task": task, "enabled": True, **fields}
            )
            self.stdout.write(
                f"{name}: {'created' if created else 'updated'} ({task}, {timing}, "
                f"a copy expires after {fields['expire_seconds']} s)"
            )
