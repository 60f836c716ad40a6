"""Signing in a user from a verified JWT's claims, and the audit events of JWT sign-ins."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.context import AuditOrigin, audit_origin, origin_current
from audit.models import ActorType
from audit.services import audit_failure_admitted, audit_once, audit_record
from core.id_batches import id_batches

from .exceptions import JwtRefused
from .jwt import JwtPrincipal
from .models import ExternalIdentity
from .roles import Role, role_parse, role_set, role_strongest
from .signals import users_deleting

_USERNAME_UNSAFE = re.compile(r"[^\w.@+-]", re.ASCII)


def claim_get(claims: dict[str, Any], path: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (``realm_access.roles``)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def role_from_claims(claims: dict[str, Any]) -> Role:
    """The role the configured claim names (one value or a list: the most powerful known one); an unknown
    or missing one gives ``LLMHUB_JWT_DEFAULT_ROLE``."""
    value = claim_get(claims, settings.LLMHUB_JWT_ROLE_CLAIM)
    values = value if isinstance(value, list) else [value]
    role = role_strongest(filter(None, map(role_parse, values)))
    return role or role_parse(settings.LLMHUB_JWT_DEFAULT_ROLE) or Role.MEMBER


def username_for_claims(claims: dict[str, Any]) -> str:
    """A free username from ``preferred_username``, else ``email``, else ``sub``: only the characters
    Django's usernames allow, and ``-2``, ``-3``… appended when it is taken."""
    User = get_user_model()
    for claim in ("preferred_username", "email", "sub"):
        value = claims.get(claim)
        if isinstance(value, str) and _USERNAME_UNSAFE.sub("", value):
            base = _USERNAME_UNSAFE.sub("", value)[:140]
            break
    else:
        base = "user"
    candidate, n = base, 1
    while User.objects.filter(username__iexact=candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _user_create(*, issuer: str, subject: str, claims: dict[str, Any]) -> Any:
    User = get_user_model()
    email = claims.get("email") if isinstance(claims.get("email"), str) and "@" in claims["email"] else ""
    username = username_for_claims(claims)
    try:
        with transaction.atomic(), audit_origin(_token_user_origin(username=username)):
            user = User.objects.create_user(username=username, email=email[:254])
            ExternalIdentity.objects.create(issuer=issuer, subject=subject, user=user)
    except IntegrityError:  # the same subject's first two requests at once: the other one created it
        return ExternalIdentity.objects.select_related("user").get(issuer=issuer, subject=subject).user
    return user


def _token_user_origin(*, username: str, user: Any = None) -> Callable[[], AuditOrigin]:
    """Who acts when a token signs its user in (creates their account, sets their role): that user, as their
    identity provider vouches, from the request's address; not an anonymous visitor, which is what the
    request's own origin says before it is authenticated. Worked out when an event is recorded, so that an
    account being created has its id by then."""
    request = origin_current()

    def origin() -> AuditOrigin:
        if user is not None:
            pk = user.pk
        else:
            pk = get_user_model().objects.filter(username=username).values_list("pk", flat=True).first()
        return AuditOrigin(
            actor_type=ActorType.USER,
            actor_id=str(pk or ""),
            actor_repr=username,
            ip_address=request.ip_address if request else None,
            user_agent=request.user_agent if request else "",
        )

    return origin


def identity_sign_in(*, issuer: str, claims: dict[str, Any]) -> JwtPrincipal:
    """The user of a verified token's (issuer, sub), created at the first token; their role is set from the
    token's claim at each sign-in (a change shows in the audit log as ``role.change``, by that user)."""
    subject = str(claims["sub"])[:255]
    identity = ExternalIdentity.objects.select_related("user").filter(issuer=issuer, subject=subject).first()
    user = identity.user if identity is not None else _user_create(issuer=issuer, subject=subject, claims=claims)
    if not user.is_active:
        raise JwtRefused("This account is disabled.")
    role = role_from_claims(claims)
    with audit_origin(_token_user_origin(username=user.get_username(), user=user)):
        role_set(user, role)
    ExternalIdentity.objects.filter(issuer=issuer, subject=subject).update(last_seen_at=timezone.now())
    principal = JwtPrincipal(
        user_id=user.pk,
        username=user.get_username(),
        role=Role.ADMIN if user.is_superuser else role,
        issuer=issuer,
        subject=subject,
        expires_at=float(claims["exp"]),
    )
    _login_record(user=user, principal=principal, jti=claims.get("jti"))
    return principal


def _login_record(*, user: Any, principal: JwtPrincipal, jti: Any) -> None:
    """``auth.jwt_login`` once per token (by ``jti``) or, for tokens without one, once per user per hour:
    not at every request, nor at every re-verification of the same token."""
    if isinstance(jti, str) and jti:
        key = f"jwt-login:{user.pk}:{jti[:128]}"
        timeout = max(1, min(int(principal.expires_at - time.time()) + 60, 86_400))
    else:
        key, timeout = f"jwt-login:{user.pk}:h{int(time.time() // 3600)}", 3600
    if audit_once(key, timeout=timeout):
        audit_record(
            "auth.jwt_login",
            target=user,
            changes={"issuer": [None, principal.issuer], "role": [None, principal.role.value]},
            actor=user,
        )


def jwt_failure_record(*, reason: str, ip_address: str | None = None) -> None:
    """``auth.jwt_failed`` for a refused token, at most once a minute per (reason, address: an IPv6 one's /64) and
    30 a minute in all (``audit.services.audit_failure_admitted``), so a flood of bad tokens cannot fill the log."""
    origin = origin_current()
    ip_address = ip_address or (origin.ip_address if origin else None)
    if not audit_failure_admitted(kind="jwt", what=reason, ip_address=ip_address):
        return
    audit_record(
        "auth.jwt_failed",
        target_type="auth.token",
        target_repr="bearer JWT",
        changes={"reason": [None, reason]},
        origin=origin or AuditOrigin(ip_address=ip_address),
    )


# Users deleted a statement: what refers to their keys, each of several, must stay under a statement's limit too.
USERS_A_DELETE = 100


@transaction.atomic
def users_delete(*, user_ids: Iterable[int]) -> None:
    """Delete users (the admin's delete, of one or of a selection), a batch at a time in one transaction: Django's
    delete sets to null what refers to them and to their keys (alerts, feedback, conversations and responses of a
    key) in one UPDATE naming every row it collected, past what a statement can name for a few thousand users (a 500,
    "too many SQL variables"). Before each batch goes, ``users_deleting`` lets the apps whose rows go with it record
    them (their own provider keys: ``provider_key.delete``)."""
    User = get_user_model()
    for batch in id_batches(sorted(set(user_ids)), USERS_A_DELETE):
        users_deleting.send(sender=User, user_ids=batch)
        User.objects.filter(pk__in=batch).delete()
