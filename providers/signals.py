"""Cache invalidation: when an admin saves or deletes a catalog row, or a user's own provider key
changes, this process forgets its cached copies at once (other processes within ``LLMHUB_LOOKUP_CACHE_TTL``,
and a user's key at once there too: ``core.broadcast``). The audit of users' own keys deleted with their
owner (``accounts.signals.users_deleting``), or anywhere else. And a deployment's incidents, closed and kept when it is
deleted (``incidents.deployment_incidents_keep``)."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from django.db.models.signals import post_delete, post_save, pre_delete
from django.dispatch import Signal, receiver
from django.utils import timezone

from accounts.signals import users_deleting
from core.broadcast import broadcast_handler, broadcast_publish
from core.cache import forget_now_and_after_commit

from .adapters.registry import adapters_forget
from .byok import credentials_cache
from .models import CatalogModel, Deployment, Provider, ProviderCredential
from .selectors import catalog_cache
from .services.credentials import owners_credentials_delete, provider_credential_deleted_record
from .services.incidents import deployment_incidents_keep

# Sent by the catalog's admin with ``model_ids`` (the public models a delete would take, their aliases too) before it
# offers the delete: an app above providers, which providers cannot import, answers with a list of reasons to refuse
# it, each naming a row of its own whose meaning the delete would change (billing: a key left with no model, which
# reads as every model). The admin shows them as the rows that protect the models.
catalog_models_delete_refusals = Signal()


@receiver([post_save, post_delete], sender=Provider)
@receiver([post_save, post_delete], sender=CatalogModel)
@receiver([post_save, post_delete], sender=Deployment)
def _catalog_changed(**kwargs: Any) -> None:
    # Again after commit: a request that reads the catalog in between still sees the rows as they were.
    forget_now_and_after_commit(catalog_cache.invalidate)


@receiver(pre_delete, sender=Deployment)
def _deployment_deleting(*, instance: Deployment, origin: object = None, **kwargs: Any) -> None:
    # Whatever deletes it (its admin page, the bulk action, its model's inline, its model deleted with it, the
    # shell): an open incident is closed and told, and its incidents keep its names.
    deleted = origin.model if isinstance(origin, QuerySet) else type(origin)
    because = "its model was deleted" if deleted is CatalogModel else "the deployment was deleted"
    deployment_incidents_keep(deployment_id=instance.pk, because=because, at=timezone.now())


def _credential_forget(owner_id: int, credential_id: int) -> None:
    credentials_cache.invalidate(owner_id)
    # The key's pooled clients hold it (and their connections) until the pool evicts them: let them go now.
    # A rename costs a client rebuilt (0.1 ms); a deleted, replaced or refused key is not kept in memory.
    adapters_forget(credential_id)


def _credential_forget_broadcast(payload: str) -> None:
    owner_id, credential_id = (int(part) for part in payload.split(":"))
    _credential_forget(owner_id, credential_id)


broadcast_handler("provider_credential", _credential_forget_broadcast)


@receiver([post_save, post_delete], sender=ProviderCredential)
def _credential_changed(*, instance: ProviderCredential, **kwargs: Any) -> None:
    owner_id, credential_id = instance.owner_id, instance.pk
    _credential_forget(owner_id, credential_id)

    def committed() -> None:
        # Again after commit: a request may have read the keys between now and then, when every other
        # connection still saw the row as it was, and would keep that copy (a deleted key) for the TTL. And
        # every other process now, not within the TTL: no request goes out on a deleted key once the delete
        # has answered (``core.broadcast``; with Redis).
        _credential_forget(owner_id, credential_id)
        broadcast_publish("provider_credential", f"{owner_id}:{credential_id}")

    transaction.on_commit(committed)


@receiver(users_deleting)
def _owners_deleting(*, user_ids: list[int], **kwargs: Any) -> None:
    # Their own keys would go with them (a cascade): deleted first, each recorded as a key deleted alone is, in a batch.
    owners_credentials_delete(owner_ids=user_ids)


@receiver(post_delete, sender=ProviderCredential)
def _credential_deleted(*, instance: ProviderCredential, **kwargs: Any) -> None:
    # Whoever deleted it (the shell, a command, its owner's or its provider's delete there), the audit log says so; the
    # services' own deletes record it once, themselves.
    provider_credential_deleted_record(credential=instance)
