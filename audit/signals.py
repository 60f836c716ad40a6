"""Recording admin changes, sign-ins and role changes in the audit log, from Django's signals.

The audited models are named by label in ``LLMHUB_AUDITED_MODELS`` and looked up with ``apps.get_model``, so
that this app imports none of the apps it audits (``tests/core/test_import_direction.py``). A save records
``<app_label>.<model>.create`` or ``.change`` with ``{field: [old, new]}`` for the fields that changed (the old
values read from the database just before the save), a delete ``.delete``; secret fields are masked. A
many-to-many change is recorded once per transaction, old set → new set, when the transaction commits
(Django's ``set()`` removes and then adds: one event, not two); a user's groups are their role, so a change of
them is ``role.change``.

Who acted, from where, comes from ``audit.context`` (the request's origin; the system outside a request).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.core.exceptions import ImproperlyConfigured
from django.db import models, transaction
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save

from .context import AuditOrigin, origin_current
from .middleware import origin_for_request
from .models import ActorType
from .services import Actor, audit_failure_admitted, audit_record, is_secret_field

DEFAULT_AUDITED_MODELS = (
    "providers.Provider",
    "providers.Deployment",
    "providers.CatalogModel",
    "providers.ModerationPolicy",
    "billing.Plan",
    "billing.UserPlan",
    "billing.OpsAlertRule",
    "auth.User",
    "auth.Group",
)
# Fields whose change is bookkeeping, not an act: a sign-in stamps last_login (recorded as auth.login); an alert
# rule's model_name_bound follows its model_name (the name its binding was made for), whose change is recorded.
DEFAULT_IGNORED_FIELDS = ("auth.user.last_login", "billing.opsalertrule.model_name_bound")
ROLE_FIELDS = {("auth.user", "groups")}

_UNSET = object()


def audited_model_labels() -> tuple[str, ...]:
    return tuple(getattr(settings, "LLMHUB_AUDITED_MODELS", DEFAULT_AUDITED_MODELS))


def _ignored_fields() -> set[str]:
    return {name.lower() for name in getattr(settings, "LLMHUB_AUDIT_IGNORED_FIELDS", DEFAULT_IGNORED_FIELDS)}


def is_secret_model_field(field: models.Field) -> bool:
    """Encrypted columns (any class named ``…Encrypted…``, found without importing the app that defines it),
    and fields whose name says secret (``audit.services.is_secret_field``: password, api_key, token, …)."""
    encrypted = any("Encrypted" in klass.__name__ for klass in type(field).__mro__)
    return encrypted or is_secret_field(field.name)


def _tracked_fields(model: type[models.Model], update_fields: Iterable[str] | None = None) -> list[models.Field]:
    ignored = _ignored_fields()
    label = model._meta.label_lower
    only = set(update_fields) if update_fields is not None else None
    return [
        field
        for field in model._meta.concrete_fields
        if not field.primary_key
        and not getattr(field, "auto_now", False)
        and f"{label}.{field.name}" not in ignored
        and (only is None or field.name in only or field.attname in only)
    ]


def _secret_names(model: type[models.Model]) -> tuple[str, ...]:
    return tuple(field.name for field in model._meta.concrete_fields if is_secret_model_field(field))


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


# SAVES AND DELETES


def _before_save(sender: type[models.Model], instance: models.Model, using: str, update_fields=None, **kwargs) -> None:
    before = None
    if instance.pk is not None:
        fields = _tracked_fields(sender, update_fields)
        if not fields:  # only untracked fields saved (a sign-in's last_login): nothing to read
            before = {}
        else:
            rows = sender._base_manager.using(using).filter(pk=instance.pk)
            before = rows.values(*(field.attname for field in fields)).first()
    instance.__dict__["_audit_before"] = before


def _after_save(
    sender: type[models.Model], instance: models.Model, created: bool, update_fields=None, **kwargs
) -> None:
    before = instance.__dict__.pop("_audit_before", None)
    fields = _tracked_fields(sender, update_fields)
    if created or before is None:
        changes = {
            field.name: [None, value] for field in fields if not _empty(value := field.value_from_object(instance))
        }
        verb = "create"
    else:
        changes = {
            field.name: [before[field.attname], value]
            for field in fields
            if (value := field.value_from_object(instance)) != before[field.attname]
        }
        if not changes:
            return
        verb = "change"
    audit_record(
        f"{sender._meta.label_lower}.{verb}", target=instance, changes=changes, secret_fields=_secret_names(sender)
    )


def _after_delete(sender: type[models.Model], instance: models.Model, **kwargs) -> None:
    changes = {
        field.name: [value, None]
        for field in _tracked_fields(sender)
        if not _empty(value := field.value_from_object(instance))
    }
    audit_record(
        f"{sender._meta.label_lower}.delete", target=instance, changes=changes, secret_fields=_secret_names(sender)
    )


# MANY-TO-MANY CHANGES
# Old sets are taken before the first change in a transaction; the new set is read when it commits, so a
# remove-then-add (``set()``) or several changes in one admin save make one event, and a rolled-back change
# none (its callback is dropped, and what it left behind is cleared by the next change).


class _PendingChange:
    __slots__ = ("old", "origin", "target_repr")

    def __init__(self, old: list[str], origin: AuditOrigin | None, target_repr: str) -> None:
        self.old, self.origin, self.target_repr = old, origin, target_repr


_pending = threading.local()


def _pending_changes() -> dict[tuple[str, str, Any, str], _PendingChange]:
    if not hasattr(_pending, "changes"):
        _pending.changes = {}
    return _pending.changes


def _flush_registered(using: str) -> bool:
    """Whether ``_flush_m2m`` waits for the current transaction to commit. A rollback drops it, and with it
    the pending changes of that transaction (what they took as old is what the rollback restored)."""
    connection = transaction.get_connection(using)
    return connection.in_atomic_block and any(entry[1] is _flush_m2m for entry in connection.run_on_commit)


def _related_names(model: type[models.Model], field: models.ManyToManyField, using: str, pk: Any) -> list[str]:
    related = field.related_model._base_manager.using(using).filter(**{field.related_query_name(): pk})
    return sorted(str(obj) for obj in related)


def _flush_m2m() -> None:
    changes = _pending_changes()
    while changes:
        (using, label, pk, field_name), pending = changes.popitem()
        model = apps.get_model(label)
        field = model._meta.get_field(field_name)
        if not model._base_manager.using(using).filter(pk=pk).exists():
            continue  # deleted in the same transaction: its delete event says so
        new = _related_names(model, field, using, pk)
        if new == pending.old:
            continue
        role = (label, field_name) in ROLE_FIELDS
        audit_record(
            "role.change" if role else f"{label}.change",
            target_type=label,
            target_id=pk,
            target_repr=pending.target_repr,
            changes={field_name: [pending.old, new]},
            origin=pending.origin,
        )


def _m2m_receiver(model: type[models.Model], field: models.ManyToManyField):
    label = model._meta.label_lower

    def changed(instance: models.Model, action: str, reverse: bool, pk_set: set | None, using: str, **kwargs) -> None:
        if not action.startswith("pre_"):
            if action.startswith("post_") and (
                _pending.__dict__.pop("unflushed", False) or not _flush_registered(using)
            ):
                transaction.on_commit(_flush_m2m, using=using)
            return
        changes = _pending_changes()
        if changes and not _flush_registered(using):
            changes.clear()  # left by a transaction that was rolled back
        if not changes:
            _pending.unflushed = True  # a first change since the last flush: it needs a flush of its own
        if not reverse:
            sources = [(instance.pk, str(instance))]
        else:  # e.g. group.user_set.add(user): the audited rows are the users
            rows = model._base_manager.using(using)
            rows = rows.filter(pk__in=pk_set) if pk_set is not None else rows.filter(**{field.name: instance})
            sources = [(row.pk, str(row)) for row in rows]
        origin = origin_current()
        for pk, target_repr in sources:
            key = (using, label, pk, field.name)
            if key not in changes:
                changes[key] = _PendingChange(_related_names(model, field, using, pk), origin, target_repr)

    return changed


# SIGN-IN


def _logged_in(sender: Any, request: Any, user: Any, **kwargs) -> None:
    origin = origin_for_request(request, user) if request is not None else None
    audit_record("auth.login", target=user, actor=user, origin=origin)


def _logged_out(sender: Any, request: Any, user: Any, **kwargs) -> None:
    if user is None:
        return
    origin = origin_for_request(request, user) if request is not None else None
    audit_record("auth.logout", target=user, actor=user, origin=origin)


def _login_failed(sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs) -> None:
    # Django has already replaced the password in ``credentials``; only the attempted name is kept.
    username_field = get_user_model().USERNAME_FIELD
    attempted = credentials.get(username_field) or credentials.get("username") or ""
    origin = origin_for_request(request, None) if request is not None else None
    ip_address = origin.ip_address if origin else None
    if not audit_failure_admitted(kind="login", what=str(attempted), ip_address=ip_address):
        return
    audit_record(
        "auth.login_failed",
        target_type=get_user_model()._meta.label_lower,
        target_repr=str(attempted),
        actor=Actor(ActorType.ANONYMOUS, "", "anonymous"),
        origin=origin,
    )


def _models(labels: Iterable[str]) -> list[type[models.Model]]:
    found = []
    for label in labels:
        try:
            found.append(apps.get_model(label))
        except (LookupError, ValueError) as exc:
            raise ImproperlyConfigured(f"LLMHUB_AUDITED_MODELS names {label!r}, which is no installed model.") from exc
    return found


def connect(labels: Iterable[str] | None = None) -> None:
    """Record changes of the models named (default: ``LLMHUB_AUDITED_MODELS``) and sign-ins. Called once from
    ``AuditConfig.ready()``; connecting a model twice is harmless (one receiver per model)."""
    for model in _models(audited_model_labels() if labels is None else labels):
        uid = f"audit:{model._meta.label_lower}"
        pre_save.connect(_before_save, sender=model, dispatch_uid=uid)
        post_save.connect(_after_save, sender=model, dispatch_uid=uid)
        post_delete.connect(_after_delete, sender=model, dispatch_uid=uid)
        for field in model._meta.many_to_many:
            m2m_changed.connect(
                _m2m_receiver(model, field),
                sender=field.remote_field.through,
                dispatch_uid=f"{uid}.{field.name}",
                weak=False,
            )
    user_logged_in.connect(_logged_in, dispatch_uid="audit:login")
    user_logged_out.connect(_logged_out, dispatch_uid="audit:logout")
    user_login_failed.connect(_login_failed, dispatch_uid="audit:login_failed")


def disconnect(labels: Iterable[str]) -> None:
    """Stop recording changes of the models named."""
    for model in _models(labels):
        uid = f"audit:{model._meta.label_lower}"
        pre_save.disconnect(sender=model, dispatch_uid=uid)
        post_save.disconnect(sender=model, dispatch_uid=uid)
        post_delete.disconnect(sender=model, dispatch_uid=uid)
        for field in model._meta.many_to_many:
            m2m_changed.disconnect(sender=field.remote_field.through, dispatch_uid=f"{uid}.{field.name}")
