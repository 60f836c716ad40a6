"""Verifying a bearer JWT from an identity provider, with PyJWT.

The algorithms a token may use come from the settings, never from the token: the token's ``alg`` is only
checked against them, so ``alg: none`` and an HS256 token whose "secret" is our RSA public key are refused.
RS256/ES256 keys come from the identity provider's JWKS, cached in-process; a token with a ``kid`` the cache
lacks makes it fetch the set again, at most once per ``LLMHUB_JWT_JWKS_REFRESH_MIN_SECONDS`` whatever the
number of unknown kids (a flood of made-up kids cannot hammer the identity provider). A verified token is
remembered by its SHA-256 until min(its expiry, ``LLMHUB_JWT_CACHE_SECONDS``), so the hot path verifies a
signature once per token per minute, not once per request (docs/auth.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from core.cache import _MISSING, TTLCache
from core.text import url_shown

from .exceptions import JwtRefused
from .roles import Role

logger = logging.getLogger("llmhub.auth")

# header.payload.signature, base64url; the signature is empty in an unsigned (alg: none) token. A gateway
# key (sk-llmhub-…) has no dots, so it never looks like one.
_JWT_SHAPE = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA")
_SYMMETRIC = ("HS256", "HS384", "HS512")


@dataclass(frozen=True, slots=True)
class JwtConfig:
    # Neither in a repr (a traceback's locals, a debugger's print): the shared secret signs a token as anyone, and a
    # key set behind basic auth has its password in the URL (a failed fetch logs it as ``url_shown`` does).
    jwks_url: str = field(repr=False)
    hs256_secret: str = field(repr=False)
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    leeway: float


def jwt_config() -> JwtConfig | None:
    """The JWT settings, or None when JWT sign-in is off (neither a JWKS URL nor a shared secret)."""
    jwks_url = settings.LLMHUB_JWT_JWKS_URL
    secret = settings.LLMHUB_JWT_HS256_SECRET
    if not jwks_url and not secret:
        return None
    if not settings.LLMHUB_JWT_ISSUER or not settings.LLMHUB_JWT_AUDIENCE:
        raise ImproperlyConfigured("JWT sign-in needs LLMHUB_JWT_ISSUER and LLMHUB_JWT_AUDIENCE.")
    algorithms = tuple(settings.LLMHUB_JWT_ALGORITHMS) or (
        (("RS256", "ES256") if jwks_url else ()) + (("HS256",) if secret else ())
    )
    for alg in algorithms:
        if (alg in _SYMMETRIC and not secret) or (alg in _ASYMMETRIC and not jwks_url):
            raise ImproperlyConfigured(f"LLMHUB_JWT_ALGORITHMS allows {alg} but gives no key for it.")
        if alg not in _SYMMETRIC + _ASYMMETRIC:
            raise ImproperlyConfigured(f"LLMHUB_JWT_ALGORITHMS: {alg} is not a signing algorithm PyJWT knows.")
    return JwtConfig(
        jwks_url=jwks_url,
        hs256_secret=secret,
        issuer=settings.LLMHUB_JWT_ISSUER,
        audience=settings.LLMHUB_JWT_AUDIENCE,
        algorithms=algorithms,
        leeway=float(settings.LLMHUB_JWT_LEEWAY_SECONDS),
    )


def jwt_bearer(raw: str | None) -> bool:
    """Whether ``raw`` (a bearer value) is to be verified as a JWT: JWT sign-in is on and it has a JWT's
    shape. When sign-in is off, a JWT is just a wrong API key."""
    return bool(raw) and _JWT_SHAPE.match(raw) is not None and jwt_config() is not None


@dataclass(frozen=True, slots=True)
class JwtPrincipal:
    """A verified token's user, as the request path needs it (cached with the token)."""

    user_id: int
    username: str
    role: Role
    issuer: str
    subject: str
    expires_at: float  # epoch seconds


def _printable(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "?", str(value))[:32]


