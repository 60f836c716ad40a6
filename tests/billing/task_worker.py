"""The Celery app a test's worker process runs (``test_task_runs``): llmhub's own (``llmhub.celery``, what
``celery -A llmhub worker`` loads), with one task more that fails, its message carrying a canary that must
never be stored or shown (a message may hold a secret).

Run as ``python -m celery -A tests.billing.task_worker -b <broker> worker …`` with DJANGO_SETTINGS_MODULE and
TEST_DATABASE_URL set."""

from __future__ import annotations

from llmhub.celery import app

__all__ = ["app"]

CANARY = "sk-canary-7f3e9a1c0b"
FAILING_TASK = "tests.billing.task_worker.upstream_refused"


@app.task(name=FAILING_TASK)
def upstream_refused() -> None:
    raise PermissionError(f"the upstream refused the key {CANARY}")
