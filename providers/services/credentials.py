"""Users' own provider keys (bring your own key): add, replace, delete and re-check them.

A key is checked before it is stored: first its format for the provider's kind, then live, with the
provider's model list (a call that costs nothing) on a one-off adapter holding the candidate key, under a
short timeout (``LLMHUB_BYOK_VALIDATION_TIMEOUT_SECONDS``) and the outbound policy every provider call
obeys. A key the provider refuses, or one that cannot be checked because the provider is unreachable, is
not stored; the refusal says why in words. Replacing a key swaps it in one row update once the new key has
passed: requests already running hold the old key in their bound configuration and finish on it.

The plaintext key never reaches a message, a log line, an exception or the audit log: in Python it is a
``Secret`` as soon as it arrives, and only its ``hint`` (``sk-…abcd``) is ever shown. The functions that
take it as a plain string are ``sensitive_variables``, so that a debug error page does not show it either.

Every change is saved with ``.save()`` / ``.delete()`` (never a queryset ``update``), so that the request
path's cache of a user's keys hears of it through the model signals.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import partial

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from audit.services import AuditEntry, audit_delete_recorded, audit_deletes_recorded, audit_record, audit_records
from core.async_bridge import run_async
from core.exceptions import ApplicationError
from core.id_batches import id_batches
from core.outbox import DeliveryState, delivery_claim, delivery_done, delivery_release
from core.time_limits import time_limit_reraise

from ..adapters import adapter_class_for_kind
from ..exceptions import (
    ProviderAuthenticationError,
    ProviderError,
    ProviderNotFoundError,
    ProviderRateLimitError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from ..fields import Secret
from ..models import (
    ByokMode,
    CredentialStatus,
    HostMoveNotice,
    Provider,
    ProviderCredential,
    ProviderKind,
    host_moved_detail,
)
from ..selectors import provider_config
from ..types import ProviderConfig

logger = logging.getLogger(__name__)

# The start every key of these kinds has; other kinds (self-hosted servers, Azure, Gemini…) have no known one.
KEY_PREFIXES: dict[str, str] = {
    ProviderKind.OPENAI: "sk-",
    ProviderKind.ANTHROPIC: "sk-ant-",
    ProviderKind.OPENROUTER: "sk-or-",
}
# Keys of another provider that a known prefix would let through (an Anthropic key starts with "sk-" too).
_FOREIGN_PREFIXES: tuple[tuple[str, str], ...] = (("sk-ant-", "an Anthropic key"), ("sk-or-", "an OpenRouter key"))
KEY_MIN_LENGTH = 8
KEY_MAX_LENGTH = 512
# Checks in a row a provider did not answer (unreachable, timing out, 5xx) after which the daily run asks it no more.
PROVIDER_DOWN_AFTER = 3


class ProviderKeyInvalidError(ApplicationError):
    """The key was refused: malformed, or refused by the provider, or not checkable (provider unreachable)."""

    status_code = 400
    code = "provider_key_invalid"


class ProviderKeyNotAcceptedError(ApplicationError):
    """The provider takes no user keys (``Provider.byok`` is ``disabled``)."""

    status_code = 400
    code = "provider_key_not_accepted"


class ProviderKeyPausedError(ApplicationError):
    """The key's provider was moved to a host its owner has not agreed to: nothing is sent there until they do."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "provider_key_paused"


class ProviderKeyUncheckedError(ApplicationError):
    """A stored key could not be re-checked (the provider did not answer): its status is left as it was."""

    status_code = 502
    error_type = "api_error"
    code = "provider_key_unchecked"


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """The outcome of a live check: ``ok``, or refused by the provider (``refused``), or not checkable; ``down``
    when that is because the provider did not answer (unreachable, timing out, 5xx): it says nothing of the key."""

    ok: bool
    refused: bool = False
    reason: str = ""
    down: bool = False


def key_prefix(kind: str) -> str:
    return KEY_PREFIXES.get(kind, "")


def validation_timeout() -> float:
    return float(settings.LLMHUB_BYOK_VALIDATION_TIMEOUT_SECONDS)


