"""django-celery-beat's scheduled tasks in the admin, their actions held to the change permission.

The package offers enabling, disabling, toggling and running tasks to whoever may view the list (its actions name no
permission, and Django then asks none): a staff user given ``view_periodictask`` alone could stop the ledger's spool
replay or the alert sweeps, or run any of them at will. Here each needs ``change_periodictask``, as every writing
action of llmhub's own admin does (``tests/test_admin_action_permissions.py``)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django_celery_beat import admin as beat_admin
from django_celery_beat.models import PeriodicTask


def _changing(name: str) -> Any:
    """The package's action ``name``, with its description, asking the change permission."""
    action = getattr(beat_admin.PeriodicTaskAdmin, name)

    def run(model_admin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> Any:
        return action(model_admin, request, queryset)

    run.__name__ = name
    return admin.action(description=action.short_description, permissions=["change"])(run)


admin.site.unregister(PeriodicTask)


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(beat_admin.PeriodicTaskAdmin):
    enable_tasks = _changing("enable_tasks")
    disable_tasks = _changing("disable_tasks")
    toggle_tasks = _changing("toggle_tasks")
    run_tasks = _changing("run_tasks")
