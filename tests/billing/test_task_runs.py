"""Each run of a Celery task is recorded as the worker finishes it (``llmhub/celery.py`` →
``billing.services.task_runs``): a real worker process on a real Redis broker runs a task that succeeds and
one that fails with a canary in its message; the failure is kept by its class only, and the canary is
nowhere: not in the row, the operations dashboard, its JSON or ``/metrics``. And a record the database
refuses never fails the task."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client, override_settings
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from accounts.roles import Role, role_set
from billing.models import TaskRun, UsageRecord
from billing.tasks import usage_rollup
from core.redis import redis_sync_client
from llmhub.celery import _starts_key, app
from tests.billing.task_worker import (
    CANARY,
    FAILING_TASK,
    LONG_TASK,
    LOST_ONCE_TASK,
    NOTE_TASK,
    POISON_TASK,
    READY,
    STUCK_TASK,
)
from tests.conftest import database_url_for_subprocesses, free_port, process_stop, wait_for_ready
from tests.factories import UserFactory
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "scrape-token-task-runs"


@pytest.fixture
def worker(broker, redis_url, tmp_path):
    """``celery worker`` in its own process, as ``docker-compose.yml`` runs it, on a queue of its own on the
    real Redis server; this process publishes to it instead of running tasks eagerly."""
    yield from worker_process(broker, redis_url, tmp_path, pool="--pool=solo")


@pytest.fixture
def prefork_worker(broker, redis_url, tmp_path):
    """The same with the pool docker-compose.yml's worker has (prefork), of one child: a run that kills its process
    kills the child, which the worker replaces and reports lost (``WorkerLostError``)."""
    yield from worker_process(broker, redis_url, tmp_path, "--concurrency=1", pool="--pool=prefork")


def worker_process(broker, redis_url, tmp_path, *pool_options: str, pool: str):
    broker_url = redis_url.rsplit("/", 1)[0] + "/9"
    queue = f"task-runs-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "worker.log"
    broker.serve(broker_url)
    process = ready_worker(broker_url, queue, log_path, pool, *pool_options)
    try:
        yield queue, log_path
    finally:
        process_stop(process, grace=30)


def ready_worker(broker_url: str, queue: str, log_path: Path, *options: str, **env_extra: str) -> subprocess.Popen:
    """``celery_worker``, once it consumes from ``queue``: a worker that never does (it cannot reach its broker,
    it hangs in its start-up) or ends first fails the test, stopped (``wait_for_ready``), not left running."""
    said_before = log_path.read_text().count(READY) if log_path.exists() else 0
    process = celery_worker(broker_url, queue, log_path, *options, **env_extra)
    wait_for_worker(process, log_path, said_before)
    return process


def wait_for_worker(process: subprocess.Popen, log_path: Path, said_before: int, timeout: float = 90) -> None:
    """Until the worker ``process`` says in ``log_path`` that it consumes (once more than the ``said_before``
    workers before it there); stopped if it does not within ``timeout`` seconds."""
    wait_for_ready(
        process,
        lambda: log_path.read_text().count(READY) > said_before,
        lambda: f"the celery worker never consumed from its queue; its log:\n{log_path.read_text()}",
        timeout=timeout,
        interval=0.1,
    )


def celery_worker(broker_url: str, queue: str, log_path: Path, *options: str, **env_extra: str) -> subprocess.Popen:
    """``celery worker`` on ``queue`` of ``broker_url``, its output appended to ``log_path``."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        PYTHONPATH=str(ROOT),
        **env_extra,
    )
    with log_path.open("a") as log:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "tests.billing.task_worker", "-b", broker_url, "worker"),
                *(*options, "-Q", queue, "-n", f"{queue}@%h", "-l", "warning"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_a_worker_that_never_consumes_is_stopped_when_its_wait_fails(tmp_path):
    """The worker fixtures handed their worker to the test without waiting for it: one that never came up (here its
    broker is nowhere, and it retries it for ever) ran on, for the rest of the session, past the test that failed
    waiting for its tasks. The wait for it fails now, and stops it (SIGTERM, then SIGKILL)."""
    log_path = tmp_path / "worker.log"
    process = celery_worker(f"redis://127.0.0.1:{free_port()}/9", "nowhere", log_path, "--pool=solo")
    try:
        with pytest.raises(TimeoutError, match="never consumed"):
            wait_for_worker(process, log_path, said_before=0, timeout=20)
        assert process.poll() is not None, "the worker that never consumed is still running"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def operator_client() -> Client:
    user = UserFactory(username="night-shift")
    role_set(user, Role.OPERATOR)
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.django_db(transaction=True)
def test_a_worker_records_a_success_and_a_failure_by_its_class_only(worker):
    queue, log_path = worker
    app.send_task("billing.tasks.usage_rollup", queue=queue)
    app.send_task(FAILING_TASK, queue=queue)

    def both_recorded() -> bool:
        return TaskRun.objects.filter(task__in=["billing.tasks.usage_rollup", FAILING_TASK]).count() == 2

    wait_until(both_recorded, lambda: f"the worker records both runs; its log:\n{log_path.read_text()}", timeout=90)
    ok = TaskRun.objects.get(task="billing.tasks.usage_rollup")
    assert ok.succeeded and ok.error_class == "" and ok.last_success_at == ok.finished_at
    assert ok.duration_seconds >= 0 and ok.failures_in_a_row == 0
    failed = TaskRun.objects.get(task=FAILING_TASK)
    assert not failed.succeeded and failed.error_class == "PermissionError" and failed.last_success_at is None
    assert failed.failures_in_a_row == 1
    assert CANARY not in repr(list(TaskRun.objects.values()))

    # What an operator reads of them: the dashboard, its JSON, the metrics.
    every_minute = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.MINUTES)
    PeriodicTask.objects.create(name="rollup", task="billing.tasks.usage_rollup", interval=every_minute)
    PeriodicTask.objects.create(name="refused", task=FAILING_TASK, interval=every_minute)
    client = operator_client()
    html = client.get("/ops/").content.decode()
    figures = client.get("/ops/data.json").content.decode()
    with override_settings(LLMHUB_METRICS_TOKEN=TOKEN):
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).content.decode()
    assert "Failing: PermissionError" in html and "Failing: PermissionError" in figures
    assert f'llmhub_periodic_task_overdue{{task="{FAILING_TASK}"}} 1.0' in metrics
    assert 'llmhub_periodic_task_last_success_timestamp_seconds{task="billing.tasks.usage_rollup"}' in metrics
    for shown in (html, figures, metrics):
        assert CANARY not in shown
    assert "could not record" not in log_path.read_text()


