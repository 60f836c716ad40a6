"""Cache invalidation only: when an admin saves or deletes a catalog row, or a user's own provider key
changes, this process forgets its cached copies at once (other processes within ``LLMHUB_LOOKUP_CACHE_TTL``)."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .byok import credentials_cache
from .models import CatalogModel, Deployment, Provider, ProviderCredential
from .selectors import catalog_cache


@receiver([post_save, post_delete], sender=Provider)
@receiver([post_save, post_delete], sender=CatalogModel)
@receiver([post_save, post_delete], sender=Deployment)
def _catalog_changed(**kwargs: Any) -> None:
    catalog_cache.invalidate()


@receiver([post_save, post_delete], sender=ProviderCredential)
def _credential_changed(*, instance: ProviderCredential, **kwargs: Any) -> None:
    credentials_cache.invalidate(instance.owner_id)
