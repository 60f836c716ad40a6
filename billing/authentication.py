"""DRF authentication by gateway API key, for the management API (/api/*)."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from .services.keys import AuthenticationFailed, api_key_authenticate_sync, user_for_principal


def key_from_headers(headers: Any) -> str | None:
    """``Authorization: Bearer …`` (OpenAI clients) or ``x-api-key`` (Anthropic-style clients)."""
    authorization = headers.get("authorization") or ""
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return headers.get("x-api-key") or None


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Any) -> tuple[Any, Any] | None:
        raw = key_from_headers(request.headers)
        if raw is None:
            return None
        try:
            principal = api_key_authenticate_sync(raw)
        except AuthenticationFailed as exc:
            raise exceptions.AuthenticationFailed(exc.message) from None
        user = user_for_principal(principal)
        if user is None:
            raise exceptions.AuthenticationFailed(f"Incorrect API key provided: {principal.prefix}…")
        return user, principal

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="llmhub"'