@pytest.mark.django_db
def test_a_record_the_database_refuses_does_not_fail_the_task(caplog):
    """The run's record fails (its table is gone); the task still succeeds, the caller's transaction is still
    usable (the write had a savepoint of its own: on PostgreSQL a failed statement spoils the transaction), the
    failure is logged by its class only, and the next run is recorded again."""
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE billing_taskrun RENAME TO billing_taskrun_away")
    with caplog.at_level(logging.WARNING, logger="llmhub.tasks"):
        result = usage_rollup.apply()
    assert result.successful() and result.get() == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "llmhub.tasks"]
    assert warning.startswith("could not record the run of task billing.tasks.usage_rollup: ")
    assert "billing_taskrun" not in warning  # the error's class, not its message
    assert UsageRecord.objects.count() == 0  # the transaction is still usable

    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE billing_taskrun_away RENAME TO billing_taskrun")
    assert usage_rollup.apply().successful()
    assert TaskRun.objects.get(task="billing.tasks.usage_rollup").succeeded


def runs_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.django_db(transaction=True)
def test_a_task_that_kills_its_worker_is_run_a_bounded_number_of_times_and_one_lost_once_runs_again(
    prefork_worker, tmp_path
):
    """With ``acks_late``, a run whose worker process dies leaves its message unacknowledged, and
    ``task_reject_on_worker_lost`` put it back in the queue at once: a task that kills its worker every time (out
    of memory, a segfault) was delivered again and again, for ever, taking the worker down each time. A lost run is
    now retried as ``Task.retry`` would (``task_retry_on_worker_lost``): counted against ``max_retries`` (Celery's
    default 3), then failed. A task lost once (a restart under it) still runs again, and completes."""
    queue, log_path = prefork_worker
    poison, lost_once, after = tmp_path / "poison.runs", tmp_path / "lost-once.runs", tmp_path / "after.runs"
    app.send_task(POISON_TASK, args=[str(poison)], queue=queue)
    app.send_task(LOST_ONCE_TASK, args=[str(lost_once)], queue=queue)

    wait_until(lambda: runs_in(lost_once) == 2, lambda: f"run again once; log:\n{log_path.read_text()}", timeout=90)
    wait_until(lambda: runs_in(poison) >= 4, lambda: f"the poison's runs; log:\n{log_path.read_text()}", timeout=90)
    # A task sent now and due after two more runs of the poison would have come (each takes the worker about 5 s to
    # replace its child, and a retry is due a second later), run by the worker's one child: the poison had every
    # chance to run again by the time it has run.
    app.send_task(NOTE_TASK, args=[str(after)], queue=queue, countdown=15)
    wait_until(lambda: runs_in(after) == 1, lambda: f"the last task; log:\n{log_path.read_text()}", timeout=90)

    assert runs_in(poison) == 1 + 3  # its first run and Celery's default of 3 retries, then no more
    assert runs_in(lost_once) == 2
    assert "WorkerLostError" in log_path.read_text()


