"""Adapter for Mistral's API (La Plateforme, ``https://api.mistral.ai/v1``): OpenAI's chat-completions and
embeddings protocol, but strict about its fields.

Mistral answers a field it does not take with a 422 (``extra_forbidden``) rather than ignoring it, and names
some of OpenAI's parameters its own way. Everything but the request's spelling is the OpenAI adapter's; this
one renames what Mistral has under another name (``max_completion_tokens`` → ``max_tokens``, ``seed`` →
``random_seed``, embeddings' ``dimensions`` → ``output_dimension``) and never sends ``stream_options``:
Mistral refuses it, and reports a stream's usage on its last chunk unasked (moved here to a chunk of its own,
where OpenAI sends it). A field Mistral has no
counterpart for (``user``, …) still goes up, and its 422 reaches the client as a 400 naming it; ``logprobs: true`` is
refused before the call (``unhonoured_refused``: Mistral returns none) and ``false`` is not sent. OpenAI's prompt
caching controls (``prompt_cache_options``, ``prompt_cache_retention``, a content part's ``prompt_cache_breakpoint``)
are not sent (``prompt_cache_hints_dropped``): Mistral caches as it does, and refused each with its 422;
``prompt_cache_key`` is, as Mistral takes it (requests sharing it are routed to its cache), and so is
``reasoning_effort``, under OpenAI's name: Mistral's is ``none`` or ``high`` (another level is its 422, a 400 naming
it), and a /v1/messages ``output_config.effort`` but ``high`` is refused before the call (``messages_efforts``). But
an assistant message sent back as llmhub answered it has fields OpenAI's replies carry and Mistral's messages lack
(``refusal``, ``annotations``, the reasoning in ``reasoning_content`` or ``reasoning``): they are left out
(``_REPLY_ONLY``), as they mean nothing to Mistral, which refused the whole request for them. An assistant message's
``refusal`` part (OpenAI's spec types an assistant's parts as text or refusal) goes as a text chunk of its text
(``refusals_as_text``): Mistral's chunks have no refusal, and it refused the request with its 422. A last message of
the assistant's (a prefill: the text a resumed stream continues, or the client's own) is sent with
``"prefix": true`` (``_prefix_marked``): Mistral serves one only as a prefix its reply begins with, and answered
it without the flag with a 400 (``Expected last role User or Tool (or Assistant with prefix True)``). Its reply
begins with the prefix itself, which is left out (``_PrefixEcho``): the client of a resumed stream read the text it
had twice. A tool call's id Mistral takes only as 9 letters and digits: another's (OpenAI's ``call_…``, Claude's
``toolu_…``, in a conversation begun on another model), which Mistral refused with a 400, goes in that form, the same
for the call and the tool message answering it (``_tool_call_ids_spelt``). An image part's data URL of a type Mistral's
vision models do not read (PNG, JPEG, WEBP and GIF are theirs) is refused before the call (``MISTRAL_IMAGE_URLS``,
``common.images_checked``), where Mistral answered its own 400 after it.

Mistral's reasoning models (Magistral) write a message's ``content``, and each streamed delta's, as a list of
chunks: ``thinking`` (its text in a list of ``text`` chunks) and ``text``. OpenAI's schema has a string there, and
the gateway's output check, its estimate of an uncounted reply and the chat page read one: such a ``content`` is
spelt as other OpenAI-compatible servers of reasoning models spell it, the thinking in ``reasoning_content`` and
the text in ``content`` (``_content_spelt``, before the OpenAI adapter checks the reply's shape). A list holding
any other kind of chunk is a malformed reply, as any content that is not text is from any OpenAI-protocol server.

Mistral has no ``/v1/completions``: a text completion (``text_complete``, ``text_stream``) is sent to Codestral's
fill-in-the-middle, ``/v1/fim/completions`` (``prompt`` and ``suffix``), whose chat-shaped answer is read back as a
``text_completion``.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import AsyncIterator
from typing import Any

from ..exceptions import ProviderBadRequestError
from .base import WireChunk
from .common import (
    TEXT_WITHOUT_LOGPROBS,
    BatchesAnswered,
    ImageUrls,
    assistant_fields_dropped,
    fields_renamed,
    images_checked,
    one_choice_only,
    prompt_cache_hints_dropped,
    refusal_named,
    refusals_as_text,
    unhonoured_refused,
)
from .openai import _CHAT_PATH, OpenAIAdapter

# OpenAI's name → Mistral's, for the same meaning; given under both, OpenAI's wins (``fields_renamed``).
_CHAT_RENAMES = {"max_completion_tokens": "max_tokens", "seed": "random_seed"}
_EMBEDDING_RENAMES = {"dimensions": "output_dimension"}
_FIM_PATH = "/fim/completions"  # Codestral's fill-in-the-middle, Mistral's text completion
# The fields of a reply's message (OpenAI's, and the reasoning of OpenAI-compatible servers) that Mistral's assistant
# message lacks (``role``, ``content``, ``tool_calls``, ``prefix``): sent back as they came, Mistral refused them.
_REPLY_ONLY = frozenset({"refusal", "annotations", "reasoning_content", "reasoning"})
# A tool call's id as Mistral takes it: 9 letters and digits.
_TOOL_CALL_ID_LENGTH = 9
_TOOL_CALL_ID = re.compile(rf"[a-zA-Z0-9]{{{_TOOL_CALL_ID_LENGTH}}}")
_TOOL_CALL_ID_ALPHABET = string.ascii_letters + string.digits
# The images Mistral's vision models take (its vision guide's FAQ: PNG, JPEG, WEBP and a non-animated GIF of one
# frame, as a data URL or an http(s) URL it fetches). A data URL of another type (text/html, a PDF, HEIC) is refused
# before the call (``images_checked``), where Mistral answered its own 400 after it.
MISTRAL_IMAGE_URLS = ImageUrls("Mistral", ("image/png", "image/jpeg", "image/gif", "image/webp"), fetches=True)


class MistralAdapter(OpenAIAdapter):
    # Mistral has no /v1/completions: a text completion goes to Codestral's fill-in-the-middle (``_fim_body``).
    serves_completions = True
    embed_batch_limit = 512  # Mistral refuses more inputs in one request ("Too many inputs in request")
    # Mistral has no ``user``: a /v1/messages request's ``metadata.user_id`` is left out, not sent to be refused.
    messages_end_user_field = None
    # The ``output_config.effort`` Mistral has a ``reasoning_effort`` for: its reasoning is ``high`` or ``none`` (which
    # Anthropic's levels do not name); another was sent to meet Mistral's 422, a 400 naming ``reasoning_effort``.
    messages_efforts = ("high",)
    image_urls = MISTRAL_IMAGE_URLS

    def _chat_body(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        if self.image_urls is not None:  # what the OpenAI adapter's ``_chat_body``, not called here, checks
            images_checked(body, self.image_urls)
        request = fields_renamed(
            {
                key: value
                for key, value in prompt_cache_hints_dropped(
                    unhonoured_refused(body, TEXT_WITHOUT_LOGPROBS), key_taken=True
                ).items()
                if key not in ("stream", "stream_options")
            },
            _CHAT_RENAMES,
        )
        request = _tool_call_ids_spelt(_prefix_marked(refusals_as_text(assistant_fields_dropped(request, _REPLY_ONLY))))
        if stream:
            request["stream"] = True
        return request

    @staticmethod
    def _content_spelt(part: dict[str, Any]) -> bool:
        return _content_chunks_spelt(part)

    async def complete(self, body: dict[str, Any], *, path: str = _CHAT_PATH) -> dict[str, Any]:
        """The OpenAI adapter's, with the prefix Mistral's reply begins with (``_marked_prefix``) left out of it."""
        completion = await super().complete(body, path=path)
        prefix = _marked_prefix(body)
        if not prefix:
            return completion
        for choice in completion.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = _PrefixEcho(prefix).text(message["content"], ended=True)
        return completion

    async def stream(self, body: dict[str, Any], *, path: str = _CHAT_PATH) -> AsyncIterator[WireChunk]:
        """The OpenAI adapter's stream, with the usage Mistral puts on its last chunk moved to a chunk of its
        own, with no choices, after it: where OpenAI reports it (``include_usage``), and every adapter too; and the
        prefix Mistral's reply begins with (``_marked_prefix``) left out of its text (``_PrefixEcho``)."""
        upstream = super().stream(body, path=path)
        prefix = _marked_prefix(body)
        echoes: dict[Any, _PrefixEcho] = {}
        try:
            async for chunk in upstream:
                if prefix:
                    _echo_dropped(chunk, prefix, echoes)
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

    async def text_complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Codestral's fill-in-the-middle, answered as a chat completion by Mistral: its message's text is the
        completion's."""
        with refusal_named(self.config):
            fim = _fim_body(body)
        return _text_completion(await self.complete(fim, path=_FIM_PATH))

    async def text_stream(self, body: dict[str, Any]) -> AsyncIterator[WireChunk]:
        with refusal_named(self.config):
            fim = _fim_body(body)
        upstream = self.stream(fim, path=_FIM_PATH)
        try:
            async for chunk in upstream:
                yield WireChunk(_text_completion(chunk, streamed=True), None)
        finally:
            await upstream.aclose()  # type: ignore[attr-defined]


