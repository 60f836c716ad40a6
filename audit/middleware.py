"""Sets the audit origin (who, from which address, with which client) for the request being served."""

from __future__ import annotations

from typing import Any

from django.utils.functional import LazyObject

from core.exceptions import DATABASE_OUTAGE_ERRORS
from core.middleware import SyncAndAsyncMiddleware

from .context import AuditOrigin, OriginSource, audit_origin, request_ip, request_user_agent
from .models import ActorType
from .services import actor_for


def origin_for_request(request, user=None) -> AuditOrigin:
    """``user``: a user or a gateway key (``KeyPrincipal``); None or an anonymous user: anonymous."""
    user = user if user is not None else getattr(request, "user", None)
    actor = actor_for(user) if user is not None and getattr(user, "is_authenticated", True) else None
    return AuditOrigin(
        actor_type=actor.type if actor else ActorType.ANONYMOUS,
        actor_id=actor.id if actor else "",
        actor_repr=actor.repr if actor else "",
        ip_address=request_ip(request),
        user_agent=request_user_agent(request),
    )


def acting_principal(request, user_at_entry: Any = None) -> Any:
    """Who acts in ``request`` now. DRF authenticates a gateway key or a JWT after the middleware has run
    and then sets ``user`` and ``auth`` on the Django request: a key (``auth`` with a ``prefix`` and a
    ``secret_hash``) acts as itself, anyone else as their user. Before that, or without DRF, the session's
    user (resolved once by the async path, lazily by the sync one)."""
    attributes = request.__dict__
    auth = attributes.get("auth")
    if auth is not None and hasattr(auth, "prefix") and hasattr(auth, "secret_hash"):
        return auth
    user = attributes.get("user")
    if user is None or (isinstance(user, LazyObject) and user_at_entry is not None):
        return user_at_entry
    return user


def lazy_origin(request, user_at_entry: Any = None) -> OriginSource:
    return lambda: origin_for_request(request, acting_principal(request, user_at_entry))


class AuditContextMiddleware(SyncAndAsyncMiddleware):
    """Sync and async capable (``core.middleware``), so that it adds no thread hop. The origin is worked out
    when an event is recorded, not here: by then DRF may have authenticated a gateway key or a JWT."""

    def call(self, request):
        with audit_origin(lazy_origin(request)):
            return self.get_response(request)

    async def acall(self, request):
        # request.user would query the database synchronously when an event is recorded from async code:
        # auser() is its async twin, resolved here once.
        try:
            user = await request.auser() if hasattr(request, "auser") else None
        except DATABASE_OUTAGE_ERRORS:
            user = None  # the view answers the outage (503); an event recorded later resolves the user then
        with audit_origin(lazy_origin(request, user)):
            return await self.get_response(request)