@sensitive_variables("api_key", "plaintext")
def key_format_check(*, provider: Provider, api_key: Secret) -> None:
    """Raise ``ProviderKeyInvalidError`` (400, ``param: api_key``) naming what is wrong with the key's form,
    and for the kinds with a known format, the start their keys have. The message shows no part of the key."""
    plaintext = api_key.reveal()
    name = provider.name
    if not plaintext:
        raise ProviderKeyInvalidError("Give the API key.", param="api_key")
    if any(ch.isspace() for ch in plaintext):
        raise ProviderKeyInvalidError("An API key has no spaces or line breaks in it.", param="api_key")
    if not (plaintext.isascii() and plaintext.isprintable()):
        raise ProviderKeyInvalidError("An API key is made of printable ASCII characters only.", param="api_key")
    if not KEY_MIN_LENGTH <= len(plaintext) <= KEY_MAX_LENGTH:
        raise ProviderKeyInvalidError(
            f"An API key is between {KEY_MIN_LENGTH} and {KEY_MAX_LENGTH} characters long.", param="api_key"
        )
    prefix = key_prefix(provider.kind)
    if not prefix:
        return
    label = ProviderKind(provider.kind).label
    article = "an" if label[:1] in "AEIOU" else "a"
    if not plaintext.startswith(prefix) or len(plaintext) <= len(prefix):
        raise ProviderKeyInvalidError(
            f"This is not {article} {label} API key: {label} keys start with {prefix!r} (provider {name!r}).",
            param="api_key",
        )
    for foreign, what in _FOREIGN_PREFIXES:
        if foreign != prefix and foreign.startswith(prefix) and plaintext.startswith(foreign):
            raise ProviderKeyInvalidError(
                f"This looks like {what}, not {article} {label} API key (provider {name!r}, keys starting with "
                f"{prefix!r}).",
                param="api_key",
            )


def _refusal_reason(provider: Provider, hint: str, exc: ProviderError) -> KeyCheck:
    """The provider's answer to the model list, in words a user can act on."""
    name = provider.name
    if isinstance(exc, ProviderAuthenticationError) and exc.upstream_status == 401:
        return KeyCheck(False, True, f"{name} refused the key {hint}: it is not a valid API key (wrong key, HTTP 401).")
    if isinstance(exc, ProviderAuthenticationError) or isinstance(exc, ProviderNotFoundError):
        return KeyCheck(
            False,
            True,
            f"{name} accepted the key {hint} but gives it no access (HTTP {exc.upstream_status}): "
            "check the key's project, permissions or models at the provider.",
        )
    if isinstance(exc, ProviderRateLimitError) and "quota" in exc.message.lower():
        return KeyCheck(
            False,
            True,
            f"{name} refused the key {hint}: its quota is exhausted (HTTP 429 insufficient_quota): "
            "check the plan and billing details of the provider account.",
        )
    return KeyCheck(
        False,
        False,
        f"The key {hint} could not be checked: {name} did not answer as expected ({exc.message}). "
        "It was not stored as valid; try again later.",
        down=isinstance(exc, ProviderTimeoutError | ProviderUnavailableError),
    )


async def _list_models_once(config: ProviderConfig) -> None:
    adapter = adapter_class_for_kind(config.kind)(config)
    try:
        await adapter.list_models()
    finally:
        await adapter.aclose()


async def key_live_acheck(*, provider: Provider, api_key: Secret, credential_id: int | None = None) -> KeyCheck:
    """List the provider's models with ``api_key`` (free), on a one-off client that is closed afterwards:
    not the shared pool, whose clients a candidate key must never become."""
    config = replace(
        provider_config(provider).on_user_key(api_key, credential_id=credential_id, hint=api_key.hint),
        timeout=validation_timeout(),
    )
    try:
        await _list_models_once(config)
    except ProviderError as exc:
        # The adapters' messages are scrubbed of the key (``adapters.common.scrub``); the reason is ours anyway.
        return _refusal_reason(provider, api_key.hint, exc)
    return KeyCheck(True)


def key_live_check(*, provider: Provider, api_key: Secret, credential_id: int | None = None) -> KeyCheck:
    """``key_live_acheck`` for synchronous callers."""
    return run_async(key_live_acheck, provider=provider, api_key=api_key, credential_id=credential_id)


def _not_accepted_check(provider: Provider) -> None:
    """A provider switched off, or taking no users' keys, is sent none: neither to use nor to check."""
    if not provider.enabled:
        raise ProviderKeyNotAcceptedError(
            f"The provider {provider.name!r} is disabled: its users' API keys are neither used nor checked.",
            param="provider",
        )
    if provider.byok == ByokMode.DISABLED:
        raise ProviderKeyNotAcceptedError(
            f"The provider {provider.name!r} does not accept users' own API keys.", param="provider"
        )


