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
needs, but for the ones every reader of a reply takes for OpenAI's types (a choice, its ``content``, its tool
calls, its ``finish_reason``): a ``content`` of text parts is their text, and any other such field of another
type makes the chunk or reply malformed (``MalformedReply``: a 502, or a stream's in-band error), rather than a
failure mid-relay.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..tokens import COUNT_MAX

__all__ = [
    "MalformedReply",
    "StreamShape",
    "completion_chunks",
    "completion_conform",
    "embeddings_conform",
    "json_constant",
    "logprob_finite",
    "numbers_finite",
    "text_parts_joined",
]

_COMPLETION = "chat.completion"
_CHUNK = "chat.completion.chunk"


class MalformedReply(ValueError):
    """A chunk or a reply whose fields are of types no fill can mend (a ``content`` that is a number, a choice
    that is a string, a tool call's ``function`` that is not an object): relayed, it would break the client, and
    every reader of the reply (the output check, the estimate, the translations) expects OpenAI's types."""


# Spells a message's or a delta's ``content`` that is not a string as one, in place; True when it could.
ContentSpeller = Callable[[dict[str, Any]], bool]


def text_parts_joined(part: dict[str, Any]) -> bool:
    """A ``content`` that is a list of text parts (``[{"type": "text", "text": …}]``, the shape OpenAI's requests
    take) as their text, in place; False (unchanged) for anything else."""
    content = part.get("content")
    if not isinstance(content, list):
        return False
    texts = []
    for item in content:
        if not (isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str)):
            return False
        texts.append(item["text"])
    part["content"] = "".join(texts)
    return True


def _content_mended(part: dict[str, Any], spell: ContentSpeller) -> None:
    content = part.get("content")
    if content is not None and type(content) is not str and not (spell(part) and _is_text(part.get("content"))):
        raise MalformedReply(f"a content of type {type(content).__name__}")
    if not _is_text(part.get("refusal")):
        raise MalformedReply("a refusal that is not text")


# What OpenAI's schema allows of the fields nobody of ours reads, whose other values are left out (a server's own
# ``service_tier``, Groq's ``on_demand``; a ``system_fingerprint`` that is not text; a delta's role of no one) or
# null (a choice's ``logprobs`` that is not an object), rather than relayed for a typed client to fail on.
_SERVICE_TIERS = frozenset({"auto", "default", "flex", "scale", "priority", "fast"})
_DELTA_ROLES = frozenset({"developer", "system", "user", "assistant", "tool"})


def _metadata_valid(holder: dict[str, Any]) -> bool:
    tier = holder.get("service_tier")
    return (tier is None or (type(tier) is str and tier in _SERVICE_TIERS)) and type(
        holder.get("system_fingerprint", "")
    ) is str


def _metadata_mended(holder: dict[str, Any]) -> None:
    tier = holder.get("service_tier")
    if tier is not None and not (type(tier) is str and tier in _SERVICE_TIERS):
        del holder["service_tier"]
    if "system_fingerprint" in holder and type(holder["system_fingerprint"]) is not str:
        del holder["system_fingerprint"]


def _logprobs_mended(choice: dict[str, Any]) -> None:
    logprobs = choice.get("logprobs")
    if logprobs is not None and type(logprobs) is not dict:
        choice["logprobs"] = None


# What a whole reply's logprobs require that OpenAI-compatible servers leave out (``CreateChatCompletionResponse``:
# each nullable): vLLM's, llama.cpp's and SGLang's logprobs carry ``content`` alone, no ``refusal``; a server that skips
# what it has none of (serde's ``skip_serializing_if``) leaves out a token's ``bytes``, or its ``top_logprobs`` when
# none were asked. OpenAI sends null for the first two and an empty list for the last.
_LOGPROBS_LISTS = ("content", "refusal")


def _whole_logprobs_filled(logprobs: Any) -> None:
    if type(logprobs) is not dict:
        return
    for name in _LOGPROBS_LISTS:
        tokens = logprobs.get(name)
        if type(tokens) is not list:
            logprobs[name] = None  # left out, null, or a list nobody can read as one
            continue
        for token in tokens:
            if type(token) is not dict:
                continue
            token.setdefault("bytes", None)
            alternatives = token.get("top_logprobs")
            if alternatives is None:
                token["top_logprobs"] = alternatives = []
            if type(alternatives) is list:
                for alternative in alternatives:
                    if type(alternative) is dict:
                        alternative.setdefault("bytes", None)


