"""Who is calling: the ``Caller`` every entry point builds from its credentials (a gateway key, a bearer
JWT from an identity provider, a signed-in user) before it runs the pipeline, and the models that caller
may use. A caller whose role may not chat (a viewer) is refused here, on every entry point alike."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from accounts.exceptions import RoleForbidden
from accounts.jwt import JwtPrincipal, jwt_authenticate, jwt_bearer
from accounts.roles import CAPABILITIES, Capability, Role, role_for_user_id, role_of
from billing.services.admission import models_allowed
from billing.services.keys import KeyPrincipal, api_key_authenticate
from providers.byok import byok_callable, byok_required_in, user_credentials
from providers.models import ModelMode
from providers.types import ResolvedModel


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: int
    username: str
    api_key_id: int | None = None
    key_allowed_model_ids: frozenset[int] | None = None
    key_scopes: frozenset[str] = frozenset()  # the gateway key's rights beyond calling models
    role: Role = Role.MEMBER
    token_expires_at: float | None = None  # a JWT's exp (epoch seconds): a socket signed in with it ends then


def _may_chat(role: Role) -> Role:
    if Capability.CHAT not in CAPABILITIES[role]:
        raise RoleForbidden(
            f"Your role ({role.value}) may not use models: it may only read its own usage. "
            "Ask an administrator for the member role."
        )
    return role


async def caller_role_recheck(caller: Caller) -> Caller:
    """``caller`` with its role as it is now (the roles' lookup cache), for a WebSocket that outlives the
    moment it signed in; RoleForbidden once the role may no longer chat (a member made a viewer)."""
    role = _may_chat(await role_for_user_id(caller.user_id))
    return caller if role == caller.role else replace(caller, role=role)


async def caller_from_user(user: Any) -> Caller:
    """A signed-in user (the web session); RoleForbidden for a role that may not chat."""
    role = _may_chat(await role_for_user_id(user.pk))
    return Caller(user_id=user.pk, username=user.get_username(), role=role)


async def caller_from_api_key(raw: str | None, *, ip_address: str | None = None) -> Caller:
    """The caller a bearer value names: a gateway key, or a JWT when JWT sign-in is on. AuthenticationFailed
    (gateway key), JwtRefused (401, why the token was refused) or RoleForbidden (403)."""
    if jwt_bearer(raw):
        principal = await jwt_authenticate(raw, ip_address=ip_address)
        return Caller(
            user_id=principal.user_id,
            username=principal.username,
            role=_may_chat(principal.role),
            token_expires_at=principal.expires_at,
        )
    principal = await api_key_authenticate(raw)
    return Caller(
        user_id=principal.user_id,
        username=principal.username,
        api_key_id=principal.key_id,
        key_allowed_model_ids=principal.allowed_model_ids,
        key_scopes=principal.scopes,
        role=_may_chat(await role_for_user_id(principal.user_id)),
    )


def caller_for_request(request: Any) -> Caller:
    """The pipeline's caller for a DRF request, from what authenticated it: a gateway key carries its model
    restrictions (and its id, for its budget and the ledger), a JWT its role, the session the user's."""
    principal = request.auth
    user = request.user
    if isinstance(principal, KeyPrincipal):
        return Caller(
            user_id=principal.user_id,
            username=principal.username,
            api_key_id=principal.key_id,
            key_allowed_model_ids=principal.allowed_model_ids,
            key_scopes=principal.scopes,
            role=role_of(user),
        )
    if isinstance(principal, JwtPrincipal):
        return Caller(
            user_id=principal.user_id,
            username=principal.username,
            role=principal.role,
            token_expires_at=principal.expires_at,
        )
    return Caller(user_id=user.pk, username=user.get_username(), role=role_of(user))


async def models_for_caller(caller: Caller, *, mode: str | None = ModelMode.CHAT) -> list[ResolvedModel]:
    """The models ``caller`` may use and can be served on, of one ``mode`` (chat: the picker's), or of every
    mode (None): one whose deployments all need the caller's own provider key, which they lack (or have had
    refused), is left out. Their keys are looked up (cached, ``user_credentials``) only when some model needs
    one."""
    models = await models_allowed(user_id=caller.user_id, key_allowed_model_ids=caller.key_allowed_model_ids, mode=mode)
    if not any(byok_required_in(m) for m in models):
        return models
    return byok_callable(models, await user_credentials(caller.user_id))


async def model_listed_for_caller(caller: Caller, name: str, *, mode: str | None) -> ResolvedModel | None:
    """The model ``name`` as ``models_for_caller`` lists it to ``caller`` (``GET /v1/models/{model}`` in either
    protocol's shape), or None when it lists no such model."""
    return next((model for model in await models_for_caller(caller, mode=mode) if model.name == name), None)