@sensitive_variables("api_key", "secret")
def provider_credential_save(
    *, owner, provider: Provider, api_key: str | Secret, label: str = ""
) -> ProviderCredential:
    """Add the user's key for ``provider``, or replace the one they have (keeping its label unless a new one
    is given). The key is checked first (format, then live); a refused or uncheckable key raises
    ``ProviderKeyInvalidError`` and changes nothing stored. A replacement is one row update: requests
    already running keep the key they started with."""
    secret = api_key if isinstance(api_key, Secret) else Secret(str(api_key).strip())
    _not_accepted_check(provider)
    key_format_check(provider=provider, api_key=secret)
    existing = ProviderCredential.objects.filter(owner=owner, provider=provider).first()
    check = key_live_check(provider=provider, api_key=secret, credential_id=existing.pk if existing else None)
    if not check.ok:
        audit_record(
            "provider_key.validation_failed",
            target=existing or provider,
            changes={"hint": [existing.hint if existing else None, secret.hint], "status_detail": [None, check.reason]},
        )
        logger.info("provider key %s for %s refused for user %s", secret.hint, provider.name, owner.pk)
        raise ProviderKeyInvalidError(check.reason, param="api_key")
    try:
        return _credential_store(owner=owner, provider=provider, secret=secret, label=label)
    except IntegrityError:
        # Another request added this user's key for the provider meanwhile: this one replaces it.
        return _credential_store(owner=owner, provider=provider, secret=secret, label=label)


@sensitive_variables("secret")
@transaction.atomic
def _credential_store(*, owner, provider: Provider, secret: Secret, label: str) -> ProviderCredential:
    now = timezone.now()
    credential = ProviderCredential.objects.select_for_update().filter(owner=owner, provider=provider).first()
    if credential is None:
        credential = ProviderCredential(
            owner=owner,
            provider=provider,
            api_key=secret,
            label=label,
            hint=secret.hint,
            status=CredentialStatus.VALID,
            last_validated_at=now,
            confirmed_origin=provider.origin,  # the host it was just checked at, and given for
        )
        credential.save(force_insert=True)
        audit_record(
            "provider_key.add",
            target=credential,
            changes={"api_key": [None, True], "hint": [None, credential.hint], "label": [None, label]},
        )
        return credential
    before = {"hint": credential.hint, "label": credential.label, "status": credential.status}
    credential.api_key = secret
    credential.hint = secret.hint
    if label:
        credential.label = label
    credential.status = CredentialStatus.VALID
    credential.status_detail = ""
    credential.invalid_notice_due = False  # about the key replaced
    credential.last_validated_at = now
    credential.rotated_at = now
    credential.confirmed_origin = provider.origin  # a key given again is given for where the provider is now
    credential.save()
    changes = {"api_key": [True, True]}
    changes.update(
        {field: [old, getattr(credential, field)] for field, old in before.items() if old != getattr(credential, field)}
    )
    audit_record("provider_key.replace", target=credential, changes=changes)
    return credential


@transaction.atomic
def provider_credential_label_set(*, credential: ProviderCredential, label: str) -> ProviderCredential:
    if credential.label != label:
        credential.label = label
        credential.save(update_fields=["label", "updated_at"])
    return credential


@transaction.atomic
def provider_credential_delete(*, credential: ProviderCredential) -> None:
    """Delete the user's key: their requests go back to the provider's key (``optional``) or are refused
    (``required``)."""
    audit_record("provider_key.delete", target=credential, changes=_deleted_changes(credential))
    with audit_deletes_recorded(ProviderCredential, [credential.pk]):
        credential.delete()


def provider_credential_deleted_record(*, credential: ProviderCredential) -> None:
    """``provider_key.delete`` for a user's key deleted other than by these services (``.delete()`` in the shell or a
    command, the cascade of its owner's or its provider's delete there), from ``post_delete``: its hint, never the
    key. A key these services delete has its event from them."""
    if not audit_delete_recorded(credential):
        audit_record("provider_key.delete", target=credential, changes=_deleted_changes(credential))


def _deleted_changes(credential: ProviderCredential) -> dict[str, list[object]]:
    return {"api_key": [True, None], "hint": [credential.hint, None]}


@transaction.atomic
def providers_delete(*, provider_ids: Iterable[int]) -> None:
    """Delete providers (the admin's delete, of one or of a selection). Their users' own keys go with them (the
    cascade), each recorded as ``provider_key.delete`` as a key deleted alone is: read in one query (never
    decrypted) and recorded in one batch (``audit_records``), before the rows go."""
    ids = list(provider_ids)
    recorded = _credentials_delete_record(ProviderCredential.objects.filter(provider_id__in=ids))
    with audit_deletes_recorded(ProviderCredential, recorded):
        Provider.objects.filter(pk__in=ids).delete()