def _is_text(value: Any) -> bool:
    return value is None or type(value) is str


# OpenAI's finish reasons (an enum in its schema), and what other servers' spellings mean: vLLM's and TGI's
# ``eos``, Mistral's ``model_length``, the Messages API's reasons an Anthropic-minded proxy passes on. A reason
# nobody spells this way is a model that stopped: ``stop``.
_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_FINISH_MEANT = {
    "eos": "stop",
    "eos_token": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_length": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _finish_mended(choice: dict[str, Any]) -> None:
    """Raise ``MalformedReply`` unless the choice's ``finish_reason`` is text (or null); spell it as OpenAI does."""
    reason = choice.get("finish_reason")
    if not _is_text(reason):
        raise MalformedReply("a finish_reason that is not text")
    if reason == "error":  # Mistral's: the generation failed, which must not end as a clean stop
        raise MalformedReply("a finish_reason of error: the provider failed to finish the reply")
    if reason is not None and reason not in _FINISH_REASONS:
        choice["finish_reason"] = _FINISH_MEANT.get(reason, "stop")


def _calls_checked(part: dict[str, Any]) -> None:
    """Raise ``MalformedReply`` unless ``part``'s tool calls and legacy function call are of OpenAI's types."""
    calls = part.get("tool_calls")
    if calls is not None:
        if type(calls) is not list:
            raise MalformedReply("tool_calls that are not a list")
        for call in calls:
            if type(call) is not dict:
                raise MalformedReply("a tool call that is not an object")
            _function_checked(call.get("function"))
    if "function_call" in part:
        _function_checked(part["function_call"])


def _function_checked(function: Any) -> None:
    if function is None:
        return
    _arguments_spelt(function)
    if not _function_valid(function):
        raise MalformedReply("a function that is not an object with a text name and arguments")


def _arguments_spelt(function: Any) -> None:
    """A function's ``arguments`` sent as a JSON object or array (Hugging Face TGI's, llama.cpp's server with
    ``--tool-args-object``), where OpenAI's schema has the JSON text, as that text, in place: exact (the same value
    read back) and compact. A streamed piece so sent is the whole arguments in one piece. A number, a bool or a
    text stays as it came: no server sends a call's arguments as a bare number or bool (a function's parameters
    are an object), so such a value is a malformed reply, not arguments to spell; null is none (left out or
    empty). A value JSON cannot write exactly (an infinity a number too large read as) is malformed too."""
    if type(function) is not dict:
        return
    arguments = function.get("arguments")
    if type(arguments) in (dict, list):
        try:
            function["arguments"] = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except ValueError:
            raise MalformedReply("a tool call's arguments JSON cannot write exactly") from None


def _new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


# A number JSON has not, which Python's JSON reads (``NaN``, ``Infinity``, ``-Infinity``: vLLM's logprob of a token
# it could not have chosen) and would write back as it came, which no strict JSON reader (JavaScript's, Go's)
# takes. -Infinity is OpenAI's own floor for a logprob, -9999.0; the others are null, but in a logprob
# (``logprobs_finite``).
_NOT_FINITE = {"-Infinity": -9999.0, "Infinity": None, "NaN": None}
# OpenAI's logprob of a token very unlikely (``ChatCompletionTokenLogprob``: "the value -9999.0 is used").
LOGPROB_FLOOR = -9999.0


def json_constant(name: str) -> float:
    """``json.loads``' ``parse_constant``: a chunk's ``NaN``, ``Infinity`` or ``-Infinity`` read as the float it
    is, for ``numbers_finite`` to replace where it stands."""
    return float(name)


def logprob_finite(value: Any) -> Any:
    """A logprob as OpenAI's spec types it, a number, never null (chat completions', text completions' and the
    Responses API's alike): ``NaN`` and ``-Infinity`` are OpenAI's floor (``LOGPROB_FLOOR``, a token very unlikely),
    ``Infinity`` ``0.0``, the most a log probability is. Any other value as it is."""
    if type(value) is float and (value != value or value in (float("inf"), float("-inf"))):
        return 0.0 if value > 0 else LOGPROB_FLOOR
    return value


def _token_logprobs_finite(tokens: Any) -> None:
    """A chat choice's ``logprobs.content`` (or ``refusal``): each token's logprob and its alternatives', in place."""
    for token in tokens if type(tokens) is list else ():
        if type(token) is not dict:
            continue
        token["logprob"] = logprob_finite(token.get("logprob"))
        for alternative in token.get("top_logprobs") if type(token.get("top_logprobs")) is list else ():
            if type(alternative) is dict:
                alternative["logprob"] = logprob_finite(alternative.get("logprob"))


def _logprobs_finite(logprobs: Any) -> None:
    """A choice's ``logprobs``, in place: a chat completion's (``content``, ``refusal``: lists of tokens) or a text
    completion's (``token_logprobs``, a list of logprobs; ``top_logprobs``, a token -> logprob object a step)."""
    if type(logprobs) is not dict:
        return
    _token_logprobs_finite(logprobs.get("content"))
    _token_logprobs_finite(logprobs.get("refusal"))
    values = logprobs.get("token_logprobs")
    if type(values) is list:
        logprobs["token_logprobs"] = [logprob_finite(value) for value in values]
    for step in logprobs.get("top_logprobs") if type(logprobs.get("top_logprobs")) is list else ():
        if type(step) is dict:
            for token, value in step.items():
                step[token] = logprob_finite(value)


def numbers_finite(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (a chat or text completion, or a chunk of one, read with ``json_constant``) with each number
    JSON has not replaced, in place: its choices' logprobs by ``logprob_finite``, any other by ``_NOT_FINITE``."""
    choices = document.get("choices")
    for choice in choices if type(choices) is list else ():
        if type(choice) is dict:
            _logprobs_finite(choice.get("logprobs"))
    return _finite(document)


def _finite(value: Any) -> Any:
    """``value`` (a decoded reply, or any part of it) with each number JSON has not (``_NOT_FINITE``) replaced,
    in place; a float's own value is returned."""
    if type(value) is float:
        if value != value:
            return None
        if value in (float("inf"), float("-inf")):
            return _NOT_FINITE["Infinity" if value > 0 else "-Infinity"]
        return value
    if type(value) is dict:
        for key, item in value.items():
            if type(item) in (float, dict, list):
                value[key] = _finite(item)
    elif type(value) is list:
        for position, item in enumerate(value):
            if type(item) in (float, dict, list):
                value[position] = _finite(item)
    return value


def _timestamp(value: Any) -> int:
    """A ``created`` that is not an integer as one: a float's seconds (JSON's ``1700000000.5``), or now for
    anything else (a text; NaN, an infinity or a float out of any clock's range, which Python's JSON reads and
    ``int()`` refuses)."""
    if type(value) is float and 0 <= value < 2**53:
        return int(value)
    return int(time.time())


def _is_int(value: Any) -> bool:
    return type(value) is int


def _conform_usage(holder: dict[str, Any], *, nullable: bool) -> None:
    usage = holder.get("usage")
    if usage is None:
        if "usage" in holder and not nullable:
            del holder["usage"]  # a completion's usage is an object or absent, never null
        return
    if isinstance(usage, dict):
        for name in _COUNT_NAMES:
            if name in usage and usage[name] is None:
                del usage[name]  # a null count is one not given
    if not isinstance(usage, dict) or not _usage_counts(usage):
        # Not a usage at all, or one whose counts are of another type or none: the schema's types could only be
        # met by making counts up, which billing would take for the provider's. Left out, the request is counted.
        del holder["usage"]
        return
    if "prompt_tokens" in usage and "completion_tokens" in usage:
        usage.setdefault("total_tokens", usage["prompt_tokens"] + usage["completion_tokens"])
    # One of the two counts left out stays so: settlement estimates it (a 0 would bill the prompt or the reply as
    # nothing), and the pipeline fills in, for the client, what the request was charged.
    for name in _DETAILS:
        if name in usage:
            _details_mended(usage, name)


# The breakdowns of a usage, and the counts in them (OpenAI's schema types each an integer; ``cache_write_1h_tokens``
# is ours: Anthropic's 1-hour cache writes, ``openai_usage``). Any other field of a breakdown is left as it came.
_DETAILS = ("prompt_tokens_details", "completion_tokens_details")
_DETAIL_COUNTS = frozenset(
    {
        "cached_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "audio_tokens",
        "image_tokens",
        "text_tokens",
        "reasoning_tokens",
        "accepted_prediction_tokens",
        "rejected_prediction_tokens",
    }
)


def _details_mended(usage: dict[str, Any], name: str) -> None:
    """A usage's breakdown as OpenAI's schema has it, in place: a count spelt as an integer's text or an integral
    float is that integer; one nobody can read as a count (another text, a fraction, a negative, null) is left out,
    as is a breakdown that is not an object."""
    details = usage[name]
    if type(details) is not dict:
        del usage[name]
        return
    for key in [key for key in details if key in _DETAIL_COUNTS]:
        count = _count_read(details[key])
        if count is None:
            del details[key]
        else:
            details[key] = count


def _count_read(value: Any) -> int | None:
    """``value`` as a count billing can believe, or None."""
    if type(value) is str:
        text = value.strip()
        value = int(text) if text.isascii() and text.isdigit() else None
    elif type(value) is float and value.is_integer():
        value = int(value)
    return value if _is_count(value) else None


def _details_valid(usage: dict[str, Any]) -> bool:
    for name in _DETAILS:
        if name not in usage:
            continue
        details = usage[name]
        if type(details) is not dict:
            return False
        for key, count in details.items():
            if key in _DETAIL_COUNTS and not _is_count(count):
                return False
    return True


def _conform_tool_calls(calls: Any, *, streamed: bool) -> None:
    if not isinstance(calls, list):
        return
    for position, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        if streamed:
            # The index joins a call's pieces: one of another type, nobody can join (the Messages translation
            # keys its blocks by it).
            if type(call.setdefault("index", position)) is not int:
                raise MalformedReply("a tool call's index that is not an integer")
            # An id or a type that is not text says nothing a client can use: left out (the first piece's id
            # is optional in a chunk).
            for name in ("id", "type"):
                if name in call and type(call[name]) is not str:
                    del call[name]
        else:
            if call.get("type") not in ("function", "custom"):
                call["type"] = "function"  # the one type a call with a function has
            if type(call.get("id")) is not str:
                call["id"] = "call_" + uuid.uuid4().hex[:24]
            if call["type"] == "custom" and type(call.get("custom")) is dict:
                continue  # a custom tool's call (its text ``input``), which OpenAI answers a custom tool with
            if call.get("function") is None:
                raise MalformedReply("a tool call without its function")
            _whole_function_mended(call["function"])


def _whole_function_mended(function: Any) -> None:
    """A whole reply's function (a tool call's, or a legacy ``function_call``) has a name and its arguments: the
    schema requires both. No name is a call nobody can make; no arguments are empty ones."""
    if type(function) is not dict:
        return
    if type(function.get("name")) is not str:
        raise MalformedReply("a function call without a name")
    if function.get("arguments") is None:
        function["arguments"] = ""


def completion_conform(
    completion: dict[str, Any], *, model: str, content: ContentSpeller = text_parts_joined
) -> dict[str, Any]:
    """Fill in, in place, what ``CreateChatCompletionResponse`` requires and ``completion`` lacks.
    ``model`` (the upstream id asked for) stands in for a missing ``model``; ``content`` spells a message's
    ``content`` that is not a string. Returns ``completion``; raises ``MalformedReply`` for what cannot be filled."""
    numbers_finite(completion)
    if not isinstance(completion.get("id"), str):
        completion["id"] = _new_id()
    completion["object"] = _COMPLETION
    created = completion.get("created")
    if not _is_int(created):
        completion["created"] = _timestamp(created)
    if not isinstance(completion.get("model"), str):
        completion["model"] = model
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices:
        # Nothing answered: relayed, a 200 with an empty answer, taken by the client (and billed) as the model's.
        raise MalformedReply("no choices")
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise MalformedReply("a choice that is not an object")
        if not _is_int(choice.get("index")):
            choice["index"] = position
        _logprobs_mended(choice)
        choice.setdefault("logprobs", None)
        _whole_logprobs_filled(choice["logprobs"])
        message = choice.get("message")
        if not isinstance(message, dict):
            choice["message"] = message = {}
        _content_mended(message, content)
        _calls_checked(message)
        message["role"] = "assistant"  # the one role a reply's message has (the schema's constant)
        message.setdefault("content", None)
        message.setdefault("refusal", None)
        _conform_tool_calls(message.get("tool_calls"), streamed=False)
        _whole_function_mended(message.get("function_call"))
        for name in ("tool_calls", "function_call", "annotations"):
            if name in message and message[name] is None:
                # A server's null for none (vLLM's every unset field, LM Studio): OpenAI's schema types them as an array
                # or an object, and leaves them out.
                del message[name]
        _finish_mended(choice)
        if choice.get("finish_reason") is None:
            # A finished completion always has a reason; a server that leaves it out stopped normally.
            choice["finish_reason"] = "tool_calls" if message.get("tool_calls") else "stop"
    _conform_usage(completion, nullable=False)
    _metadata_mended(completion)
    return completion


# What a message holds that its stream carries in chunks of their own (``completion_chunks``); any other field of it (a
# server's ``reasoning_content``, ``reasoning``, ``annotations``) goes in the delta that carries its text.
_MESSAGE_PARTS = frozenset({"role", "content", "refusal", "tool_calls", "function_call"})


def completion_chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole chat completion, conformed (``completion_conform``), as the stream that would have carried it: for
    a server that answered one to a request for a stream (vLLM, Ollama and proxies that ignore ``stream``). Each
    choice in turn: a chunk opening its message with its role, one with its text (its other fields and its
    logprobs beside it), its refusal, one per tool call (or its legacy function call), its finish; then, when
    the reply counted its tokens, a chunk of its usage with no choices, as OpenAI ends a stream that asked for it."""
    head = {"id": completion["id"], "object": _CHUNK, "created": completion["created"], "model": completion["model"]}
    for name in ("service_tier", "system_fingerprint"):
        if name in completion:
            head[name] = completion[name]

    def chunk(index: int, delta: dict[str, Any], *, logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    chunks = []
    for choice in completion["choices"]:
        index, message = choice["index"], choice["message"]
        chunks.append(chunk(index, {"role": "assistant", "content": ""}))
        said = {key: value for key, value in message.items() if key not in _MESSAGE_PARTS and value is not None}
        if message["content"]:
            said["content"] = message["content"]
        if said or choice["logprobs"] is not None:
            chunks.append(chunk(index, said, logprobs=choice["logprobs"]))
        if message["refusal"]:
            chunks.append(chunk(index, {"refusal": message["refusal"]}))
        for number, call in enumerate(message.get("tool_calls") or ()):
            chunks.append(chunk(index, {"tool_calls": [{**call, "index": number}]}))
        if message.get("function_call") is not None:
            chunks.append(chunk(index, {"function_call": message["function_call"]}))
        chunks.append(chunk(index, {}, finish=choice["finish_reason"]))
    if completion.get("usage") is not None:
        chunks.append({**head, "choices": [], "usage": completion["usage"]})
    return chunks


class StreamShape:
    """The state one stream needs to fill its chunks in: the ``id`` and ``created`` of its first chunk
    (every chunk of a stream carries the same ones), or made-up ones when the upstream sent none; and, per
    choice, the tool call being streamed (``_calls_numbered``). ``numbered``: whether the chunk ``conform`` last took
    had a tool call piece that the upstream numbered none of, which the stream's state numbered: its filled bytes
    carry that call's index, so the adapter learns no argument template from them (``OpenAIAdapter._chunk``)."""

    __slots__ = ("_calls", "_content", "_created", "_id", "_model", "numbered")

    def __init__(self, model: str, *, content: ContentSpeller = text_parts_joined) -> None:
        self._model = model
        self._content = content
        self._id: str | None = None
        self._created: int | None = None
        self._calls: dict[int, tuple[int, str | None]] = {}  # choice index -> (its current call's index, id)
        self.numbered = False

    def conform(self, chunk: dict[str, Any]) -> bool:
        """True when ``chunk`` already has every required field (leave its bytes alone); else fill it in,
        in place, and return False (its bytes must be encoded again). Raises ``MalformedReply`` for what
        cannot be filled."""
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
            and _metadata_valid(chunk)
        )
        if valid:
            for choice in choices:  # a loop, not all(<generator>): this runs for every chunk of every stream
                if not _choice_valid(choice):
                    valid = False
                    break
        if valid:
            if self._id is None:
                self._id, self._created = chunk_id, created
            self.numbered = False  # a valid chunk's every call piece has its index
            return True
        self.numbered = False
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
                created = _timestamp(created)
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
                raise MalformedReply("a choice that is not an object")
            if not _is_int(choice.get("index")):
                choice["index"] = position
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                choice["delta"] = delta = {}
            _content_mended(delta, self._content)
            _calls_listed(delta)
            _calls_checked(delta)
            _logprobs_mended(choice)
            role = delta.get("role")
            if role is not None and not (type(role) is str and role in _DELTA_ROLES):
                del delta["role"]
            _nulls_left_out(delta)
            self._calls_numbered(choice["index"], delta.get("tool_calls"))
            _conform_tool_calls(delta.get("tool_calls"), streamed=True)
            choice.setdefault("finish_reason", None)
            _finish_mended(choice)
        _conform_usage(chunk, nullable=True)
        _metadata_mended(chunk)

    def _calls_numbered(self, choice_index: Any, calls: Any) -> None:
        """The ``index`` of each tool call piece a server numbered none of: it sends the calls one after another,
        each call's first piece with its ``id``, so a piece with an id other than the current call's (or after
        another in the same chunk) begins the next call, and one without continues the current call. Numbered by
        their place in the chunk, every call of a stream that sent one per chunk was call 0: a client joined
        their pieces into one call."""
        if not isinstance(calls, list):
            return
        current, current_id = self._calls.get(choice_index, (-1, None))
        for position, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            call_id = call.get("id") if type(call.get("id")) is str else None
            if "index" in call:
                if type(call["index"]) is int:
                    current, current_id = call["index"], call_id or (current_id if call["index"] == current else None)
                continue
            if current < 0 or position > 0 or (call_id is not None and call_id != current_id):
                current, current_id = current + 1, call_id
            call["index"] = current
            self.numbered = True
        self._calls[choice_index] = (current, current_id)


def _calls_listed(delta: dict[str, Any]) -> None:
    """A delta's ``tool_calls`` sent as the one call piece itself, an object, not an array of it (older versions of
    Hugging Face TGI's OpenAI-compatible route stream every piece so), as the array of that one call, in place: the
    schema's array, which every reader of a stream joins pieces from. Only a decoded chunk gets here (``_fill``: the
    object is not the schema's array), so a stream of the schema's shape pays nothing for it."""
    calls = delta.get("tool_calls")
    if type(calls) is dict:
        delta["tool_calls"] = [calls]


# What a delta may not say null for none (vLLM, LM Studio, llama.cpp and some OpenRouter routes do): OpenAI's schema
# (``ChatCompletionStreamResponseDelta``) types ``role`` as one of its roles, ``tool_calls`` as an array,
# ``function_call`` and a tool call's ``function`` as objects, and a function's ``name`` and ``arguments`` as text,
# none nullable (a tool call's ``id`` and ``type`` that are not text are left out by ``_conform_tool_calls``).
# ``content`` and ``refusal`` are nullable, as are a choice's ``logprobs`` and ``finish_reason`` and the chunk's
# ``usage``.
_DELTA_NOT_NULL = ("role", "tool_calls", "function_call")
_FUNCTION_NOT_NULL = ("name", "arguments")


def _nulls_left_out(delta: dict[str, Any]) -> None:
    """Leave out, in place, each field of ``delta`` (and of its functions) that is null where OpenAI's schema
    does not allow it: a null there says none, as a field left out does."""
    for name in _DELTA_NOT_NULL:
        if name in delta and delta[name] is None:
            del delta[name]
    functions = [delta.get("function_call")]
    for call in delta.get("tool_calls") or ():
        if type(call) is dict:
            if "function" in call and call["function"] is None:
                del call["function"]
            functions.append(call.get("function"))
    for function in functions:
        if type(function) is dict:
            for name in _FUNCTION_NOT_NULL:
                if name in function and function[name] is None:
                    del function[name]


def _choice_valid(choice: Any) -> bool:
    if type(choice) is not dict or type(choice.get("index")) is not int or "finish_reason" not in choice:
        return False
    reason = choice["finish_reason"]
    if reason is not None and (type(reason) is not str or reason not in _FINISH_REASONS):
        return False
    delta = choice.get("delta")
    if type(delta) is not dict:
        return False
    content = delta.get("content")
    if content is not None and type(content) is not str:
        return False
    logprobs = choice.get("logprobs")
    role = delta.get("role")
    if (logprobs is not None and type(logprobs) is not dict) or (
        role is not None and (type(role) is not str or role not in _DELTA_ROLES)
    ):
        return False
    if (role is None and "role" in delta) or not _is_text(delta.get("refusal")):
        return False
    function = delta.get("function_call")
    if function is not None:
        if not _function_given(function):
            return False
    elif "function_call" in delta:
        return False
    calls = delta.get("tool_calls")
    if calls is None:
        # Tool calls said null (a server's for none) are not of the schema's types: left out by ``_fill``.
        return "tool_calls" not in delta
    if type(calls) is not list:
        return False
    for call in calls:
        if type(call) is not dict or type(call.get("index")) is not int:
            return False
        if type(call.get("id", "")) is not str or type(call.get("type", "")) is not str:
            return False
        function = call.get("function")
        if (function is None and "function" in call) or (function is not None and not _function_given(function)):
            return False
    return True


def _function_valid(function: Any) -> bool:
    return type(function) is dict and _is_text(function.get("arguments")) and _is_text(function.get("name"))


def _function_given(function: Any) -> bool:
    """A streamed function piece as OpenAI's schema has it: an object whose name and arguments, when there, are
    text (null is not: ``_nulls_left_out``)."""
    return (
        type(function) is dict and type(function.get("arguments", "")) is str and type(function.get("name", "")) is str
    )


def _usage_valid(usage: Any) -> bool:
    return usage is None or (
        type(usage) is dict
        and "prompt_tokens" in usage
        and "completion_tokens" in usage
        and "total_tokens" in usage
        and _usage_counts(usage)
        and _details_valid(usage)
    )


_COUNT_NAMES = ("prompt_tokens", "completion_tokens", "total_tokens")


def _usage_counts(usage: dict[str, Any]) -> bool:
    """Whether ``usage`` counts something, and every count it has is a non-negative integer billing can believe."""
    counts = [usage[name] for name in _COUNT_NAMES if name in usage]
    return ("prompt_tokens" in usage or "completion_tokens" in usage) and all(_is_count(count) for count in counts)


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= COUNT_MAX


def embeddings_conform(response: dict[str, Any]) -> None:
    """Fill in, in place, what ``CreateEmbeddingResponse`` requires and an OpenAI-compatible server's list of embeddings
    (``response["data"]``, a list of objects) left out or said null: the constants ``object`` of the list and of each
    embedding, and a usage's ``total_tokens``, which is its ``prompt_tokens``: an embedding writes no tokens. A usage
    that counts no prompt is the pipeline's to estimate and replace."""
    response["object"] = "list"
    for item in response["data"]:
        item["object"] = "embedding"
    usage = response.get("usage")
    if type(usage) is dict and _is_count(usage.get("prompt_tokens")) and not _is_count(usage.get("total_tokens")):
        usage["total_tokens"] = usage["prompt_tokens"]


_TEXT_COMPLETION = "text_completion"
# A text completion's finish reasons (``CreateCompletionResponse``): no tool calls here.
_TEXT_FINISH_REASONS = frozenset({"stop", "length", "content_filter"})


# A text completion's logprobs (``CreateCompletionResponse``): four lists, each optional and none nullable, which a
# server that dumps what it left unset sends as null.
_TEXT_LOGPROBS_LISTS = ("text_offset", "token_logprobs", "tokens", "top_logprobs")


def _text_logprobs_mended(logprobs: dict[str, Any]) -> bool:
    """Leave out, in place, the lists ``logprobs`` says null; True when there was one."""
    nulls = [name for name in _TEXT_LOGPROBS_LISTS if name in logprobs and logprobs[name] is None]
    for name in nulls:
        del logprobs[name]
    return bool(nulls)


def text_completion_chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole text completion, conformed (``TextCompletionShape.conform`` with ``whole``), as the stream that would
    have carried it: for a server that answered one to a request for a stream (vLLM, Ollama and proxies that ignore
    ``stream``), as ``completion_chunks`` does a chat completion. A chunk per choice (its text, logprobs and finish:
    a text completion's chunks are its own shape); then, when the reply counted its tokens, a chunk of its usage with
    no choices, as OpenAI ends a stream that asked for it."""
    head = {name: completion[name] for name in ("id", "object", "created", "model")}
    if "system_fingerprint" in completion:
        head["system_fingerprint"] = completion["system_fingerprint"]
    chunks = [{**head, "choices": [choice]} for choice in completion["choices"]]
    if completion.get("usage") is not None:
        chunks.append({**head, "choices": [], "usage": completion["usage"]})
    return chunks


class TextCompletionShape:
    """``CreateCompletionResponse`` (``/v1/completions``), whose stream chunks are the same object: what one reply or
    one stream needs to fill in what the schema requires and an upstream left out (``id``, ``created`` and ``model``,
    each choice's ``index``, ``logprobs`` and ``text``), the same ``id`` and ``created`` on every chunk."""

    __slots__ = ("_created", "_id", "_model")

    def __init__(self, model: str) -> None:
        self._model = model
        self._id: str | None = None
        self._created: int | None = None

    def conform(self, data: dict[str, Any], *, whole: bool) -> bool:
        """Fill ``data`` in, in place; True when it needed nothing (its bytes may be relayed as they came).
        ``whole``: a reply, not a chunk (its choices all have a reason: one left out stopped normally, and its
        usage is an object or absent). Raises ``MalformedReply`` for what cannot be filled: a reply with no choices,
        a choice that is not an object, a ``text`` that is not text, a finish reason of ``error``."""
        valid = True
        if type(data.get("id")) is not str:
            data["id"], valid = self._id or "cmpl-" + uuid.uuid4().hex, False
        created = data.get("created")
        if type(created) is not int:
            fallback = int(created) if isinstance(created, float) else int(time.time())
            data["created"], valid = self._created if self._created is not None else fallback, False
        if self._id is None:
            self._id, self._created = data["id"], data["created"]
        if type(data.get("model")) is not str:
            data["model"], valid = self._model, False
        if data.get("object") != _TEXT_COMPLETION:
            data["object"], valid = _TEXT_COMPLETION, False
        if "system_fingerprint" in data and type(data["system_fingerprint"]) is not str:
            del data["system_fingerprint"]  # vLLM's null (the schema types it as text), or a server's other value
            valid = False
        choices = data.get("choices")
        if whole and (type(choices) is not list or not choices):
            # Nothing answered: relayed, a 200 with an empty answer, taken by the client (and billed) as the model's.
            raise MalformedReply("no choices")
        if type(choices) is not list:
            data["choices"], choices, valid = [], [], False
        for position, choice in enumerate(choices):
            if type(choice) is not dict:
                raise MalformedReply("a choice that is not an object")
            if type(choice.get("index")) is not int:
                choice["index"], valid = position, False
            text = choice.get("text")
            if text is None:
                choice["text"], valid = "", False
            elif type(text) is not str:
                raise MalformedReply(f"a text of type {type(text).__name__}")
            if "logprobs" not in choice:
                choice["logprobs"], valid = None, False
            elif type(choice["logprobs"]) is dict and _text_logprobs_mended(choice["logprobs"]):
                valid = False
            reason = choice.get("finish_reason")
            if reason is None and whole:
                choice["finish_reason"], valid = "stop", False
            elif "finish_reason" not in choice:
                choice["finish_reason"], valid = None, False
            elif reason is not None and reason not in _TEXT_FINISH_REASONS:
                _finish_mended(choice)
                if choice["finish_reason"] not in _TEXT_FINISH_REASONS:  # a tool call's, say: the model stopped
                    choice["finish_reason"] = "stop"
                valid = False
        if not _usage_valid(data.get("usage")) or (whole and "usage" in data and data["usage"] is None):
            _conform_usage(data, nullable=not whole)
            valid = False
        return valid
