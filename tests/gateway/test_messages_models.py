"""``GET /v1/models`` for the anthropic SDK: a request carrying ``anthropic-version`` (every request the SDK
sends) is answered in Anthropic's shape (``ModelInfo`` items, cursor pages, Anthropic's errors); any other
in OpenAI's, as before."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from providers.models import ModelMode, Provider
from tests.factories import ModelFactory
from tests.gateway.test_messages_api import client

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_sdk_lists_the_models_as_anthropic_model_infos(gateway):
    page = client(gateway).models.list()
    ids = [model.id for model in page.data]
    assert {"claude-test", "gpt-test"} <= set(ids)
    assert "broken" in ids and "disabled-model" not in ids
    for model in page.data:
        assert model.type == "model"
        assert model.display_name
        assert model.created_at.year >= 1970
    assert page.has_more is False
    assert page.first_id == ids[0] and page.last_id == ids[-1]


def test_embedding_models_are_not_listed_to_the_messages_api(gateway):
    ModelFactory(name="embed-test", provider=gateway_provider(), mode=ModelMode.EMBEDDING)
    ids = [model.id for model in client(gateway).models.list(limit=1000)]
    assert "embed-test" not in ids
    openai_ids = [m["id"] for m in _openai_list(gateway)]
    assert "embed-test" in openai_ids  # the OpenAI shape still lists them, for /v1/embeddings


def test_a_label_is_the_display_name(gateway):
    ModelFactory(name="labelled", label="Labelled Model", provider=gateway_provider())
    assert client(gateway).models.retrieve("labelled").display_name == "Labelled Model"
    assert client(gateway).models.retrieve("gpt-test").display_name == "gpt-test"


def test_the_sdk_pages_through_every_model_one_at_a_time(gateway):
    everything = [model.id for model in client(gateway).models.list(limit=1000)]
    paged = [model.id for model in client(gateway).models.list(limit=1)]
    assert paged == everything and len(everything) >= 3
    first = client(gateway).models.list(limit=1)
    assert first.has_more is True and len(first.data) == 1
    back = client(gateway).models.list(limit=10, before_id=everything[2])
    assert [m.id for m in back.data] == everything[:2]


def test_retrieve_and_its_not_found(gateway):
    model = client(gateway).models.retrieve("claude-test")
    assert model.id == "claude-test" and model.type == "model"
    with pytest.raises(anthropic.NotFoundError) as failed:
        client(gateway).models.retrieve("nope")
    assert failed.value.body["type"] == "error"
    assert failed.value.body["error"]["type"] == "not_found_error"
    assert failed.value.response.headers.get("request-id")


def test_wrong_key_is_the_sdks_authentication_error(gateway):
    with pytest.raises(anthropic.AuthenticationError) as failed:
        client(gateway, api_key="sk-llmhub-aaaaaaaa-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").models.list()
    assert failed.value.body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "after_id=nope", "after_id=a&before_id=b"])
def test_bad_page_parameters_are_anthropic_400s(gateway, query):
    response = httpx.get(
        f"{gateway.url}/v1/models?{query}",
        headers={"x-api-key": gateway.key, "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_without_anthropic_version_the_answer_stays_openais(gateway):
    listed = _openai_list(gateway)
    assert all(m["object"] == "model" for m in listed)


def gateway_provider():
    return Provider.objects.get(name="fake-openai")


def _openai_list(gateway) -> list[dict]:
    response = httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {gateway.key}"})
    assert response.status_code == 200
    return response.json()["data"]


def test_plain_http_refusal_of_a_models_list_speaks_the_askers_shape():
    from llmhub.handlers import TransportSecurity

    anthropic_headers = {"anthropic-version": "2023-06-01"}
    refused = json.loads(TransportSecurity.refusal("/v1/models", anthropic_headers).content)
    assert refused["type"] == "error" and refused["error"]["type"] == "permission_error"
    assert json.loads(TransportSecurity.refusal("/v1/models").content)["error"]["code"] == "https_required"


def test_a_wrong_method_is_an_anthropic_405(gateway):
    response = httpx.post(
        f"{gateway.url}/v1/models", headers={"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    )
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert response.json()["error"]["type"] == "invalid_request_error"
