"""DRF permission classes by role capability (accounts.roles), for the management API's views."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse
from rest_framework import permissions

from core.openapi import ErrorResponseSerializer

from .roles import Capability, Role, role_can, role_of

_MESSAGES = {
    Capability.CHAT: "Your role ({role}) may not chat or read conversations; ask an administrator for the member role.",
    Capability.MANAGE_OWN_KEYS: "Your role ({role}) may not manage keys; ask an administrator for the member role.",
    Capability.VIEW_OWN_USAGE: "Your role ({role}) may not read usage.",
    Capability.VIEW_ALL_USAGE: "Your role ({role}) may read only your own usage; other users' is for operators.",
    Capability.MANAGE_EXPERIMENTS: "Your role ({role}) may not manage experiments; they are for operators.",
}


class RolePermission(permissions.BasePermission):
    """Allows a signed-in user whose role holds ``capability``; subclass with ``role_permission()``."""

    capability: Capability = Capability.VIEW_OWN_USAGE

    def has_permission(self, request: Any, view: Any) -> bool:
        user = request.user
        if user is None or not user.is_authenticated:
            return False
        if role_can(user, self.capability):
            return True
        self.message = _MESSAGES[self.capability].format(role=role_of(user).value)
        return False


_classes: dict[Capability, type[RolePermission]] = {}


def role_permission(capability: Capability) -> type[RolePermission]:
    """The permission class that requires ``capability`` (one class per capability, for DRF's lists)."""
    if capability not in _classes:
        name = "Can" + "".join(part.title() for part in capability.value.split("_"))
        _classes[capability] = type(name, (RolePermission,), {"capability": capability})
    return _classes[capability]


CanChat = role_permission(Capability.CHAT)
CanManageOwnKeys = role_permission(Capability.MANAGE_OWN_KEYS)
CanViewOwnUsage = role_permission(Capability.VIEW_OWN_USAGE)
CanViewAllUsage = role_permission(Capability.VIEW_ALL_USAGE)
CanManageExperiments = role_permission(Capability.MANAGE_EXPERIMENTS)

# The scopes a gateway key needs (``billing.models.KeyScope``), spelled out here because accounts sits below
# billing.
KEYS_MANAGE_SCOPE = "keys:manage"
EXPERIMENTS_MANAGE_SCOPE = "experiments:manage"


class KeyScopePermission(permissions.BasePermission):
    """Lets a person (web session, JWT) through, and a gateway key only if it holds ``scope``: a key handed to
    an app must not do what its owner may unless it was given the right. A gateway key is the principal with
    ``scopes`` (``billing``'s ``KeyPrincipal``). The owner's role is checked by a ``RolePermission`` beside it."""

    scope: str = ""

    def has_permission(self, request: Any, view: Any) -> bool:
        scopes = getattr(request.auth, "scopes", None)
        return scopes is None or self.scope in scopes


class CanManageKeys(KeyScopePermission):
    """A person may manage their keys, gateway and provider keys alike; a gateway key only with ``keys:manage``:
    a key that may only call models must not read, replace or delete its owner's keys."""

    scope = KEYS_MANAGE_SCOPE
    message = (
        "This API key may not manage keys: only a key created with the keys:manage scope may, "
        "or the account owner from the web session."
    )


class KeyMayManageExperiments(KeyScopePermission):
    """An operator's or admin's key only with ``experiments:manage``: experiments steer every user's traffic on
    a model, and their results sum every user's ledger rows."""

    scope = EXPERIMENTS_MANAGE_SCOPE
    message = (
        "This API key may not manage experiments: only a key created with the experiments:manage scope may "
        "(its owner an operator or admin), or the operator from the web session."
    )


class NotAReplacedSecret(permissions.BasePermission):
    """A gateway key's secret that a rotation replaced keeps working for its grace period so that clients can
    switch (calling models, reading), but may change no key, gateway or provider, nor an experiment (which steers
    every user's traffic on a model): minting a key (a child key, the key's next secret) would outlive the grace
    period, and revoking, rotating or replacing one would let whoever holds a leaked secret undo or punish the
    rotation made because of the leak (a rotation by the old secret also ends the owner's new one at once).
    ``rotated_out_at`` is set on such a principal (``billing``'s ``KeyPrincipal``)."""

    message = (
        "This API key's secret was replaced by a rotation: until its grace period ends it may call models "
        "and read, but not create, rotate, revoke or change keys, nor change experiments. Use the key's new secret."
    )

    def has_permission(self, request: Any, view: Any) -> bool:
        if request.method in permissions.SAFE_METHODS:
            return True
        return getattr(request.auth, "rotated_out_at", None) is None


# Who may manage experiments (/api/experiments/), and the 403 the API schema names for the refusal.
EXPERIMENT_MANAGEMENT = [
    permissions.IsAuthenticated,
    CanManageExperiments,
    KeyMayManageExperiments,
    NotAReplacedSecret,
]
EXPERIMENT_MANAGEMENT_FORBIDDEN = {
    403: OpenApiResponse(
        response=ErrorResponseSerializer,
        description=(
            "Your role may not manage experiments (operators and admins), or the API key lacks the "
            "`experiments:manage` scope."
        ),
    )
}

# Who may manage keys (gateway keys on /api/keys/, provider keys on /api/provider-keys/), and the 403 the API
# schema names for the refusal.
KEY_MANAGEMENT = [permissions.IsAuthenticated, CanManageOwnKeys, CanManageKeys, NotAReplacedSecret]
KEY_MANAGEMENT_FORBIDDEN = {
    403: OpenApiResponse(
        response=ErrorResponseSerializer,
        description=(
            "The API key lacks the `keys:manage` scope, or its secret was replaced by a rotation (it may only "
            "read keys until its grace period ends), or the user's role (viewer) may not manage keys."
        ),
    )
}


__all__ = [
    "EXPERIMENTS_MANAGE_SCOPE",
    "EXPERIMENT_MANAGEMENT",
    "EXPERIMENT_MANAGEMENT_FORBIDDEN",
    "KEYS_MANAGE_SCOPE",
    "KEY_MANAGEMENT",
    "KEY_MANAGEMENT_FORBIDDEN",
    "CanChat",
    "CanManageExperiments",
    "CanManageKeys",
    "CanManageOwnKeys",
    "CanViewAllUsage",
    "CanViewOwnUsage",
    "KeyMayManageExperiments",
    "KeyScopePermission",
    "NotAReplacedSecret",
    "Role",
    "RolePermission",
]
