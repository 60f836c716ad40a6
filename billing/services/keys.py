"""Gateway API keys: creation, revocation and the cached, constant-time lookup on every request.

A key reads ``sk-llmhub-<prefix 8>-<secret 32>``. The database keeps the prefix (to show the user
which key is which) and a SHA-256 of the whole key. SHA-256 rather than a slow password hash is
deliberate: the key is 190 bits of randomness, so brute force is hopeless either way, and the hash
is computed on every request. The lookup is by hash; the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from providers.cache import TTLCache
from providers.exceptions import ApplicationError
from providers.models import Model

from ..models import ApiKey

KEY_PREFIX = "sk-llmhub-"
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
    expires_at: datetime | None
    allowed_model_ids: frozenset[int] | None  # None: no key-level restriction


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
    allowed_models: Iterable[Model] = (),
) -> CreatedKey:
    """``allowed_models`` empty: the key may use every model its owner's plan allows."""
    if expires_at is not None and expires_at <= timezone.now():
        raise ApplicationError("expires_at must be in the future.", param="expires_at", code="invalid_value")
    prefix = KEY_PREFIX + _random(8)
    secret = f"{prefix}-{_random(32)}"
    api_key = ApiKey.objects.create(
        user=user, name=name or "default", prefix=prefix, secret_hash=hash_key(secret), expires_at=expires_at
    )
    api_key.allowed_models.set(allowed_models)
    return CreatedKey(api_key=api_key, secret=secret)


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    key_cache.invalidate(api_key.secret_hash)
    return api_key


def _is_well_formed(raw: str) -> bool:
    return raw.startswith(KEY_PREFIX) and 40 <= len(raw) <= 80 and raw.isascii()


async def _load_principal(digest: str) -> KeyPrincipal | None:
    row = await (
        ApiKey.objects.select_related("user")
        .filter(secret_hash=digest, revoked_at__isnull=True, user__is_active=True)
        .afirst()
    )
    if row is None:
        return None
    allowed = frozenset([pk async for pk in row.allowed_models.values_list("pk", flat=True)])
    return KeyPrincipal(
        key_id=row.pk,
        user_id=row.user_id,
        username=row.user.get_username(),
        prefix=row.prefix,
        secret_hash=row.secret_hash,
        expires_at=row.expires_at,
        allowed_model_ids=allowed or None,
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
    if principal.expires_at is not None and principal.expires_at <= timezone.now():
        raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
    return principal


def api_key_authenticate_sync(raw: str | None) -> KeyPrincipal:
    from asgiref.sync import async_to_sync

    return async_to_sync(api_key_authenticate)(raw)


def user_for_principal(principal: KeyPrincipal):
    return get_user_model().objects.get(pk=principal.user_id)
