"""The Celery app a test's worker process runs (``test_task_runs``): llmhub's own (``llmhub.celery``, what
``celery -A llmhub worker`` loads), with a few tasks more: one that fails, its message carrying a canary that must
never be stored or shown (a message may hold a secret); one that kills the process running it on every run, one
that does so on its first run only, one that notes its run (``test_task_runs``, a worker lost under a task), one
that runs until the test lets it end (a worker stopped under a run), and one that goes on past its soft time limit
until its hard limit kills it.

Run as ``python -m celery -A tests.billing.task_worker -b <broker> worker …`` with DJANGO_SETTINGS_MODULE and
TEST_DATABASE_URL set."""

from __future__ import annotations

import logging
import os

from celery.signals import celeryd_init, worker_ready

from llmhub.celery import app

__all__ = ["app"]


@celeryd_init.connect
def _send_for_real(**_: object) -> None:
    """The tests' settings run tasks eagerly in the process that sends them; a worker sends for real (a retry of a
    run whose process died is sent from the worker's main process, which must not run it itself). Only in the
    worker: the test process imports this module too, and keeps running its own tasks eagerly.

    ``TEST_VISIBILITY_TIMEOUT`` (seconds), when set, is the Redis broker's ``visibility_timeout``: a message whose
    worker died is handed out again by the next worker that starts after it, not hours later."""
    app.conf.task_always_eager = False
    if visibility := os.environ.get("TEST_VISIBILITY_TIMEOUT"):
        app.conf.broker_transport_options = {**app.conf.broker_transport_options, "visibility_timeout": int(visibility)}


READY = "consumes from its queues"


@worker_ready.connect
def _say_ready(sender: object, **_: object) -> None:
    """Celery says its worker is ready at INFO, below the ``-l warning`` the tests' workers log at: this line is
    what ``test_task_runs.worker_ready`` waits for in the worker's log (``READY``)."""
    logging.getLogger(__name__).warning("%s %s", sender.hostname, READY)


CANARY = "sk-canary-7f3e9a1c0b"
FAILING_TASK = "tests.billing.task_worker.upstream_refused"


@app.task(name=FAILING_TASK)
def upstream_refused() -> None:
    raise PermissionError(f"the upstream refused the key {CANARY}")


POISON_TASK = "tests.billing.task_worker.worker_killer"
LOST_ONCE_TASK = "tests.billing.task_worker.lost_to_a_restart"
NOTE_TASK = "tests.billing.task_worker.note"
LONG_TASK = "tests.billing.task_worker.long_run"
STUCK_TASK = "tests.billing.task_worker.stuck_past_its_soft_limit"


def _run_noted(path: str) -> int:
    """Append a line to ``path`` (one per run, before anything else happens) and say how many runs it holds."""
    with open(path, "a") as runs:
        runs.write("run\n")
    with open(path) as runs:
        return len(runs.readlines())


# A second between a lost run and its retry (llmhub's own tasks keep Celery's 3 minutes, or their own delay), so
# that the test waits seconds.
@app.task(name=POISON_TASK, default_retry_delay=1)
def worker_killer(path: str) -> None:
    """Kills the process that runs it, every time: a task that runs its worker out of memory (under the solo pool,
    the worker's main process itself)."""
    import os
    import signal

    _run_noted(path)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name=LOST_ONCE_TASK, default_retry_delay=1)
def lost_to_a_restart(path: str) -> str:
    """Its first run dies with its process (a worker restarted under it, the OOM killer choosing it once)."""
    import os
    import signal

    if _run_noted(path) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return "done"


@app.task(name=NOTE_TASK)
def note(path: str) -> None:
    _run_noted(path)


@app.task(name=LONG_TASK)
def long_run(path: str, may_end: str) -> str:
    """Runs until the file ``may_end`` exists (at most two minutes): a run long enough for its worker to be stopped
    under it, as a deploy stops a worker under a long sweep."""
    import time

    _run_noted(path)
    deadline = time.monotonic() + 120
    while not os.path.exists(may_end) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "done"


@app.task(name=STUCK_TASK, soft_time_limit=1, time_limit=3)
def stuck_past_its_soft_limit(path: str) -> None:
    """Goes on past its soft time limit, as a run inside one long database statement does (the limit's exception
    is raised only once the statement returns), until its hard limit kills the process running it."""
    import time

    from celery.exceptions import SoftTimeLimitExceeded

    _run_noted(path)
    try:
        time.sleep(30)
    except SoftTimeLimitExceeded:
        time.sleep(30)
