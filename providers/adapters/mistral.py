"""Adapter for Mistral's API (La Plateforme, ``https://api.mistral.ai/v1``): OpenAI's chat-completions and
embeddings protocol, but strict about its fields.

Mistral answers a field it does not take with a 422 (``extra_forbidden``) rather than ignoring it, and names
some of OpenAI's parameters its own way. Everything but the request's spelling is the OpenAI adapter's; this
one renames what Mistral has under another name (``max_completion_tokens`` → ``max_tokens``, ``seed`` →
``random_seed``, embeddings' ``dimensions`` → ``output_dimension``) and never sends ``stream_options``:
Mistral refuses it, and reports a stream's usage on its last chunk unasked (moved here to a chunk of its own,
where OpenAI sends it). A field Mistral has no
counterpart for (``logprobs``, ``user``, …) still goes up, and its 422 reaches the client as a 400 naming it.

Mistral's reasoning models (Magistral) write a message's ``content``, and each streamed delta's, as a list of
chunks: ``thinking`` (its text in a list of ``text`` chunks) and ``text``. OpenAI's schema has a string there, and
the gateway's output check, its estimate of an uncounted reply and the chat page read one: such a ``content`` is
spelt as other OpenAI-compatible servers of reasoning models spell it, the thinking in ``reasoning_content`` and
the text in ``content`` (``_content_spelt``, before the OpenAI adapter checks the reply's shape). A list holding
any other kind of chunk is a malformed reply, as any content that is not text is from any OpenAI-protocol server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .base import WireChunk
from .common import BatchesAnswered, fields_renamed
from .openai import OpenAIAdapter

# OpenAI's name → Mistral's, for the same meaning; given under both, OpenAI's wins (``fields_renamed``).
_CHAT_RENAMES = {"max_completion_tokens": "max_tokens", "seed": "random_seed"}
_EMBEDDING_RENAMES = {"dimensions": "output_dimension"}


class MistralAdapter(OpenAIAdapter):
    # Mistral has no /v1/completions; its fill-in-the-middle (Codestral's /v1/fim/completions) answers a
    # differently shaped request and reply, not served yet (docs/completions.md).
    serves_completions = False
    embed_batch_limit = 512  # Mistral refuses more inputs in one request ("Too many inputs in request")

    def _chat_body(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        request = fields_renamed(
            {key: value for key, value in body.items() if key not in ("stream", "stream_options")}, _CHAT_RENAMES
        )
        if stream:
            request["stream"] = True
        return request

    @staticmethod
    def _content_spelt(part: dict[str, Any]) -> bool:
        return _content_chunks_spelt(part)

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[WireChunk]:
        """The OpenAI adapter's stream, with the usage Mistral puts on its last chunk moved to a chunk of its
        own, with no choices, after it: where OpenAI reports it (``include_usage``), and every adapter too."""
        upstream = super().stream(body)
        try:
            async for chunk in upstream:
                usage = chunk.get("usage")
                if not usage or not chunk.get("choices"):
                    yield chunk
                    continue
                chunk.drop_usage()
                yield chunk
                head = {key: chunk[key] for key in ("id", "object", "created", "model") if key in chunk}
                yield WireChunk({**head, "choices": [], "usage": usage}, None)
        finally:
            await upstream.aclose()  # type: ignore[attr-defined]  # also on aclose(): the upstream stops at once

    async def embed(self, body: dict[str, Any], *, kept: BatchesAnswered | None = None) -> dict[str, Any]:
        return await super().embed(fields_renamed(body, _EMBEDDING_RENAMES), kept=kept)


def _content_chunks_spelt(part: dict[str, Any]) -> bool:
    """Spell a message's or a delta's ``content`` chunks (``thinking`` and ``text``, as Mistral's reasoning models
    write them) as OpenAI-compatible servers of reasoning models do, in place: the thinking in
    ``reasoning_content``, the text in ``content`` (null when there is none, as in a delta that only thinks).
    True when it changed ``part``."""
    content = part.get("content")
    if not isinstance(content, list):
        return False
    texts: list[str] = []
    thoughts: list[str] = []
    for chunk in content:
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        if kind == "text" and isinstance(chunk.get("text"), str):
            texts.append(chunk["text"])
        elif kind == "thinking" and isinstance(chunk.get("thinking"), list):
            for piece in chunk["thinking"]:
                if not (isinstance(piece, dict) and piece.get("type") == "text" and isinstance(piece.get("text"), str)):
                    return False
                thoughts.append(piece["text"])
        else:
            return False  # a chunk of another kind (a reference, an image): not ours to reshape
    part["content"] = "".join(texts) if texts else None
    if thoughts:
        part["reasoning_content"] = "".join(thoughts)
    return True