def owners_credentials_delete(*, owner_ids: Iterable[int]) -> None:
    """Delete the own keys of users about to be deleted (``accounts.signals.users_deleting``: the admin's delete of
    one user or of a selection), which their delete would take with it: one ``provider_key.delete`` a key, as a key
    deleted alone is, read in one query (never decrypted) and recorded in one batch, before their owners go."""
    owners = list(owner_ids)
    recorded = _credentials_delete_record(ProviderCredential.objects.filter(owner_id__in=owners))
    with audit_deletes_recorded(ProviderCredential, recorded):
        ProviderCredential.objects.filter(owner_id__in=owners).delete()


def _credentials_delete_record(credentials: QuerySet[ProviderCredential]) -> list[int]:
    """One ``provider_key.delete`` for each of ``credentials`` about to be deleted, in one batch; their ids."""
    credentials = credentials.select_related("provider").only("pk", "hint", "owner_id", "provider__name").order_by("pk")
    entries = [
        AuditEntry("provider_key.delete", target=credential, changes=_deleted_changes(credential))
        for credential in credentials
    ]
    audit_records(entries)
    return [entry.target.pk for entry in entries]


@dataclass(frozen=True, slots=True)
class Revalidation:
    valid: bool
    # This check turned the stored status to invalid (decided under the row's lock, so of two checks that
    # meet the same refusal at once, or a check and a refused request, one only sees the change).
    turned_invalid: bool = False


def provider_credential_validate(*, credential: ProviderCredential) -> bool:
    """Re-check a stored key live and record the outcome (status, status_detail, last_validated_at).
    Returns whether the provider accepts it. Raises ``ProviderKeyUncheckedError`` when the provider could
    not be asked (unreachable, timing out, answering something else): the stored status is then left as it
    is, since one failed call says nothing about the key. Raises ``ProviderKeyNotAcceptedError`` (nothing
    sent) when the provider is disabled or takes no users' keys."""
    return provider_credential_revalidate(credential=credential).valid


def provider_credential_revalidate(*, credential: ProviderCredential) -> Revalidation:
    """``provider_credential_validate``, also saying whether this check is the one that turned the key
    invalid (whose owner is then to be told)."""
    provider = credential.provider
    _not_accepted_check(provider)
    if credential.host_paused:
        raise ProviderKeyPausedError(credential.shown_status_detail)
    checked_key = credential.api_key
    check = key_live_check(provider=provider, api_key=checked_key, credential_id=credential.pk)
    return _revalidation_record(credential=credential, checked_key=checked_key, check=check)


def _revalidation_record(*, credential: ProviderCredential, checked_key: Secret, check: KeyCheck) -> Revalidation:
    """Store the outcome of a live re-check of ``checked_key`` on ``credential``; ``ProviderKeyUncheckedError``
    when the provider could not be asked (nothing stored)."""
    if not check.ok and not check.refused:
        raise ProviderKeyUncheckedError(check.reason)
    with transaction.atomic():
        current = ProviderCredential.objects.select_for_update().filter(pk=credential.pk).first()
        if current is None or current.api_key != checked_key:
            # Deleted or replaced while this check ran: the new key was checked when it was saved.
            return Revalidation(check.ok)
        old_status = current.status
        current.status = CredentialStatus.VALID if check.ok else CredentialStatus.INVALID
        current.status_detail = "" if check.ok else check.reason[:300]
        current.last_validated_at = timezone.now()
        turned_invalid = not check.ok and old_status != CredentialStatus.INVALID
        # The owner is to be told, until an email is sent (provider_credential_invalid_notify).
        current.invalid_notice_due = turned_invalid or (current.invalid_notice_due and not check.ok)
        fields = ["status", "status_detail", "last_validated_at", "invalid_notice_due", "updated_at"]
        current.save(update_fields=fields)
        if turned_invalid:
            audit_record(
                "provider_key.validation_failed",
                target=current,
                changes={"status": [old_status, current.status], "status_detail": [None, current.status_detail]},
            )
    for field in fields:
        setattr(credential, field, getattr(current, field))
    return Revalidation(check.ok, turned_invalid)


