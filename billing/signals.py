"""Cache invalidation: a changed, revoked or deleted key, a changed allow-list or a deactivated
owner is forgotten by this process's key cache at once and again after commit (other processes within
``LLMHUB_LOOKUP_CACHE_TTL``); so are changed limits (plans, a user's plan, a key's). And the keys of users
being deleted (``accounts.signals.users_deleting``) deleted first, as a key's delete is (``key.delete``); a key deleted
anywhere else (the shell, a cascade) recorded as ``key.delete`` too, its spend left to the key above it that stays
(``keys.api_key_spend_keep``). And a catalog model's open operations incidents,
closed when it is deleted (``ops_alerts.ops_model_incidents_close``), and an alert rule's, when it is
(``ops_alerts.ops_rule_deleting``); the rules watching a model's name by the name alone, bound to it when a model is
saved with that name (``ops_alerts.ops_rules_model_bind``). And a delete of catalog models in the admin refused
while it would leave a key with no model, which reads as every model
(``providers.signals.catalog_models_delete_refusals``)."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete
from django.dispatch import receiver

from accounts.signals import users_deleting
from core.cache import forget_now_and_after_commit
from providers.models import CatalogModel
from providers.signals import catalog_models_delete_refusals

from .models import ApiKey, OpsAlertRule, Plan, UserPlan
from .selectors import api_key_subtree_ids, limits_cache
from .services.keys import api_key_deleted_record, api_key_spend_keep, api_keys_delete, key_cache
from .services.ops_alerts import ops_model_incidents_close, ops_rule_deleting, ops_rules_model_bind
from .tasks import budget_counters_put_back

logger = logging.getLogger(__name__)


def _forget(secret_hashes: list[str]) -> None:
    def invalidate() -> None:
        for secret_hash in secret_hashes:
            key_cache.invalidate(secret_hash)

    forget_now_and_after_commit(invalidate)


def _with_subtree(instance: ApiKey) -> list[str]:
    # A key's cached lookup carries the keys above it (revoked? expiring? models?): a change to a key
    # changes what every key created under it may do.
    below = ApiKey.objects.filter(pk__in=api_key_subtree_ids(instance.pk)).exclude(pk=instance.pk)
    return [instance.secret_hash, *below.values_list("secret_hash", flat=True)]


@receiver(post_save, sender=ApiKey)
def _api_key_changed(instance: ApiKey, **kwargs: Any) -> None:
    _forget(_with_subtree(instance))


@receiver(post_delete, sender=ApiKey)
def _api_key_deleted(instance: ApiKey, **kwargs: Any) -> None:
    # No walk of the keys below: they are gone too (a cascade), each forgotten by its own signal. A walk a key
    # was a few queries a key of a delete of thousands (a user's, the admin's selection across the list).
    _forget([digest for digest in (instance.secret_hash, instance.previous_secret_hash) if digest])
    # Whoever deleted it, the audit log says so (the services' own delete records it once, itself).
    api_key_deleted_record(api_key=instance)


@receiver(pre_delete, sender=ApiKey)
def _api_key_deleting(instance: ApiKey, origin: Any = None, **kwargs: Any) -> None:
    # Before Django's delete sets its ledger rows to null: a key deleted under one that stays leaves its spend to it,
    # whoever deletes it (the services' own delete moves its keys' rows itself, a batch at a time).
    api_key_spend_keep(api_key=instance, origin=origin)


@receiver(users_deleting)
def _owners_deleting(*, user_ids: list[int], **kwargs: Any) -> None:
    # Their keys would go with them (a cascade) unrecorded: deleted first as the keys' own delete deletes them, one
    # ``key.delete`` a key (the keys below it named in it), their secrets forgotten; a few queries a batch of keys.
    api_keys_delete(api_key_ids=ApiKey.objects.filter(user_id__in=user_ids).values_list("pk", flat=True))


@receiver(m2m_changed, sender=ApiKey.allowed_models.through)
def _api_key_models_changed(instance: ApiKey, action: str, **kwargs: Any) -> None:
    # Only the forward side exists (related_name="+"), so ``instance`` is always the key.
    if action.startswith("post_"):
        _forget(_with_subtree(instance))


@receiver(post_save, sender=get_user_model())
def _owner_changed(instance: Any, **kwargs: Any) -> None:
    # A deactivated user's keys must stop at once; saving an active user (e.g. last_login) costs nothing.
    if not instance.is_active:
        _forget(list(ApiKey.objects.filter(user=instance).values_list("secret_hash", flat=True)))


# Limits (plans, a user's plan, a key's budget and rates) are cached per process like keys are.


@receiver([post_save, post_delete], sender=ApiKey)
def _api_key_limits_changed(instance: ApiKey, **kwargs: Any) -> None:
    forget_now_and_after_commit(partial(limits_cache.invalidate, ("key", instance.pk)))


@receiver([post_save, post_delete], sender=UserPlan)
def _user_plan_changed(instance: UserPlan, **kwargs: Any) -> None:
    forget_now_and_after_commit(partial(limits_cache.invalidate, ("user", instance.user_id)))


@receiver([post_save, post_delete], sender=Plan)
@receiver(m2m_changed, sender=Plan.allowed_models.through)
def _plan_changed(**kwargs: Any) -> None:
    forget_now_and_after_commit(limits_cache.invalidate)


# A changed budget puts its scope's counters back on the ledger (they are the ledger's sums, kept): a counter its scope
# stopped using while the budget was lifted or in another period stayed where it was left, and a budget set back
# onto it would take it up short of what the period spent meanwhile (until the 5-minute reconcile). Queued once the
# change is committed; a broker that does not take it leaves it to that reconcile.

BUDGET_FIELDS = frozenset({"budget_usd", "budget_period"})


def _counters_put_back(**scope: int) -> None:
    """Queue ``budget_counters_put_back`` for ``scope`` (``key_id``, ``user_id`` or ``plan_id``) after the commit."""

    def queue() -> None:
        try:
            budget_counters_put_back.delay(**scope)
        except Exception as exc:  # the broker's error (its text may name hosts): the reconcile task catches up
            logger.warning(
                "a budget changed, and its counters could not be queued to be put back on the ledger (%s); the "
                "5-minute reconcile will",
                type(exc).__name__,
            )

    transaction.on_commit(queue)


@receiver(post_save, sender=ApiKey)
def _api_key_budget_saved(instance: ApiKey, created: bool, update_fields: Any, **kwargs: Any) -> None:
    # A new key has no counter yet; a rotation, a revoke or the last use writes no budget.
    if not created and (update_fields is None or BUDGET_FIELDS & set(update_fields)):
        _counters_put_back(key_id=instance.pk)


@receiver([post_save, post_delete], sender=UserPlan)
def _user_plan_budget_saved(instance: UserPlan, created: bool = False, **kwargs: Any) -> None:
    # A user's plan is created at their first lookup (``user_plan_ensure``, on the request path), before any counter.
    if not created:
        _counters_put_back(user_id=instance.user_id)


@receiver(post_save, sender=Plan)
def _plan_budget_saved(instance: Plan, created: bool, **kwargs: Any) -> None:
    if not created:
        _counters_put_back(plan_id=instance.pk)


@receiver(post_save, sender=CatalogModel)
def _model_saved(*, instance: CatalogModel, **kwargs: Any) -> None:
    # Added, or renamed to a name rules watch by the name alone: they follow the model from now on.
    ops_rules_model_bind(name=instance.name)


@receiver(pre_delete, sender=CatalogModel)
def _model_deleting(*, instance: CatalogModel, **kwargs: Any) -> None:
    # Whatever deletes it (its admin page, the bulk action, the shell): its open error-rate, latency and spend-spike
    # incidents are closed and told as no recovery, before its rows go to null and would read as a recovery.
    ops_model_incidents_close(model_id=instance.pk, name=instance.name)


# The most keys a refused delete names (the admin's page lists them): the first are enough to act on.
REFUSAL_KEYS_NAMED = 100


@receiver(catalog_models_delete_refusals)
def _keys_left_without_a_model(*, model_ids: list[int], **kwargs: Any) -> list[str]:
    # A key's empty model list means every model its owner's plan allows: a delete that took every model a key
    # (not revoked) may use would free it to call them all. Narrowing a key that keeps another model is fine.
    kept = ApiKey.allowed_models.through.objects.exclude(catalogmodel_id__in=model_ids).values("apikey_id")
    keys = (
        ApiKey.objects.filter(revoked_at__isnull=True, allowed_models__in=model_ids)
        .exclude(pk__in=kept)
        .distinct()
        .select_related("user")
        .prefetch_related("allowed_models")
        .order_by("pk")[:REFUSAL_KEYS_NAMED]
    )
    return [
        f"{', '.join(sorted(model.name for model in key.allowed_models.all()))}: the only "
        f"{'model' if len(key.allowed_models.all()) == 1 else 'models'} the key {key.prefix} ({key.name}, "
        f"{key.user.get_username()}) may use. Deleted, the key could use every model its owner's plan allows: give "
        "it another model, or revoke it, first."
        for key in keys
    ]


@receiver(pre_delete, sender=OpsAlertRule)
def _ops_rule_deleting(*, instance: OpsAlertRule, **kwargs: Any) -> None:
    # Whatever deletes it (the admin, the shell, a queryset): its open incidents are closed and told, before they
    # lose their rule and nothing evaluates them any more.
    ops_rule_deleting(instance)
