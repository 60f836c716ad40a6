"""Recording audit events (``audit_record``) and checking the chain (``audit_verify``).

The hash of a row is SHA-256 over its previous row's hash and a canonical JSON of its own fields
(sorted keys, UTC ISO time), so any edit of a recorded field, a removed row or two rows swapped makes
the chain fail at the first row concerned.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import redis
from django.core.cache import cache
from django.db import models, transaction
from django.utils import timezone
from django.utils.ipv6 import clean_ipv6_address

from core.addresses import address_throttle_key

from .context import AuditOrigin, origin_current
from .models import GENESIS_HASH, ActorType, AuditChainHead, AuditEvent

logger = logging.getLogger("llmhub.audit")

SECRET_MASK = "[secret]"
# Field names whose values are never written to the log, whatever the model (masked in ``changes``).
# A webhook's URL is its own credential (a Slack-style URL lets anyone who has it post).
SECRET_FIELD_HINTS = ("secret", "password", "api_key", "extra_headers", "key_hash", "webhook_url")
# "token" says credential only as the name's last word (``token``, ``access_token``) or a token's hash: in
# ``daily_token_quota`` or ``max_output_tokens`` it counts tokens, a figure an auditor must be able to read.
_TOKEN_CREDENTIAL = re.compile(r"(^|_)token(_hash)?$")


def is_secret_field(name: str) -> bool:
    lowered = name.lower()
    return any(hint in lowered for hint in SECRET_FIELD_HINTS) or _TOKEN_CREDENTIAL.search(lowered) is not None


def _text(value: Any, length: int) -> str:
    return str(value)[:length].replace("\x00", "") if value is not None else ""


def _jsonable(value: Any) -> Any:
    """What a JSON column gives back as it was given: PostgreSQL's jsonb refuses NUL in text."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {_jsonable(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    return str(value)


def changes_masked(changes: Mapping[str, Any] | None, *, secret_fields: Iterable[str] = ()) -> dict[str, Any]:
    """``{field: [old, new]}`` as stored: values of secret fields (by name, or listed) replaced by a mask
    that still says whether the value changed, was set or was cleared."""
    secret = set(secret_fields)
    out: dict[str, Any] = {}
    for name, pair in (changes or {}).items():
        if name in secret or is_secret_field(name):
            old, new = pair if isinstance(pair, list | tuple) and len(pair) == 2 else (None, pair)
            out[name] = [SECRET_MASK if old else "", SECRET_MASK if new else ""]
        else:
            out[name] = _jsonable(pair)
    return out


def ip_normalized(value: str | None) -> str | None:
    """The address as the column gives it back (Django's IPv6 spelling, as PostgreSQL's ``inet`` prints it),
    so that the hash taken before the insert holds for the row read back; None if it is no address."""
    if not value:
        return None
    try:
        address = ipaddress.ip_address(str(value).split("%", 1)[0].strip())
    except ValueError:
        return None
    return clean_ipv6_address(str(address)) if address.version == 6 else str(address)


@dataclass(frozen=True, slots=True)
class Actor:
    type: str
    id: str = ""
    repr: str = ""


def actor_for(who: Any) -> Actor:
    """A user, a gateway key (has ``prefix``), an ``Actor``, or None (system)."""
    if who is None:
        return Actor(ActorType.SYSTEM, "", "system")
    if isinstance(who, Actor):
        return who
    if hasattr(who, "prefix") and hasattr(who, "secret_hash"):  # billing's ApiKey or KeyPrincipal, unimported
        key_id = who.key_id if hasattr(who, "key_id") else who.pk
        return Actor(ActorType.KEY, str(key_id), _text(who.prefix, 200))
    if hasattr(who, "get_username"):
        if not getattr(who, "is_authenticated", True):
            return Actor(ActorType.ANONYMOUS, "", "anonymous")
        return Actor(ActorType.USER, str(who.pk), _text(who.get_username(), 200))
    return Actor(ActorType.SYSTEM, "", _text(who, 200))


def event_hash(fields: Mapping[str, Any], prev_hash: str) -> str:
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(f"{prev_hash}\n{payload}".encode()).hexdigest()


def hashed_fields(event: AuditEvent) -> dict[str, Any]:
    """What the hash covers: every recorded field but the hashes themselves."""
    created = event.created_at.astimezone(UTC).isoformat(timespec="microseconds")
    return {
        "seq": event.seq,
        "created_at": created,
        "actor_type": event.actor_type,
        "actor_id": event.actor_id,
        "actor_repr": event.actor_repr,
        "action": event.action,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "target_repr": event.target_repr,
        "changes": event.changes,
        "ip_address": event.ip_address,
        "user_agent": event.user_agent,
    }


