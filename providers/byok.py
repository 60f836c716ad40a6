"""Bring your own key on the request path: which of a user's own provider keys a request uses.

``user_credentials`` loads a user's usable keys (cached per process, dropped when a key changes);
``byok_bind`` puts the user's key on a model bound to a deployment, or says the deployment cannot serve
the user (its provider requires a key of their own and they have none). ``byok_refused`` turns the
provider's refusal of a user's key into the user's error, and marks the key invalid in the background so
that their next request does not meet the same refusal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from asgiref.sync import sync_to_async
from django.db import DatabaseError, transaction
from django.utils import timezone

from audit.services import audit_record
from core.broadcast import broadcast_listen
from core.cache import TTLCache

from .exceptions import (
    ProviderAuthenticationError,
    ProviderError,
    ProviderNotFoundError,
    ProviderQuotaExhaustedError,
    ProviderRateLimitError,
    UpstreamModelMissingError,
    UserKeyQuotaExhaustedError,
    UserKeyRefusedError,
)
from .fields import Secret
from .models import ByokMode, CredentialStatus, ProviderCredential, url_origin
from .services.credentials import provider_credential_invalid_notice_queue
from .types import ProviderConfig, ResolvedDeployment, ResolvedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UserCredential:
    id: int
    provider_id: int
    api_key: Secret = field(repr=False)
    hint: str = ""
    # The host its owner agreed to send it to (``ProviderCredential.confirmed_origin``): a provider moved
    # elsewhere does not get it (``usable_credential``).
    origin: str = ""


# user id -> their usable keys by provider id. Invalidated per user by ``signals`` when a key is saved or
# deleted in this process, and in the others through ``core.broadcast`` (with Redis; else within
# ``LLMHUB_LOOKUP_CACHE_TTL``). A user with
# no key is cached too (an empty mapping), so a model that allows own keys costs one query per TTL per user.
credentials_cache: TTLCache[Mapping[int, UserCredential]] = TTLCache("user_credentials")


async def user_credentials(user_id: int) -> Mapping[int, UserCredential]:
    """The user's own keys by provider id: those not known to be refused (valid or unchecked)."""
    broadcast_listen()  # a key deleted in another process is dropped here at once (``providers.signals``)
    return await credentials_cache.get_or_load(user_id, lambda: _credentials_load(user_id))


def _credentials_rows(user_id: int):
    return ProviderCredential.objects.filter(owner_id=user_id).exclude(status=CredentialStatus.INVALID)


def _credential(row: ProviderCredential) -> UserCredential:
    return UserCredential(
        id=row.pk, provider_id=row.provider_id, api_key=row.api_key, hint=row.hint, origin=row.confirmed_origin
    )


async def _credentials_load(user_id: int) -> Mapping[int, UserCredential]:
    return {row.provider_id: _credential(row) async for row in _credentials_rows(user_id)}


def user_credentials_sync(user_id: int) -> Mapping[int, UserCredential]:
    """For pages (the chat picker): the same keys as ``user_credentials``, uncached, so that a key just added
    in another process unlocks its models at the next page load."""
    return {row.provider_id: _credential(row) for row in _credentials_rows(user_id)}


def usable_credential(provider: ProviderConfig, credentials: Mapping[int, UserCredential]) -> UserCredential | None:
    """The user's key for ``provider`` when it may go where ``provider`` (this snapshot) sends requests: None
    when they have none, or when the provider was moved to another host than the one they agreed to (the key
    is paused until they confirm the new host). Compared with the very snapshot the request goes out on, so no
    cache can send a key to a host its owner has not agreed to."""
    credential = credentials.get(provider.id)
    if credential is None or credential.origin != url_origin(provider.base_url):
        return None
    return credential


def byok_paused(model: ResolvedModel, credentials: Mapping[int, UserCredential]) -> dict[str, UserCredential]:
    """By provider name: the user's keys for ``model``'s providers that are paused (the provider moved to a host
    they have not agreed to). Read only to word a refusal: "confirm yours", not "add one"."""
    return {
        d.provider.name: credentials[d.provider.id]
        for d in model.deployments
        if d.provider.id in credentials and usable_credential(d.provider, credentials) is None
    }


def byok_bind(target: ResolvedModel, credentials: Mapping[int, UserCredential]) -> ResolvedModel | None:
    """``target`` (bound to a deployment) on the user's own key when its provider allows one and the user
    has one; unchanged on the provider's key otherwise; None when the provider requires the user's own key
    and there is none."""
    provider = target.provider
    if provider.byok == ByokMode.DISABLED:
        return target
    credential = usable_credential(provider, credentials)
    if credential is None:
        return None if provider.byok == ByokMode.REQUIRED else target
    bound = provider.on_user_key(credential.api_key, credential_id=credential.id, hint=credential.hint)
    return replace(target, provider=bound)


def byok_servable(deployment: ResolvedDeployment, credentials: Mapping[int, UserCredential]) -> bool:
    """Whether ``deployment`` can serve the user: its provider does not require their own key, or they have
    one (``byok_bind`` would not answer None); without building the bound snapshot."""
    provider = deployment.provider
    return provider.byok != ByokMode.REQUIRED or usable_credential(provider, credentials) is not None


