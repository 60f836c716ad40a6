"""django-celery-beat's scheduled tasks in the admin, their actions held to the change permission, and its crontab
schedules checked as Celery reads them.

The package offers enabling, disabling, toggling and running tasks to whoever may view the list (its actions name no
permission, and Django then asks none): a staff user given ``view_periodictask`` alone could stop the ledger's spool
replay or the alert sweeps, or run any of them at will. Here each needs ``change_periodictask``, as every writing
action of llmhub's own admin does (``tests/test_admin_action_permissions.py``).

A crontab's fields are checked by the package's validators (python-crontab's grammar), and read by beat through
Celery's ``crontab``, which takes less: a negative number, refused by both, was answered with a server error (the
page shows the refused row's ``human_readable``, which raised Celery's ``ParseException``), and a day of the week 7
(Sunday to cron, past Celery's 0-6) was saved, and beat skipped every task on it without a word. Here each field is
also read by Celery, and one it cannot read is that field's error (``tests/test_admin_crontab.py``); so is a custom task
name the task's field refuses (the package's form then failed on it)."""

from __future__ import annotations

from typing import Any

from celery import schedules
from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django_celery_beat import admin as beat_admin
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from .admin_dates import DateHierarchyBounded

CRONTAB_FIELDS = ("minute", "hour", "day_of_week", "day_of_month", "month_of_year")


def _changing(name: str) -> Any:
    """The package's action ``name``, with its description, asking the change permission."""
    action = getattr(beat_admin.PeriodicTaskAdmin, name)

    def run(model_admin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> Any:
        return action(model_admin, request, queryset)

    run.__name__ = name
    return admin.action(description=action.short_description, permissions=["change"])(run)


class PeriodicTaskForm(beat_admin.PeriodicTaskForm):
    def clean(self) -> dict[str, Any]:
        # The package's clean reads the custom task name, which a name its field refused (past 200 characters, a
        # NUL) is not in: a KeyError, a 500. That field's own error says what is wrong.
        if "task" not in self.cleaned_data:
            return self.cleaned_data
        return super().clean()


admin.site.unregister(PeriodicTask)


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(DateHierarchyBounded, beat_admin.PeriodicTaskAdmin):
    form = PeriodicTaskForm
    enable_tasks = _changing("enable_tasks")
    disable_tasks = _changing("disable_tasks")
    toggle_tasks = _changing("toggle_tasks")
    run_tasks = _changing("run_tasks")


class CrontabScheduleForm(forms.ModelForm):
    """No Meta: the admin builds the form for its fields."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        for name in CRONTAB_FIELDS:
            value = cleaned.get(name)
            if not value:
                continue
            try:
                schedules.crontab(**{name: value})
            except (ValueError, schedules.ParseException) as exc:
                # Left out of the row: the page shows the row as it stands (its human_readable reads every field).
                self.add_error(name, f"Celery cannot read “{value}”: {exc}")
        return cleaned


admin.site.unregister(CrontabSchedule)


@admin.register(CrontabSchedule)
class CrontabScheduleAdmin(beat_admin.CrontabScheduleAdmin):
    form = CrontabScheduleForm
