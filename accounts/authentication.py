"""DRF authentication by a JWT from an identity provider (``Authorization: Bearer <JWT>``).

Listed before the gateway-key authentication (settings ``REST_FRAMEWORK``): it answers only for a bearer
value shaped like a JWT while JWT sign-in is on, and passes anything else on."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from rest_framework import authentication, exceptions

from audit.context import origin_set, request_ip
from audit.middleware import origin_for_request

from .exceptions import JwtRefused
from .jwt import JwtPrincipal, jwt_authenticate, jwt_bearer


def bearer_from_headers(headers: Any) -> str | None:
    authorization = headers.get("authorization") or ""
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


class JwtAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Any) -> tuple[Any, JwtPrincipal] | None:
        raw = bearer_from_headers(request.headers)
        if not jwt_bearer(raw):
            return None
        try:
            principal = async_to_sync(jwt_authenticate)(raw, ip_address=request_ip(request))
        except JwtRefused as exc:
            raise exceptions.AuthenticationFailed(exc.message) from None
        user = get_user_model().objects.filter(pk=principal.user_id, is_active=True).first()
        if user is None:
            raise exceptions.AuthenticationFailed("This account is disabled.")
        user._llmhub_role = principal.role
        origin_set(origin_for_request(request, user))
        return user, principal

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="llmhub"'
