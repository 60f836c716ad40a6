"""Adapter for Cohere's v2 API (``cohere.AsyncClientV2``), behind the OpenAI chat-completions shape.

The SDK sends through plain ``httpx`` (not ``httpx2`` like the openai and anthropic SDKs), so it gets a
plain ``httpx.AsyncClient`` built on ``providers.outbound``'s guarded backend for that library: the same
address rules at connect time, no redirect off the provider's origin. The SDK's own retries are off
(``max_retries=0``): ``upstream_deadline`` bounds a call, and a retry is the router's decision.

Responses arrive as the SDK's models, read back as the wire's JSON (``.dict()``, by alias); stream events are
read from the raw response (``stream``); both are translated by the pure functions below, so that the
translation is tested without a server. Cohere's finish reasons: ``COMPLETE``/``STOP_SEQUENCE`` → ``stop``,
``MAX_TOKENS`` → ``length``, ``TOOL_CALL`` → ``tool_calls``, ``ERROR_TOXIC`` → ``content_filter`` (the model's
output was withheld, which is what ``content_filter`` tells an OpenAI client); ``ERROR`` is a failure of the
provider, raised as one. Cohere cannot be told to call one tool a turn, so ``parallel_tool_calls: false`` is kept on
the answer (its first call only, whole or streamed, ``max_tool_calls``), and a tool that is not a function (chat
completions' free-form ``custom``) has no Cohere form: refused; nor has a tool message's part other than text (an
image: Cohere's tool content is text or documents), refused naming it (``common.text_parts_only``), not dropped;
an image's data URL of a type Cohere does not read (PNG, JPEG, WEBP and GIF are its) is refused naming it too,
before the call (``COHERE_IMAGE_URLS``, ``common.images_checked``). A system, developer or assistant message's parts
are text (an assistant's refusal too: its text is the turn's), as Cohere takes them: chat validation refuses any
other before any translation (``chat.validation.ROLE_CONTENT_PARTS``).
``reasoning_effort`` is Cohere's ``thinking`` (``_thinking``): its reasoning models think by default, ``none`` turns it
off, another level is a ``token_budget``, Claude's budget for it (``THINKING_BUDGETS``). What they think (``thinking``
content, streamed in ``content.thinking`` deltas) is the reply's ``reasoning_content``, as OpenAI-compatible servers of
reasoning models give theirs, and an assistant turn sent back with it has it as a ``thinking`` content item before its
text, as Cohere's assistant messages take the thinking of an earlier turn.
OpenAI's explicit prompt caching (``prompt_cache_options``, a part's ``prompt_cache_breakpoint``) is not sent: Cohere
caches as it does (its usage's ``cached_tokens``), and a hint that cannot be honoured changes no answer.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import cohere
import httpx
import pydantic
from cohere.core.api_error import ApiError

from ..exceptions import ProviderBadRequestError, ProviderError, ProviderMalformedReplyError
from ..outbound import OutboundRefused, plain_outbound_client
from ..types import ProviderConfig, UpstreamModel
from .base import BaseAdapter, WireChunk
from .common import (
    POOL_LIMITS,
    TEXT_WITHOUT_LOGPROBS,
    TOOL_TEXT_REMEDY,
    BatchesAnswered,
    ImageUrls,
    embedding_input_type,
    error_for_failure,
    error_for_status,
    http_request_hooks,
    images_checked,
    in_batches,
    interruption_reason,
    max_tool_calls,
    message_text,
    one_choice_only,
    refusal_named,
    scrub,
    stream_interrupted,
    stream_unfinished,
    text_parts_only,
    unhonoured_refused,
    upstream_deadline,
)
from .sse import sse_events
from .translate_anthropic import ANSWER_FLOOR, EFFORTS, THINKING_BUDGETS, thinking_budget

# Given when the row has no key, so that the SDK never falls back to CO_API_KEY from the gateway's
# environment: the provider then answers 401, which is the truth.
_PLACEHOLDER_KEY = "not-configured"
EMBED_BATCH_LIMIT = 96  # texts in one v2/embed call
_FAILURES = (ApiError, httpx.HTTPError, ValueError, OutboundRefused)
# The images Cohere's vision models take (its image inputs guide: PNG, JPEG, WEBP and non-animated GIF, as a base64
# data URL or an http(s) URL it fetches). A data URL of another type (text/html, a PDF, HEIC) is refused before the
# call (``images_checked``), where Cohere answered its own 400 after it.
COHERE_IMAGE_URLS = ImageUrls("Cohere", ("image/png", "image/jpeg", "image/gif", "image/webp"), fetches=True)

FINISH_REASONS = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "TOOL_CALL": "tool_calls",
    "ERROR_TOXIC": "content_filter",
}
_TOOL_CHOICES = {"required": "REQUIRED", "none": "NONE"}


class CohereAdapter(BaseAdapter):
    # A Messages client's ``output_config.effort`` Cohere has a thinking budget for (not ``xhigh`` nor ``max``).
    messages_efforts = tuple(effort for effort in EFFORTS if effort in THINKING_BUDGETS)
    # Its chat's stop_sequences: "A list of up to 5 strings that the model will use to stop generation".
    messages_stop_max = 5

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        timeout = httpx.Timeout(config.timeout, connect=min(config.timeout, 10.0))
        limits = httpx.Limits(
            max_connections=POOL_LIMITS.max_connections,
            max_keepalive_connections=POOL_LIMITS.max_keepalive_connections,
            keepalive_expiry=POOL_LIMITS.keepalive_expiry,
        )
        self._http = plain_outbound_client(
            url=config.base_url,
            timeout=timeout,
            limits=limits,
            headers=dict(config.extra_headers),
            event_hooks={"request": http_request_hooks()},
        )
        self._client = cohere.AsyncClientV2(
            api_key=config.api_key.reveal() or _PLACEHOLDER_KEY,
            base_url=config.base_url,
            timeout=config.timeout,
            max_retries=0,
            httpx_client=self._http,
            log_warning_experimental_features=False,
        )

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        request = self._translate(body)
        try:
            async with upstream_deadline(self.config):
                response = await self._client.chat(**request)
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        except (TypeError, AttributeError, KeyError):
            # The SDK makes its model of the 200's JSON unchecked, and JSON of another shape (a list, a text) fails
            # there: no reply of Cohere's.
            raise self._malformed() from None
        try:
            data = response.dict() if isinstance(response, pydantic.BaseModel) else None
            if not isinstance(data, dict):
                raise ValueError("not an object")
            if data.get("finish_reason") == "ERROR":
                raise ProviderError(f"The provider {self.config.name!r} reported an error.", provider=self.config.name)
            return completion_from_cohere(data, model=body["model"], max_calls=max_tool_calls(body))
        except ValueError:  # fields of other types than Cohere's (``_object``, ``_text``, ``_count``)
            raise self._malformed() from None

    def _malformed(self) -> ProviderMalformedReplyError:
        """A 200 that is no reply of Cohere's: routing moves on to the next deployment at once."""
        return ProviderMalformedReplyError(
            f"The provider {self.config.name!r} answered with something other than a chat response.",
            provider=self.config.name,
        )

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[WireChunk]:
        """The SDK's request (its auth, its error classes for a refusal), the events read from its raw response
        (``sse.sse_events``): its own reader leaves out, with a warning, an event that is not JSON or not of its
        types, so a malformed event passed for none, and the reply went on with a hole in it."""
        request = self._translate(body)
        translator = StreamTranslator(model=body["model"], max_calls=max_tool_calls(body))
        opened = self._client.with_raw_response.chat_stream(**request)
        try:
            async with upstream_deadline(self.config):
                upstream: httpx.Response = (await opened.__aenter__())._response
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        began = done = False  # an event came; `[DONE]` came (what follows is read and left)
        try:
            async for event in sse_events(upstream.aiter_bytes()):
                if done or not event.data:
                    continue
                if event.data == b"[DONE]":
                    done = True
                    continue
                began = True
                for chunk in translator.feed(_stream_event(event.data)):
                    yield WireChunk(chunk, None)
        except _FAILURES as exc:
            # A ValueError: an event that is not JSON, or not Cohere's (``StreamTranslator``): malformed, as on an
            # OpenAI deployment (``ProviderMalformedStreamError``); so is a body not the encoding it declared.
            malformed = isinstance(exc, ValueError | httpx.DecodingError)
            if not began and not malformed:
                raise self.map_error(exc) from None  # before any event: the failure of the call
            raise stream_interrupted(self.config, _interruption_reason(exc), malformed=malformed) from None
        finally:
            await opened.__aexit__(None, None, None)  # also on aclose() and cancellation: the response stops
        if translator.failed:
            raise stream_interrupted(self.config, "the provider reported an error.") from None
        if not translator.complete:
            raise stream_unfinished(self.config, began=began) from None

    async def embed(self, body: dict[str, Any], *, kept: BatchesAnswered | None = None) -> dict[str, Any]:
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise ProviderBadRequestError(
                "Cohere embeds text only: 'input' must be a string or a list of strings.",
                provider=self.config.name,
                param="input",
            )
        # embed-v4's output_dimension is OpenAI's `dimensions` (Cohere answers a 400 for a size it lacks).
        extra = {"output_dimension": body["dimensions"]} if body.get("dimensions") else {}
        # Cohere requires an input type: documents unless the client says otherwise (a query, say).
        input_type = embedding_input_type(body, provider=self.config.name) or "search_document"

        async def embed_batch(batch: list[str]) -> dict[str, Any]:
            try:
                async with upstream_deadline(self.config):
                    response = await self._client.embed(
                        texts=batch,
                        model=body["model"],
                        input_type=input_type,
                        embedding_types=["float"],
                        **extra,
                    )
            except _FAILURES as exc:
                raise self.map_error(exc) from None
            answer = response.dict()
            came = len((answer.get("embeddings") or {}).get("float") or [])
            if came != len(batch):  # a short list would pair the client's texts with the wrong vectors
                raise ProviderError(
                    f"The provider {self.config.name!r} did not answer one embedding for each of the {len(batch)} "
                    f"inputs ({came} came).",
                    provider=self.config.name,
                )
            return answer

        # Cohere embeds at most 96 texts a call: more go in several, answered and billed as one.
        responses = await in_batches(texts, EMBED_BATCH_LIMIT, embed_batch, counted=_billed_input_tokens, kept=kept)
        return embeddings_from_cohere(responses, model=body["model"], encoding=body.get("encoding_format"))

    async def list_models(self) -> list[UpstreamModel]:
        try:
            async with upstream_deadline(self.config):
                listing = await self._client.models.list()
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        return [
            UpstreamModel(id=model.name, owned_by="cohere", context_window=_int_or_none(model.context_length))
            for model in listing.models or []
            if model.name
        ]

    def map_error(self, exc: BaseException) -> ProviderError:
        config = self.config
        if isinstance(exc, ApiError) and exc.status_code is not None and 200 <= exc.status_code < 300:
            # The SDK raises its ApiError, with the 200's own status, for a body it could not read as JSON.
            return ProviderMalformedReplyError(
                f"The provider {config.name!r} answered with malformed JSON.", provider=config.name
            )
        if isinstance(exc, httpx.DecodingError):  # plain httpx's: ``common.undecodable`` knows httpx2's
            return ProviderMalformedReplyError(
                f"The provider {config.name!r} answered with a malformed body (not the encoding it declared).",
                provider=config.name,
            )
        if isinstance(exc, ApiError) and exc.status_code is not None:
            message = self._upstream_message(exc.body) or f"HTTP {exc.status_code}"
            return error_for_status(
                self.config,
                exc.status_code,
                message,
                headers=exc.headers,
                # Cohere says "too many tokens: total number of tokens in the prompt cannot exceed …".
                context_exceeded="too many tokens" in message.lower(),
            )
        # The SDK sends through plain httpx, whose transport errors are not httpx2's.
        return error_for_failure(
            self.config, exc, timeouts=(httpx.TimeoutException,), connection_errors=(httpx.TransportError,)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _translate(self, body: dict[str, Any]) -> dict[str, Any]:
        with refusal_named(self.config):
            return cohere_request(unhonoured_refused(body, TEXT_WITHOUT_LOGPROBS))

    def _upstream_message(self, body: object) -> str:
        """Cohere's error body is ``{"message": ...}``; a proxy's may be text."""
        message = body.get("message") if isinstance(body, dict) else body
        if not isinstance(message, str):
            return ""
        return scrub(message.strip(), self.config)


def _stream_event(data: bytes) -> dict[str, Any]:
    """A stream event's JSON; ValueError for one that is not JSON (nor UTF-8), or not an object with a type."""
    event = json.loads(data)
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ValueError("not an event of Cohere's")
    return event


def _object(holder: dict[str, Any], name: str) -> dict[str, Any]:
    """``holder[name]``, an object of Cohere's reply or event, {} when it has none; ValueError for another type: a
    reply or an event that is not Cohere's, which the SDK passes on as it came."""
    value = holder.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"a {name} that is not an object")
    return value