# How the JWKS is fetched: under the outbound policy every outbound call uses (``providers.outbound``: each
# address judged when the connection opens, no redirect off the URL's origin, no environment proxy). That
# module sits above accounts in the chain of imports, so it is plugged in from there (``ProvidersConfig.ready``
# calls ``jwks_outbound_use``); until it is, no JWKS is fetched at all.
JwksClientFactory = Callable[..., httpx.AsyncClient]
_outbound: tuple[JwksClientFactory, tuple[type[Exception], ...]] | None = None


def jwks_outbound_use(client_for: JwksClientFactory, *, refused: type[Exception]) -> None:
    """Fetch the JWKS with ``client_for(url=..., timeout=...)`` (an ``httpx.AsyncClient`` bound to the URL's
    origin); ``refused`` is the exception it raises for a destination the policy refuses."""
    global _outbound
    _outbound = (client_for, (refused,))


class JwksCache:
    """The identity provider's public keys by ``kid``, fetched with an async client and a short timeout.

    Refetched when older than ``LLMHUB_JWT_JWKS_CACHE_SECONDS`` or when a token names an unknown kid, but
    never twice within ``LLMHUB_JWT_JWKS_REFRESH_MIN_SECONDS``; concurrent requests share one fetch. When a
    fetch fails, the keys already known stay in use."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._url = ""
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._inflight: tuple[asyncio.AbstractEventLoop, asyncio.Task[None]] | None = None
        self.fetches = 0

    async def key(self, url: str, kid: str | None) -> jwt.PyJWK:
        if url != self._url:
            self.clear()
            self._url = url
        now = time.monotonic()
        stale = now - self._fetched_at > settings.LLMHUB_JWT_JWKS_CACHE_SECONDS
        if stale or kid not in self._keys:
            await self._refresh(url, now)
        key = self._keys.get(kid)
        if key is None and kid is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        if key is None:
            raise JwtRefused(
                f"The token's signing key (kid {_printable(kid)}) is not one the identity provider publishes."
                if kid is not None
                else "The token names no signing key (kid) and the identity provider publishes several."
            )
        return key

    async def _refresh(self, url: str, now: float) -> None:
        loop = asyncio.get_running_loop()
        if self._inflight is not None and self._inflight[0] is loop and not self._inflight[1].done():
            await asyncio.shield(self._inflight[1])
            return
        if now - self._attempted_at < settings.LLMHUB_JWT_JWKS_REFRESH_MIN_SECONDS:
            return
        self._attempted_at = now
        task = loop.create_task(self._fetch(url))
        self._inflight = (loop, task)
        await asyncio.shield(task)

    async def _fetch(self, url: str) -> None:
        self.fetches += 1
        if _outbound is None:  # no outbound policy plugged in (see jwks_outbound_use): never a bare client
            logger.error("could not fetch the JWKS from %s: no outbound policy is installed", url_shown(url))
            if not self._keys:
                raise JwtRefused("The identity provider's signing keys could not be fetched; try again.")
            return
        client_for, refused = _outbound
        allowed = settings.LLMHUB_JWT_JWKS_TIMEOUT_SECONDS
        try:
            # The client's timeout bounds each step (connect, each read); this one the whole fetch, which every
            # request with a token waits for while the keys are stale or its kid unknown: an identity provider
            # trickling its answer a byte at a time would otherwise hold them all as long as it liked.
            async with asyncio.timeout(allowed), client_for(url=url, timeout=allowed) as client:
                response = await client.get(url, headers={"Accept": "application/json"})
                response.raise_for_status()
                keys = jwt.PyJWKSet.from_dict(response.json()).keys
        except (TimeoutError, httpx.HTTPError, ValueError, jwt.PyJWKSetError, jwt.InvalidKeyError, *refused) as exc:
            # A refusal by the policy says which host and address (never a credential): the operator's clue.
            detail = str(exc) if isinstance(exc, refused) else ""
            # The URL without its userinfo and query: an identity provider's key set behind basic auth or a token.
            logger.warning("could not fetch the JWKS from %s: %s %s", url_shown(url), type(exc).__name__, detail)
            if not self._keys:
                raise JwtRefused("The identity provider's signing keys could not be fetched; try again.") from None
            return
        self._keys = {key.key_id: key for key in keys}
        self._fetched_at = time.monotonic()


jwks_cache = JwksCache()
# Verified tokens by SHA-256: the principal, until min(the token's expiry, LLMHUB_JWT_CACHE_SECONDS).
token_cache: TTLCache[JwtPrincipal] = TTLCache("jwt-tokens", max_entries=20_000)

_CLAIM_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "The token has expired (exp)."),
    (jwt.ImmatureSignatureError, "The token is not valid yet (nbf or iat is in the future)."),
    (jwt.InvalidAudienceError, "The token's audience (aud) is not this server."),
    (jwt.InvalidIssuerError, "The token's issuer (iss) is not the identity provider this server trusts."),
    (jwt.InvalidSignatureError, "The token's signature does not verify."),
    (jwt.InvalidAlgorithmError, "The token's algorithm does not match its signing key."),
)


async def jwt_claims_verify(raw: str, config: JwtConfig) -> dict[str, Any]:
    """The token's claims if its signature, issuer, audience, expiry and not-before hold; else JwtRefused."""
    try:
        header = jwt.get_unverified_header(raw)
    except jwt.PyJWTError:
        raise JwtRefused("The token is not a well-formed JWT.") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in config.algorithms:
        raise JwtRefused(
            f"The token's algorithm ({_printable(alg)}) is not accepted; this server accepts "
            f"{', '.join(config.algorithms)}."
        )
    if alg in _SYMMETRIC:
        key: Any = config.hs256_secret
    else:
        kid = header.get("kid")
        jwk = await jwks_cache.key(config.jwks_url, kid if isinstance(kid, str) else None)
        if jwk.algorithm_name != alg:
            raise JwtRefused("The token's algorithm does not match its signing key.")
        key = jwk.key
    try:
        return jwt.decode(
            raw,
            key,
            algorithms=[alg],
            issuer=config.issuer,
            audience=config.audience,
            leeway=config.leeway,
            options={"require": ["exp", "iss", "aud", "sub"], "verify_nbf": True, "verify_iat": True},
        )
    except jwt.MissingRequiredClaimError as exc:
        raise JwtRefused(f"The token lacks the {_printable(exc.claim)} claim.") from None
    except jwt.PyJWTError as exc:
        for error_class, message in _CLAIM_ERRORS:
            if isinstance(exc, error_class):
                raise JwtRefused(message) from None
        raise JwtRefused("The token is not a valid JWT.") from None


def token_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


async def jwt_authenticate(raw: str, *, ip_address: str | None = None) -> JwtPrincipal:
    """The user a bearer JWT signs in (created at its first token), or JwtRefused. A refusal and a first
    sign-in are written to the audit log (rate-limited; accounts.services)."""
    from asgiref.sync import sync_to_async

    from .services import identity_sign_in, jwt_failure_record

    digest = token_digest(raw)
    cached = token_cache.get(digest)
    if cached is not _MISSING:
        return cached  # type: ignore[return-value]
    config = jwt_config()
    if config is None:
        raise JwtRefused("JWT sign-in is not enabled on this server.")
    try:
        claims = await jwt_claims_verify(raw, config)
        principal = await sync_to_async(identity_sign_in)(issuer=config.issuer, claims=claims)
    except JwtRefused as exc:
        await sync_to_async(jwt_failure_record)(reason=exc.message, ip_address=ip_address)
        raise
    ttl = min(float(settings.LLMHUB_JWT_CACHE_SECONDS), principal.expires_at - time.time())
    if ttl > 0:
        token_cache.set(digest, principal, ttl=ttl)
    return principal
