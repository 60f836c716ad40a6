"""Celery tasks of experiments. Each loads what it needs and calls a service."""

from __future__ import annotations

from celery import shared_task

from .services import experiments_conclude_due, rollout_steps_apply_due


class RolloutStepsNotAppliedError(Exception):
    """A run in which some experiment's due rollout steps did not apply (each is logged); the others' did."""


class ExperimentsNotConcludedError(Exception):
    """A run in which some experiment past its end could not be concluded (each is logged); the others were."""


@shared_task
def rollout_steps_apply_due_task() -> int:
    """Every minute: the gradual rollouts' timed steps that are due are applied (each recorded in the
    audit log), and running experiments whose end has passed are concluded. Returns the steps applied. An
    experiment whose due steps did not apply (one no longer fits, the database failed), or that could not be
    concluded, does not stop the others; the run then ends failed naming it (``RolloutStepsNotAppliedError``,
    or ``ExperimentsNotConcludedError`` when every due step applied), so that the operations dashboard shows
    the task failing until an admin (or the next run) sees to it."""
    not_applied: list[str] = []
    not_concluded: list[str] = []
    applied = rollout_steps_apply_due(failed=not_applied)
    experiments_conclude_due(failed=not_concluded)
    unconcluded = f"experiments not concluded: {', '.join(not_concluded)}; " if not_concluded else ""
    if not_applied:
        raise RolloutStepsNotAppliedError(
            f"rollout steps not applied: {', '.join(not_applied)}; {unconcluded}the other experiments' were"
        )
    if not_concluded:
        raise ExperimentsNotConcludedError(f"{unconcluded}the others were")
    return len(applied)