def _text(holder: dict[str, Any], name: str) -> str | None:
    """``holder[name]``, a text of Cohere's (or None); ValueError for another type (see ``_object``)."""
    value = holder.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"a {name} that is not text")
    return value


def _count(holder: dict[str, Any], name: str) -> int:
    """``holder[name]``, a token count of Cohere's (its SDK reads them as floats), 0 when it has none; ValueError for
    a value that counts nothing."""
    value = holder.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2**53:
        raise ValueError(f"a {name} that is not a count")
    return int(value)


def _interruption_reason(exc: BaseException) -> str:
    """``common.interruption_reason`` for plain httpx's failures, which the SDK sends through (not httpx2's), and an
    event that is not Cohere's (a ValueError, ``StreamTranslator``)."""
    if isinstance(exc, ValueError):
        return "the provider sent a malformed event."
    return interruption_reason(
        exc,
        undecodable_errors=(httpx.DecodingError,),
        timeouts=(httpx.TimeoutException,),
        connection_errors=(httpx.TransportError,),
    )


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------------------------------------
# OpenAI chat → Cohere v2


def _user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A user message's content as Cohere's (text and image items); a part of another type (a sound, a file) is a 400
    naming it, ``{where}.content[M].type``, as the other translations name a part they cannot take."""
    if not isinstance(content, list):
        return message_text(content)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise ProviderBadRequestError(
                f"Cohere takes a user message's text and images only, and `{where}.content[{index}]` is a {kind!r} "
                "part.",
                param=f"{where}.content[{index}].type",
                code="unsupported_value",
            )
    return parts


def _message(message: dict[str, Any], where: str) -> dict[str, Any]:
    role = message.get("role")
    if role in ("system", "developer"):
        # Cohere's system message is text alone (its SystemMessageV2), as OpenAI's spec has it: chat validation refused
        # any other part (``chat.validation.ROLE_CONTENT_PARTS``).
        return {"role": "system", "content": message_text(message.get("content"))}
    if role == "user":
        return {"role": "user", "content": _user_content(message.get("content"), where)}
    if role == "assistant":
        translated: dict[str, Any] = {"role": "assistant"}
        # Cohere's assistant content is text (and thinking); OpenAI's spec types an assistant's parts as text or
        # ``refusal`` alone, and chat validation refused any other (``chat.validation.ROLE_CONTENT_PARTS``).
        # A ``refusal`` part is what the model said when it refused: the turn's text, as Claude's translation sends it.
        text = message_text(message.get("content"), refusals=True)
        thought = message.get("reasoning_content")
        if isinstance(thought, str) and thought:
            # What a reasoning model thought (the reply's ``reasoning_content``) goes back as Cohere's assistant
            # message takes it: a ``thinking`` content item before the text.
            translated["content"] = [{"type": "thinking", "thinking": thought}]
            if text:
                translated["content"].append({"type": "text", "text": text})
        elif text:
            translated["content"] = text
        calls = message.get("tool_calls") or []
        if calls:
            translated["tool_calls"] = [
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {
                        "name": call.get("function", {}).get("name"),
                        "arguments": call.get("function", {}).get("arguments") or "{}",
                    },
                }
                for call in calls
            ]
        return translated
    if role == "tool":
        # Cohere's tool content is text or documents (its ToolContent): an image is refused, not dropped.
        text_parts_only(
            message.get("content"), where, takes="Cohere takes a tool's result as text only", remedy=TOOL_TEXT_REMEDY
        )
        return {
            "role": "tool",
            "tool_call_id": message.get("tool_call_id"),
            "content": message_text(message.get("content")),
        }
    raise ProviderBadRequestError(f"Cohere does not take a message of role {role!r}.", param="messages")


def cohere_request(body: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``AsyncClientV2.chat`` / ``chat_stream`` for an OpenAI chat body."""
    one_choice_only(body)  # Cohere's chat has no `n`
    images_checked(body, COHERE_IMAGE_URLS)
    request: dict[str, Any] = {
        "model": body["model"],
        "messages": [
            _message(message, f"messages[{index}]") for index, message in enumerate(body.get("messages") or [])
        ],
    }
    tools = body.get("tools") or []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            # A free-form ``custom`` tool has no Cohere form: left out, the model answered without it.
            raise ProviderBadRequestError(
                "This model takes function tools only.", param=f"tools[{index}]", code="unsupported_value"
            )
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        # Cohere cannot name the tool to call: offer only that one, and require a call.
        name = choice.get("function", {}).get("name")
        tools = [tool for tool in tools if tool["function"].get("name") == name]
        choice = "required"
    if tools:
        request["tools"] = [
            {
                "type": "function",
                "function": {
                    key: tool["function"][key]
                    for key in ("name", "description", "parameters")
                    if key in tool["function"]
                },
            }
            for tool in tools
        ]
    if choice in _TOOL_CHOICES:
        request["tool_choice"] = _TOOL_CHOICES[choice]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "p"),
        ("seed", "seed"),
        ("frequency_penalty", "frequency_penalty"),
        ("presence_penalty", "presence_penalty"),
    ):
        if body.get(ours) is not None:
            request[theirs] = body[ours]
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        schema = response_format.get("json_schema", {}).get("schema")
        request["response_format"] = {"type": "json_object", **({"json_schema": schema} if schema else {})}
    _thinking(body, request)
    return request


