"""The Celery application: health checks, key rotation, reservation reconciliation and cost rollups.

Every process that imports it (the workers: ``celery -A llmhub worker``) records each task run it finishes,
when and how it ended and how long it took (``billing.services.task_runs``), so that a background job that
stopped or keeps failing shows on the operations dashboard and in ``/metrics``. ``task_postrun`` says both
for a run that ends in the process running it: its ``state`` is the outcome and, on a failure or a retry, ``retval``
the exception (one write per run; ``task_failure`` would add a second signal for the same run). A run that does not
end there (its child killed at the hard time limit, or lost with its child once its retries are spent) has no
``task_postrun``: the worker's main process records it from ``task_failure``, once.

Every task also counts its starts (``StartCountingTask``): a message whose run never ends because the process
running it dies (the worker's main process killed, the host lost) is handed out again by the Redis broker after
its ``visibility_timeout``, with no count of its own, for ever; here it is run at most ``LLMHUB_TASK_MAX_STARTS``
times (docs/reliability.md, "Celery: a task that kills its worker"). A worker told to stop gives back the starts of
the runs it holds, so that a run cut by the stop (killed at the stop timeout) is not counted against its task."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery, Task, states
from celery.exceptions import Reject, Retry, TimeLimitExceeded, WorkerLostError
from celery.signals import setup_logging, task_failure, task_postrun, task_prerun, worker_shutting_down

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.base")

logger = logging.getLogger("llmhub.celery")


class TaskStartsExhausted(Exception):
    """A task's message was started ``LLMHUB_TASK_MAX_STARTS`` times and never seen ending: not run again."""


class StartCountingTask(Task):
    """Counts each start of a message, per task id and retry, in the broker's Redis, and clears the count when the
    run ends (success, failure, retry). A start that finds more starts than ``LLMHUB_TASK_MAX_STARTS`` is of a
    message whose every run so far died with its process: the broker hands such a message out again after its
    ``visibility_timeout`` (4 h) for ever, as kombu counts no deliveries (it only marks a message
    ``redelivered``). It is then rejected (acknowledged without requeue), logged and recorded as a failed run.

    A child of the prefork pool that dies is retried by Celery itself (``task_retry_on_worker_lost``, a new message
    with the next retry number, counted apart). Without a Redis broker (kombu's filesystem transport) or with Redis
    unreachable, nothing is counted and the task runs."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        if self.request.is_eager:
            return  # run here by its caller, not handed out by a broker
        from django.conf import settings

        starts = _starts_counted(task_id, self.request.retries)
        if starts is None or starts <= settings.LLMHUB_TASK_MAX_STARTS:
            return
        logger.error(
            "task %s[%s] was started %d times without ever ending (its process died each time): not run again",
            self.name,
            task_id,
            starts - 1,
        )
        from django.utils import timezone

        from billing.services.task_runs import task_run_record

        error = TaskStartsExhausted(f"started {starts - 1} times, never ended")
        task_run_record(task=self.name, finished_at=timezone.now(), duration_seconds=0.0, error=error)
        raise Reject(error, requeue=False)

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if not self.request.is_eager:
            _starts_clear(task_id, self.request.retries)


# A message is handed out again every visibility_timeout: its count must outlive that many of them.
_STARTS_TTL_SECONDS = 7 * 86_400
_starts_client: tuple[int, Any] | None = None


def _starts_redis() -> Any:
    """The broker's Redis, one client per process (a prefork child opens its own); None for another broker."""
    global _starts_client
    url = app.conf.broker_url or ""
    if not url.startswith(("redis://", "rediss://")):
        return None
    if _starts_client is None or _starts_client[0] != os.getpid():
        from core.redis import redis_sync_client

        _starts_client = (os.getpid(), redis_sync_client(url))
    return _starts_client[1]


def _starts_key(task_id: str, retries: int | None) -> str:
    return f"llmhub:celery:starts:{task_id}:{retries or 0}"


