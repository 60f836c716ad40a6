"""The error renderers of ``core.errors``: the bytes and headers each protocol's clients read.

Pure formatting, so unit tests: the entry points that use these renderers are exercised end to end by
tests/gateway (OpenAI's and Anthropic's SDKs against a live server) and tests/billing (the /api/* views).
"""

from __future__ import annotations

import json

from django.test import override_settings

from core.errors import (
    anthropic_error_event,
    anthropic_error_response,
    json_response,
    openai_error_event,
    openai_error_response,
)
from core.exceptions import ApplicationError, DatabaseUnavailableError
from providers.exceptions import ProviderOverloadedError, ProviderRateLimitError


class RateLimited(ApplicationError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(message, extra={"headers": headers})
        self.retry_after = retry_after


def test_openai_response_is_compact_utf8_with_the_error_headers():
    exc = RateLimited("Trop de requêtes", retry_after=1.4, headers={"x-ratelimit-remaining-requests": "0"})

    response = openai_error_response(exc)

    assert response.status_code == 429
    assert response["Content-Type"] == "application/json"
    assert (
        response.content
        == (
            '{"error":{"message":"Trop de requêtes","type":"rate_limit_error","param":null,'
            '"code":"rate_limit_exceeded"}}'
        ).encode()
    )
    assert response["Retry-After"] == "2"  # 1.4 s, rounded up: after 1 s the limit would still refuse
    assert response["x-ratelimit-remaining-requests"] == "0"
    assert "WWW-Authenticate" not in response


def test_retry_after_is_at_least_one_second():
    response = openai_error_response(ProviderRateLimitError("slow down", provider="p", retry_after=0.2))

    assert response["Retry-After"] == "1"


@override_settings(LLMHUB_DATABASE_RETRY_AFTER=7)
def test_database_outage_is_a_503_server_error_to_retry():
    response = openai_error_response(DatabaseUnavailableError())

    assert response.status_code == 503
    assert json.loads(response.content)["error"]["type"] == "server_error"
    assert response["Retry-After"] == "7"


def test_openai_401_says_how_to_authenticate():
    response = openai_error_response(ApplicationError("Invalid API key.", code="invalid_api_key", status_code=401))

    assert response["WWW-Authenticate"] == 'Bearer realm="llmhub"'


def test_openai_stream_error_event():
    event = openai_error_event(ApplicationError("bad", param="model", code="x"))

    assert event == b'data: {"error":{"message":"bad","type":"invalid_request_error","param":"model","code":"x"}}\n\n'


def test_anthropic_response_takes_anthropic_types_and_statuses():
    overloaded = anthropic_error_response(ProviderOverloadedError("Overloaded", provider="p"))
    unauthorized = anthropic_error_response(ApplicationError("Invalid API key.", status_code=401))
    upstream = anthropic_error_response(ProviderRateLimitError("slow down", provider="p", retry_after=3))

    assert overloaded.status_code == 529
    assert overloaded.content == b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    assert unauthorized.status_code == 401
    assert json.loads(unauthorized.content)["error"]["type"] == "authentication_error"
    assert "WWW-Authenticate" not in unauthorized  # Anthropic's API sends none
    assert upstream.status_code == 429
    assert upstream["Retry-After"] == "3"


def test_anthropic_stream_error_event():
    event = anthropic_error_event(ApplicationError("upstream died", status_code=502))

    assert event == b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"upstream died"}}\n\n'


def test_json_response_defaults_to_200():
    response = json_response({"ok": True})

    assert (response.status_code, response.content) == (200, b'{"ok":true}')
