"""Adapter for Ollama's OpenAI compatibility (``http://<host>:11434/v1``): the OpenAI adapter, less what Ollama
silently ignores.

Ollama reads a subset of OpenAI's request fields (its ``ChatCompletionRequest``, ``openai/openai.go``) and
ignores the rest. Most of those the answer shows for itself; these five it would not, or are left out, and one part
it refuses is sent as a part it reads:

- ``n``: Ollama answers one choice whatever ``n`` asked, so a request for several is refused with a 400 before
  any call, as the adapters of the other providers without ``n`` do;
- ``max_completion_tokens``: Ollama limits a reply by ``max_tokens`` only (its ``num_predict``), so OpenAI's
  newer name goes up as ``max_tokens``. Sent as it came, the reply would not be limited at all, and could spend
  past the output the key's budget reserved for it;
- ``tool_choice``: the model may call any tool it is given, or none. ``"none"`` is kept by not sending the
  tools; ``"auto"`` is what Ollama does anyway (and ``allowed_tools`` in mode ``auto``: only those tools are sent,
  as to every provider without that choice, ``BaseAdapter.prepare_request``); a choice that forces a call
  (``"required"``, a named tool, ``allowed_tools`` in mode ``required``) cannot be kept and is refused with a 400,
  rather than answered as if it had been;
- OpenAI's prompt caching controls (``prompt_cache_options``, ``prompt_cache_retention``, ``prompt_cache_key``, a
  part's ``prompt_cache_breakpoint``): not sent (``prompt_cache_hints_dropped``); Ollama keeps a model's context as
  it does, and the hint changes no answer;
- ``parallel_tool_calls: false``: a model may still ask for several calls at once, and a client that sent it
  runs one call a turn. It is kept on the answer instead: each choice carries its first call only, streamed
  or not (the model asks for the next once it has the first's result);
- an assistant message's ``refusal`` part (OpenAI's spec types an assistant's parts as text or refusal): Ollama reads
  text and image_url parts alone, whatever the role, and refuses another with its 400 ``invalid message format``, so
  its text goes as a text part, in its place (``refusals_as_text``). An image in a tool message Ollama takes as it is
  (the message's ``images``, given to the model as a user's are), and it goes as it came;
- an image part's URL Ollama does not decode (its ``decodeImageURL``: a base64 data URL of type image/jpeg, jpg, png
  or webp, or of none, and no http(s) URL, which it does not fetch) is refused with a 400 naming
  ``messages[N].content[M].image_url.url`` before any call (``OLLAMA_IMAGE_URLS``, ``common.images_checked``), where
  Ollama answered its own 400 ``invalid image input``, naming nothing, after one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..exceptions import ProviderBadRequestError
from ..types import ResolvedModel
from .base import WireChunk
from .common import (
    TEXT_ONLY,
    ImageUrls,
    fields_renamed,
    one_choice_only,
    prompt_cache_hints_dropped,
    refusals_as_text,
    unhonoured_refused,
)
from .openai import OpenAIAdapter

_CHAT_RENAMES = {"max_completion_tokens": "max_tokens"}
# The image URLs Ollama decodes (``decodeImageURL``, which compares these prefixes as written; it fetches no URL).
OLLAMA_IMAGE_URLS = ImageUrls(
    "Ollama", ("image/jpeg", "image/jpg", "image/png", "image/webp"), fetches=False, as_written=True
)


class OllamaAdapter(OpenAIAdapter):
    counts_every_request_search = False  # the models it runs search nothing (``web_searches``)
    image_urls = OLLAMA_IMAGE_URLS

    def web_searches(self, body: dict[str, Any], model: ResolvedModel) -> int:
        """None: Ollama ignores ``web_search_options`` (no field of its ``ChatCompletionRequest``), and the models it
        runs search nothing."""
        return 0

    def _chat_body(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        one_choice_only(body)
        body = refusals_as_text(prompt_cache_hints_dropped(unhonoured_refused(body, TEXT_ONLY)))
        return super()._chat_body(fields_renamed(_tool_choice_kept(body), _CHAT_RENAMES), stream=stream)

    def _completion_args(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        """Ollama's ``/v1/completions`` takes one prompt, as text (its ``CompletionRequest``), and answers one
        choice: several prompts, token ids or ``n`` > 1 are refused rather than answered short."""
        one_choice_only(body)
        if not isinstance(body.get("prompt"), str):
            raise ProviderBadRequestError(
                "This model takes one prompt, as text: not a list of prompts, nor token ids.",
                param="prompt",
                code="unsupported_value",
            )
        return super()._completion_args(body, stream=stream)

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        completion = await super().complete(body)
        if body.get("parallel_tool_calls") is False:
            for choice in completion.get("choices") or ():
                message = choice.get("message") if isinstance(choice, dict) else None
                if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
                    message["tool_calls"] = message["tool_calls"][:1]
        return completion

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[WireChunk]:
        if body.get("parallel_tool_calls") is not False:
            async for chunk in super().stream(body):
                yield chunk
            return
        first_calls: dict[Any, Any] = {}  # per choice, the index of the call it keeps
        async for chunk in super().stream(body):
            if _later_calls_dropped(chunk, first_calls):
                yield chunk


def _later_calls_dropped(chunk: WireChunk, first_calls: dict[Any, Any]) -> bool:
    """Drop from ``chunk`` the deltas of every call but each choice's first; False when nothing is left of it."""
    changed = False
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        calls = delta.get("tool_calls") if isinstance(delta, dict) else None
        if not isinstance(calls, list):
            continue
        kept = []
        for position, call in enumerate(calls):
            number = call.get("index", position) if isinstance(call, dict) else position
            if first_calls.setdefault(choice.get("index"), number) == number:
                kept.append(call)
        if len(kept) != len(calls):
            changed = True
            if kept:
                delta["tool_calls"] = kept
            else:
                del delta["tool_calls"]
    if not changed:
        return True
    chunk.raw = None  # changed: the relay encodes the dict
    return any(
        choice.get("delta") or choice.get("finish_reason") or choice.get("logprobs")
        for choice in chunk.get("choices") or ()
        if isinstance(choice, dict)
    ) or bool(chunk.get("usage"))


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
