"""Clear the cached experiment plans when an experiment, its variants or a public model change (a variant
names its target model by the model's public name), now and again after commit."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from core.cache import forget_now_and_after_commit
from providers.models import CatalogModel

from .assignment import assignment_cache
from .models import Experiment, Variant


@receiver([post_save, post_delete], sender=Experiment)
@receiver([post_save, post_delete], sender=Variant)
@receiver([post_save, post_delete], sender=CatalogModel)
def _experiments_changed(sender: Any, **kwargs: Any) -> None:
    forget_now_and_after_commit(assignment_cache.invalidate)
