"""A crontab schedule in the admin (django-celery-beat's, registered in ``core/admin.py``): a value Celery cannot
read is the form's error on its field, never a server error nor a schedule beat silently drops.

django-celery-beat's validators (python-crontab's grammar) and Celery's ``crontab``, which beat builds for each
task, disagree: a negative number is refused by both, but the add page then rendered the refused row's
``human_readable``, which raised Celery's ``ParseException`` (a 500); a day of the week 7 (Sunday to cron) passed
the validators and was saved, and beat dropped every task on it without a word (``DatabaseScheduler`` skips an
entry whose schedule raises ``ValueError``)."""

from __future__ import annotations

import pytest
from django.urls import reverse
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler

from llmhub.celery import app

pytestmark = pytest.mark.django_db

ADD = reverse("admin:django_celery_beat_crontabschedule_add")
EVERY_HOUR = {
    "minute": "0",
    "hour": "*",
    "day_of_month": "*",
    "month_of_year": "*",
    "day_of_week": "*",
    "timezone": "UTC",
    # The page's inline of the tasks on the schedule (none).
    "periodictask_set-TOTAL_FORMS": "0",
    "periodictask_set-INITIAL_FORMS": "0",
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("minute", "-1"),
        ("hour", "-1"),
        ("day_of_month", "-1"),
        ("month_of_year", "-5"),
        ("day_of_week", "-1"),
        ("day_of_week", "7"),  # Sunday to cron, out of Celery's 0-6
        ("day_of_week", "1-7"),
    ],
)
def test_a_value_celery_cannot_read_is_the_fields_error(admin_client, field, value):
    response = admin_client.post(ADD, {**EVERY_HOUR, field: value})

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == [field], errors
    assert not CrontabSchedule.objects.exists()


def test_a_schedule_celery_reads_is_saved_and_beat_runs_its_task(admin_client):
    response = admin_client.post(ADD, {**EVERY_HOUR, "day_of_week": "0,6"})

    assert response.status_code == 302, response.context["adminform"].form.errors
    crontab = CrontabSchedule.objects.get()
    PeriodicTask.objects.create(name="weekend sweep", task="billing.tasks.usage_rollup", crontab=crontab)
    assert "weekend sweep" in DatabaseScheduler(app=app, lazy=True).all_as_schedule()


PERIODIC_TASK_ADD = reverse("admin:django_celery_beat_periodictask_add")


@pytest.mark.parametrize("task", ["billing.tasks." + "x" * 200, "billing.tasks.usage\x00rollup"])
def test_a_custom_task_name_the_field_refuses_is_its_error(admin_client, task):
    """A custom task name past the field's 200 characters, or with a NUL, is the field's own error (the package's
    form then read the name it had dropped: ``KeyError``, a 500)."""
    every = IntervalSchedule.objects.create(every=10, period=IntervalSchedule.MINUTES)

    response = admin_client.post(
        PERIODIC_TASK_ADD,
        {"name": "sweep", "task": task, "interval": every.pk, "enabled": "on", "args": "[]", "kwargs": "{}"},
    )

    assert response.status_code == 200
    assert "task" in response.context["adminform"].form.errors
    assert not PeriodicTask.objects.exists()
