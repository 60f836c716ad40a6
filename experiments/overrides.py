"""Which request parameters an experiment's variant may set, and with what values: one check for the admin
(``Variant.clean``) and the API (``experiments.serializers``)."""

from __future__ import annotations

import math
from typing import Any

from django.core.exceptions import ValidationError

from core.text import json_has_nul

_INT32_MAX = 2**31 - 1
_INT64 = (-(2**63), 2**63 - 1)
_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
# What a variant may set on the way upstream: sampling parameters. Not what shapes the request or its answer
# (model, messages, stream, n, tools, user): the pipeline merges overrides after validating the client's
# request and deciding how to answer it, so they must not change either.
OVERRIDABLE = (*_RANGES, "max_tokens", "max_completion_tokens", "seed", "stop", "reasoning_effort", "response_format")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def overrides_validate(overrides: Any) -> dict[str, Any]:
    """``overrides`` if each is a parameter a variant may set (``OVERRIDABLE``) with a value the chat
    endpoint would accept; else a ``ValidationError`` naming the parameter (the admin and the API alike)."""
    if not isinstance(overrides, dict):
        raise ValidationError({"overrides": "An object of parameter names and values."})
    for name, value in overrides.items():
        if name not in OVERRIDABLE:
            raise ValidationError({name: f"Not a parameter a variant may set; one of {', '.join(OVERRIDABLE)}."})
        if name in _RANGES:
            low, high = _RANGES[name]
            if not _is_number(value) or not low <= value <= high:
                raise ValidationError({name: f"Expected a number between {low} and {high}."})
        elif name in ("max_tokens", "max_completion_tokens"):
            if not _is_int(value) or not 1 <= value <= _INT32_MAX:
                raise ValidationError({name: f"Expected an integer between 1 and {_INT32_MAX}."})
        elif name == "seed":
            if not _is_int(value) or not _INT64[0] <= value <= _INT64[1]:
                raise ValidationError({name: "Expected a 64-bit integer."})
        elif name == "stop":
            if not (
                isinstance(value, str)
                or (isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) for s in value))
            ):
                raise ValidationError({name: "Expected a string or an array of at most 4 strings."})
        elif name == "reasoning_effort":
            if value not in ("minimal", "low", "medium", "high"):
                raise ValidationError({name: "Expected minimal, low, medium or high."})
        elif name == "response_format" and (
            not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema")
        ):
            raise ValidationError({name: "Expected an object of type text, json_object or json_schema."})
        if json_has_nul(value):  # PostgreSQL's jsonb cannot hold it: its DataError was a 500
            raise ValidationError({name: "A NUL character (\\u0000) cannot be stored."})
    return overrides


def overrides_for_messages(overrides: dict[str, Any]) -> dict[str, Any]:
    """A variant's overrides as an Anthropic Messages request (``/v1/messages``) spells them: the sampling
    parameters that API has (``max_completion_tokens`` is its ``max_tokens``, ``stop`` its
    ``stop_sequences``, a temperature up to 1), the others left out rather than sent to be refused."""
    spelled: dict[str, Any] = {}
    for name, value in overrides.items():
        if name == "temperature" and value <= 1:
            spelled["temperature"] = value
        elif name == "top_p":
            spelled["top_p"] = value
        elif name in ("max_tokens", "max_completion_tokens"):
            spelled["max_tokens"] = value
        elif name == "stop":
            spelled["stop_sequences"] = [value] if isinstance(value, str) else list(value)
    return spelled
