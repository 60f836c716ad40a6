"""Celery tasks of experiments. Each loads what it needs and calls a service."""

from __future__ import annotations

from celery import shared_task

from .services import experiments_conclude_due, rollout_steps_apply_due


class RolloutStepsNotAppliedError(Exception):
    """A run in which some experiment's due rollout steps did not apply (each is logged); the others' did."""


@shared_task
def rollout_steps_apply_due_task() -> int:
    """Every minute: the gradual rollouts' timed steps that are due are applied (each recorded in the
    audit log), and running experiments whose end has passed are concluded. Returns the steps applied. An
    experiment whose due steps did not apply (one no longer fits, the database failed) does not stop the others;
    the run then ends with ``RolloutStepsNotAppliedError`` naming it, so that the operations dashboard shows the
    task failing until an admin (or the next run) sees to it."""
    failed: list[str] = []
    applied = rollout_steps_apply_due(failed=failed)
    experiments_conclude_due()
    if failed:
        raise RolloutStepsNotAppliedError(
            f"rollout steps not applied: {', '.join(failed)}; the other experiments' were"
        )
    return len(applied)
