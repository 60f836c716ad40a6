"""Validation of OpenAI's legacy text-completion requests (``/v1/completions``), with OpenAI's wording and the
offending ``param``.

As for chat completions (``chat.validation``), only what can be judged without the provider is checked
(``CreateCompletionRequest``): the prompt's shape (a string, a list of strings, a token array or a list of token
arrays), ``suffix``, ``echo`` (which OpenAI refuses beside a ``suffix``), ``logprobs`` 0 to 5, ``n`` 1 to 128,
``best_of`` 0 to 20 and at least ``n`` (and not with a stream, which can only send the choices it returns), the
numbers' ranges and ``stop``. Whether an upstream takes a token prompt, or several prompts, is its adapter's to
say. Fields we do not know pass through untouched.
"""

from __future__ import annotations

from typing import Any

from .validation import MAX_TOKENS_LIMIT, _check_range, _fail, _is_int, check_body_and_model, check_logit_bias
from .validation_inputs import InputShape, check_inputs

MAX_LOGPROBS = 5
MAX_BEST_OF = 20
# "" is OpenAI's default prompt (the start of a document): a completion of nothing is one.
PROMPT = InputShape(
    param="prompt",
    items="prompts",
    empty_text=True,
    too_many="Invalid 'prompt': {count} prompts; at most {limit} are accepted.",
    kinds="a string or an array of integers (tokens)",
)


def _check_int(body: dict[str, Any], name: str, low: int, high: int) -> Any:
    value = body.get(name)
    if value is not None and (not _is_int(value) or not low <= value <= high):
        _fail(f"Invalid '{name}': expected an integer between {low} and {high}.", name)
    return value


def validate_completions_request(body: Any) -> None:
    """Raise ``InvalidRequestError`` (400) naming the first offending parameter."""
    check_body_and_model(body)
    check_inputs(body.get("prompt"), PROMPT)
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        _fail("Invalid type for 'suffix': expected a string.", "suffix", "invalid_type")
    for name in ("echo", "stream"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            _fail(f"Invalid type for '{name}': expected a boolean.", name, "invalid_type")
    if body.get("echo") and suffix:
        _fail("Invalid value for 'echo': echo is not supported with 'suffix'.", "echo")
    _check_int(body, "logprobs", 0, MAX_LOGPROBS)
    _check_int(body, "max_tokens", 0, MAX_TOKENS_LIMIT)
    n = _check_int(body, "n", 1, 128)
    best_of = _check_int(body, "best_of", 0, MAX_BEST_OF)
    if best_of is not None and best_of < (n or 1):
        _fail("Invalid value for 'best_of': it must be at least 'n'.", "best_of")
    if best_of is not None and best_of > (n or 1) and body.get("stream"):
        _fail("Invalid value for 'best_of': 'best_of' cannot be greater than 'n' when streaming.", "best_of")
    _check_range(body, "temperature", 0, 2)
    _check_range(body, "top_p", 0, 1)
    _check_range(body, "presence_penalty", -2, 2)
    _check_range(body, "frequency_penalty", -2, 2)
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            _fail("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
        if not isinstance(options, dict):
            _fail("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))
    ):
        _fail("Invalid 'stop': expected a string or an array of at most 4 strings.", "stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        _fail("Invalid type for 'seed': expected an integer.", "seed", "invalid_type")
    check_logit_bias(body)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        _fail("Invalid type for 'user': expected a string.", "user", "invalid_type")