def _thinking(body: dict[str, Any], request: dict[str, Any]) -> None:
    """``reasoning_effort`` as Cohere's ``thinking``, as Claude's translation makes it Claude's: Cohere's reasoning
    models think by default, as long as they choose, so ``none`` turns it off (``disabled``) and another level is a
    ``token_budget`` (``thinking_budget``, Claude's rule: one without a budget is a 400 naming it, not dropped).
    Thinking counts in the output limit (Cohere asks that a budget leave at least 1K tokens to the reply), which is a
    cost ceiling and never raised: with one, the budget gives way so that the reply keeps ``ANSWER_FLOOR`` tokens of
    it, down to a token (Cohere's least budget: a positive integer)."""
    effort = body.get("reasoning_effort")
    if effort is None:
        return
    budget = thinking_budget(effort, "Cohere", ProviderBadRequestError)
    if not budget:
        request["thinking"] = {"type": "disabled"}
        return
    limit = request.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool):
        budget = max(1, min(budget, limit - ANSWER_FLOOR))
    request["thinking"] = {"type": "enabled", "token_budget": budget}


# ---------------------------------------------------------------------------------------------------
# Cohere v2 → OpenAI chat


def usage_from_cohere(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Billed units when Cohere gives them (what it charges for), else its raw token counts."""
    usage = usage or {}
    billed = _object(usage, "billed_units")
    tokens = _object(usage, "tokens")
    prompt = _count(billed, "input_tokens") or _count(tokens, "input_tokens")
    completion = _count(billed, "output_tokens") or _count(tokens, "output_tokens")
    result: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = _count(usage, "cached_tokens")
    if cached:
        result["prompt_tokens_details"] = {"cached_tokens": cached}
    return result


def _objects(holder: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """``holder[name]``, a list of objects of Cohere's, [] when it has none; ValueError for another type."""
    value = holder.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"a {name} that is not a list of objects")
    return value


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": _text(call, "id") or "",
            "type": "function",
            "function": {
                "name": _text(_object(call, "function"), "name") or "",
                "arguments": _text(_object(call, "function"), "arguments") or "{}",
            },
        }
        for call in calls
    ]


