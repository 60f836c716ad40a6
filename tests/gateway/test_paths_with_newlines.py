"""A /v1 path holding a newline (``%0A``, decoded into the path Django resolves) is still the API's: its routes'
patterns match any character, and what no route matches answers in the API's error shape, never Django's HTML page.
A regular expression's ``.`` does not match a newline, so such a path once matched no /v1 route, not even the
catch-all, and got Django's HTML 404 (the fuzz's valid-request test found ``GET /v1/models/a%0A``)."""

from __future__ import annotations

import json

import pytest

from billing.services.keys import api_key_create
from tests.factories import UserFactory
from tests.test_handlers import call

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def api_key(db):
    return api_key_create(user=UserFactory(), name="newlines").secret


def error_of(status: int, headers: dict[str, str], body: bytes) -> dict:
    assert headers["content-type"].startswith("application/json"), (status, headers, body[:200])
    return json.loads(body)


@pytest.mark.parametrize("path", ["/v1/models/a\n", "/v1/models/a\nb", "/v1/models/\n"])
async def test_a_model_name_with_a_newline_is_an_unknown_model(api_key, path):
    status, headers, body = await call(path, api_key=api_key)
    assert status == 404
    assert error_of(status, headers, body)["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/no-such\nroute", "/v1/\n", "/v1/chat/completions\n"])
async def test_an_unknown_path_with_a_newline_is_a_json_404(api_key, path):
    status, headers, body = await call(path, api_key=api_key)
    assert status == 404
    assert error_of(status, headers, body)["error"]["code"] == "unknown_url"


async def test_a_stored_response_id_with_a_newline_is_a_json_404(api_key):
    status, headers, body = await call("/v1/responses/resp_a\nb", api_key=api_key)
    assert status == 404
    assert error_of(status, headers, body)["error"]["type"] == "invalid_request_error"


async def test_a_messages_path_with_a_newline_answers_in_anthropics_shape(api_key):
    status, headers, body = await call("/v1/messages/batches\n", api_key=api_key)
    assert status == 404
    assert error_of(status, headers, body)["type"] == "error"
