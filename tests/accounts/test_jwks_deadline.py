"""The JWKS fetch is bounded as a whole, not only per read: an identity provider that trickles its key set (a byte
now and then, each well within the per-read timeout) is given up on at ``LLMHUB_JWT_JWKS_TIMEOUT_SECONDS``, and
the requests waiting for that fetch are answered."""

from __future__ import annotations

import json

import pytest

from accounts.exceptions import JwtRefused
from accounts.jwt import jwks_cache, jwt_claims_verify, jwt_config
from tests.trickling import TricklingHttp


class TricklingJwks(TricklingHttp):
    """An identity provider that reads a GET's head and trickles a valid JWKS (``jwks``) back."""

    def __init__(self, jwks: dict[str, object], pause: float) -> None:
        body = json.dumps(jwks).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        self.answer = head.encode() + body
        super().__init__(pause=pause)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"


@pytest.fixture
def trickling_idp(jwt_on, settings):
    """The local identity provider's EC key, served a byte every 20 ms (about 7 s in all), under a 1 s timeout."""
    jwt_on.published = {"ec-1": jwt_on.keys["ec-1"]}
    server = TricklingJwks(jwt_on.jwks(), pause=0.02)
    settings.LLMHUB_JWT_JWKS_URL = server.url
    settings.LLMHUB_JWT_JWKS_TIMEOUT_SECONDS = 1.0
    jwks_cache.clear()
    yield server
    server.close()
    jwks_cache.clear()


async def test_a_jwks_that_trickles_is_given_up_at_the_timeout_and_the_token_answered(jwt_on, trickling_idp):
    """``LLMHUB_JWT_JWKS_TIMEOUT_SECONDS`` bounded each read only: a key set trickled a byte at a time held the
    fetch, and every request with a token that waited for it, as long as the identity provider liked (a
    ``kid`` unknown or a cache gone stale makes every such request wait for the one fetch). It now bounds the
    whole fetch: the token is answered with the 401 of keys that could not be fetched, and the key set is never
    read to its end."""
    token = jwt_on.token("ES256")
    with pytest.raises(JwtRefused, match="signing keys could not be fetched"):
        await jwt_claims_verify(token, jwt_config())
    assert trickling_idp.sessions == 1
    assert trickling_idp.accepted == 0