def byok_on_own_key(deployment: ResolvedDeployment, credentials: Mapping[int, UserCredential]) -> bool:
    """Whether ``deployment`` would serve the user on their own key (``byok_bind`` would bind it to one)."""
    provider = deployment.provider
    return provider.byok != ByokMode.DISABLED and usable_credential(provider, credentials) is not None


def byok_only(models: Iterable[ResolvedModel], credentials: Mapping[int, UserCredential] | None) -> bool:
    """Whether every deployment that may serve the request (of ``models``: the model, its fallbacks) runs on
    the user's own key: then nothing of it is paid on the platform's keys (admission need not reserve
    against the platform's budgets). False without credentials, or when some deployment would use the
    provider's key."""
    if not credentials:
        return False
    servable = [d for m in models for d in m.deployments if byok_servable(d, credentials)]
    return bool(servable) and all(byok_on_own_key(d, credentials) for d in servable)


def byok_refused(target: ResolvedModel, exc: ProviderError) -> ProviderError:
    """The error to give the client when a call on ``target`` failed with ``exc``: a refusal of the user's
    own key becomes ``UserKeyRefusedError`` naming the key by its hint, its account's exhausted quota
    ``UserKeyQuotaExhaustedError``, and the key's account without access to the model (403, or OpenAI's 404
    "does not exist or you do not have access to it") ``UserKeyRefusedError`` naming the model; anything
    else is unchanged.

    A key refused as invalid (401) is also marked invalid, in the background (``byok_key_refused_record``),
    so that the user's next request uses the provider's key (``optional``) or is refused up front as needing
    their own (``required``) instead of meeting the same refusal. A 403 or 404 (no access to this model) leaves
    the key as it is: it may serve the provider's other models. A 404 for an upstream id the health round found
    missing (``UpstreamModelMissingError``, from ``exceptions.upstream_model_missing``) is the catalog's, not the
    key's: unchanged."""
    provider = target.provider
    if provider.credential_id is None or isinstance(exc, UpstreamModelMissingError):
        return exc
    hint = f" {provider.credential_hint}" if provider.credential_hint else ""
    if isinstance(exc, ProviderQuotaExhaustedError):
        # Not retried on another deployment: the platform's key would pay for what the user's account could not.
        return UserKeyQuotaExhaustedError(
            f"{provider.name} says the quota of your own API key{hint} is exhausted: check your plan and billing "
            "with them, or delete the key to use the platform's key where allowed.",
            provider=provider.name,
            upstream_status=exc.upstream_status,
        )
    if isinstance(exc, ProviderNotFoundError) and exc.upstream_status == 404:
        # OpenAI's answer to an account without access to the model: the key's, as a 403 is. Not moved on to
        # another deployment, which may be on the platform's key and would pay for what the user's key may not.
        what = f"{provider.name} refused your own API key{hint}: {_no_access(target, 404)}"
    elif not isinstance(exc, ProviderAuthenticationError) or isinstance(exc, UserKeyRefusedError):
        return exc
    elif exc.upstream_status == 403:
        what = f"{provider.name} refused your own API key{hint}: {_no_access(target, 403)}"
    else:
        what = f"{provider.name} refused your own API key{hint} as invalid (HTTP {exc.upstream_status or 401})"
        byok_key_refused_record(
            credential_id=provider.credential_id,
            api_key=provider.api_key,
            reason=f"{provider.name} refused the key when it was used (HTTP {exc.upstream_status or 401}).",
        )
    return UserKeyRefusedError(
        what + ". Replace it in your provider keys, or delete it to use the platform's key where allowed.",
        provider=provider.name,
        upstream_status=exc.upstream_status,
    )


def _no_access(target: ResolvedModel, status: int) -> str:
    return f"it has no access to the model {target.upstream_id!r} (HTTP {status})"


def byok_key_failure(target: ResolvedModel, exc: ProviderError) -> bool:
    """Whether ``exc``, met on ``target``, speaks of the user's own key rather than of the deployment: the key
    refused (401, 403), its account's rate limit or quota (429: a provider limits an account, not the
    deployment), or its account's access to the model (404: OpenAI's "does not exist or you do not have access
    to it"). Such a failure does not count against the deployment's breaker, which serves everyone else on
    the provider's key. A 5xx, a timeout or a cut connection says the same of the deployment on any key; an
    error the provider did not answer (no ``upstream_status``: the deployments' own caps) is not the key's, nor a
    404 for an upstream id the health round found missing (``UpstreamModelMissingError``): the deployment's on
    any key, which counts against its breaker (a half-open one's probe on a user's key included)."""
    if (
        target.provider.credential_id is None
        or exc.upstream_status is None
        or isinstance(exc, UpstreamModelMissingError)
    ):
        return False
    return isinstance(
        exc, (ProviderAuthenticationError, ProviderRateLimitError, ProviderNotFoundError, UserKeyQuotaExhaustedError)
    )


