"""Adapter for Ollama's OpenAI compatibility (``http://<host>:11434/v1``): the OpenAI adapter, less what Ollama
silently ignores.

Ollama reads a subset of OpenAI's request fields (its ``ChatCompletionRequest``, ``openai/openai.go``) and
ignores the rest. Most of those the answer shows for itself, but three would not:

- ``n``: Ollama answers one choice whatever ``n`` asked, so a request for several is refused with a 400 before
  any call, as the adapters of the other providers without ``n`` do;
- ``max_completion_tokens``: Ollama limits a reply by ``max_tokens`` only (its ``num_predict``), so OpenAI's
  newer name goes up as ``max_tokens``. Sent as it came, the reply would not be limited at all, and could spend
  past the output the key's budget reserved for it;
- ``tool_choice``: the model may call any tool it is given, or none. ``"none"`` is kept by not sending the
  tools; ``"auto"`` is what Ollama does anyway; a choice that forces a call (``"required"``, a named tool,
  ``allowed_tools``) cannot be kept and is refused with a 400, rather than answered as if it had been.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import ProviderBadRequestError
from .common import fields_renamed, one_choice_only
from .openai import OpenAIAdapter

_CHAT_RENAMES = {"max_completion_tokens": "max_tokens"}


class OllamaAdapter(OpenAIAdapter):
    def _chat_body(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        one_choice_only(body)
        return super()._chat_body(fields_renamed(_tool_choice_kept(body), _CHAT_RENAMES), stream=stream)


def _tool_choice_kept(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without the ``tool_choice`` Ollama would ignore, and without its tools when the choice was none."""
    if "tool_choice" not in body:
        return body
    choice = body["tool_choice"]
    if choice not in (None, "auto", "none"):
        raise ProviderBadRequestError(
            "This model cannot be made to call a tool: `tool_choice` must be 'auto' or 'none'.",
            param="tool_choice",
            code="unsupported_value",
        )
    dropped = ("tool_choice", "tools", "parallel_tool_calls") if choice == "none" else ("tool_choice",)
    return {key: value for key, value in body.items() if key not in dropped}