@transaction.atomic
def provider_credential_host_confirm(*, credential: ProviderCredential) -> ProviderCredential:
    """The owner agrees that their key may go where its provider sends requests now: a key paused by the
    provider's move to another host is used again (audited as ``provider_key.host_confirm``)."""
    current = ProviderCredential.objects.select_for_update().select_related("provider").get(pk=credential.pk)
    origin = current.provider.origin
    if current.confirmed_origin != origin:
        audit_record(
            "provider_key.host_confirm",
            target=current,
            changes={"confirmed_host": [current.confirmed_origin, origin]},
        )
        current.confirmed_origin = origin
        # ``save``: the signal drops the owner's cached keys (everywhere, through the broadcast).
        current.save(update_fields=["confirmed_origin", "updated_at"])
    return current


@dataclass(frozen=True, slots=True)
class HostChange:
    paused: int  # keys agreed for the former host: not used until their owners confirm the new one
    resumed: int  # keys agreed for the new host already (it was moved back): used again, unasked


def provider_host_change_record(*, provider: Provider, old_origin: str) -> HostChange:
    """After ``provider`` was moved from ``old_origin`` to another host: count the users' keys this pauses and
    resumes, audit it (``provider.host_change``), and tell each owner whose key it pauses by email, once (at
    this move, which gets an id of its own: ``HostMoveNotice``). The keys themselves need no write: a key is used
    only where its ``confirmed_origin`` is the provider's host (``providers.byok.usable_credential``). Called by
    each path that moves a provider: the admin's change form and the catalog file (``catalog_file.providers_load``)."""
    new_origin = provider.origin
    if new_origin == old_origin:
        return HostChange(0, 0)
    keys = ProviderCredential.objects.filter(provider=provider)
    paused = list(keys.filter(confirmed_origin=old_origin).values_list("pk", flat=True))
    resumed = keys.filter(confirmed_origin=new_origin).count()
    audit_record(
        "provider.host_change",
        target=provider,
        changes={"host": [old_origin, new_origin], "keys_paused": [None, len(paused)], "keys_resumed": [None, resumed]},
    )
    if paused:
        move = uuid.uuid4().hex
        transaction.on_commit(partial(_host_moved_queue, paused, old_origin, new_origin, move), robust=True)
    return HostChange(len(paused), resumed)


def _host_moved_queue(credential_ids: list[int], old_origin: str, new_origin: str, move: str) -> None:
    # After commit, one message for the whole move, which a worker splits into a task per key: a provider
    # holding thousands of users' keys is not moved by a request (or a load) that sends thousands of emails, or
    # publishes thousands of messages to a broker that may be slow; each email is retried on its own.
    from ..tasks_credentials import provider_credentials_host_moved_emails

    try:
        provider_credentials_host_moved_emails.delay(credential_ids, old_origin, new_origin, move)
    except Exception:  # the broker could not take it: the keys are paused either way (their page and API say so)
        logger.exception("the owners of %d provider key(s) could not be emailed about their pause", len(credential_ids))


# What a move's notice records once its email is sent (``HostMoveNotice.delivered``).
HOST_MOVE_EMAIL = "email"


def host_move_id(move: str, old_origin: str, new_origin: str) -> str:
    """The move's id; for a message queued by a release that gave moves none, one made from the hosts (the same for
    every message of that move)."""
    return move or uuid.uuid5(uuid.NAMESPACE_URL, f"{old_origin} {new_origin}").hex


def host_move_notices_unsent(*, credential_ids: list[int], move: str) -> list[int]:
    """Those of ``credential_ids`` whose owner was not emailed about ``move`` yet, in their order: a run of the move's
    emails again queues no task for the others."""
    sent: set[int] = set()
    for batch in id_batches(credential_ids):
        notices = HostMoveNotice.objects.filter(move=move, credential_id__in=batch).values_list(
            "credential_id", "delivered"
        )
        sent.update(credential_id for credential_id, delivered in notices if HOST_MOVE_EMAIL in delivered)
    return [credential_id for credential_id in credential_ids if credential_id not in sent]


def host_move_notice_claim(*, credential: ProviderCredential, move: str) -> int | None:
    """The right to email ``credential``'s owner about ``move``: its notice's id, or None when that email was sent
    already or another task is sending it (a claim younger than its lease, ``core.outbox.delivery_claim``)."""
    notice, _ = HostMoveNotice.objects.get_or_create(credential=credential, move=move)
    if not delivery_claim(HostMoveNotice, notice.pk, HOST_MOVE_EMAIL, delivered_field="delivered"):
        return None
    return notice.pk