# Marks in progress, by credential id: kept referenced until done, and one per key however many requests
# met the refusal at once.
_marking: dict[int, asyncio.Task[None]] = {}
_MARK_ATTEMPTS = 5


def byok_key_refused_record(*, credential_id: int, api_key: Secret, reason: str) -> None:
    """Mark a user's key invalid off the request's path: a task of the running loop, retried while the
    database fails, logged if it never lands (the next refusal of the same key tries again, and the daily
    re-validation finds it too)."""
    if credential_id in _marking:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop (a synchronous caller): do it now
        byok_credential_refused(credential_id=credential_id, api_key=api_key, reason=reason)
        return
    task = loop.create_task(_mark_until_landed(credential_id, api_key, reason))
    _marking[credential_id] = task
    task.add_done_callback(lambda _: _marking.pop(credential_id, None))


async def _mark_until_landed(credential_id: int, api_key: Secret, reason: str) -> None:
    delay = 0.2
    for attempt in range(1, _MARK_ATTEMPTS + 1):
        try:
            await sync_to_async(byok_credential_refused, thread_sensitive=False)(
                credential_id=credential_id, api_key=api_key, reason=reason
            )
            return
        except DatabaseError:
            if attempt == _MARK_ATTEMPTS:
                logger.exception(
                    "provider key %s was refused upstream but could not be marked invalid (%d attempts)",
                    credential_id,
                    attempt,
                )
                return
            await asyncio.sleep(delay)
            delay *= 2
        except Exception:
            logger.exception("provider key %s was refused upstream; marking it invalid failed", credential_id)
            return


def byok_credential_refused(*, credential_id: int, api_key: Secret, reason: str) -> bool:
    """Record that the provider refused ``api_key``, the key of credential ``credential_id``, on a request:
    the credential turns invalid with ``reason`` (audited as ``provider_key.validation_failed``, by the
    system) and its owner is told by email. Nothing changes when the key was replaced or deleted since the
    request read it, or is already invalid. Returns whether it turned invalid."""
    with transaction.atomic():
        current = ProviderCredential.objects.select_for_update().filter(pk=credential_id).first()
        if current is None or current.api_key != api_key or current.status == CredentialStatus.INVALID:
            return False
        old_status = current.status
        current.status = CredentialStatus.INVALID
        current.status_detail = reason[:300]
        current.last_validated_at = timezone.now()
        current.invalid_notice_due = True  # until an email is sent (provider_credential_invalid_notify)
        # ``save`` (not a queryset update): the signal drops the owner's cached keys in this process.
        current.save(update_fields=["status", "status_detail", "last_validated_at", "invalid_notice_due", "updated_at"])
        audit_record(
            "provider_key.validation_failed",
            target=current,
            changes={"status": [old_status, current.status], "status_detail": [None, current.status_detail]},
            actor=None,
        )
    # The key is marked invalid either way (the page and the API show it); the email is retried while the mail
    # server fails, and its notice stays due until it is sent.
    provider_credential_invalid_notice_queue(credential_id)
    return True


def byok_missing(model: ResolvedModel, credentials: Mapping[int, UserCredential]) -> list[str]:
    """The providers (names) of ``model``'s deployments that require the user's own key they do not have."""
    return sorted(
        {
            d.provider.name
            for d in model.deployments
            if d.provider.byok == ByokMode.REQUIRED and usable_credential(d.provider, credentials) is None
        }
    )


async def byok_refused_hints(user_id: int, provider_names: Iterable[str]) -> dict[str, str]:
    """The hints of the user's keys for these providers (by name) that are marked invalid: those the cache of
    usable keys leaves out. Read only to word a refusal: "replace yours", not "add one"."""
    rows = ProviderCredential.objects.filter(
        owner_id=user_id, provider__name__in=list(provider_names), status=CredentialStatus.INVALID
    ).values_list("provider__name", "hint")
    return {name: hint async for name, hint in rows}


def byok_required_in(model: ResolvedModel) -> bool:
    """Whether some deployment of ``model`` runs only on a user's own key: else every user can be served."""
    return any(d.provider.byok == ByokMode.REQUIRED for d in model.deployments)


def byok_callable(models: list[ResolvedModel], credentials: Mapping[int, UserCredential]) -> list[ResolvedModel]:
    """Those of ``models`` (the ones a user may use) that a request of theirs can be served on: some deployment
    of the model, or of one of its fallbacks among ``models`` of the same mode, that their own keys let serve
    them (``byok_servable``). The others would only ever answer 403 ``own_key_required``."""
    by_name = {m.name: m for m in models}

    def servable(model: ResolvedModel) -> bool:
        return any(byok_servable(d, credentials) for d in model.deployments)

    def served_by_fallback(model: ResolvedModel) -> bool:
        fallbacks = (by_name.get(name) for name in model.fallbacks)
        return any(f is not None and f.mode == model.mode and servable(f) for f in fallbacks)

    return [m for m in models if servable(m) or served_by_fallback(m)]


def byok_in_use(model: ResolvedModel) -> bool:
    """Whether any deployment of ``model`` may run on a user's key: else no lookup is needed."""
    return any(d.provider.byok != ByokMode.DISABLED for d in model.deployments)
