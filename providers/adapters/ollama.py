"""Adapter for Ollama's OpenAI compatibility (``http://<host>:11434/v1``): the OpenAI adapter, less what Ollama
silently ignores.

Ollama reads a subset of OpenAI's request fields and ignores the rest. Most of those the answer shows for
itself, but ``n`` would not: Ollama answers one choice whatever ``n`` asked, so a request for several is
refused with a 400 before any call, as the adapters of the other providers without ``n`` do.
"""

from __future__ import annotations

from typing import Any

from .common import one_choice_only
from .openai import OpenAIAdapter


class OllamaAdapter(OpenAIAdapter):
    def _chat_body(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        one_choice_only(body)
        return super()._chat_body(body, stream=stream)
