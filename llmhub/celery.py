"""The Celery application: health checks, key rotation, reservation reconciliation and cost rollups.

Every process that imports it (the workers: ``celery -A llmhub worker``) records each task run it finishes,
when and how it ended and how long it took (``billing.services.task_runs``), so that a background job that
stopped or keeps failing shows on the operations dashboard and in ``/metrics``. ``task_postrun`` alone says
both: its ``state`` is the outcome and, on a failure or a retry, ``retval`` the exception (one write per
run; ``task_failure`` would add a second signal for the same run)."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, states
from celery.exceptions import Retry
from celery.signals import setup_logging, task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.base")

app = Celery("llmhub")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def _logging_from_settings(**_: Any) -> None:
    """The worker and beat log as the web server does: Django's ``LOGGING`` (llmhub/logging.py; JSON lines in
    production), not Celery's own text lines on a root logger it takes over. Connecting here is what tells
    Celery to leave logging alone; ``LOG_LEVEL`` sets the level, as for the web server (``-l`` is not read)."""
    from django.conf import settings
    from django.utils.log import configure_logging

    configure_logging(settings.LOGGING_CONFIG, settings.LOGGING)


# When each run this process is running began (monotonic), by task id; a run takes its entry out as it ends.
_started: dict[str, float] = {}


@task_prerun.connect
def _task_run_started(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        _started[task_id] = time.monotonic()


@task_postrun.connect
def _task_run_finished(
    task_id: str | None = None, task: Any = None, state: str | None = None, retval: Any = None, **_: Any
) -> None:
    started = _started.pop(task_id, None) if task_id is not None else None
    if task is None or state in (states.REJECTED, states.IGNORED):
        return  # not a run that ended: a message refused or a task that chose to say nothing
    # Imported here: this module is loaded with the settings, before Django's apps are ready.
    from django.utils import timezone

    from billing.services.task_runs import task_run_record

    if state == states.SUCCESS:
        error = None
    elif isinstance(retval, Retry) and isinstance(retval.exc, BaseException):
        error = retval.exc  # a retry: the failure that caused it
    elif isinstance(retval, BaseException):
        error = retval
    else:
        return  # no run ends so (FAILURE and RETRY carry their exception)
    task_run_record(
        task=task.name,
        finished_at=timezone.now(),
        duration_seconds=time.monotonic() - started if started is not None else 0.0,
        error=error,
    )