@pytest.mark.django_db(transaction=True)
def test_a_run_killed_at_its_hard_time_limit_or_lost_with_its_child_is_recorded_failed_once(prefork_worker, tmp_path):
    """A run that goes on past its soft time limit (stuck in one long statement, which the limit's exception cannot
    interrupt) is killed with its child at the hard limit; a task that kills its child on every run fails once its
    retries are spent. Neither run ends in the child, so ``task_postrun`` never came: no run was recorded, and the
    operations dashboard showed the last success (a nightly job killed every night read "ok" until it turned
    overdue). Both are recorded now, as failed, once, by the error's class, from the worker's main process."""
    queue, log_path = prefork_worker
    stuck, poison, after = tmp_path / "stuck.runs", tmp_path / "poison.runs", tmp_path / "after.runs"
    app.send_task(STUCK_TASK, args=[str(stuck)], queue=queue)
    app.send_task(POISON_TASK, args=[str(poison)], queue=queue)

    killed = TaskRun.objects.filter(task=STUCK_TASK, succeeded=False, error_class="TimeLimitExceeded")
    wait_until(killed.exists, lambda: f"the run killed at its limit; log:\n{log_path.read_text()}", timeout=90)
    lost = TaskRun.objects.filter(task=POISON_TASK, succeeded=False, error_class="WorkerLostError")
    wait_until(lost.exists, lambda: f"the lost run's failure; log:\n{log_path.read_text()}", timeout=90)
    # The worker has handled whatever it was to do of those two runs by the time it has run a task sent after them.
    app.send_task(NOTE_TASK, args=[str(after)], queue=queue)
    wait_until(lambda: runs_in(after) == 1, lambda: f"the last task; log:\n{log_path.read_text()}", timeout=90)

    assert runs_in(stuck) == 1 and killed.get().failures_in_a_row == 1
    assert runs_in(poison) == 1 + 3 and lost.get().failures_in_a_row == 1
    assert "Hard time limit (3" in log_path.read_text()