def provider_credential_host_moved_notify(
    *, credential: ProviderCredential, old_origin: str, new_origin: str, notice_id: int
) -> bool:
    """Tell the key's owner by email that their key is paused: its provider now sends requests to another host
    than the one they gave it for; the move's notice ``notice_id`` (claimed, ``host_move_notice_claim``) recorded
    sent. False when they have no address. An email that raises leaves the notice claimed, for the caller to
    release (``core.outbox.delivery_failed``)."""
    owner = credential.owner
    if not owner.email:
        delivery_release(HostMoveNotice, notice_id, HOST_MOVE_EMAIL, state=DeliveryState.NOBODY)
        return False
    provider = credential.provider.name
    label = f" ({credential.label})" if credential.label else ""
    send_mail(
        subject=f"[llmhub] Your {provider} API key {credential.hint} is paused: the provider moved",
        message=(
            f"Hello {owner.get_username()},\n\n"
            f"Your own API key {credential.hint}{label} for the provider {provider} is paused.\n"
            f"{host_moved_detail(provider, old_origin, new_origin)}\n\n"
            "Until you confirm, your requests to this provider use the platform's key where it allows that, and "
            "are refused where it requires your own key. Confirm the new host, or delete the key, on the Provider "
            "keys page (/provider-keys/) or with POST /api/provider-keys/{id}/confirm-host/.\n"
        ),
        from_email=None,
        recipient_list=[owner.email],
    )
    delivery_done(HostMoveNotice, notice_id, HOST_MOVE_EMAIL, delivered_field="delivered")
    return True


def provider_credential_invalid_notify(*, credential: ProviderCredential) -> bool:
    """Tell the key's owner by email that the provider now refuses it; False when they have no address.
    The key's ``invalid_notice_due`` (set when it turned invalid) is cleared as the email is claimed (nothing is
    sent when it is no longer set), and set again by an email that raises, for the task's retry
    (``provider_credential_invalid_notice_queue``) and past its retries the next daily check
    (``provider_credentials_invalid_notices_send``)."""
    owner = credential.owner
    # Claimed before the email goes out: the refused request's task and the daily run's backstop can reach one
    # notice at the same moment, and each would send it. Whoever clears the flag sends; a failed email sets it
    # again, for the retry.
    claimed = ProviderCredential.objects.filter(pk=credential.pk, invalid_notice_due=True).update(
        invalid_notice_due=False
    )
    if not claimed or not owner.email:
        return False
    provider = credential.provider.name
    label = f" ({credential.label})" if credential.label else ""
    try:
        send_mail(
            subject=f"[llmhub] Your {provider} API key {credential.hint} was refused",
            message=(
                f"Hello {owner.get_username()},\n\n"
                f"Your own API key {credential.hint}{label} for the provider {provider} was checked today and "
                f"refused:\n{credential.status_detail}\n\n"
                "Until you replace it, your requests to this provider use the platform's key where it allows that, "
                "and are refused where it requires your own key. Replace or delete it on the Provider keys page "
                "(/provider-keys/) or with POST /api/provider-keys/.\n"
            ),
            from_email=None,
            recipient_list=[owner.email],
        )
    except BaseException:
        ProviderCredential.objects.filter(pk=credential.pk).update(invalid_notice_due=True)
        raise
    return True


def provider_credential_invalid_notice_queue(credential_id: int) -> bool:
    """Have the owner of a key that just turned invalid emailed, from a Celery task retried while the mail server
    fails (``provider_credential_invalid_email``). A broker that cannot take it is logged: the notice stays due
    (``invalid_notice_due``) and the next daily run sends it. Returns whether the task was queued."""
    from ..tasks_credentials import provider_credential_invalid_email

    try:
        provider_credential_invalid_email.delay(credential_id)
    except Exception as exc:
        time_limit_reraise(exc)
        logger.exception("the owner of provider key %s could not be emailed; tried again next run", credential_id)
        return False
    return True


def provider_credentials_invalid_notices_send(*, failed: list[int] | None = None) -> int:
    """Email the owners of invalid keys whose notice is still due (its email failed when the key turned
    invalid, in a daily check or on a refused request), each on its own: one whose email fails is logged, its
    key's id appended to ``failed``, and stays due for the next run. Returns how many were sent."""
    failed = [] if failed is None else failed
    due = ProviderCredential.objects.filter(invalid_notice_due=True, status=CredentialStatus.INVALID)
    sent = 0
    for credential in due.select_related("provider", "owner").order_by("pk"):
        try:
            sent += provider_credential_invalid_notify(credential=credential)
        except Exception as exc:
            time_limit_reraise(exc)
            failed.append(credential.pk)
            logger.exception("the owner of provider key %s could not be emailed; tried again next run", credential.pk)
    return sent