def _starts_counted(task_id: str, retries: int | None) -> int | None:
    """This start, counted: how many starts of the message there have been, this one included."""
    client = _starts_redis()
    if client is None:
        return None
    try:
        with client.pipeline() as pipe:
            starts, _ = (
                pipe.incr(_starts_key(task_id, retries))
                .expire(_starts_key(task_id, retries), _STARTS_TTL_SECONDS)
                .execute()
            )
        return int(starts)
    except Exception as exc:  # a count lost never stops a task
        logger.warning("could not count the start of task %s: %s", task_id, type(exc).__name__)
        return None


def _starts_clear(task_id: str, retries: int | None) -> None:
    client = _starts_redis()
    if client is None:
        return
    try:
        client.delete(_starts_key(task_id, retries))
    except Exception as exc:
        logger.warning("could not clear the starts of task %s: %s", task_id, type(exc).__name__)


# The start of a run, given back: one less start, the key gone at none. Not below zero, and nothing when the run has
# ended since (its key deleted), so that a release cannot be counted twice or outlive its run.
_RELEASE_SCRIPT = """
local starts = tonumber(redis.call('GET', KEYS[1]) or '0')
if starts <= 1 then
    redis.call('DEL', KEYS[1])
    return 0
end
return redis.call('DECR', KEYS[1])
"""
# The runs whose start this process has given back already: a worker can be told to stop more than once (SIGTERM
# again, then SIGQUIT), and each must give a start back once.
_released: set[tuple[str, int]] = set()


def _starts_release_running() -> None:
    """Give back the start of every run this worker holds: it was asked to stop, so a run it does not see end was cut
    by the stop (the orchestrator's SIGKILL at its stop timeout, a cold stop cancelling it), not by the task. Handed
    out again, the message then runs again, as often as stops cut it, and only deaths of the worker's own count.

    Run by the worker's main process as it takes the stop in, inside the signal's handler: with a Redis client of its
    own, since the signal may have come while this thread was inside the counting client's pool."""
    from celery.worker import state

    running = {(r.id, r.request_dict.get("retries") or 0) for r in list(state.active_requests)} - _released
    url = app.conf.broker_url or ""
    if not running or not url.startswith(("redis://", "rediss://")):
        return
    from core.redis import redis_sync_client

    client = redis_sync_client(url, socket_timeout=2.0)
    for task_id, retries in sorted(running):
        try:
            client.eval(_RELEASE_SCRIPT, 1, _starts_key(task_id, retries))
        except Exception as exc:  # the count stays: a stop under this run then counts as a start, as before
            logger.warning("could not release the start of task %s: %s", task_id, type(exc).__name__)
            continue
        _released.add((task_id, retries))


@worker_shutting_down.connect
def _stop_releases_starts(**_: Any) -> None:
    _starts_release_running()


app = Celery("llmhub", task_cls=StartCountingTask)
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


# The runs recorded from ``task_failure``, newest last: Celery sends it twice for a run cut at its hard time limit
# (as the child is killed, and again as the pool reports the job failed). A few hundred are plenty to tell them apart.
_lost_recorded: dict[str, None] = {}
_LOST_REMEMBERED = 512


@task_failure.connect
def _task_run_lost(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    """A run that never ended in a process running it, so that ``task_postrun`` never came: its child was killed
    at the run's hard time limit, or died under it (``WorkerLostError``, once the retries on a lost worker are
    spent). Without this the operations dashboard showed the task's last success. Sent in the worker's main process;
    a failure inside a run (``task_id`` in ``_started``) is ``task_postrun``'s to record."""
    if sender is None or task_id is None or task_id in _started or task_id in _lost_recorded:
        return
    if not isinstance(exception, TimeLimitExceeded | WorkerLostError):
        return
    _lost_recorded[task_id] = None
    while len(_lost_recorded) > _LOST_REMEMBERED:
        del _lost_recorded[next(iter(_lost_recorded))]
    from django.utils import timezone

    from billing.services.task_runs import task_run_record

    limit = exception.args[0] if isinstance(exception, TimeLimitExceeded) and exception.args else None
    task_run_record(
        task=sender.name,
        finished_at=timezone.now(),
        duration_seconds=float(limit) if isinstance(limit, int | float) else 0.0,
        error=exception,
    )
