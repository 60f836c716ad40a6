"""Validation of OpenAI embeddings requests (``/v1/embeddings``), with OpenAI's wording and the offending ``param``.

As for chat completions (``chat.validation``), only what can be judged without the provider is checked:
the input's shape (a string, a list of strings, a token array or a list of token arrays, none of them
empty), OpenAI's limit of 2048 inputs a request, and the types of ``encoding_format``, ``dimensions``,
``input_type`` and ``user``. Fields we do not know pass through untouched.
"""

from __future__ import annotations

from typing import Any

from .validation import MAX_TOKENS_LIMIT, _fail, _is_int, check_body_and_model
from .validation_inputs import InputShape, check_inputs

ENCODING_FORMATS = ("float", "base64")
INPUT = InputShape(
    param="input",
    items="inputs",
    empty_text=False,
    too_many="Invalid 'input': {count} items; at most {limit} inputs are accepted.",
    kinds="a string, an integer (token) or an array of integers",
)


def validate_embeddings_request(body: Any) -> None:
    """Raise ``InvalidRequestError`` (400) naming the first offending parameter."""
    check_body_and_model(body)
    check_inputs(body.get("input"), INPUT)
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