@pytest.mark.django_db(transaction=True)
def test_a_task_that_kills_the_workers_main_process_is_started_a_bounded_number_of_times(broker, redis_url, tmp_path):
    """A run whose whole worker process dies (SIGKILL of the main process, the OOM killer choosing it, a lost host)
    is never seen ending: the Redis broker hands its message to a worker again after its ``visibility_timeout``,
    and kombu counts no deliveries, so a task that brings the main process down came back every 4 hours for ever.
    Each start is now counted (``llmhub.celery.StartCountingTask``): the worker started after the third death
    refuses the message (acknowledged, dropped), logs it and records the run as failed, and stays up. Here the
    solo pool runs the task in the main process, and the visibility timeout is a second, so that each worker
    started after one died is handed the message at once."""
    broker_url = redis_url.rsplit("/", 1)[0] + "/9"
    queue = f"task-starts-{uuid.uuid4().hex[:8]}"
    log_path, poison = tmp_path / "worker.log", tmp_path / "poison.runs"
    broker.serve(broker_url)
    app.send_task(POISON_TASK, args=[str(poison)], queue=queue)

    def start_worker() -> subprocess.Popen:
        return celery_worker(broker_url, queue, log_path, "--pool=solo", TEST_VISIBILITY_TIMEOUT="1")

    for deaths in (1, 2, 3):
        worker = start_worker()
        try:
            worker.wait(timeout=90)
        except subprocess.TimeoutExpired:
            worker.kill()
            pytest.fail(f"the worker did not die a {deaths}. time; log:\n{log_path.read_text()}")
        assert worker.returncode == -9 and runs_in(poison) == deaths
    worker = start_worker()
    try:
        refused = TaskRun.objects.filter(task=POISON_TASK, error_class="TaskStartsExhausted")
        wait_until(refused.exists, lambda: f"the refusal; log:\n{log_path.read_text()}", timeout=90)
        assert runs_in(poison) == 3 and worker.poll() is None
        assert "was started 3 times without ever ending" in log_path.read_text()
    finally:
        process_stop(worker, grace=30)


@pytest.mark.timeout(300)  # four worker processes started one after the other, on a loaded CI
@pytest.mark.django_db(transaction=True)
def test_a_worker_stopped_under_a_run_does_not_count_that_start_against_the_task(broker, redis_url, tmp_path):
    """A deploy stops the worker (SIGTERM: a warm stop, which waits for the run) and, the run outlasting the
    orchestrator's stop timeout, kills it (SIGKILL). The run never ended, but not because of the task: its message,
    handed out again, must run again as often as deploys cut it. Each such stop counted as a start that died, so the
    worker started after the third refused the message for good (``TaskStartsExhausted``) though the task never
    killed anything. A worker asked to stop now releases the starts of the runs it holds."""
    broker_url = redis_url.rsplit("/", 1)[0] + "/9"
    queue = f"task-stops-{uuid.uuid4().hex[:8]}"
    log_path, runs, may_end = tmp_path / "worker.log", tmp_path / "long.runs", tmp_path / "may-end"
    broker.serve(broker_url)
    task_id = str(uuid.uuid4())
    starts = redis_sync_client(broker_url)
    app.send_task(LONG_TASK, args=[str(runs), str(may_end)], queue=queue, task_id=task_id)

    def start_worker() -> subprocess.Popen:
        return celery_worker(broker_url, queue, log_path, "--pool=solo", TEST_VISIBILITY_TIMEOUT="1")

    for stops in (1, 2, 3):
        worker = start_worker()
        try:
            wait_until(lambda n=stops: runs_in(runs) == n, lambda: f"a run; log:\n{log_path.read_text()}", timeout=90)
            worker.send_signal(signal.SIGTERM)
            # The stop is taken in (the worker has released the run's start) before the stop timeout runs out.
            wait_until(
                lambda: starts.get(_starts_key(task_id, 0)) is None,
                lambda: f"the stopped worker still counts the run's start; log:\n{log_path.read_text()}",
                timeout=30,
            )
        finally:
            worker.kill()
            worker.wait(timeout=30)
    worker = start_worker()
    try:
        wait_until(lambda: runs_in(runs) == 4, lambda: f"the fourth run; log:\n{log_path.read_text()}", timeout=90)
        may_end.touch()
        ended = TaskRun.objects.filter(task=LONG_TASK, error_class="")
        wait_until(ended.exists, lambda: f"the run's end; log:\n{log_path.read_text()}", timeout=90)
        assert not TaskRun.objects.filter(error_class="TaskStartsExhausted").exists()
        assert "without ever ending" not in log_path.read_text()
    finally:
        process_stop(worker, grace=30)
