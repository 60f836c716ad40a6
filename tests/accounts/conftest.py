"""A local identity provider for the JWT tests: RSA and EC key pairs generated here with ``cryptography``,
their public halves served as a JWKS by a real HTTP server on 127.0.0.1 (which counts its fetches), and
tokens signed with PyJWT. ``jwt_on`` points llmhub's settings at it."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.loopback_http import LoopbackHTTPServer, QuietHandler

ISSUER = "https://idp.test.example"
AUDIENCE = "llmhub-tests"
HS256_SECRET = "a-shared-secret-for-hs256-of-32+-bytes-0123456789"


def _jwk(public_key: Any, *, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    return {**json.loads(algorithm.to_jwk(public_key)), "kid": kid, "alg": alg, "use": "sig"}


class IdentityProvider(LoopbackHTTPServer):
    """Signs tokens and serves its public keys (``/jwks.json``); ``publish`` changes what is served."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.keys = {"rsa-1": (self.rsa, "RS256"), "ec-1": (self.ec, "ES256")}
        self.published = dict(self.keys)
        self.fetches = 0

    @property
    def jwks_url(self) -> str:
        return self.origin + "/jwks.json"

    def rsa_public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwks(self) -> dict[str, Any]:
        return {"keys": [_jwk(key.public_key(), kid=kid, alg=alg) for kid, (key, alg) in self.published.items()]}

    def add_key(self, kid: str, *, publish: bool) -> None:
        self.keys[kid] = (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
        if publish:
            self.published[kid] = self.keys[kid]

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "user-1",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
            "preferred_username": "ada",
            "email": "ada@example.com",
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def token(self, alg: str = "RS256", *, kid: str | None = None, key: Any = None, **claims: Any) -> str:
        payload = self.claims(**claims)
        if alg == "HS256":
            return jwt.encode(payload, key or HS256_SECRET, algorithm="HS256")
        kid = kid or ("ec-1" if alg == "ES256" else "rsa-1")
        return jwt.encode(payload, key or self.keys[kid][0], algorithm=alg, headers={"kid": kid})

    def start(self) -> IdentityProvider:
        idp = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                idp.fetches += 1
                body = json.dumps(idp.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.serve(Handler)
        return self


def unsigned_token(claims: dict[str, Any]) -> str:
    """``alg: none``: a header and claims with an empty signature, as an attacker would send them."""
    return jwt.encode(claims, None, algorithm="none")


@pytest.fixture(scope="session")
def identity_provider_server() -> Iterator[IdentityProvider]:
    idp = IdentityProvider().start()
    yield idp
    idp.stop()


@pytest.fixture
def idp(identity_provider_server: IdentityProvider) -> IdentityProvider:
    identity_provider_server.published = {kid: identity_provider_server.keys[kid] for kid in ("rsa-1", "ec-1")}
    identity_provider_server.fetches = 0
    return identity_provider_server


@pytest.fixture
def jwt_on(settings, idp: IdentityProvider) -> IdentityProvider:
    """JWT sign-in on, against the local identity provider (JWKS for RS256/ES256 and a shared HS256 secret),
    with an empty JWKS cache."""
    from accounts.jwt import jwks_cache

    settings.LLMHUB_JWT_JWKS_URL = idp.jwks_url
    settings.LLMHUB_JWT_HS256_SECRET = HS256_SECRET
    settings.LLMHUB_JWT_ISSUER = ISSUER
    settings.LLMHUB_JWT_AUDIENCE = AUDIENCE
    settings.LLMHUB_JWT_ALGORITHMS = ["RS256", "ES256", "HS256"]
    jwks_cache.clear()
    yield idp
    jwks_cache.clear()
