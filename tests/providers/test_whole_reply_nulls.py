"""OpenAI-compatible servers say null for what they left unset (vLLM dumps every field of its pydantic models; SGLang,
DeepInfra and OpenRouter send their own nulls) and leave out what they have none of (serde's ``skip_serializing_if``).
A whole reply is relayed in OpenAI's schema whatever of that it holds, by one rule read off the schema itself: a null
where the schema's type is not nullable and the field is optional is left out; a nullable field the schema requires
and the reply left out is null.

The cases are drawn from the spec (``llmhub/openai_schemas.json``), walked beside a reply that has every field it
names, so a field the spec adds is covered (or the walk says the reply lacks it)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from llmhub.testing.openapi import COMMITTED_SCHEMAS, validate_openai_schema
from providers.adapters.openai_shape import TextCompletionShape, completion_conform

SCHEMAS = json.loads(COMMITTED_SCHEMAS.read_text(encoding="utf-8"))["schemas"]

_TOKEN = {
    "token": "Hi",
    "logprob": -0.1,
    "bytes": [72, 105],
    "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}],
}
_USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 2,
    "total_tokens": 7,
    "prompt_tokens_details": {
        "cached_tokens": 0,
        "audio_tokens": 0,
        "cache_write_tokens": 0,
        "image_tokens": 0,
        "text_tokens": 5,
    },
    "completion_tokens_details": {
        "accepted_prediction_tokens": 0,
        "audio_tokens": 0,
        "reasoning_tokens": 0,
        "rejected_prediction_tokens": 0,
        "text_tokens": 2,
    },
}
# A reply with every field OpenAI's schema names (``moderation`` aside: OpenAI's moderated completions, which no
# other server answers, and which llmhub's own moderation does not put in a reply).
CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "service_tier": "default",
    "system_fingerprint": "fp",
    "metadata": {"a": "b"},
    "usage": _USAGE,
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": {"content": [_TOKEN], "refusal": [_TOKEN]},
            "message": {
                "role": "assistant",
                "content": "Hi",
                "refusal": None,
                "annotations": [
                    {
                        "type": "url_citation",
                        "url_citation": {"end_index": 1, "start_index": 0, "url": "https://x.example", "title": "t"},
                    }
                ],
                "audio": {"id": "a", "expires_at": 1, "data": "AA==", "transcript": "Hi"},
                "function_call": {"name": "f", "arguments": "{}"},
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
        }
    ],
}
TEXT = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "system_fingerprint": "fp",
    "usage": _USAGE,
    "choices": [
        {
            "index": 0,
            "text": "Hi",
            "finish_reason": "stop",
            "logprobs": {
                "text_offset": [0],
                "token_logprobs": [-0.1],
                "tokens": ["Hi"],
                "top_logprobs": [{"Hi": -0.1}],
            },
        }
    ],
}
NOT_WALKED = {"moderation"}


def _resolved(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _alternatives(schema: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The schemas a value may match (anyOf and oneOf spread out), and whether null is one of them."""
    schema = _resolved(schema)
    if "anyOf" in schema or "oneOf" in schema:
        found, nullable = [], False
        for option in schema.get("anyOf", []) + schema.get("oneOf", []):
            more, null = _alternatives(option)
            found += more
            nullable = nullable or null
        return found, nullable
    if schema.get("type") == "null":
        return [], True
    return [schema], False


def _cases(schema: dict[str, Any], value: Any, path: tuple[Any, ...]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Each field of ``value`` the rule speaks for: ``("null", path)`` for an optional field whose type is not nullable,
    ``("missing", path)`` for a required one that is nullable."""
    options, _ = _alternatives(schema)
    if isinstance(value, list):
        for option in options:
            if "items" in option:
                for position, item in enumerate(value):
                    yield from _cases(option["items"], item, (*path, position))
        return
    if not isinstance(value, dict):
        return
    # The alternative this object is (a tool call's function or custom one: by its type).
    objects = [option for option in options if "properties" in option]
    typed = [
        o for o in objects if value.get("type") in o["properties"].get("type", {}).get("enum", [value.get("type")])
    ]
    for option in typed[:1]:
        properties, required = option["properties"], set(option.get("required", ()))
        unnamed = set(properties) - set(value) - NOT_WALKED
        assert not unnamed, f"the reply at {path} lacks {sorted(unnamed)}: add them, so that their nulls are tried"
        for name, field in properties.items():
            if name not in value:
                continue
            _, nullable = _alternatives(field)
            if name not in required and not nullable:
                yield "null", (*path, name)
            if name in required and nullable:
                yield "missing", (*path, name)
            yield from _cases(field, value[name], (*path, name))


def _changed(reply: dict[str, Any], case: str, path: tuple[Any, ...]) -> dict[str, Any]:
    reply = copy.deepcopy(reply)
    holder = reply
    for step in path[:-1]:
        holder = holder[step]
    if case == "null":
        holder[path[-1]] = None
    else:
        del holder[path[-1]]
    return reply


def _conform_text(reply: dict[str, Any], *, model: str) -> dict[str, Any]:
    TextCompletionShape(model).conform(reply, whole=True)
    return reply


RESPONSES = {
    "CreateChatCompletionResponse": (CHAT, completion_conform),
    "CreateCompletionResponse": (TEXT, _conform_text),
}
CASES = [
    pytest.param(name, case, path, id=f"{name} {case} {'.'.join(map(str, path))}")
    for name, (reply, _) in RESPONSES.items()
    for case, path in _cases(SCHEMAS[name], reply, ())
]


def test_the_replies_are_valid_and_the_walk_finds_both_kinds_of_field():
    for name, (reply, conform) in RESPONSES.items():
        validate_openai_schema(conform(copy.deepcopy(reply), model="m"), name)
    assert {case for _, case, _ in (param.values for param in CASES)} == {"null", "missing"}


@pytest.mark.parametrize(("name", "case", "path"), CASES)
def test_a_null_the_schema_does_not_allow_or_a_required_null_left_out_is_relayed_in_schema(name, case, path):
    """Before: a choice's logprobs without ``refusal`` (vLLM's, llama.cpp's, SGLang's) or a token's without ``bytes``,
    and a text completion's logprobs' null lists, were relayed as they came, out of OpenAI's schema."""
    reply, conform = RESPONSES[name]
    answered = conform(_changed(reply, case, path), model="m")
    validate_openai_schema(answered, name)