def provider_credentials_revalidate_due(
    *, concurrency: int, max_seconds: float, notices_failed: list[int] | None = None
) -> dict[str, int]:
    """The daily re-check of every stored key of an enabled provider that takes users' keys, those checked (or
    tried) longest ago, or never, first: ``concurrency`` checks at a time, and none started after ``max_seconds``
    (those running then end within their own timeout), so that a run over thousands of keys at a slow
    provider still ends the same day. What it did not reach is counted ``left``: checked longest ago, it comes
    first in the next run. A provider holding more checks than another waits for it, so that one slow
    provider cannot take every slot from the others. A key the provider now refuses turns invalid and its owner
    is emailed, once (an email that fails is sent again at the next run). A provider that cannot be asked leaves
    its keys as they were (not checked, good or bad), but those tried move behind the others (``unchecked_at``),
    and after ``PROVIDER_DOWN_AFTER`` checks in a row it did not answer, the run asks it no more (its other keys are
    ``left``): a provider down for days neither has the same keys tried first every run nor takes the run's time
    from the others. Returns counts; the ids of keys whose due notice could not be emailed, or whose new notice
    the broker did not take, are appended to ``notices_failed``."""
    # The later of the last check and the last try that could not check: the one null when the other is not.
    touched = Greatest(Coalesce("last_validated_at", "unchecked_at"), Coalesce("unchecked_at", "last_validated_at"))
    due = (
        ProviderCredential.objects.filter(provider__enabled=True)
        .exclude(provider__byok=ByokMode.DISABLED)
        .order_by(touched.asc(nulls_first=True), "pk")
        .values_list("pk", "provider_id")
    )
    # Notices whose email failed before, first: a key already invalid does not turn invalid again.
    provider_credentials_invalid_notices_send(failed=notices_failed)
    return _revalidate_in_order(due, concurrency=concurrency, max_seconds=max_seconds, notices_failed=notices_failed)


def provider_credentials_revalidate(
    *, credential_ids: Iterable[int], concurrency: int, max_seconds: float, notices_failed: list[int] | None = None
) -> dict[str, int]:
    """An admin's "check again" of the keys ``credential_ids`` (hundreds, selected across the list: a worker's
    task, ``provider_credentials_revalidate_selected``), as the daily run checks them: ``concurrency`` at a time,
    each provider its share, none started after ``max_seconds``, each outcome recorded as ``provider_credential_
    validate`` records it (a key refused turns invalid, its owner emailed once). A key deleted since, of a provider
    disabled or closed to users' keys, or paused by its provider's move, is sent nowhere. Returns counts; the ids
    of keys turned invalid whose notice the broker did not take (it stays due) are appended to ``notices_failed``."""
    rows = [
        row
        for batch in id_batches(sorted(set(credential_ids)))
        for row in ProviderCredential.objects.filter(pk__in=batch).order_by("pk").values_list("pk", "provider_id")
    ]
    return _revalidate_in_order(rows, concurrency=concurrency, max_seconds=max_seconds, notices_failed=notices_failed)


def _revalidate_in_order(
    rows: Iterable[tuple[int, int]], *, concurrency: int, max_seconds: float, notices_failed: list[int] | None = None
) -> dict[str, int]:
    """Check the keys ``rows`` (key, provider), in their order within each provider (``_revalidate_queued``);
    counts of the outcomes, and of the keys ``left`` when ``max_seconds`` ran out. A key turned invalid whose
    notice the broker did not take is appended to ``notices_failed`` (its notice stays due)."""
    notices_failed = [] if notices_failed is None else notices_failed
    queues: dict[int, deque[int]] = {}
    place: dict[int, int] = {}
    for position, (credential_id, provider_id) in enumerate(rows):
        queues.setdefault(provider_id, deque()).append(credential_id)
        place[credential_id] = position
    counts = {"valid": 0, "invalid": 0, "turned_invalid": 0, "unchecked": 0, "left": 0}
    run_async(
        _revalidate_queued,
        queues,
        place,
        counts,
        concurrency=max(1, concurrency),
        max_seconds=max_seconds,
        notices_failed=notices_failed,
    )
    counts["left"] = sum(len(queue) for queue in queues.values())
    return counts


