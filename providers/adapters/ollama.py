"""Adapter for Ollama's OpenAI compatibility (``http://<host>:11434/v1``): the OpenAI adapter, less what Ollama
silently ignores.

Ollama reads a subset of OpenAI's request fields (its ``ChatCompletionRequest``, ``openai/openai.go``) and
ignores the rest. Most of those the answer shows for itself, but two would not:

- ``n``: Ollama answers one choice whatever ``n`` asked, so a request for several is refused with a 400 before
  any call, as the adapters of the other providers without ``n`` do;
- ``max_completion_tokens``: Ollama limits a reply by ``max_tokens`` only (its ``num_predict``), so OpenAI's
  newer name goes up as ``max_tokens``. Sent as it came, the reply would not be limited at all, and could spend
  past the output the key's budget reserved for it.
"""

from __future__ import annotations

from typing import Any

from .common import fields_renamed, one_choice_only
from .openai import OpenAIAdapter

_CHAT_RENAMES = {"max_completion_tokens": "max_tokens"}


class OllamaAdapter(OpenAIAdapter):
    def _chat_body(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        one_choice_only(body)
        return super()._chat_body(fields_renamed(body, _CHAT_RENAMES), stream=stream)
