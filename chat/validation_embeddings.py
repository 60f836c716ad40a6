"""Validation of OpenAI embeddings requests (``/v1/embeddings``), with OpenAI's wording and the offending ``param``.

As for chat completions (``chat.validation``), only what can be judged without the provider is checked:
the input's shape (a string, a list of strings, a token array or a list of token arrays, none of them
empty), OpenAI's limit of 2048 inputs a request, and the types of ``encoding_format``, ``dimensions``,
``input_type`` and ``user``. Fields we do not know pass through untouched.
"""

from __future__ import annotations

from typing import Any

from .validation import MAX_TOKENS_LIMIT, _fail, _is_int, check_body_and_model

MAX_INPUTS = 2048  # OpenAI's limit of inputs (strings or token arrays) in one request
ENCODING_FORMATS = ("float", "base64")
# Token ids are 32-bit in every tokenizer's vocabulary; a bound also keeps a token array's size finite.
MAX_TOKEN_ID = 2**31 - 1


def _check_tokens(tokens: list[Any], param: str) -> None:
    if not tokens:
        _fail(f"Invalid '{param}': empty token array. Expected at least one token.", param, "empty_array")
    for index, token in enumerate(tokens):
        if not _is_int(token) or not 0 <= token <= MAX_TOKEN_ID:
            _fail(
                f"Invalid '{param}[{index}]': a token must be an integer between 0 and {MAX_TOKEN_ID}.",
                f"{param}[{index}]",
                "invalid_type",
            )


def _check_input(value: Any) -> None:
    if value is None:
        _fail("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(value, str):
        if not value:
            _fail("Invalid 'input': empty string. Expected a non-empty string.", "input", "empty_string")
        return
    if not isinstance(value, list):
        _fail(
            "Invalid type for 'input': expected a string, an array of strings, an array of integers (tokens) "
            "or an array of arrays of integers.",
            "input",
            "invalid_type",
        )
    if not value:
        _fail("Invalid 'input': empty array. Expected an array with minimum length 1.", "input", "empty_array")
    if len(value) > MAX_INPUTS:
        _fail(f"Invalid 'input': {len(value)} items; at most {MAX_INPUTS} inputs are accepted.", "input")
    first = value[0]
    if _is_int(first):
        _check_tokens(value, "input")
        return
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if isinstance(first, str):
            if not isinstance(item, str):
                _fail(f"Invalid type for '{param}': expected a string, like the other inputs.", param, "invalid_type")
            if not item:
                _fail(f"Invalid '{param}': empty string. Expected a non-empty string.", param, "empty_string")
        elif isinstance(first, list):
            if not isinstance(item, list):
                _fail(f"Invalid type for '{param}': expected an array of integers (tokens).", param, "invalid_type")
            _check_tokens(item, param)
        else:
            _fail(
                f"Invalid type for '{param}': expected a string, an integer (token) or an array of integers.",
                param,
                "invalid_type",
            )


def validate_embeddings_request(body: Any) -> None:
    """Raise ``InvalidRequestError`` (400) naming the first offending parameter."""
    check_body_and_model(body)
    _check_input(body.get("input"))
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ENCODING_FORMATS:
        _fail("Invalid value for 'encoding_format': expected 'float' or 'base64'.", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or not 1 <= dimensions <= MAX_TOKENS_LIMIT):
        _fail("Invalid 'dimensions': expected a positive integer.", "dimensions")
    input_type = body.get("input_type")  # Cohere's and Gemini's query/document switch (the adapters read it)
    if input_type is not None and not isinstance(input_type, str):
        _fail("Invalid type for 'input_type': expected a string, such as 'search_query'.", "input_type", "invalid_type")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        _fail("Invalid type for 'user': expected a string.", "user", "invalid_type")
    stream = body.get("stream")
    if stream:
        _fail("Embeddings are not streamed: remove 'stream' or set it to false.", "stream")