def audit_record(
    action: str,
    *,
    target: Any = None,
    target_type: str = "",
    target_id: Any = "",
    target_repr: str = "",
    changes: Mapping[str, Any] | None = None,
    secret_fields: Iterable[str] = (),
    actor: Any = ...,
    origin: AuditOrigin | None = None,
) -> AuditEvent:
    """Append one event. ``target``: a model instance (its label, pk and str, which must hold no secret),
    or give ``target_type``/``target_id``/``target_repr``. ``actor``: a user, a key, None for the system;
    left out, the acting principal of the current request (``audit.context``), else the system.
    ``changes``: ``{field: [old, new]}``; secret fields are masked here, so callers may pass them as is.

    Runs in its own atomic block (a savepoint inside a caller's transaction, so the event is kept or
    rolled back with the change it records)."""
    return audit_records(
        [AuditEntry(action, target, target_type, target_id, target_repr, changes, tuple(secret_fields))],
        actor=actor,
        origin=origin,
    )[0]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One event of ``audit_records``; its fields as ``audit_record``'s."""

    action: str
    target: Any = None
    target_type: str = ""
    target_id: Any = ""
    target_repr: str = ""
    changes: Mapping[str, Any] | None = None
    secret_fields: tuple[str, ...] = ()


def audit_records(
    entries: Iterable[AuditEntry], *, actor: Any = ..., origin: AuditOrigin | None = None
) -> list[AuditEvent]:
    """Append several events by one actor (an admin's action on many rows: one event a row), in their order:
    the chain's head is locked and moved once, and the events are inserted ``EVENTS_A_STATEMENT`` at a time, so
    a thousand events cost a few queries, not a thousand locks, inserts and head updates.

    Runs in its own atomic block, as ``audit_record``."""
    origin = origin or origin_current()
    if actor is ...:
        who = Actor(origin.actor_type, origin.actor_id, origin.actor_repr) if origin else actor_for(None)
    else:
        who = actor_for(actor)
    entries = list(entries)
    if not entries:
        return []
    with transaction.atomic():
        head, _ = AuditChainHead.objects.select_for_update().get_or_create(pk=1)
        now = timezone.now()
        events: list[AuditEvent] = []
        for entry in entries:
            target_type, target_id, target_repr = entry.target_type, entry.target_id, entry.target_repr
            if entry.target is not None:
                target_type = target_type or entry.target._meta.label_lower
                target_id = entry.target.pk if target_id == "" else target_id
                target_repr = target_repr or _text(entry.target, 200)
            event = AuditEvent(
                seq=head.last_seq + 1,
                created_at=now,
                actor_type=who.type,
                actor_id=_text(who.id, 64),
                actor_repr=_text(who.repr, 200),
                action=_text(entry.action, 64),
                target_type=_text(target_type, 64),
                target_id=_text(target_id, 64),
                target_repr=_text(target_repr, 200),
                changes=changes_masked(entry.changes, secret_fields=entry.secret_fields),
                ip_address=ip_normalized(origin.ip_address) if origin else None,
                user_agent=_text(origin.user_agent, 300) if origin else "",
                prev_hash=head.last_hash,
            )
            event.hash = event_hash(hashed_fields(event), event.prev_hash)
            events.append(event)
            head.last_hash, head.last_seq = event.hash, event.seq
        AuditEvent.objects.bulk_create(events, batch_size=EVENTS_A_STATEMENT)
        head.save(update_fields=["last_hash", "last_seq"])
    return events


# An event is 13 values: under a statement's limit of them on an old SQLite (999).
EVENTS_A_STATEMENT = 70


# A delete that its service records itself, in a shape of its own (a gateway key with the keys below it, a batch of
# users' provider keys in one statement), holds the (label, pk) of the rows it deletes here while it deletes them, so
# that the ``post_delete`` receivers that record a delete made anywhere else (``.delete()`` in the shell or a command,
# a cascade) leave those rows to it: one event a delete, whoever made it.
_deletes_recorded: ContextVar[frozenset[tuple[str, str]]] = ContextVar("audit_deletes_recorded", default=frozenset())


@contextlib.contextmanager
def audit_deletes_recorded(model: type[models.Model], pks: Iterable[Any]) -> Iterator[None]:
    """Around a service's delete of ``model``'s rows ``pks`` (and the cascade it makes), whose events it records."""
    label = model._meta.label_lower
    token = _deletes_recorded.set(_deletes_recorded.get() | {(label, str(pk)) for pk in pks})
    try:
        yield
    finally:
        _deletes_recorded.reset(token)