def _tool_call_ids_spelt(request: dict[str, Any]) -> dict[str, Any]:
    """``request`` with each tool call id of its messages (an assistant's call, a tool message's answer to it) in
    Mistral's form (``_mistral_tool_call_id``); ``request`` itself when every one is already."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return request
    spelt = [_message_ids_spelt(message) for message in messages]
    if all(new is old for new, old in zip(spelt, messages, strict=True)):
        return request
    return {**request, "messages": spelt}


def _message_ids_spelt(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    out = message
    if isinstance(message.get("tool_call_id"), str):
        call_id = _mistral_tool_call_id(message["tool_call_id"])
        if call_id != message["tool_call_id"]:
            out = {**out, "tool_call_id": call_id}
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        spelt = [
            {**call, "id": _mistral_tool_call_id(call["id"])}
            if isinstance(call, dict) and isinstance(call.get("id"), str)
            else call
            for call in calls
        ]
        if any(new != old for new, old in zip(spelt, calls, strict=True)):
            out = {**out, "tool_calls": spelt}
    return out


def _mistral_tool_call_id(call_id: str) -> str:
    """``call_id`` in Mistral's form, 9 letters and digits, the only one it takes (else its 400 ``Tool call id was …
    but must be a-z, A-Z, 0-9, with a length of 9``): as it is when it is one (Mistral's own), else drawn from its
    SHA-256, so that a call and the tool message answering it (another provider's ``call_…``, Claude's ``toolu_…``)
    get the same, and different calls different ones."""
    if _TOOL_CALL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    digits = []
    for _ in range(_TOOL_CALL_ID_LENGTH):
        number, digit = divmod(number, len(_TOOL_CALL_ID_ALPHABET))
        digits.append(_TOOL_CALL_ID_ALPHABET[digit])
    return "".join(digits)


def _prefix_marked(request: dict[str, Any]) -> dict[str, Any]:
    """``request`` with its last message, when the assistant's text (no tool calls), marked ``"prefix": true``."""
    if _to_mark(request) is None:
        return request
    messages = request["messages"]
    return {**request, "messages": [*messages[:-1], {**messages[-1], "prefix": True}]}


def _to_mark(request: dict[str, Any]) -> dict[str, Any] | None:
    """The last message of ``request`` that ``_prefix_marked`` marks as Mistral's prefix; None when there is none."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "assistant" or last.get("tool_calls") or "prefix" in last:
        return None
    return last


def _marked_prefix(body: dict[str, Any]) -> str:
    """The text llmhub sends Mistral as the prefix of its reply for ``body`` (the prefill ``_prefix_marked`` marks;
    "" for none). Mistral's reply begins with the prefix itself (its guide slices it off the reply's text): left in,
    a resumed stream's client would read the text it has twice. A client that marks its prefill itself speaks
    Mistral's API and gets its reply as Mistral writes it."""
    last = _to_mark(body)
    content = last.get("content") if last is not None else None
    return content if isinstance(content, str) else ""


