"""What the signed-in user's role allows, for the templates (the navigation shows only what works)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import SynchronousOnlyOperation
from django.utils.functional import SimpleLazyObject

from .roles import CAPABILITIES, Capability, Role, role_of


def capabilities(request: Any) -> dict[str, Any]:
    """``can.chat``, ``can.manage_own_keys``, ``can.view_all_usage``, …; worked out only when a template asks.

    An async view cannot query while its template renders: it looks the role up first
    (``accounts.roles.request_role``), and one that did not gets every link (the pages refuse the rest)."""

    def allowed() -> dict[str, bool]:
        role: Role | None = getattr(request, "llmhub_role", None)
        if role is None:
            try:
                role = role_of(request.user)
            except SynchronousOnlyOperation:
                return {c.value: True for c in Capability}
        return {c.value: c in CAPABILITIES[role] for c in Capability}

    return {"can": SimpleLazyObject(allowed)}
