"""The OpenAPI document at /api/schema/: valid OpenAPI 3.1, every /api/ and /v1/ path with its errors,
OpenAI's own schemas for /v1/*, and the Swagger UI at /api/docs/."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.validation import validate_schema
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from rest_framework.test import APIClient

from billing.services.keys import api_key_create
from llmhub.schema import OPENAI_SCHEMAS_PATH
from llmhub.testing.openapi import COMMITTED_SCHEMAS, spec_path
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

METHODS = ("get", "put", "post", "patch", "delete")
ERROR_REF = "#/components/schemas/ErrorResponse"
ANTHROPIC_ERROR_REF = "#/components/schemas/AnthropicErrorResponse"


@pytest.fixture(scope="module")
def schema(django_db_blocker) -> dict[str, Any]:
    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi+json")
    return response.json()


def operations(schema: dict[str, Any], prefix: str):
    for path, item in schema["paths"].items():
        if path.startswith(prefix):
            for method in METHODS:
                if method in item:
                    yield path, method, item[method]


def shape(path: str) -> str:
    """A path with its parameters unnamed: drf-spectacular documents ``<pk>`` as ``{id}``."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def drf_api_paths() -> set[str]:
    """Every route Django serves under /api/ except the schema and docs themselves, in OpenAPI's spelling."""
    found: set[str] = set()

    def walk(patterns, prefix: str) -> None:
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, route)
            elif isinstance(pattern, URLPattern) and route.startswith("api/"):
                found.add(shape("/" + re.sub(r"<[^>]*>", "{}", route)))

    walk(get_resolver().url_patterns, "")
    return found - {"/api/schema/", "/api/docs/", "/api/redoc/"}


def validator_for(schema: dict[str, Any], component: str) -> Draft202012Validator:
    """A JSON Schema validator for one component of the generated document, $refs resolved inside it."""
    uri = "urn:llmhub:schema"
    resource = Resource.from_contents({"components": schema["components"]}, default_specification=DRAFT202012)
    return Draft202012Validator(
        {"$ref": f"{uri}#/components/schemas/{component}"}, registry=Registry().with_resource(uri, resource)
    )


def test_the_document_is_valid_openapi_3_1(schema):
    assert schema["openapi"].startswith("3.1")
    validate_schema(schema)  # the official OpenAPI 3.1 JSON Schema, shipped with drf-spectacular