class _PrefixEcho:
    """The start of one choice's reply held back until it is as long as ``prefix`` (or the reply ends): when it is
    the prefix, Mistral's echo of it, it is dropped; otherwise (a server that only continues the prefix) it is
    passed on unchanged. Once that is decided, text passes at once."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.held = ""
        self.decided = False

    def text(self, piece: str, *, ended: bool) -> str:
        """What of ``piece``, the reply's next text, goes on now; ``ended``: no more text follows it."""
        if self.decided:
            return piece
        self.held += piece
        if len(self.held) < len(self.prefix) and self.prefix.startswith(self.held) and not ended:
            return ""
        self.decided = True
        held, self.held = self.held, ""
        return held[len(self.prefix) :] if held.startswith(self.prefix) else held


def _echo_dropped(chunk: WireChunk, prefix: str, echoes: dict[Any, _PrefixEcho]) -> None:
    """``chunk`` without Mistral's echo of ``prefix`` in its choices' text (``_PrefixEcho``, one a choice), in
    place. Text held back goes on with the choice's next text, at the latest with its finish or first tool call."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict) or not isinstance(choice.get("delta"), dict):
            continue
        echo = echoes.setdefault(choice.get("index", 0), _PrefixEcho(prefix))
        if echo.decided:
            continue
        delta = choice["delta"]
        content = delta.get("content")
        ended = bool(choice.get("finish_reason") or delta.get("tool_calls") or delta.get("function_call"))
        if not isinstance(content, str) and not (ended and echo.held):
            continue
        passed = echo.text(content if isinstance(content, str) else "", ended=ended)
        if passed != content:
            delta["content"] = passed
            chunk.raw = None


def _fim_body(body: dict[str, Any]) -> dict[str, Any]:
    """A text completion as Codestral's FIM request (``FIMCompletionRequest``): one prompt, as text, and the
    ``suffix``; what FIM has no counterpart for (several prompts, token ids, ``n``, ``best_of``, ``echo``,
    ``logprobs``) is refused with a 400 naming it, rather than sent for a 422 or answered as if it had been kept.
    Any other field goes up, and Mistral's 422 for one it does not take reaches the client as a 400 naming it."""
    if not isinstance(body.get("prompt"), str):
        raise ProviderBadRequestError(
            "Mistral's fill-in-the-middle takes one prompt, as text: not a list of prompts, nor token ids.",
            param="prompt",
            code="unsupported_value",
        )
    one_choice_only(body)
    for name, default in (("best_of", 1), ("echo", False), ("logprobs", None)):
        if body.get(name) not in (None, default):
            raise ProviderBadRequestError(
                f"Mistral's fill-in-the-middle has no `{name}`.", param=name, code="unsupported_value"
            )
    return {key: value for key, value in body.items() if key not in ("best_of", "echo", "logprobs", "n")}


def _text_completion(completion: dict[str, Any], *, streamed: bool = False) -> dict[str, Any]:
    """A chat completion (or chunk) from FIM as the ``text_completion`` it answers: each choice's text is its
    message's (its delta's) content."""
    answer = {key: completion[key] for key in ("id", "created", "model", "usage") if key in completion}
    choices = []
    for choice in completion.get("choices") or ():
        part = choice.get("delta" if streamed else "message") or {}
        text = part.get("content") if isinstance(part.get("content"), str) else ""
        reason = choice.get("finish_reason")
        choices.append(
            {
                "text": text,
                "index": choice.get("index", 0),
                "logprobs": None,
                "finish_reason": "stop" if reason == "tool_calls" else reason,
            }
        )
    return {**answer, "object": "text_completion", "choices": choices}


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
