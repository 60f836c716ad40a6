"""The JWKS URL's credentials stay out of the log: an identity provider whose key set sits behind HTTP basic auth
is configured as ``https://user:password@idp/...`` (httpx sends the userinfo as the Authorization header), or with a
token in its query; a failed fetch is logged with the host and path only.

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
