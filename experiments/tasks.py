"""Celery tasks of experiments. Each loads what it needs and calls a service."""

from __future__ import annotations

from celery import shared_task

from .services import experiments_conclude_due, rollout_steps_apply_due


@shared_task
def rollout_steps_apply_due_task() -> int:
    """Every minute: the gradual rollouts' timed steps that are due are applied (each recorded in the
    audit log), and running experiments whose end has passed are concluded. Returns the steps applied."""
    applied = rollout_steps_apply_due()
    experiments_conclude_due()
    return len(applied)
