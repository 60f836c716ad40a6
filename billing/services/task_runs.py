"""What the Celery workers did: the latest run of each task (``TaskRun``), recorded as a worker finishes it
(``llmhub/celery.py`` connects ``task_run_record`` to Celery's task signals in every process that imports the
Celery app, the workers first). The operations dashboard and ``/metrics`` read it to tell a background job
that stopped (beat or the worker down) or fails on every run (``billing/selectors_ops.py``).

One small write per run, never a reason for the task to fail: a run whose record the database refuses is
logged (the error's class only) and the task's own outcome is left as it was."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import F

from ..models import TaskRun

logger = logging.getLogger("llmhub.tasks")


def task_run_record(*, task: str, finished_at: datetime, duration_seconds: float, error: BaseException | None) -> None:
    """Record that a run of ``task`` finished at ``finished_at``: a success when ``error`` is None, else a
    failure of which only the exception's class is stored. Never raises."""
    try:
        # A savepoint: a run in the caller's transaction (an eager task inside a request) keeps that
        # transaction usable when this write fails.
        with transaction.atomic():
            _write(task=task, finished_at=finished_at, duration_seconds=duration_seconds, error=error)
    except Exception as exc:
        logger.warning("could not record the run of task %s: %s", task, type(exc).__name__)


def _write(*, task: str, finished_at: datetime, duration_seconds: float, error: BaseException | None) -> None:
    ran = {"finished_at": finished_at, "duration_seconds": max(duration_seconds, 0.0)}
    if error is None:
        fields = {**ran, "succeeded": True, "error_class": "", "failures_in_a_row": 0, "last_success_at": finished_at}
        first = fields
    else:
        failed = {"succeeded": False, "error_class": type(error).__name__[:200]}
        fields = {**ran, **failed, "failures_in_a_row": F("failures_in_a_row") + 1}
        first = {**fields, "failures_in_a_row": 1}
    # After a task's first run the row exists: one UPDATE. The first run inserts it; of two workers finishing
    # a task's first runs at once, the second's insert meets the unique name, and it updates.
    if TaskRun.objects.filter(task=task).update(**fields):
        return
    try:
        with transaction.atomic():
            TaskRun.objects.create(task=task, **first)
    except IntegrityError:
        TaskRun.objects.filter(task=task).update(**fields)