def completion_from_cohere(response: dict[str, Any], *, model: str, max_calls: int | None = None) -> dict[str, Any]:
    """The chat completion of a reply of Cohere's; ValueError for one whose fields are not of Cohere's types.
    ``max_calls``: the tool calls it may carry (``max_tool_calls``: the first, for no parallel calls)."""
    message = _object(response, "message")
    parts = _objects(message, "content")
    text = "".join(_text(part, "text") or "" for part in parts if part.get("type") == "text")
    thought = "".join(_text(part, "thinking") or "" for part in parts if part.get("type") == "thinking")
    calls = _tool_calls(_objects(message, "tool_calls"))[:max_calls]
    reply: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else ""), "refusal": None}
    if thought:
        reply["reasoning_content"] = thought
    if calls:
        reply["tool_calls"] = calls
    return {
        "id": _text(response, "id") or "",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(_text(response, "finish_reason") or "", "stop"),
            }
        ],
        "usage": usage_from_cohere(_object(response, "usage")),
    }


class StreamTranslator:
    """Cohere's v2 stream events (each the JSON of one ``data:`` line) → ``chat.completion.chunk`` dicts."""

    def __init__(self, *, model: str, max_calls: int | None = None) -> None:
        self.model = model
        self.max_calls = max_calls  # tool calls the choice may carry (``max_tool_calls``); later ones are left out
        self.id = ""
        self.created = int(time.time())
        self.complete = False
        self.failed = False
        self._tool_index = -1

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def _call_left_out(self) -> bool:
        return self.max_calls is not None and self._tool_index >= self.max_calls

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks of one event; ValueError for an event whose fields this reads are not of Cohere's types."""
        kind = event.get("type")
        delta = _object(event, "delta")
        message = _object(delta, "message")
        if kind == "message-start":
            self.id = _text(event, "id") or self.id
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content-delta":
            content = _object(message, "content")
            chunks = []
            if thought := _text(content, "thinking"):
                chunks.append(self._chunk({"reasoning_content": thought}))
            if text := _text(content, "text"):
                chunks.append(self._chunk({"content": text}))
            return chunks
        if kind == "tool-call-start":
            call = _object(message, "tool_calls")
            self._tool_index += 1
            if self._call_left_out():
                return []
            function = _object(call, "function")
            return [
                self._chunk(
                    {
                        "tool_calls": [
                            {
                                "index": self._tool_index,
                                "id": _text(call, "id") or "",
                                "type": "function",
                                "function": {
                                    "name": _text(function, "name") or "",
                                    "arguments": _text(function, "arguments") or "",
                                },
                            }
                        ]
                    }
                )
            ]
        if kind == "tool-call-delta":
            arguments = _text(_object(_object(message, "tool_calls"), "function"), "arguments")
            if not arguments or self._call_left_out():
                return []
            return [self._chunk({"tool_calls": [{"index": self._tool_index, "function": {"arguments": arguments}}]})]
        if kind == "message-end":
            reason = _text(delta, "finish_reason") or ""
            if reason == "ERROR":
                self.failed = True
                return []
            self.complete = True
            finish = FINISH_REASONS.get(reason, "stop")
            usage_chunk = {**self._chunk({}), "choices": [], "usage": usage_from_cohere(_object(delta, "usage"))}
            return [self._chunk({}, finish), usage_chunk]
        # content-start / content-end / tool-plan-delta / tool-call-end / citations: nothing to relay.
        return []


# ---------------------------------------------------------------------------------------------------
# Embeddings


def embeddings_from_cohere(responses: list[dict[str, Any]], *, model: str, encoding: str | None) -> dict[str, Any]:
    """The answers to one request's calls (in their order), as one OpenAI list with their billed units summed."""
    vectors = [vector for response in responses for vector in (response.get("embeddings") or {}).get("float") or []]
    data = []
    for index, vector in enumerate(vectors):
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(_billed_input_tokens(response) for response in responses)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _billed_input_tokens(response: dict[str, Any]) -> int:
    """One embed call's billed input tokens (a float in Cohere's SDK)."""
    return int(((response.get("meta") or {}).get("billed_units") or {}).get("input_tokens") or 0)
