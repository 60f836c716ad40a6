"""OpenAI's published response schema, met whatever an OpenAI-compatible server left out.

Several servers that speak the chat-completions protocol leave out fields OpenAI's spec requires
(``CreateChatCompletionResponse``, ``CreateChatCompletionStreamResponse`` in its OpenAPI document):
``choices[].logprobs`` and ``message.refusal`` (required, nullable), sometimes ``created``, ``object``,
a choice's ``index`` or ``finish_reason``, a tool call's ``type``, usage's ``total_tokens``. Clients that
validate (typed SDKs, generated clients) then fail on a response OpenAI itself would never send.
These functions fill in the value OpenAI would have sent (``null`` for a nullable field, the constant,
the obvious default) and leave everything else as it came.

A stream chunk is checked first (``StreamShape.conform``) with a few dictionary lookups on the dict the
relay has decoded anyway, so that a chunk already valid keeps its upstream bytes; only a chunk that
needed a fill is encoded again. Values of the wrong type are not second-guessed beyond what a fill
needs: a field that is present is the upstream's answer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

__all__ = ["StreamShape", "completion_conform"]

_COMPLETION = "chat.completion"
_CHUNK = "chat.completion.chunk"


def _new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _is_int(value: Any) -> bool:
    return type(value) is int


def _conform_usage(holder: dict[str, Any], *, nullable: bool) -> None:
    usage = holder.get("usage")
    if usage is None:
        if "usage" in holder and not nullable:
            del holder["usage"]  # a completion's usage is an object or absent, never null
        return
    if not isinstance(usage, dict):
        del holder["usage"]
        return
    prompt = usage.setdefault("prompt_tokens", 0)
    completion = usage.setdefault("completion_tokens", 0)
    if "total_tokens" not in usage:
        usage["total_tokens"] = (prompt if _is_int(prompt) else 0) + (completion if _is_int(completion) else 0)


def _conform_tool_calls(calls: Any, *, streamed: bool) -> None:
    if not isinstance(calls, list):
        return
    for position, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        if streamed:
            call.setdefault("index", position)
        else:
            call.setdefault("type", "function")


def completion_conform(completion: dict[str, Any], *, model: str) -> dict[str, Any]:
    """Fill in, in place, what ``CreateChatCompletionResponse`` requires and ``completion`` lacks.
    ``model`` (the upstream id asked for) stands in for a missing ``model``. Returns ``completion``."""
    if not isinstance(completion.get("id"), str):
        completion["id"] = _new_id()
    completion["object"] = _COMPLETION
    created = completion.get("created")
    if not _is_int(created):
        completion["created"] = int(created) if isinstance(created, float) else int(time.time())
    if not isinstance(completion.get("model"), str):
        completion["model"] = model
    choices = completion.get("choices")
    if not isinstance(choices, list):
        completion["choices"] = choices = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        if not _is_int(choice.get("index")):
            choice["index"] = position
        choice.setdefault("logprobs", None)
        message = choice.get("message")
        if not isinstance(message, dict):
            choice["message"] = message = {}
        message.setdefault("role", "assistant")
        message.setdefault("content", None)
        message.setdefault("refusal", None)
        _conform_tool_calls(message.get("tool_calls"), streamed=False)
        if choice.get("finish_reason") is None:
            # A finished completion always has a reason; a server that leaves it out stopped normally.
            choice["finish_reason"] = "tool_calls" if message.get("tool_calls") else "stop"
    _conform_usage(completion, nullable=False)
    return completion


class StreamShape:
    """The state one stream needs to fill its chunks in: the ``id`` and ``created`` of its first chunk
    (every chunk of a stream carries the same ones), or made-up ones when the upstream sent none."""

    __slots__ = ("_created", "_id", "_model")

    def __init__(self, model: str) -> None:
        self._model = model
        self._id: str | None = None
        self._created: int | None = None

    def conform(self, chunk: dict[str, Any]) -> bool:
        """True when ``chunk`` already has every required field (leave its bytes alone); else fill it in,
        in place, and return False (its bytes must be encoded again)."""
        chunk_id = chunk.get("id")
        created = chunk.get("created")
        choices = chunk.get("choices")
        valid = (
            type(chunk_id) is str
            and type(created) is int
            and type(chunk.get("model")) is str
            and chunk.get("object") == _CHUNK
            and type(choices) is list
            and _usage_valid(chunk.get("usage"))
        )
        if valid:
            for choice in choices:  # a loop, not all(<generator>): this runs for every chunk of every stream
                if not _choice_valid(choice):
                    valid = False
                    break
        if valid:
            if self._id is None:
                self._id, self._created = chunk_id, created
            return True
        self._fill(chunk)
        return False

    def _fill(self, chunk: dict[str, Any]) -> None:
        chunk_id = chunk.get("id")
        if type(chunk_id) is not str:
            chunk["id"] = chunk_id = self._id or _new_id()
        created = chunk.get("created")
        if type(created) is not int:
            if self._created is not None:
                created = self._created
            else:
                created = int(created) if isinstance(created, float) else int(time.time())
            chunk["created"] = created
        if self._id is None:
            self._id, self._created = chunk_id, created
        if type(chunk.get("model")) is not str:
            chunk["model"] = self._model
        chunk["object"] = _CHUNK
        choices = chunk.get("choices")
        if type(choices) is not list:
            chunk["choices"] = choices = []
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            if not _is_int(choice.get("index")):
                choice["index"] = position
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                choice["delta"] = delta = {}
            _conform_tool_calls(delta.get("tool_calls"), streamed=True)
            choice.setdefault("finish_reason", None)
        _conform_usage(chunk, nullable=True)


def _choice_valid(choice: Any) -> bool:
    if type(choice) is not dict or type(choice.get("index")) is not int or "finish_reason" not in choice:
        return False
    delta = choice.get("delta")
    if type(delta) is not dict:
        return False
    calls = delta.get("tool_calls")
    if calls is None:
        return True
    if type(calls) is not list:
        return False
    for call in calls:
        if type(call) is not dict or "index" not in call:
            return False
    return True


def _usage_valid(usage: Any) -> bool:
    return usage is None or (
        type(usage) is dict and "prompt_tokens" in usage and "completion_tokens" in usage and "total_tokens" in usage
    )
