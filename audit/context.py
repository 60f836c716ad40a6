"""Who is acting, from where: set once per request (``AuditContextMiddleware``, the API's authentication,
the WebSocket consumer) and read by ``audit_record`` so that services need not pass the request down."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AuditOrigin:
    actor_type: str = "anonymous"
    actor_id: str = ""
    actor_repr: str = ""
    ip_address: str | None = None
    user_agent: str = ""


# An origin, or a function that works it out when an event is recorded: the middleware runs before DRF
# authenticates a gateway key or a JWT, so who acts is only known later in the request.
OriginSource = AuditOrigin | Callable[[], AuditOrigin]
_origin: ContextVar[OriginSource | None] = ContextVar("audit_origin", default=None)


def origin_current() -> AuditOrigin | None:
    """The current origin. A lazy one may read the request's user: call this from sync code (as
    ``audit_record`` is), not from an event loop."""
    source = _origin.get()
    return source() if callable(source) else source


@contextlib.contextmanager
def audit_origin(origin: OriginSource) -> Iterator[OriginSource]:
    token = _origin.set(origin)
    try:
        yield origin
    finally:
        _origin.reset(token)


def origin_set(origin: OriginSource | None) -> None:
    """For code that cannot wrap the whole request in ``audit_origin`` (a DRF authentication class)."""
    _origin.set(origin)


def request_ip(request) -> str | None:
    """The client's address as the server saw it (REMOTE_ADDR; a proxy's X-Forwarded-For is not trusted)."""
    meta = getattr(request, "META", None)
    if meta is None:  # an ASGI scope (WebSocket)
        client = (request or {}).get("client") if isinstance(request, dict) else None
        return client[0] if client else None
    return meta.get("REMOTE_ADDR") or None


def request_user_agent(request) -> str:
    meta = getattr(request, "META", None)
    if meta is None:
        headers = dict((request or {}).get("headers") or []) if isinstance(request, dict) else {}
        return headers.get(b"user-agent", b"").decode("latin-1")[:300]
    return (meta.get("HTTP_USER_AGENT") or "")[:300]
