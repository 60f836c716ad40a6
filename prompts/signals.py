"""Cache invalidation only: when a template, version, label or brand is saved or deleted, this process
forgets its cached lookups at once and again after commit (other processes within ``LLMHUB_LOOKUP_CACHE_TTL``)."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from core.cache import forget_now_and_after_commit

from .models import BrandProfile, PromptLabel, PromptTemplate, PromptVersion
from .selectors import brand_cache, prompt_cache


@receiver([post_save, post_delete], sender=PromptTemplate)
@receiver([post_save, post_delete], sender=PromptVersion)
@receiver([post_save, post_delete], sender=PromptLabel)
def _prompt_changed(**kwargs: Any) -> None:
    forget_now_and_after_commit(prompt_cache.invalidate)


@receiver([post_save, post_delete], sender=BrandProfile)
def _brand_changed(**kwargs: Any) -> None:
    forget_now_and_after_commit(brand_cache.invalidate)
