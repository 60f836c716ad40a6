"""Sets the audit origin (who, from which address, with which client) for the request being served."""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from .context import AuditOrigin, audit_origin, request_ip, request_user_agent
from .services import actor_for


def origin_for_request(request, user=None) -> AuditOrigin:
    user = user if user is not None else getattr(request, "user", None)
    actor = actor_for(user) if user is not None and user.is_authenticated else None
    return AuditOrigin(
        actor_type=actor.type if actor else "anonymous",
        actor_id=actor.id if actor else "",
        actor_repr=actor.repr if actor else "",
        ip_address=request_ip(request),
        user_agent=request_user_agent(request),
    )


class AuditContextMiddleware:
    """Sync and async capable, so that it adds no thread hop to async views."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        with audit_origin(origin_for_request(request)):
            return self.get_response(request)

    async def __acall__(self, request):
        # request.user would query the database synchronously here: auser() is its async twin.
        user = await request.auser() if hasattr(request, "auser") else None
        with audit_origin(origin_for_request(request, user)):
            return await self.get_response(request)
