"""Adapter for Anthropic's Messages API, behind the OpenAI chat-completions shape.

Requests and responses are translated by the pure functions of :mod:`.translate_anthropic`. The
Messages body is posted with the SDK's generic ``post`` and ``cast_to=object``, so that responses
and stream events arrive as plain dicts (no pydantic model per event) while authentication,
retries and exception classes stay the SDK's. ``ProviderConfig.base_url`` has no ``/v1``: the
SDK's paths carry it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anthropic
import httpx2
from anthropic.types import message_count_tokens_params, message_create_params

from ..exceptions import ProviderError
from ..outbound import OutboundRefused
from ..types import ProviderConfig, ResolvedModel, UpstreamModel
from . import sdk_requests
from .base import BaseAdapter, WireChunk, WireEvent
from .common import (
    TEXT_WITHOUT_LOGPROBS,
    error_for_failure,
    error_for_status,
    http_timeout,
    interruption_reason,
    provider_http_client,
    refusal_named,
    scrub,
    stream_interrupted,
    stream_unfinished,
    undecodable,
    unhonoured_refused,
    upstream_deadline,
)
from .sse import ServerSentEvent, SSEParser, response_body
from .text_chunks import TextChunks
from .translate_anthropic import StreamTranslator, anthropic_request, completion_from_message, within_output_limit

_MESSAGES_PATH = "/v1/messages"
_COUNT_PATH = "/v1/messages/count_tokens"
# The fields of a Messages request that Anthropic's token counting does not take (they count no input): the SDK's own
# list (what ``messages.create`` takes and ``messages.count_tokens`` does not), and ``stream`` and the sampling
# parameters, which this SDK's signature no longer has but clients still send.
_NOT_COUNTED = (
    frozenset(message_create_params.MessageCreateParamsBase.__annotations__)
    - frozenset(message_count_tokens_params.MessageCountTokensParams.__annotations__)
) | {"stream", "temperature", "top_p", "top_k"}
# Where a text delta's text is (``text_chunks``).
_TEXT_PATH = ("delta", "text")
_JSON_PATH = ("delta", "partial_json")  # a tool call's input, streamed a piece of JSON at a time
# Given when the row has no key, so that the SDK never falls back to the gateway's own environment
# (ANTHROPIC_API_KEY, profiles on disk): the provider then answers 401, which is the truth.
_PLACEHOLDER_KEY = "not-configured"
_EventStream = anthropic.AsyncStream[object]
_RAW_STREAM = {anthropic._constants.RAW_RESPONSE_HEADER: "stream"}
# The SDK does not wrap transport errors met while reading a stream; ValueError is malformed JSON;
# OutboundRefused is the outbound policy's refusal, which the SDK lets through unwrapped.
_FAILURES = (anthropic.AnthropicError, httpx2.HTTPError, ValueError, OutboundRefused)


class AnthropicAdapter(BaseAdapter):
    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        timeout = http_timeout(config)
        self._client = sdk_requests.AsyncAnthropic(
            api_key=config.api_key.reveal() or _PLACEHOLDER_KEY,
            base_url=config.base_url,
            timeout=timeout,
            max_retries=0,  # retries are the router's (chat.pipeline): the SDK's would multiply them
            default_headers=dict(config.extra_headers),
            http_client=provider_http_client(config),
        )

    def prepare_request(self, body: dict[str, Any], model: ResolvedModel) -> dict[str, Any]:
        """As every adapter's, and the output limit llmhub picks when the client sets none kept under what the
        model writes at most (``within_output_limit``)."""
        prepared = super().prepare_request(body, model)
        with refusal_named(self.config):
            return within_output_limit(prepared, model.max_output_tokens)

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        request = self._translate(body)
        try:
            async with upstream_deadline(self.config):
                message = await self._client.post(_MESSAGES_PATH, body=request, cast_to=object)
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        return completion_from_message(self._message(message))

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[WireChunk]:
        request = self._translate(body)
        request["stream"] = True
        try:
            async with upstream_deadline(self.config):
                upstream = await self._client.post(
                    _MESSAGES_PATH, body=request, cast_to=object, stream=True, stream_cls=_EventStream
                )
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        translator = StreamTranslator()
        began = False
        try:
            async for event in upstream:
                if not isinstance(event, dict):
                    raise ValueError("not an event object")
                began = True
                chunk = translator.feed(event)
                if chunk is not None:
                    yield WireChunk(chunk, None)  # translated: no upstream bytes to relay
        except _FAILURES as exc:
            raise self._stream_broken(exc) from None
        finally:
            # Also on aclose() and cancellation: the upstream response stops at once.
            await upstream.close()
        if not translator.complete:
            raise stream_unfinished(self.config, began=began)

    async def messages(
        self, request: dict[str, Any], model: ResolvedModel, *, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """A Messages request goes through untranslated (but for the model's upstream id): whatever the
        client sent (cache control, thinking, fields newer than this code) reaches the provider, and its
        message comes back as it was. The parameter rules, written for chat-completion fields, do not apply."""
        request = {**{key: value for key, value in request.items() if key != "stream"}, "model": model.upstream_id}
        try:
            async with upstream_deadline(self.config):
                message = await self._client.post(
                    _MESSAGES_PATH, body=request, cast_to=object, options={"headers": dict(headers or {})}
                )
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        return self._message(message)

    @classmethod
    def messages_check(cls, request: dict[str, Any]) -> None:
        """Nothing to refuse: the request goes through as written (``messages``)."""

    counts_messages = True

    async def messages_count(
        self, request: dict[str, Any], model: ResolvedModel, *, headers: Mapping[str, str] | None = None
    ) -> int:
        """Anthropic's own count (its token counting, free of charge): exact, as it bills the request. Sent as the
        client wrote it, but for the model's upstream id and the fields counting does not take (``_NOT_COUNTED``)."""
        body = {key: value for key, value in request.items() if key not in _NOT_COUNTED}
        body["model"] = model.upstream_id
        try:
            async with upstream_deadline(self.config):
                answer = await self._client.post(
                    _COUNT_PATH, body=body, cast_to=object, options={"headers": dict(headers or {})}
                )
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        tokens = answer.get("input_tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise ProviderError(
                f"The provider {self.config.name!r} answered a token count with something other than a count.",
                provider=self.config.name,
            )
        return tokens

    async def messages_stream(
        self, request: dict[str, Any], model: ResolvedModel, *, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[WireEvent]:
        """The upstream's events, each with its own bytes (``WireEvent.raw``), read raw as the OpenAI
        adapter reads its chunks: the relay forwards what it does not change as it came."""
        try:
            async with upstream_deadline(self.config):
                upstream = await self._client.post(
                    _MESSAGES_PATH,
                    body={**request, "model": model.upstream_id, "stream": True},
                    cast_to=httpx2.Response,
                    options={"headers": {**(headers or {}), **_RAW_STREAM}},
                )
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        finished = began = False
        parser = SSEParser()
        # Text deltas, and a tool call's input deltas, read without a decode.
        texts = (TextChunks(_TEXT_PATH, WireEvent), TextChunks(_JSON_PATH, WireEvent))
        try:
            async for piece in response_body(upstream):
                for sse in parser.feed(piece):
                    event = self._event(sse, texts)
                    began = True
                    finished = finished or event.get("type") == "message_stop"
                    yield event
            for sse in parser.end():
                event = self._event(sse, texts)
                began = True
                finished = finished or event.get("type") == "message_stop"
                yield event
        except _FAILURES as exc:
            raise self._stream_broken(exc) from None
        finally:
            await upstream.aclose()
        if not finished:
            raise stream_unfinished(self.config, began=began)

    def _stream_broken(self, exc: BaseException) -> ProviderError:
        """The interruption for a stream that broke on ``exc``: malformed when it is an event that is not JSON
        (or not an object), or a body not in the encoding it declared, as the OpenAI adapter judges its chunks."""
        malformed = isinstance(exc, ValueError) or undecodable(exc)
        overloaded = isinstance(exc, anthropic.APIStatusError) and _overloaded(exc.body)
        return stream_interrupted(
            self.config, self._interruption_reason(exc), malformed=malformed, overloaded=overloaded
        )

    def _event(self, sse: ServerSentEvent, texts: tuple[TextChunks, TextChunks]) -> WireEvent:
        """The event ``sse`` carries: a text or input JSON delta like the last one learned is built from it
        (``texts``: the text deltas', the input deltas'), anything else decoded."""
        text_deltas, json_deltas = texts
        plain = text_deltas.read(sse.data)
        if plain is None:
            plain = json_deltas.read(sse.data)
        if plain is not None:
            return plain  # type: ignore[return-value]  (built as a WireEvent: ``TextChunks``'s kind)
        event = json.loads(sse.data)
        if not isinstance(event, dict):
            raise ValueError("not an event object")
        kind = event.get("type")
        if kind == "error":
            error = event.get("error") if isinstance(event.get("error"), dict) else {}
            reason = scrub(str(error.get("message") or "no details given"), self.config)
            raise stream_interrupted(
                self.config, f"the provider reported an error: {reason}", overloaded=_overloaded(event)
            )
        raw = sse.data if b"\n" not in sse.data and b"\r" not in sse.data else None
        delta = event.get("delta")
        if raw is not None and kind == "content_block_delta" and type(delta) is dict:
            # The block's next delta of the same kind is read from its bytes (``text_chunks``).
            if delta.get("type") == "text_delta":
                text_deltas.learn(event, raw)
            elif delta.get("type") == "input_json_delta":
                json_deltas.learn(event, raw)
        return WireEvent(event, raw)

    async def list_models(self) -> list[UpstreamModel]:
        try:
            async with upstream_deadline(self.config):
                return [
                    UpstreamModel(
                        id=model.id,
                        owned_by="anthropic",
                        display_name=model.display_name or "",
                        context_window=getattr(model, "max_input_tokens", None),
                    )
                    async for model in self._client.models.list()
                ]
        except _FAILURES as exc:
            raise self.map_error(exc) from None

    def map_error(self, exc: BaseException) -> ProviderError:
        config = self.config
        if isinstance(exc, anthropic.APIStatusError):
            message = self._upstream_message(exc.body) or f"HTTP {exc.status_code}"
            if exc.status_code < 400:
                # An error event inside a stream that had begun with a 200.
                return ProviderError(f"The provider {config.name!r} reported an error: {message}", provider=config.name)
            status, code = exc.status_code, None
            if status == 402 or (status == 400 and "credit balance is too low" in message.lower()):
                # Anthropic says an empty account as a 400 in words ("Your credit balance is too low ...") or a
                # 402 billing_error, where OpenAI says 429 insufficient_quota: the account's quota, not the
                # request, is at fault (a user's own key: their 429; the provider's: an administrator's to fix).
                status, code = 429, "insufficient_quota"
            return error_for_status(config, status, message, headers=exc.response.headers, code=code)
        return error_for_failure(
            config, exc, timeouts=(anthropic.APITimeoutError,), connection_errors=(anthropic.APIConnectionError,)
        )

    async def aclose(self) -> None:
        await self._client.close()

    def _message(self, answer: object) -> dict[str, Any]:
        """The upstream's answer to a request that is not streamed, if it is a message."""
        if not isinstance(answer, dict) or answer.get("type") != "message":
            raise ProviderError(
                f"The provider {self.config.name!r} answered with something other than a message.",
                provider=self.config.name,
            )
        return answer

    def _translate(self, body: dict[str, Any]) -> dict[str, Any]:
        with refusal_named(self.config):
            return anthropic_request(unhonoured_refused(body, TEXT_WITHOUT_LOGPROBS))

    def _interruption_reason(self, exc: BaseException) -> str:
        if isinstance(exc, anthropic.APITimeoutError):
            return "no data arrived in time."
        if isinstance(exc, anthropic.APIConnectionError):
            return "the connection closed before the response was complete."
        if isinstance(exc, anthropic.APIStatusError):
            return f"the provider reported an error: {self._upstream_message(exc.body) or 'no details given'}"
        if isinstance(exc, ValueError):
            return "the provider sent a malformed event."
        return interruption_reason(exc)

    def _upstream_message(self, body: object) -> str:
        """The provider's own error message (``body`` is ``{"type": "error", "error": {...}}`` or a text)."""
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else body
        if not isinstance(message, str):
            return ""
        return scrub(message.strip(), self.config)


def _overloaded(body: object) -> bool:
    """Whether an error event's body (``{"type": "error", "error": {...}}``) says the provider is overloaded."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and error.get("type") == "overloaded_error"
