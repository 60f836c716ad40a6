"""Bring your own key on the request path: which of a user's own provider keys a request uses.

``user_credentials`` loads a user's usable keys (cached per process, dropped when a key changes);
``byok_bind`` puts the user's key on a model bound to a deployment, or says the deployment cannot serve
the user (its provider requires a key of their own and they have none).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from .exceptions import ProviderAuthenticationError, ProviderError, UserKeyRefusedError
from .fields import Secret
from .models import ByokMode, CredentialStatus, ProviderCredential
from .types import ResolvedModel


@dataclass(frozen=True, slots=True)
class UserCredential:
    id: int
    provider_id: int
    api_key: Secret = field(repr=False)
    hint: str = ""


async def user_credentials(user_id: int) -> Mapping[int, UserCredential]:
    """The user's own keys by provider id: those not known to be refused (valid or unchecked)."""
    rows = ProviderCredential.objects.filter(owner_id=user_id).exclude(status=CredentialStatus.INVALID)
    return {
        row.provider_id: UserCredential(id=row.pk, provider_id=row.provider_id, api_key=row.api_key, hint=row.hint)
        async for row in rows
    }


def byok_bind(target: ResolvedModel, credentials: Mapping[int, UserCredential]) -> ResolvedModel | None:
    """``target`` (bound to a deployment) on the user's own key when its provider allows one and the user
    has one; unchanged on the provider's key otherwise; None when the provider requires the user's own key
    and there is none."""
    provider = target.provider
    if provider.byok == ByokMode.DISABLED:
        return target
    credential = credentials.get(provider.id)
    if credential is None:
        return None if provider.byok == ByokMode.REQUIRED else target
    bound = replace(provider, api_key=credential.api_key, credential_id=credential.id, credential_hint=credential.hint)
    return replace(target, provider=bound)


def byok_refused(target: ResolvedModel, exc: ProviderError) -> ProviderError:
    """The error to give the client when a call on ``target`` failed with ``exc``: a refusal of the user's
    own key becomes ``UserKeyRefusedError`` naming the key; anything else is unchanged."""
    provider = target.provider
    if provider.credential_id is None or not isinstance(exc, ProviderAuthenticationError):
        return exc
    return UserKeyRefusedError(
        f"{provider.name} refused your own API key {provider.credential_hint or ''}".rstrip()
        + ". Replace it in your provider keys, or delete it to use the platform's key where allowed.",
        provider=provider.name,
        upstream_status=exc.upstream_status,
    )


def byok_missing(model: ResolvedModel, credentials: Mapping[int, UserCredential]) -> list[str]:
    """The providers (names) of ``model``'s deployments that require the user's own key they do not have."""
    return sorted(
        {
            d.provider.name
            for d in model.deployments
            if d.provider.byok == ByokMode.REQUIRED and d.provider.id not in credentials
        }
    )


def byok_in_use(model: ResolvedModel) -> bool:
    """Whether any deployment of ``model`` may run on a user's key: else no lookup is needed."""
    return any(d.provider.byok != ByokMode.DISABLED for d in model.deployments)


def byok_servable(deployment_provider_byok: str, provider_id: int, credentials: Mapping[int, UserCredential]) -> bool:
    return deployment_provider_byok != ByokMode.REQUIRED or provider_id in credentials
