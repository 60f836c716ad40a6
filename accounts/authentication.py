"""DRF authentication by a JWT from an identity provider (``Authorization: Bearer <JWT>``)."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication


class JwtAuthentication(authentication.BaseAuthentication):
    """Filled in by the JWT sign-in work (accounts.jwt); until then it authenticates nobody."""

    def authenticate(self, request: Any) -> tuple[Any, Any] | None:
        return None