async def _revalidate_queued(
    queues: dict[int, deque[int]],
    place: dict[int, int],
    counts: dict[str, int],
    *,
    concurrency: int,
    max_seconds: float,
    notices_failed: list[int],
) -> None:
    """Check the keys of ``queues`` (by provider id, oldest checked first) with ``concurrency`` workers until
    they are empty or ``max_seconds`` have passed; what is not taken stays in ``queues``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    in_flight: Counter[int] = Counter()
    # By provider: its checks in a row that it did not answer; at ``PROVIDER_DOWN_AFTER``, it is given up.
    unanswered: Counter[int] = Counter()

    def take() -> tuple[int, int] | None:
        # The provider with the fewest checks running, then the key checked longest ago: a provider whose
        # checks wait out their timeout holds no more slots than the others while they have keys to check.
        waiting = [p for p, queue in queues.items() if queue and unanswered[p] < PROVIDER_DOWN_AFTER]
        if not waiting:
            return None
        provider_id = min(waiting, key=lambda p: (in_flight[p], place[queues[p][0]]))
        in_flight[provider_id] += 1
        return provider_id, queues[provider_id].popleft()

    async def worker() -> None:
        while loop.time() < deadline and (taken := take()) is not None:
            provider_id, credential_id = taken
            try:
                outcomes, down = await _revalidate_one(credential_id, notices_failed)
            finally:
                in_flight[provider_id] -= 1
            for outcome in outcomes:
                counts[outcome] += 1
            unanswered[provider_id] = unanswered[provider_id] + 1 if down else 0
            if down and unanswered[provider_id] == PROVIDER_DOWN_AFTER and queues[provider_id]:
                logger.warning(
                    "provider %s did not answer %d key checks in a row: its %d other key(s) are left for the next run",
                    provider_id,
                    PROVIDER_DOWN_AFTER,
                    len(queues[provider_id]),
                )

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _credential_for_check(credential_id: int) -> ProviderCredential | None:
    """The key as it is now; None when it was deleted, or its provider closed to users' keys, since the run
    began (such a key is sent nowhere)."""
    credential = ProviderCredential.objects.select_related("provider", "owner").filter(pk=credential_id).first()
    if credential is None or not credential.provider.enabled or credential.provider.byok == ByokMode.DISABLED:
        return None
    if credential.host_paused:  # the provider was moved to a host its owner has not agreed to
        return None
    return credential


def _credential_unchecked_record(credential_id: int) -> None:
    """The daily check tried the key and could not check it: nothing is said of the key (its status and
    ``last_validated_at`` stay), but it was tried, which puts it behind the others in the next run. A queryset
    update: no cached state depends on it."""
    ProviderCredential.objects.filter(pk=credential_id).update(unchecked_at=timezone.now())


async def _revalidate_one(credential_id: int, notices_failed: list[int]) -> tuple[tuple[str, ...], bool]:
    """Re-check one key: the counts it adds to, and whether its provider did not answer (``KeyCheck.down``); a key
    turned invalid whose notice the broker did not take goes in ``notices_failed``. The database is reached through
    ``sync_to_async``: the caller's thread, one query at a time, while the live checks run side by side."""
    try:
        credential = await sync_to_async(_credential_for_check)(credential_id)
    except Exception as exc:
        time_limit_reraise(exc)
        logger.exception("provider key %s could not be loaded for its daily check", credential_id)
        return ("unchecked",), False
    if credential is None:
        return (), False
    checked_key = credential.api_key
    try:
        check = await key_live_acheck(provider=credential.provider, api_key=checked_key, credential_id=credential_id)
        if not check.ok and not check.refused:
            logger.warning("provider key %s (%s) not checked: %s", credential_id, credential.hint, check.reason)
            await sync_to_async(_credential_unchecked_record)(credential_id)
            return ("unchecked",), check.down
        checked = await sync_to_async(_revalidation_record)(credential=credential, checked_key=checked_key, check=check)
    except Exception as exc:
        time_limit_reraise(exc)
        logger.exception("provider key %s (%s) could not be checked", credential_id, credential.hint)
        return ("unchecked",), False
    if not checked.turned_invalid:
        return (("valid",) if checked.valid else ("invalid",)), False
    if not await sync_to_async(provider_credential_invalid_notice_queue)(credential_id):
        notices_failed.append(credential_id)
    return ("invalid", "turned_invalid"), False
