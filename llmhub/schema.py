"""OpenAPI wiring for drf-spectacular (``/api/schema/``, ``/api/docs/``).

- ``AutoSchema`` (``DEFAULT_SCHEMA_CLASS``) names the nested Input/Output serializers of our views after
  their view;
- the ``document_error_responses`` hook adds the errors a view left implied, in OpenAI's error shape
  (``core.openapi``, which the apps' views document their own errors with);
- ``ApiKeyAuthenticationScheme`` documents the gateway key (``Authorization: Bearer`` or ``x-api-key``);
- the ``add_openai_compatible_paths`` hook adds ``/v1/*``: plain async Django views (see
  ``chat.api_openai``) that drf-spectacular cannot see. Their request and response schemas are
  OpenAI's own, copied from OpenAI's spec into ``openai_schemas.json`` by
  ``scripts/extract_openai_schemas.py`` (the spec itself is not deployed);
- ``llmhub.schema_view.SchemaApi`` serves ``/api/schema/``, the document generated once per process (a module
  of its own: drf-spectacular's views import DRF's settings, which import ``AutoSchema`` from here).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import serializers

from core.openapi import ERROR_DESCRIPTIONS

OPENAI_SCHEMAS_PATH = Path(__file__).resolve().parent / "openai_schemas.json"
BEARER_SCHEME = "bearerAuth"
HEADER_SCHEME = "apiKeyHeader"
_REF = "#/components/schemas/"


_SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    BEARER_SCHEME: {
        "type": "http",
        "scheme": "bearer",
        "description": "A gateway key, `Authorization: Bearer sk-llmhub-…` (what OpenAI's SDKs send).",
    },
    HEADER_SCHEME: {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "The same gateway key in an `x-api-key` header (what Anthropic-style clients send).",
    },
}


class AutoSchema(openapi.AutoSchema):
    """Views nest their ``InputSerializer``/``OutputSerializer`` (HackSoft style), so class names repeat
    across views; a nested serializer's component is named after its view instead
    (``ConversationListApi.OutputSerializer`` → ``ConversationListOutput``)."""

    def get_serializer_name(self, serializer: serializers.BaseSerializer, direction: Any) -> str:
        outer, _, name = type(serializer).__qualname__.rpartition(".")
        if outer and "<locals>" not in outer:
            return outer.rpartition(".")[2].removesuffix("Api") + name
        return name


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """``billing.authentication.ApiKeyAuthentication`` reads either header: either one suffices."""

    target_class = "billing.authentication.ApiKeyAuthentication"
    name = [BEARER_SCHEME, HEADER_SCHEME]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        return [{BEARER_SCHEME: []}, {HEADER_SCHEME: []}]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, Any]]:
        return [_SECURITY_SCHEMES[BEARER_SCHEME], _SECURITY_SCHEMES[HEADER_SCHEME]]


_ANTHROPIC_MODELS_NOTE = (
    "OpenAI's shape, below. A request carrying `anthropic-version` (the anthropic SDK sends it on every request) "
    "is answered in Anthropic's instead: chat models only, as `ModelInfo` objects in cursor pages (`limit` 1-1000, "
    "`after_id`, `before_id`), with Anthropic's error shape."
)


@functools.cache
def openai_schemas() -> dict[str, Any]:
    with OPENAI_SCHEMAS_PATH.open(encoding="utf-8") as handle:
        return json.load(handle)["schemas"]


def _json(schema_name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF + schema_name}}}


def _errors(*status_codes: int) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status in status_codes:
        responses[str(status)] = {"description": ERROR_DESCRIPTIONS[status], "content": _json("ErrorResponse")}
    if 429 in status_codes:
        responses["429"]["headers"] = {
            "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}},
            "retry-after-ms": {
                "description": "The same wait, exactly, in milliseconds (the openai and anthropic SDKs prefer it).",
                "schema": {"type": "integer"},
            },
        }
    return responses


def _request_id_header() -> dict[str, Any]:
    return {
        "x-request-id": {"description": "The id of this request in the usage ledger.", "schema": {"type": "string"}}
    }


_TAG = "OpenAI-compatible"


def _openai_compatible_paths() -> dict[str, Any]:
    security = [{BEARER_SCHEME: []}, {HEADER_SCHEME: []}]
    return {
        "/v1/chat/completions": {
            "post": {
                "operationId": "createChatCompletion",
                "summary": "Create a chat completion",
                "description": (
                    "OpenAI's Chat Completions API, routed to the provider that serves `model`. With "
                    '`"stream": true` the answer is `text/event-stream`: one `data: {chunk}` event per '
                    "CreateChatCompletionStreamResponse, then `data: [DONE]`. An upstream failure after the "
                    'stream has started arrives as a `data: {"error": {...}}` event.\n\n'
                    "llmhub's extension: `prompt` in place of `messages` runs a prompt template, "
                    '`{"slug", "version" | "label", "variables", "brand"}` (see `GET /api/prompts/`); the template '
                    "is rendered on the server and the provider receives only `messages`."
                ),
                "tags": [_TAG],
                "security": security,
                "requestBody": {"required": True, "content": _json("CreateChatCompletionRequest")},
                "responses": {
                    "200": {
                        "description": "The completion, or a stream of chunks when `stream` is true.",
                        "headers": {
                            **_request_id_header(),
                            "x-llmhub-experiment": {
                                "description": "`<experiment>:<variant>` when the model's running A/B experiment "
                                "assigned this caller to a variant.",
                                "schema": {"type": "string"},
                            },
                            "x-llmhub-prompt": {
                                "description": "`<slug>:v<N>`: the prompt template version that ran (`prompt`).",
                                "schema": {"type": "string"},
                            },
                        },
                        "content": {
                            **_json("CreateChatCompletionResponse"),
                            "text/event-stream": {"schema": {"$ref": _REF + "CreateChatCompletionStreamResponse"}},
                        },
                    },
                    **_errors(400, 401, 403, 404, 413, 429, 502, 503, 504),
                },
            }
        },
        "/v1/completions": {
            "post": {
                "operationId": "createCompletion",
                "summary": "Create a text completion (legacy; fill-in-the-middle with `suffix`)",
                "description": (
                    "OpenAI's legacy Completions API, for catalog models an OpenAI-compatible provider serves (OpenAI, "
                    "OpenRouter, vLLM, Ollama, generic), called on the upstream's own `/completions`, and Mistral's "
                    "(Codestral's fill-in-the-middle) (docs/completions.md). A chat-only model (Anthropic, Gemini, "
                    "Cohere, Azure) is a 400 "
                    '`model_not_supported`: a chat model does not continue a text. With `"stream": true` the answer is '
                    "`text/event-stream`: one `data: {chunk}` event per chunk (the same object as the reply), then "
                    '`data: [DONE]`; an upstream failure after the stream has started arrives as a `data: {"error": '
                    "{...}}` event, without `[DONE]`."
                ),
                "tags": [_TAG],
                "security": security,
                "requestBody": {"required": True, "content": _json("CreateCompletionRequest")},
                "responses": {
                    "200": {
                        "description": "The completion, or a stream of its chunks when `stream` is true.",
                        "headers": _request_id_header(),
                        "content": {
                            **_json("CreateCompletionResponse"),
                            "text/event-stream": {"schema": {"$ref": _REF + "CreateCompletionResponse"}},
                        },
                    },
                    **_errors(400, 401, 403, 404, 413, 429, 502, 503, 504),
                },
            }
        },
        "/v1/embeddings": {
            "post": {
                "operationId": "createEmbedding",
                "summary": "Create embeddings",
                "description": (
                    "OpenAI's Embeddings API, for catalog models whose mode is `embedding`; priced on input "
                    "tokens. A chat model here is a 400 `model_not_supported`."
                ),
                "tags": [_TAG],
                "security": security,
                "requestBody": {"required": True, "content": _json("CreateEmbeddingRequest")},
                "responses": {
                    "200": {
                        "description": "The embeddings.",
                        "headers": _request_id_header(),
                        "content": _json("CreateEmbeddingResponse"),
                    },
                    **_errors(400, 401, 403, 404, 413, 429, 502, 503, 504),
                },
            }
        },
        "/v1/responses": {
            "post": {
                "operationId": "createResponse",
                "summary": "Create a response (OpenAI's Responses API, stateless)",
                "description": (
                    "OpenAI's Responses API for every chat model, run as the chat completion it translates into "
                    '(docs/responses.md): a `Response` object, or with `"stream": true` its typed events '
                    "(`event: response.created` … `response.completed`), a stream that breaks after it began ending "
                    "with `response.failed`. Nothing is stored: `previous_response_id`, `conversation`, "
                    "`background`, built-in tools and item references are a 400 naming the parameter, and "
                    "`GET /v1/responses/{id}` is a 404."
                ),
                "tags": [_TAG],
                "security": security,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "required": ["model", "input"], "additionalProperties": True}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "The response, or its event stream when `stream` is true.",
                        "headers": _request_id_header(),
                        "content": {
                            **_json("Response"),
                            "text/event-stream": {"schema": {"$ref": _REF + "ResponseStreamEvent"}},
                        },
                    },
                    **_errors(400, 401, 403, 404, 413, 429, 502, 503, 504),
                },
            }
        },
        **_anthropic_compatible_paths(security),
        "/v1/feedback": {
            "post": {
                "operationId": "createFeedback",
                "summary": "Rate one of your requests",
                "description": (
                    "Thumbs up or down, or a score (optionally named by `metric`), on a request of the caller's "
                    "own, named by the `x-request-id` its answer carried; with an optional comment. One "
                    "rating per request and metric: a second one replaces it (200; 201 when new). A person "
                    "(JWT) rates any of their requests; an API key only those made by itself or by the keys "
                    "created under it. A request id out of the caller's reach (another user's, another key's) "
                    "or an unknown one answers the same 404. Not billed."
                ),
                "tags": [_TAG],
                "security": security,
                "requestBody": {"required": True, "content": _json(FEEDBACK_REQUEST_COMPONENT)},
                "responses": {
                    "200": {
                        "description": "The rating that replaced the previous one.",
                        "headers": _request_id_header(),
                        "content": _json(FEEDBACK_COMPONENT),
                    },
                    "201": {
                        "description": "The new rating.",
                        "headers": _request_id_header(),
                        "content": _json(FEEDBACK_COMPONENT),
                    },
                    **_feedback_errors(),
                },
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "List the models this key may use",
                "description": _ANTHROPIC_MODELS_NOTE,
                "tags": [_TAG],
                "security": security,
                "responses": {
                    "200": {
                        "description": "The models.",
                        "headers": _request_id_header(),
                        "content": _json("ListModelsResponse"),
                    },
                    **_errors(401),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
                "summary": "Retrieve a model this key may use",
                "description": _ANTHROPIC_MODELS_NOTE,
                "tags": [_TAG],
                "security": security,
                "parameters": [
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "The public model name.",
                    }
                ],
                "responses": {
                    "200": {"description": "The model.", "headers": _request_id_header(), "content": _json("Model")},
                    **_errors(401, 404),
                },
            }
        },
    }


# ``POST /v1/feedback`` is ours (OpenAI has no such endpoint), in the style of OpenAI's objects.
FEEDBACK_REQUEST_COMPONENT = "CreateFeedbackRequest"
FEEDBACK_COMPONENT = "FeedbackResponse"
_FEEDBACK_COMMENT = {"type": "string", "maxLength": 2000, "description": "Why; at most 2,000 characters."}
_FEEDBACK_REQUEST_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "description": "The `x-request-id` of the request rated.",
}
_FEEDBACK_SCHEMAS: dict[str, dict[str, Any]] = {
    FEEDBACK_REQUEST_COMPONENT: {
        "oneOf": [
            {
                "type": "object",
                "title": "Thumbs",
                "required": ["request_id", "thumbs"],
                "additionalProperties": False,
                "properties": {
                    "request_id": _FEEDBACK_REQUEST_ID,
                    "thumbs": {"type": "string", "enum": ["up", "down"]},
                    "metric": {"type": "string", "enum": ["thumbs"]},
                    "comment": {**_FEEDBACK_COMMENT, "type": ["string", "null"]},
                },
            },
            {
                "type": "object",
                "title": "Score",
                "required": ["request_id", "score"],
                "additionalProperties": False,
                "properties": {
                    "request_id": _FEEDBACK_REQUEST_ID,
                    "score": {"type": "number", "description": "Any finite number."},
                    "metric": {
                        "type": "string",
                        "pattern": "^[a-z0-9][a-z0-9_.-]{0,31}$",
                        "not": {"const": "thumbs"},
                        "default": "score",
                        "description": "The score's name, for several kinds of score.",
                    },
                    "comment": {**_FEEDBACK_COMMENT, "type": ["string", "null"]},
                },
            },
        ]
    },
    FEEDBACK_COMPONENT: {
        "type": "object",
        "required": ["object", "request_id", "metric", "value", "comment", "created_at", "updated_at"],
        "properties": {
            "object": {"type": "string", "enum": ["feedback"]},
            "request_id": {"type": "string"},
            "metric": {"type": "string", "description": '"thumbs", or the score\'s name ("score" by default).'},
            "value": {"type": "number", "description": "1 or -1 for thumbs up or down; the score otherwise."},
            "thumbs": {"type": "string", "enum": ["up", "down"], "description": "For thumbs only."},
            "score": {"type": "number", "description": "For scores only."},
            "comment": _FEEDBACK_COMMENT,
            "created_at": {"type": "integer", "description": "Unix seconds."},
            "updated_at": {"type": "integer", "description": "Unix seconds: when it was last replaced."},
        },
    },
}


def _feedback_errors() -> dict[str, Any]:
    responses = _errors(400, 401, 403, 404, 413, 503)
    responses["403"]["description"] = "The caller's role may not use models (a viewer)."
    responses["503"]["description"] = "llmhub's database is unavailable; retry after `Retry-After` seconds."
    return responses


_ANTHROPIC_TAG = "Anthropic-compatible"
# Anthropic publishes no OpenAPI document of its own; these are the shapes its SDK validates.
ANTHROPIC_ERROR_COMPONENT = "AnthropicErrorResponse"
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"type": "string", "enum": ["error"]},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}


def _anthropic_errors(*status_codes: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": ERROR_DESCRIPTIONS.get(status, "The provider is overloaded; retry later."),
            "content": {"application/json": {"schema": {"$ref": _REF + ANTHROPIC_ERROR_COMPONENT}}},
        }
        for status in status_codes
    }


def _anthropic_compatible_paths(security: list[dict[str, list[Any]]]) -> dict[str, Any]:
    body = {"type": "object", "required": ["model", "messages"], "additionalProperties": True}
    return {
        "/v1/messages": {
            "post": {
                "operationId": "createMessage",
                "summary": "Create a message (Anthropic's Messages API)",
                "description": (
                    "Anthropic's Messages API for every chat model: passed through to Anthropic-protocol "
                    'providers, translated for the others. With `"stream": true` the answer is Anthropic\'s '
                    "event stream. Errors come in Anthropic's shape."
                ),
                "tags": [_ANTHROPIC_TAG],
                "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {
                    "200": {
                        "description": "The message, or its event stream when `stream` is true.",
                        "headers": _request_id_header(),
                        "content": {
                            **_json("Response"),
                            "text/event-stream": {"schema": {"$ref": _REF + "ResponseStreamEvent"}},
                        },
                    },
                    **_anthropic_errors(400, 401, 403, 404, 413, 429, 502, 503, 504, 529),
                },
            }
        },
        "/v1/messages/count_tokens": {
            "post": {
                "operationId": "countMessageTokens",
                "summary": "Estimate the input tokens of a Messages request",
                "tags": [_ANTHROPIC_TAG],
                "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {
                    "200": {
                        "description": "An estimate; not charged. It counts toward the requests per minute.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["input_tokens"],
                                    "properties": {"input_tokens": {"type": "integer"}},
                                }
                            }
                        },
                    },
                    **_anthropic_errors(400, 401, 403, 404, 413, 429, 503),
                },
            }
        },
    }


# Components both sides define: the DRF serializers above mirror OpenAI's, and OpenAI's copy wins.
_SHARED_COMPONENTS = frozenset({"Error", "ErrorResponse"})


def add_openai_compatible_paths(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular POSTPROCESSING hook: add ``/v1/*`` with OpenAI's schemas and our error and auth schemes."""
    components = result.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, schema in openai_schemas().items():
        if name in schemas and name not in _SHARED_COMPONENTS:
            raise ImproperlyConfigured(f"component {name!r} is defined both by a DRF serializer and by OpenAI's spec")
        schemas[name] = copy.deepcopy(schema)
    schemas[ANTHROPIC_ERROR_COMPONENT] = copy.deepcopy(_ANTHROPIC_ERROR)
    for name, schema in _FEEDBACK_SCHEMAS.items():
        if name in schemas:
            raise ImproperlyConfigured(f"component {name!r} is defined both by a DRF serializer and for /v1/feedback")
        schemas[name] = copy.deepcopy(schema)
    components["schemas"] = dict(sorted(schemas.items()))
    security_schemes = components.setdefault("securitySchemes", {})
    for name, scheme in _SECURITY_SCHEMES.items():
        security_schemes.setdefault(name, scheme)
    result["paths"] = {**result.get("paths", {}), **_openai_compatible_paths()}
    tags = result.setdefault("tags", [])
    if not any(tag.get("name") == _TAG for tag in tags):
        tags.append({"name": _TAG, "description": "Drop-in replacement for OpenAI's API: point an OpenAI SDK here."})
    if not any(tag.get("name") == _ANTHROPIC_TAG for tag in tags):
        tags.append({"name": _ANTHROPIC_TAG, "description": "Anthropic's Messages API: point an Anthropic SDK here."})
    return result


_METHODS = ("get", "put", "post", "patch", "delete")
_PAGINATION_PARAMS = frozenset({"limit", "offset"})


def document_error_responses(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular POSTPROCESSING hook: every DRF error answers in OpenAI's shape (the
    EXCEPTION_HANDLER sees to it), so document the errors an operation implies where its view did not:
    401 unless anonymous access is allowed, 400 when it takes input, 404 when its path names an object."""
    for path, item in result.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            implied = []
            if {} not in operation.get("security", [{}]):
                implied.append(401)
            takes_input = "requestBody" in operation or any(
                parameter.get("in") == "query" and parameter.get("name") not in _PAGINATION_PARAMS
                for parameter in operation.get("parameters", [])
            )
            if takes_input:
                implied.append(400)
            if "{" in path:
                implied.append(404)
            responses = operation.setdefault("responses", {})
            for status, response in _errors(*implied).items():
                responses.setdefault(status, response)
            operation["responses"] = dict(sorted(responses.items()))
    return result


class JwtAuthenticationScheme(OpenApiAuthenticationExtension):
    """``accounts.authentication.JwtAuthentication``: an identity provider's JWT as a bearer token."""

    target_class = "accounts.authentication.JwtAuthentication"
    name = "jwtAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