def test_no_value_matches_two_branches_of_a_oneof_for_null(schema):
    """drf-spectacular documents a nullable JSONField as ``oneOf: [{}, {type: null}]``: null matches both
    branches, which ``oneOf`` refuses, so a client validating answers against the document refused every null
    (a prompt version without an output schema). Such fields are documented as ``{}`` or a nullable type."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            branches = node.get("oneOf")
            if isinstance(branches, list) and {"type": "null"} in branches and any(not b for b in branches):
                found.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    walk(schema, "")
    assert not found, found


def test_every_reference_resolves(schema):
    refs: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(schema)
    assert refs
    prefix = "#/components/schemas/"
    assert all(ref.startswith(prefix) for ref in refs), sorted(ref for ref in refs if not ref.startswith(prefix))
    missing = {ref for ref in refs if ref[len(prefix) :] not in schema["components"]["schemas"]}
    assert not missing


def test_every_api_route_is_documented(schema):
    expected = drf_api_paths()

    assert {"/api/keys/", "/api/keys/{}/", "/api/keys/{}/revoke/", "/api/usage/", "/api/usage/summary/"} <= expected
    assert expected <= {shape(path) for path in schema["paths"]}
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/models",
        "/v1/responses",
    } <= set(schema["paths"])


@pytest.mark.parametrize("prefix", ["/api/", "/v1/"])
def test_every_operation_documents_its_errors_in_openai_shape(schema, prefix):
    seen = 0
    for path, method, operation in operations(schema, prefix):
        seen += 1
        errors = {code: response for code, response in operation["responses"].items() if code >= "400"}
        assert "401" in errors, (path, method)
        if "{" in path:
            assert "404" in errors, (path, method)
        if "requestBody" in operation:
            assert "400" in errors, (path, method)
        # Anthropic's Messages API answers in Anthropic's error shape, so that its SDK raises its own classes.
        expected = ANTHROPIC_ERROR_REF if path.startswith("/v1/messages") else ERROR_REF
        for code, response in errors.items():
            assert response["content"]["application/json"]["schema"] == {"$ref": expected}, (path, method, code)
        assert operation["security"], (path, method)
    assert seen >= 3


def test_the_error_component_is_openais(schema):
    error = schema["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    assert schema["components"]["schemas"]["ErrorResponse"]["properties"]["error"] == {
        "$ref": "#/components/schemas/Error"
    }


def test_a_real_error_body_matches_the_documented_error(schema):
    body = APIClient().get("/api/keys/").json()
    validator_for(schema, "ErrorResponse").validate(body)

    with pytest.raises(Exception, match="required"):
        validator_for(schema, "ErrorResponse").validate({"detail": "Not found."})


def test_the_413_of_a_body_too_large_is_the_documented_error(schema, settings):
    secret = api_key_create(user=UserFactory()).secret
    settings.LLMHUB_MAX_REQUEST_BYTES = 64
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 64 + b'"}]}'
    response = Client().post(
        "/v1/chat/completions",
        data=body,
        content_type="application/json",
        headers={"authorization": f"Bearer {secret}"},
    )
    assert response.status_code == 413
    validator_for(schema, "ErrorResponse").validate(response.json())
    assert "413" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_key_management_documents_its_bodies(schema):
    create = schema["paths"]["/api/keys/"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ApiKeyCreateRequest")
    assert create["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/ApiKeyCreated")
    assert "secret" in schema["components"]["schemas"]["ApiKeyCreated"]["properties"]
    assert "secret" not in schema["components"]["schemas"]["ApiKey"]["properties"]
    assert "secret_hash" not in str(schema)
    listed = schema["paths"]["/api/keys/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed["$ref"].endswith("/PaginatedApiKeyList")
    usage_params = {param["name"] for param in schema["paths"]["/api/usage/"]["get"]["parameters"]}
    assert {"start", "end", "model", "key", "status", "limit", "offset"} <= usage_params
    cost = schema["components"]["schemas"]["UsageRecord"]["properties"]["cost"]
    assert cost["type"] == "string"


def test_chat_completions_uses_openais_schemas(schema):
    operation = schema["paths"]["/v1/chat/completions"]["post"]

    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CreateChatCompletionRequest"}
    ok = operation["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/CreateChatCompletionResponse"}
    assert ok["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/CreateChatCompletionStreamResponse"}
    assert {"400", "401", "403", "404", "413", "429", "502", "503", "504"} <= set(operation["responses"])
    assert "Retry-After" in operation["responses"]["429"]["headers"]
    assert "retry-after-ms" in operation["responses"]["429"]["headers"]
    assert {"bearerAuth": []} in operation["security"]
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    models = schema["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models == {"$ref": "#/components/schemas/ListModelsResponse"}


def test_openais_schemas_accept_what_openai_sends(schema):
    """The copied schemas are complete: real request and response bodies validate against them."""
    validator_for(schema, "CreateChatCompletionRequest").validate(
        {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": None}
    )
    validator_for(schema, "CreateChatCompletionResponse").validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "gpt-test",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello", "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    validator_for(schema, "CreateChatCompletionStreamResponse").validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-test",
            "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}],
        }
    )
    validator_for(schema, "ListModelsResponse").validate(
        {"object": "list", "data": [{"id": "gpt-test", "object": "model", "created": 0, "owned_by": "fake-openai"}]}
    )
    with pytest.raises(Exception, match="messages"):
        validator_for(schema, "CreateChatCompletionRequest").validate({"model": "gpt-test"})


def test_the_swagger_ui_answers():
    response = APIClient().get("/api/docs/")

    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_the_committed_openai_schemas_are_up_to_date():
    if spec_path() == COMMITTED_SCHEMAS:
        pytest.skip("OpenAI's spec (the shared folder) is not beside this checkout")
    script = Path(__file__).resolve().parent.parent / "scripts" / "extract_openai_schemas.py"
    module_spec = importlib.util.spec_from_file_location("extract_openai_schemas", script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)

    assert module.render(spec_path()) == OPENAI_SCHEMAS_PATH.read_text(encoding="utf-8")


def test_the_document_is_generated_once_per_process_and_is_drf_spectaculars(monkeypatch):
    """/api/schema/ is public, and generating it takes about half a second of CPU: generated at each request, it
    was a CPU sink for anyone. It changes only with a deploy: generated once in a process (whatever the format,
    language or version asked) and then served as it was, the document drf-spectacular's own view serves."""
    from django.test import RequestFactory
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.views import SpectacularAPIView

    from llmhub.schema_view import schema_documents_forget

    schema_documents_forget()
    generated = []
    get_schema = SchemaGenerator.get_schema

    def spy(self, *args, **kwargs):
        generated.append(self)
        return get_schema(self, *args, **kwargs)

    monkeypatch.setattr(SchemaGenerator, "get_schema", spy)
    client = Client()
    first = client.get("/api/schema/", {"format": "json"})
    again = client.get("/api/schema/", {"format": "json"})
    yaml_document = client.get("/api/schema/")
    others = [client.get("/api/schema/", {"format": "json", "lang": "fr"})]
    others.append(client.get("/api/schema/", {"format": "json", "version": "9.9"}))

    assert len(generated) == 1
    assert first.status_code == again.status_code == yaml_document.status_code == 200
    assert first.content == again.content and all(other.content == first.content for other in others)
    assert first["Content-Type"].startswith("application/vnd.oai.openapi+json")
    assert yaml_document["Content-Type"].startswith("application/vnd.oai.openapi")
    assert first["Content-Disposition"] == 'inline; filename="llmhub API.json"'

    request = RequestFactory().get("/api/schema/", {"format": "json"})
    original = SpectacularAPIView.as_view()(request)
    original.render()
    assert first.content == original.content
    request = RequestFactory().get("/api/schema/")
    original = SpectacularAPIView.as_view()(request)
    original.render()
    assert yaml_document.content == original.content
