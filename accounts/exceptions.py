from __future__ import annotations

from core.exceptions import ApplicationError


class JwtRefused(ApplicationError):
    """A bearer token that is a JWT and does not verify. The message says why; it never holds the token."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_token"


class RoleForbidden(ApplicationError):
    """The caller is signed in but their role does not allow this (a viewer sending a chat)."""

    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"