def audit_delete_recorded(instance: models.Model) -> bool:
    """Whether ``instance``, being deleted, has its event from the service deleting it (``audit_deletes_recorded``)."""
    return (instance._meta.label_lower, str(instance.pk)) in _deletes_recorded.get()


# Events an anonymous caller can cause (a refused sign-in, a refused token): at most one a minute per (kind,
# what failed, client address: an IPv6 one's /64, ``core.addresses``), and this many a minute of a kind in all.
# The log is append-only and nothing deletes from it, so a flood of them must not be able to fill it.
FAILURES_PER_MINUTE = 30


def audit_once(key: str, *, timeout: float) -> bool:
    """Whether an event deduplicated by ``key`` is to be recorded: the first time ``key`` is seen within
    ``timeout`` seconds (kept in the cache). When the cache does not answer, yes: an event recorded twice
    is better than a sign-in that fails, or a record lost."""
    try:
        return bool(cache.add(f"llmhub:audit-once:{key}", 1, timeout=timeout))
    except (redis.RedisError, OSError) as exc:
        logger.warning("audit: the cache did not answer (%s); event recorded without deduplication", type(exc).__name__)
        return True


def audit_failure_admitted(*, kind: str, what: str, ip_address: str | None) -> bool:
    """Whether a failure event of ``kind`` (``what`` failed, from ``ip_address``) is to be recorded now.

    The counts live in the cache (Redis in production). When it does not answer, every failure is recorded:
    a refused sign-in must stay a refusal, not become a 500, and the log keeps the attempts."""
    minute = int(time.time() // 60)
    digest = hashlib.sha256(what.encode()).hexdigest()[:16]
    try:
        address = address_throttle_key(ip_address)
        if not cache.add(f"llmhub:audit-failed:{kind}:{minute}:{address}:{digest}", 1, timeout=120):
            return False
        total_key = f"llmhub:audit-failed:{kind}:{minute}"
        cache.add(total_key, 0, timeout=120)
        return cache.incr(total_key) <= FAILURES_PER_MINUTE
    except (redis.RedisError, OSError) as exc:
        logger.warning("audit: the cache did not answer (%s); failure recorded unthrottled", type(exc).__name__)
        return True


@dataclass(frozen=True, slots=True)
class ChainProblem:
    seq: int | None
    reason: str
    action: str = ""

    def __str__(self) -> str:
        row = f"#{self.seq}" if self.seq is not None else "the chain head"
        return f"{row}{f' ({self.action})' if self.action else ''}: {self.reason}"


def audit_verify(*, batch_size: int = 2000) -> ChainProblem | None:
    """Walk the chain from the first row; the first row that does not hold (edited, missing predecessor,
    out of order, or a head that does not match its row) is returned, else None.

    The head is read before the walk: on a live system events keep being appended, and one appended after
    the walk read the last row would otherwise look like rows removed from the end. Rows appended after the
    head was read are walked too (their links checked); the head of this moment vouches for the rows up to
    its own."""
    head = AuditChainHead.objects.filter(pk=1).values_list("last_seq", "last_hash").first()
    prev_hash, expected_seq = GENESIS_HASH, 1
    last_seq = 0
    hash_at_head = GENESIS_HASH if head is not None and head[0] == 0 else None
    queryset = AuditEvent.objects.in_chain_order()
    while True:
        rows = list(queryset.filter(seq__gt=last_seq)[:batch_size])
        if not rows:
            break
        for event in rows:
            if event.seq != expected_seq:
                reason = f"row #{expected_seq} before it is missing (removed after it was written)"
                return ChainProblem(event.seq, reason, event.action)
            if event.prev_hash != prev_hash:
                reason = "its prev_hash is not the hash of the row before it (rows reordered or rewritten)"
                return ChainProblem(event.seq, reason, event.action)
            if event_hash(hashed_fields(event), event.prev_hash) != event.hash:
                return ChainProblem(
                    event.seq, "its fields do not match its hash (edited after it was written)", event.action
                )
            prev_hash, expected_seq, last_seq = event.hash, expected_seq + 1, event.seq
            if head is not None and event.seq == head[0]:
                hash_at_head = event.hash
    if head is None:
        # No head when the walk began: rows there may only be those appended since (the very first events).
        head = AuditChainHead.objects.filter(pk=1).values_list("last_seq", "last_hash").first()
        if head is None:
            return ChainProblem(None, "the chain head row is missing") if last_seq else None
        hash_at_head = prev_hash if head[0] == last_seq else None
    head_seq, head_hash = head
    if head_seq > last_seq:
        return ChainProblem(last_seq + 1, f"rows #{last_seq + 1} to #{head_seq} were removed from the end")
    if hash_at_head != head_hash:
        return ChainProblem(None, f"it does not match row #{head_seq} (edited after it was written)")
    return None
