"""The shape check of an input of texts or token ids, with OpenAI's wording and the offending ``param``: embeddings'
``input`` (``chat.validation_embeddings``) and a text completion's ``prompt`` (``chat.validation_completions``) both
take a string, a list of strings, a token array or a list of token arrays, at most 2048 of them. What differs
between the two (the parameter's name, whether an empty string is an input, a few words of the messages) is an
``InputShape``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .validation import _fail, _is_int

MAX_INPUTS = 2048  # OpenAI's limit of inputs (strings or token arrays) in one request
# Token ids are 32-bit in every tokenizer's vocabulary; a bound also keeps a token array's size finite.
MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True, slots=True)
class InputShape:
    """How one endpoint names and words its input of texts or token ids."""

    param: str  # the parameter: ``input``, ``prompt``
    items: str  # what its items are called, in the message for one unlike the first: "inputs", "prompts"
    empty_text: bool  # whether an empty string is an input ("" is OpenAI's default prompt; embeddings refuse it)
    too_many: str  # the message for more than ``MAX_INPUTS`` items, with ``{count}`` and ``{limit}``
    kinds: str  # what an item of a list may be, in the message for one that is none of them


def check_tokens(tokens: list[Any], param: str) -> None:
    if not tokens:
        _fail(f"Invalid '{param}': empty token array. Expected at least one token.", param, "empty_array")
    for index, token in enumerate(tokens):
        if not _is_int(token) or not 0 <= token <= MAX_TOKEN_ID:
            _fail(
                f"Invalid '{param}[{index}]': a token must be an integer between 0 and {MAX_TOKEN_ID}.",
                f"{param}[{index}]",
                "invalid_type",
            )


def check_inputs(value: Any, shape: InputShape) -> None:
    """Raise ``InvalidRequestError`` (400) naming the first offending part of ``value``, the body's ``shape.param``."""
    name = shape.param
    if value is None:
        _fail(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    if isinstance(value, str):
        if not value and not shape.empty_text:
            _fail(f"Invalid '{name}': empty string. Expected a non-empty string.", name, "empty_string")
        return
    if not isinstance(value, list):
        _fail(
            f"Invalid type for '{name}': expected a string, an array of strings, an array of integers (tokens) "
            "or an array of arrays of integers.",
            name,
            "invalid_type",
        )
    if not value:
        _fail(f"Invalid '{name}': empty array. Expected an array with minimum length 1.", name, "empty_array")
    if len(value) > MAX_INPUTS:
        _fail(shape.too_many.format(count=len(value), limit=MAX_INPUTS), name)
    first = value[0]
    if _is_int(first):
        check_tokens(value, name)
        return
    for index, item in enumerate(value):
        param = f"{name}[{index}]"
        if isinstance(first, str):
            if not isinstance(item, str):
                _fail(
                    f"Invalid type for '{param}': expected a string, like the other {shape.items}.",
                    param,
                    "invalid_type",
                )
            if not item and not shape.empty_text:
                _fail(f"Invalid '{param}': empty string. Expected a non-empty string.", param, "empty_string")
        elif isinstance(first, list):
            if not isinstance(item, list):
                _fail(f"Invalid type for '{param}': expected an array of integers (tokens).", param, "invalid_type")
            check_tokens(item, param)
        else:
            _fail(f"Invalid type for '{param}': expected {shape.kinds}.", param, "invalid_type")
