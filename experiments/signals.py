"""Clear the cached running experiments when an experiment or its variants change."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .assignment import assignment_cache
from .models import Experiment, Variant


@receiver([post_save, post_delete], sender=Experiment)
@receiver([post_save, post_delete], sender=Variant)
def _experiments_changed(sender: Any, **kwargs: Any) -> None:
    assignment_cache.invalidate()
