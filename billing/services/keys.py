"""Gateway API keys: creation, rotation, revocation, deletion and the cached, constant-time lookup on
every request.

A key reads ``sk-llmhub-<prefix 8>-<secret 32>``. The database keeps the prefix (to show the user
which key is which) and a SHA-256 of the whole key. SHA-256 rather than a slow password hash is
deliberate: the key is 190 bits of randomness, so brute force is hopeless either way, and the hash
is computed on every request. The lookup is by hash; the final comparison is constant-time.

Rotation gives a key a new secret (and a new prefix) while the key keeps its id, owner, limits, children
and ledger; the secret before it keeps working for a grace period (``previous_secret_hash`` until
``previous_secret_expires_at``). Every change here is written to the audit log (``key.create``,
``key.change``, ``key.rotate``, ``key.revoke``, ``key.delete``) with the prefix, never a secret or its hash.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Case, Q, QuerySet, Value, When
from django.utils import timezone

from audit.services import AuditEntry, audit_delete_recorded, audit_deletes_recorded, audit_record, audit_records
from core.cache import TTLCache, forget_now_and_after_commit
from core.exceptions import ApplicationError
from core.id_batches import id_batches
from providers.models import CatalogModel

from ..models import ApiKey, ApiKeyHeir, BudgetPeriod, DailyUsage, KeyScope, UsageRecord
from ..selectors import api_key_ancestor_ids, api_key_subtree_ids, api_keys_subtree, limits_cache

KEY_PREFIX = "sk-llmhub-"
# How many keys may stand above a key. Creation refuses deeper chains; the lookup treats a deeper one
# (rows edited by hand into a loop) as revoked.
MAX_KEY_DEPTH = 8
# A grace period is for clients to switch to the new secret, not a second lifetime for the old one.
MAX_ROTATION_GRACE_SECONDS = 30 * 86400
_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


class AuthenticationFailed(ApplicationError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


@dataclass(frozen=True, slots=True)
class KeyPrincipal:
    """What the request path needs to know about a key, cacheable across requests."""

    key_id: int
    user_id: int
    username: str
    prefix: str
    secret_hash: str
    expires_at: datetime | None  # the earliest expiry of the key and every key above it
    allowed_model_ids: frozenset[int] | None  # None: no key-level restriction; else what the whole chain allows
    scopes: frozenset[str] = frozenset()
    # Set when the lookup was by the secret a rotation replaced: when its grace period ends. Kept in the
    # cached copy, so that every process refuses it from that moment, whatever its cache holds.
    rotated_out_at: datetime | None = None

    def rotated_out(self, now: datetime) -> bool:
        return self.rotated_out_at is not None and self.rotated_out_at <= now


key_cache: TTLCache[KeyPrincipal | None] = TTLCache("api-keys")


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class CreatedKey:
    api_key: ApiKey
    secret: str = field(repr=False)  # shown to the user once, never stored, never in a traceback


@transaction.atomic
def api_key_create(
    *,
    user,
    name: str = "default",
    expires_at: datetime | None = None,
    allowed_models: Iterable[CatalogModel] = (),
    budget_usd: Decimal | None = None,
    budget_period: str = BudgetPeriod.MONTHLY,
    rpm: int | None = None,
    tpm: int | None = None,
    scopes: Iterable[str] = (),
    parent: ApiKey | None = None,
) -> CreatedKey:
    """``allowed_models`` empty: the key may use every model its owner's plan allows.

    ``parent``: the key creating this one. The new key belongs to the parent's owner and may not exceed
    the parent in anything (``api_key_within_parent_check``); an ``ApplicationError`` names the field that does."""
    allowed_models = list(allowed_models)
    scopes = sorted({str(scope) for scope in scopes})
    if expires_at is not None and expires_at <= timezone.now():
        raise _invalid("expires_at", "expires_at must be in the future.")
    unknown = [scope for scope in scopes if scope not in KeyScope.values]
    if unknown:
        raise _invalid("scopes", f"Unknown scope {unknown[0]!r}; choose from {', '.join(KeyScope.values)}.")
    if budget_usd is not None and budget_usd < 0:
        raise _invalid("budget_usd", "A budget cannot be negative.")
    if budget_period not in BudgetPeriod.values:
        raise _invalid("budget_period", f"Choose one of {', '.join(BudgetPeriod.values)}.")
    for param, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise _invalid(param, "A rate limit must be at least 1.")
    if parent is not None:
        if parent.user_id != user.pk:
            raise _invalid("parent", "A key can only create keys for its own owner.")
        if not parent.is_active:
            raise _invalid("parent", "A revoked or expired key cannot create keys.")
        if len(api_key_ancestor_ids(parent.pk)) >= MAX_KEY_DEPTH:
            raise _invalid("parent", f"Keys may be created at most {MAX_KEY_DEPTH} levels below a person's key.")
        api_key_within_parent_check(
            parent,
            expires_at=expires_at,
            allowed_models=allowed_models,
            budget_usd=budget_usd,
            budget_period=budget_period,
            rpm=rpm,
            tpm=tpm,
            scopes=scopes,
        )
    prefix, secret = _new_secret()
    api_key = ApiKey.objects.create(
        user=user,
        name=name or "default",
        prefix=prefix,
        secret_hash=hash_key(secret),
        expires_at=expires_at,
        budget_usd=budget_usd,
        budget_period=budget_period,
        rpm=rpm,
        tpm=tpm,
        scopes=scopes,
        parent=parent,
    )
    api_key.allowed_models.set(allowed_models)
    audit_record(
        "key.create",
        target=api_key,
        changes={
            "user": [None, user.get_username()],
            "name": [None, api_key.name],
            "prefix": [None, prefix],
            "parent": [None, parent.prefix if parent is not None else None],
            "expires_at": [None, _iso(expires_at)],
            "scopes": [None, scopes],
            "allowed_models": [None, sorted(model.name for model in allowed_models)],
            "budget_usd": [None, _recorded(budget_usd)],
            "budget_period": [None, budget_period],
            "rpm": [None, rpm],
            "tpm": [None, tpm],
        },
    )
    return CreatedKey(api_key=api_key, secret=secret)


# What a person may change on a key after its creation (the admin's change form); its owner, secret and
# place under another key never change.
KEY_CHANGEABLE_FIELDS = ("name", "expires_at", "scopes", "budget_usd", "budget_period", "rpm", "tpm")


def _recorded(value: object) -> object:
    if isinstance(value, datetime):
        return _iso(value)
    return str(value) if isinstance(value, Decimal) else value


@transaction.atomic
def api_key_change(*, api_key: ApiKey, allowed_models: Iterable[CatalogModel] | None = None) -> ApiKey:
    """Save the changeable fields a caller has set on ``api_key`` and, if given, its list of models, and
    record one ``key.change`` event with what changed (nothing when nothing did): a key's budget, expiry,
    scopes and models are what an auditor looks for, whoever changed them."""
    before = ApiKey.objects.select_for_update().filter(pk=api_key.pk).values(*KEY_CHANGEABLE_FIELDS).get()
    api_key.scopes = sorted({str(scope) for scope in api_key.scopes or ()})
    api_key.save(update_fields=KEY_CHANGEABLE_FIELDS)
    changes = {
        name: [_recorded(before[name]), _recorded(getattr(api_key, name))]
        for name in KEY_CHANGEABLE_FIELDS
        if before[name] != getattr(api_key, name)
    }
    if allowed_models is not None:
        old_models = sorted(api_key.allowed_models.values_list("name", flat=True))
        api_key.allowed_models.set(allowed_models)
        new_models = sorted(api_key.allowed_models.values_list("name", flat=True))
        if new_models != old_models:
            changes["allowed_models"] = [old_models, new_models]
    if changes:
        audit_record("key.change", target=api_key, changes=changes)
    return api_key


def _new_secret() -> tuple[str, str]:
    prefix = KEY_PREFIX + _random(8)
    return prefix, f"{prefix}-{_random(32)}"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def api_key_rotate(*, api_key: ApiKey, grace_seconds: float | None = None) -> CreatedKey:
    """Give the key a new secret; the one it had keeps working for ``grace_seconds`` (default
    ``LLMHUB_KEY_ROTATION_GRACE_SECONDS``; 0: it stops at once), then gets 401 in every process (its cached
    lookup carries the end of the grace). A secret replaced by an earlier rotation stops now: only the
    newest previous secret has a grace period. The key keeps its id, limits, children and ledger.

    The prefix changes with the secret: it is how a person tells which secret a client holds, so during
    the grace period a client still sending the old one shows the old prefix, not the listed one.
    Refused for a revoked or expired key (a new secret would not work either)."""
    grace = _rotation_grace(grace_seconds)
    with transaction.atomic():
        # Locked: two rotations at once must not both take the same secret as "previous".
        locked = ApiKey.objects.select_for_update().get(pk=api_key.pk)
        if locked.revoked_at is not None:
            raise _invalid("key", "A revoked key cannot be rotated: create a new key.")
        if not locked.is_active:
            raise _invalid("key", "An expired key cannot be rotated: create a new key.")
        secret, replaced, entry = _rotate(locked, grace=grace, now=timezone.now())
        locked.save(update_fields=ROTATED_FIELDS)
        audit_records([entry])
        _forget_secrets(replaced)
    return CreatedKey(api_key=locked, secret=secret)


def api_keys_rotate(
    *, api_key_ids: Iterable[int], grace_seconds: float | None = None
) -> tuple[list[tuple[CreatedKey, str]], list[ApiKey]]:
    """``api_key_rotate`` for many keys at once (an admin's selection across the list): each active one gets a new
    secret, with its event; a few queries for each ``IDS_A_STATEMENT`` keys, not a few a key. Returns the keys
    rotated with their new secrets, each with the prefix it had, and those not rotated (revoked or expired), in the
    keys' order."""
    grace = _rotation_grace(grace_seconds)
    rotated: list[tuple[CreatedKey, str]] = []
    skipped: list[ApiKey] = []
    replaced: list[str | None] = []
    entries: list[AuditEntry] = []
    with transaction.atomic():
        now = timezone.now()
        for batch in id_batches(sorted(set(api_key_ids))):
            changed: list[ApiKey] = []
            for locked in ApiKey.objects.select_for_update().filter(pk__in=batch).order_by("pk"):
                if not locked.is_active:
                    skipped.append(locked)
                    continue
                was = locked.prefix
                secret, gone, entry = _rotate(locked, grace=grace, now=now)
                changed.append(locked)
                rotated.append((CreatedKey(api_key=locked, secret=secret), was))
                replaced += gone
                entries.append(entry)
            # No save signal: a new secret changes nothing the keys below carry in their cached lookups (which keys
            # are above them, revoked or expiring); the replaced secrets are forgotten below.
            ApiKey.objects.bulk_update(changed, ROTATED_FIELDS)
        audit_records(entries)
        _forget_secrets(replaced)
    return rotated, skipped


ROTATED_FIELDS = ["prefix", "secret_hash", "previous_secret_hash", "previous_secret_expires_at", "rotated_at"]


def _rotation_grace(grace_seconds: float | None) -> float:
    grace = settings.LLMHUB_KEY_ROTATION_GRACE_SECONDS if grace_seconds is None else grace_seconds
    if not 0 <= grace <= MAX_ROTATION_GRACE_SECONDS:
        raise _invalid(
            "grace_seconds", f"A grace period is between 0 and {MAX_ROTATION_GRACE_SECONDS} seconds (30 days)."
        )
    return grace


def _rotate(locked: ApiKey, *, grace: float, now: datetime) -> tuple[str, list[str | None], AuditEntry]:
    """A new secret on ``locked`` (a row locked, unsaved): the secret, the digests it replaces (to forget) and its
    event."""
    replaced = [locked.secret_hash, locked.previous_secret_hash]
    before = {"prefix": locked.prefix, "grace_until": _iso(locked.previous_secret_expires_at)}
    prefix, secret = _new_secret()
    if grace > 0:
        locked.previous_secret_hash = locked.secret_hash
        locked.previous_secret_expires_at = now + timedelta(seconds=grace)
    else:
        locked.previous_secret_hash = None
        locked.previous_secret_expires_at = None
    locked.prefix, locked.secret_hash, locked.rotated_at = prefix, hash_key(secret), now
    entry = AuditEntry(
        "key.rotate",
        target=locked,
        changes={
            "prefix": [before["prefix"], prefix],
            "grace_until": [before["grace_until"], _iso(locked.previous_secret_expires_at)],
            "grace_seconds": [None, grace],
        },
    )
    return secret, replaced, entry


def _invalid(param: str, message: str) -> ApplicationError:
    return ApplicationError(message, param=param, code="invalid_value")


def api_key_within_parent_check(
    parent: ApiKey,
    *,
    expires_at: datetime | None,
    allowed_models: list[CatalogModel],
    budget_usd: Decimal | None,
    budget_period: str,
    rpm: int | None,
    tpm: int | None,
    scopes: list[str],
) -> None:
    """A child never has more than its parent. Where the parent has a limit the child must state one
    (no larger); "no limit" is never inherited silently, so that the child's row says what it may do.

    Budgets: the same period, or ``total`` (which never resets, so it is never more than the same amount
    per period). Admission charges every key above the child as well, so the parent's budget holds
    across all of its children together whatever they were given."""
    if parent.expires_at is not None and (expires_at is None or expires_at > parent.expires_at):
        raise _invalid(
            "expires_at",
            f"This key expires at {parent.expires_at.isoformat()}: a key it creates must expire no later.",
        )
    parent_models = {model.pk: model.name for model in parent.allowed_models.all()}
    if parent_models:
        extra = [model.name for model in allowed_models if model.pk not in parent_models]
        if not allowed_models or extra:
            allowed = ", ".join(sorted(parent_models.values()))
            raise _invalid(
                "allowed_models",
                f"This key is restricted to {allowed}: a key it creates must list some of these models and no other"
                + (f" (not {', '.join(extra)})." if extra else "."),
            )
    if parent.budget_usd is not None:
        if budget_usd is None or budget_usd > parent.budget_usd:
            raise _invalid(
                "budget_usd",
                f"This key has a {parent.budget_period} budget of ${parent.budget_usd}: a key it creates must have "
                "a budget no larger.",
            )
        if budget_period not in (parent.budget_period, BudgetPeriod.TOTAL):
            raise _invalid(
                "budget_period",
                f"This key's budget is {parent.budget_period}: a key it creates must have a {parent.budget_period} "
                "or a total budget.",
            )
    for param, mine, theirs in (("rpm", rpm, parent.rpm), ("tpm", tpm, parent.tpm)):
        if theirs is not None and (mine is None or mine > theirs):
            raise _invalid(param, f"This key allows {theirs} {param}: a key it creates must allow no more.")
    extra_scopes = sorted(set(scopes) - set(parent.scopes))
    if extra_scopes:
        raise _invalid("scopes", f"This key does not hold the scope {extra_scopes[0]!r}, so it cannot grant it.")


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoking a key stops the keys created under it too (they are valid only while it is), and both of
    its secrets during a rotation's grace period: their cached copies in this process are dropped with its
    own. Revoking twice keeps the first ``revoked_at`` and records one event."""
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        audit_record("key.revoke", target=api_key, changes={"revoked_at": [None, _iso(api_key.revoked_at)]})
    key_cache_forget(api_key_ids=[api_key.pk])
    return api_key


def api_keys_revoke(*, api_key_ids: Iterable[int]) -> int:
    """``api_key_revoke`` for many keys at once (an admin's selection across the list): those not revoked yet
    are, each with its event, and the cached lookups of every one and of every key below them are dropped. A few
    queries for each ``IDS_A_STATEMENT`` keys, not a few a key. Returns how many were revoked."""
    ids = sorted(set(api_key_ids))
    with transaction.atomic():
        now = timezone.now()
        revoked: list[ApiKey] = []
        for batch in id_batches(ids):
            found = ApiKey.objects.select_for_update().filter(pk__in=batch, revoked_at__isnull=True)
            keys = list(found.only("pk", "prefix", "name").order_by("pk"))
            ApiKey.objects.filter(pk__in=[key.pk for key in keys]).update(revoked_at=now)
            revoked += keys
        audit_records(
            AuditEntry("key.revoke", target=key, changes={"revoked_at": [None, _iso(now)]}) for key in revoked
        )
        subtree = api_keys_subtree(ids)
        for pk in subtree:
            limits_cache.invalidate(("key", pk))
        _forget_secrets(_secrets_of(subtree))
    return len(revoked)


def api_key_delete(*, api_key: ApiKey) -> None:
    """Delete a key and the keys created under it. Their ledger and rollup rows go to the key above it, which
    answered for their spend (its budget and those above it keep counting it: ``api_keys_delete``); a person's key's
    rows keep no key. Revoking is usually what a person wants: a deleted key's rows no longer say which key spent."""
    api_keys_delete(api_key_ids=[api_key.pk])


# Keys deleted a statement: Django's delete sets to null what refers to them (the ledger's rows, alerts,
# conversations, responses) naming every key of a batch and of the keys below them. The ledger's and the daily
# rollup's rows of keys with a key left above them are moved to it as many keys a statement.
KEYS_A_DELETE = 100


@transaction.atomic
def api_keys_delete(*, api_key_ids: Iterable[int]) -> int:
    """Delete these keys and the keys created under them, one event a key deleted (a key selected under another
    selected one goes with that one, in its ``keys_below``), both secrets of every one forgotten. A few queries
    for each batch of keys, not a few a key (an admin's selection across the list). Returns how many events.

    A key deleted under a key that stays (the nearest above it not deleted with it) leaves its spend to that key:
    its ledger rows and ``DailyUsage`` rows are that key's (``_spend_moved_up``), so that the budgets above it,
    summed from their subtrees' rows, keep counting what it spent; without, the reconcile took it off them and a
    parent could spend its budget again. A whole tree deleted (a person's key, a user's keys) leaves its rows
    without a key, its owner's figures keeping them."""
    ids = set(api_key_ids)
    subtree = api_keys_subtree(ids)
    selected = ids & subtree.keys()
    rows = {
        pk: (parent_id, prefix, name)
        for batch in id_batches(sorted(subtree))
        for pk, parent_id, prefix, name in ApiKey.objects.filter(pk__in=batch).values_list(
            "pk", "parent_id", "prefix", "name"
        )
    }
    children: dict[int | None, list[int]] = {}
    for pk, (parent_id, _prefix, _name) in rows.items():
        children.setdefault(parent_id, []).append(pk)
    tops = sorted(pk for pk in selected if not _under(pk, selected, rows))
    secrets_of = _secrets_of(subtree)
    entries = []
    for top in tops:
        below = [rows[pk][1] for pk in _below(top, children) if pk != top]
        _parent, prefix, name = rows[top]
        entries.append(
            AuditEntry(
                "key.delete",
                target_type=ApiKey._meta.label_lower,
                target_id=top,
                target_repr=str(ApiKey(prefix=prefix, name=name)),
                changes={"prefix": [prefix, None], "keys_below": [sorted(below), []]},
            )
        )
    heirs: dict[int, int] = {}
    for top in tops:
        parent_id = rows[top][0]
        if parent_id is not None and parent_id not in subtree:  # not a loop made by hand
            heirs.update(dict.fromkeys(_below(top, children), parent_id))
    _spend_moved_up(heirs)
    with audit_deletes_recorded(ApiKey, subtree):
        for batch in id_batches(tops, KEYS_A_DELETE):
            ApiKey.objects.filter(pk__in=batch).delete()
    audit_records(entries)
    _forget_secrets(secrets_of)
    return len(entries)


def _spend_moved_up(heirs: dict[int, int]) -> None:
    """Give the ledger's and the daily rollup's rows of each key of ``heirs`` (being deleted) to its heir (the key
    above it that stays), before the delete would set them to null: one ``UPDATE`` of each table a batch of
    ``KEYS_A_DELETE`` keys, whatever their heirs. The ledger finds a key's rows in its ``(api_key_id, created_at)``
    index, the rollup in its ``api_key_id`` one; each row moved is written once, as the null would have written
    it (docs/ledger.md, "A deleted key's spend"). The rollup's rows go as the ledger's do, so a day rebuilt from the
    ledger gives the same figures by key, and a sealed day (its raw rows gone) keeps them under the heir too.

    Each key's heir is recorded (``ApiKeyHeir``) for the rows that name it after the delete (a stream running on it,
    a row in the spool), which the ledger's writer puts on the heir; keys deleted earlier whose heir this one was
    get this one's heir, so that a late row is one lookup away from the key that stays."""
    for batch in id_batches(sorted(heirs, key=lambda pk: (heirs[pk], pk)), KEYS_A_DELETE):
        by_heir: dict[int, list[int]] = {}
        for pk in batch:
            by_heir.setdefault(heirs[pk], []).append(pk)
        heir = Case(*(When(api_key_id__in=keys, then=Value(to)) for to, keys in by_heir.items()))
        for model in (UsageRecord, DailyUsage):
            model.objects.filter(api_key_id__in=batch).update(api_key_id=heir)
        passed_on = Case(*(When(heir_key_id__in=keys, then=Value(to)) for to, keys in by_heir.items()))
        ApiKeyHeir.objects.filter(heir_key_id__in=batch).update(heir_key_id=passed_on)
        ApiKeyHeir.objects.bulk_create(ApiKeyHeir(deleted_key_id=pk, heir_key_id=heirs[pk]) for pk in batch)


def api_key_spend_keep(*, api_key: ApiKey, origin: object) -> None:
    """For a key deleted other than by ``api_keys_delete`` (``key.delete()`` or a queryset's in the shell or a
    command, and the keys below it that its delete takes), from ``pre_delete``, before Django's delete sets its rows
    to null: its ledger and rollup rows go to the nearest key above it that the delete leaves, as
    ``api_keys_delete`` moves them. Which keys go is read from the delete's ``origin``: a key (the keys below it go
    with it) or a queryset of keys; any other (its owner's delete) takes every key of the tree, and the rows keep
    no key. A few queries a key (its keys above, at most ``MAX_KEY_DEPTH``): the shell's deletes are a few keys;
    the admin's and a user's delete go through ``api_keys_delete``, whose keys are skipped here."""
    if audit_delete_recorded(api_key):  # api_keys_delete's own: it moved their rows, a batch at a time
        return
    by_key = isinstance(origin, ApiKey)
    if not by_key and not (isinstance(origin, QuerySet) and origin.model is ApiKey):
        return
    chain = [api_key.pk, *api_key_ancestor_ids(api_key.pk)]
    deleted = {origin.pk} if by_key else set(origin.filter(pk__in=chain).values_list("pk", flat=True))
    # Every key below one the delete takes goes with it: the heir is the key right above the highest such.
    highest = max((index for index, pk in enumerate(chain) if pk in deleted), default=None)
    if highest is not None and highest + 1 < len(chain):
        _spend_moved_up({api_key.pk: chain[highest + 1]})


def api_key_deleted_record(*, api_key: ApiKey) -> None:
    """``key.delete`` for a key deleted other than by ``api_keys_delete`` (``key.delete()`` in the shell or a command,
    the cascade of its owner's or its parent's delete there), from ``post_delete``: one event a key, with its prefix
    (a key below another has its own). A key ``api_keys_delete`` deletes has its event from it."""
    if not audit_delete_recorded(api_key):
        audit_record("key.delete", target=api_key, changes={"prefix": [api_key.prefix, None]})


def _under(pk: int, selected: set[int], rows: dict[int, tuple[int | None, str, str]]) -> bool:
    """Whether a key above ``pk`` is among ``selected`` (a loop made by hand ends the walk)."""
    seen = {pk}
    parent_id = rows[pk][0]
    while parent_id is not None and parent_id not in seen and parent_id in rows:
        if parent_id in selected:
            return True
        seen.add(parent_id)
        parent_id = rows[parent_id][0]
    return False


def _below(top: int, children: dict[int | None, list[int]]) -> list[int]:
    """``top`` and every key under it (a loop made by hand ends the walk)."""
    found, frontier = {top}, [top]
    while frontier:
        frontier = [pk for parent in frontier for pk in children.get(parent, []) if pk not in found]
        found.update(frontier)
    return sorted(found)


def _secrets_of(key_ids: Iterable[int]) -> list[str | None]:
    """Both secrets' digests of these keys, read a batch at a time."""
    return [
        digest
        for batch in id_batches(sorted(key_ids))
        for pair in ApiKey.objects.filter(pk__in=batch).values_list("secret_hash", "previous_secret_hash")
        for digest in pair
    ]


def key_cache_forget(*, api_key_ids: Iterable[int]) -> None:
    """Drop the cached lookups of these keys and of every key below them (both secrets of each)."""
    ids = [descendant for key_id in api_key_ids for descendant in api_key_subtree_ids(key_id)]
    pairs = ApiKey.objects.filter(pk__in=ids).values_list("secret_hash", "previous_secret_hash")
    for secret_hash, previous_hash in pairs:
        key_cache.invalidate(secret_hash)
        if previous_hash:
            key_cache.invalidate(previous_hash)


def _forget_secrets(digests: Iterable[str | None]) -> None:
    """Drop these secrets' cached lookups now and again after commit (a request may cache the old row in
    between)."""
    digests = [digest for digest in digests if digest]

    def forget() -> None:
        for digest in digests:
            key_cache.invalidate(digest)

    forget_now_and_after_commit(forget)


def _is_well_formed(raw: str) -> bool:
    return raw.startswith(KEY_PREFIX) and 40 <= len(raw) <= 80 and raw.isascii()


async def _load_principal(digest: str) -> KeyPrincipal | None:
    """The key and every key above it must be unrevoked (and the owner active); the earliest expiry, the
    narrowest model list and the scopes every key of the chain holds apply (a scope taken from a key after it
    created keys is taken from them too: a child never has more than its parent)."""
    row = await (
        ApiKey.objects.select_related("user")
        .filter(Q(secret_hash=digest) | Q(previous_secret_hash=digest), revoked_at__isnull=True, user__is_active=True)
        .afirst()
    )
    if row is None:
        return None
    rotated_out_at = None
    if row.secret_hash != digest:  # the secret a rotation replaced: valid until its grace period ends
        rotated_out_at = row.previous_secret_expires_at
        if rotated_out_at is None:
            return None
    expires_at = row.expires_at
    scopes = frozenset(row.scopes)
    allowed = frozenset([pk async for pk in row.allowed_models.values_list("pk", flat=True)]) or None
    parent_id, depth = row.parent_id, 0
    while parent_id is not None:
        depth += 1
        if depth > MAX_KEY_DEPTH:
            return None
        parent = (
            await ApiKey.objects.filter(pk=parent_id).values("parent_id", "revoked_at", "expires_at", "scopes").afirst()
        )
        if parent is None or parent["revoked_at"] is not None:
            return None
        if parent["expires_at"] is not None and (expires_at is None or parent["expires_at"] < expires_at):
            expires_at = parent["expires_at"]
        scopes &= frozenset(parent["scopes"] or ())
        through = ApiKey.allowed_models.through.objects.filter(apikey_id=parent_id)
        theirs = frozenset([pk async for pk in through.values_list("catalogmodel_id", flat=True)])
        if theirs:
            allowed = theirs if allowed is None else allowed & theirs
        parent_id = parent["parent_id"]
    return KeyPrincipal(
        key_id=row.pk,
        user_id=row.user_id,
        username=row.user.get_username(),
        prefix=row.prefix,
        secret_hash=digest,
        expires_at=expires_at,
        allowed_model_ids=allowed,
        scopes=scopes,
        rotated_out_at=rotated_out_at,
    )


async def api_key_authenticate(raw: str | None) -> KeyPrincipal:
    """The key's principal, or ``AuthenticationFailed`` with OpenAI's wording. Cached per process."""
    if not raw:
        raise AuthenticationFailed(
            "You didn't provide an API key. Provide it as 'Authorization: Bearer YOUR_KEY' or 'x-api-key'.",
            code="missing_api_key",
        )
    if not _is_well_formed(raw):
        raise AuthenticationFailed("Incorrect API key provided.")
    digest = hash_key(raw)
    principal = await key_cache.get_or_load(digest, lambda: _load_principal(digest))
    if principal is None or not hmac.compare_digest(principal.secret_hash, digest):
        raise AuthenticationFailed(f"Incorrect API key provided: {raw[:14]}…")
    if principal.rotated_out(timezone.now()):
        raise AuthenticationFailed(
            f"This API key was rotated and its old secret ({raw[:14]}…) stopped working at the end of its grace "
            "period: use the new secret."
        )
    if principal.expires_at is not None and principal.expires_at <= timezone.now():
        raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
    return principal


KeyStatus = Literal["active", "revoked", "expired"]


async def api_key_status(digest: str) -> KeyStatus:
    """Whether a key that authenticated once still works, through the same cache as every request: for
    a WebSocket that keeps a key for its whole life. Revoked covers a deleted key, a deactivated owner
    and a revoked key above it; expired, an expiry of the key or of a key above it, and the end of the
    grace period of a secret a rotation replaced."""
    return (await api_key_recheck(digest))[0]


async def api_key_recheck(digest: str) -> tuple[KeyStatus, KeyPrincipal | None]:
    """``api_key_status`` and the key as it is now (its models may have changed since it authenticated)."""
    principal = await key_cache.get_or_load(digest, lambda: _load_principal(digest))
    if principal is None:
        return "revoked", None
    if principal.rotated_out(timezone.now()):
        return "expired", principal
    if principal.expires_at is not None and principal.expires_at <= timezone.now():
        return "expired", principal
    return "active", principal


def api_key_authenticate_sync(raw: str | None) -> KeyPrincipal:
    from asgiref.sync import async_to_sync

    return async_to_sync(api_key_authenticate)(raw)


def user_for_principal(principal: KeyPrincipal):
    """The key's owner, or None when they were deleted or deactivated since the key's lookup was cached (by
    another process, for up to LLMHUB_LOOKUP_CACHE_TTL): such a key no longer works."""
    return get_user_model().objects.filter(pk=principal.user_id, is_active=True).first()
