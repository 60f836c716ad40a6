"""The JWKS URL's credentials stay out of the log: an identity provider whose key set sits behind HTTP basic auth
is configured as ``https://user:password@idp/...`` (httpx sends the userinfo as the Authorization header), or with a
token in its query; a failed fetch is logged with the host and path only; and the repr of the JWT settings shows
neither the URL nor the shared HS256 secret.

Until 7 December the warning quoted ``LLMHUB_JWT_JWKS_URL`` whole (``could not fetch the JWKS from %s``), password
and query included, at every failed fetch, into a log that every operator and log pipeline reads."""

from __future__ import annotations

import logging
import secrets

import pytest

pytestmark = pytest.mark.django_db

PASSWORD = f"jwks-canary-{secrets.token_hex(8)}"
QUERY_TOKEN = f"jwks-query-canary-{secrets.token_hex(8)}"


def test_a_failed_jwks_fetch_logs_the_host_and_path_but_not_the_urls_password_or_query(
    client, jwt_on, settings, caplog
):
    origin = jwt_on.origin.removeprefix("http://")
    settings.LLMHUB_JWT_JWKS_URL = f"http://idp-user:{PASSWORD}@{origin}/not-the-jwks.json?token={QUERY_TOKEN}"
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True

    with caplog.at_level(logging.DEBUG):
        response = client.get("/api/usage/summary/", HTTP_AUTHORIZATION=f"Bearer {jwt_on.token()}")

    assert response.status_code == 401, response.content  # the identity provider answered 404
    logged = [record.getMessage() for record in caplog.records if "JWKS" in record.getMessage()]
    assert logged, caplog.text
    assert any(f"http://{origin}/not-the-jwks.json" in line for line in logged), logged  # the operator's clue
    assert PASSWORD not in caplog.text and QUERY_TOKEN not in caplog.text
    assert PASSWORD not in response.content.decode() and QUERY_TOKEN not in response.content.decode()


def test_the_jwt_settings_repr_shows_neither_the_shared_secret_nor_the_jwks_urls_password(settings):
    """What a traceback's locals or a debugger print of the settings llmhub verifies tokens with (``JwtConfig``,
    read at every token's verification): until 7 December its repr held the HS256 secret, with which anyone can
    sign a token as any user, and the JWKS URL whole."""
    from accounts.jwt import jwt_config

    shared = f"hs256-canary-{secrets.token_hex(16)}"
    settings.LLMHUB_JWT_HS256_SECRET = shared
    settings.LLMHUB_JWT_JWKS_URL = f"https://idp-user:{PASSWORD}@idp.example/jwks.json"
    settings.LLMHUB_JWT_ISSUER, settings.LLMHUB_JWT_AUDIENCE = "https://idp.example", "llmhub"

    shown = repr(jwt_config())

    assert "idp.example" in shown  # the issuer, and what else says which provider it is
    assert shared not in shown and PASSWORD not in shown
