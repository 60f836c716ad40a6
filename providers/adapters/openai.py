"""Adapter for OpenAI and every server that speaks its chat-completions protocol (OpenRouter,
Ollama, vLLM, any OpenAI-compatible endpoint).

The request body goes upstream as the client sent it (after the model's parameter rules): fields
this adapter does not interpret — tools, response_format, images, logprobs, seed, fields newer
than the SDK — pass through untouched. It is posted with the SDK's generic ``post`` rather than
``chat.completions.create``, whose keyword signature would refuse unknown fields, and with
``cast_to=object`` so that a response comes back as the upstream's JSON decoded to a dict, without
building and dumping a pydantic model. A stream is read raw (``sse.SSEParser``) and each chunk keeps
the upstream's bytes (``WireChunk``), so that the relay forwards what it did not change instead of
encoding it again; a chunk that only carries the next piece of text is not decoded at all
(``text_chunks``). Authentication, retries and the exception classes are still the SDK's. One thing is
left out: Claude's signed thinking in an assistant message sent back (its ``thinking_blocks``, which Anthropic
wants in a tool-use round), no field of this protocol, which strict servers refuse and no other model can use
(``prepare_request``).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx2
import openai

from ..exceptions import ProviderError, ProviderMalformedReplyError
from ..outbound import OutboundRefused
from ..rules import OUTPUT_LIMITS
from ..tokens import chat_web_searches, web_plugin_results
from ..types import ProviderConfig, ResolvedModel, UpstreamModel
from . import sdk_requests
from .base import BaseAdapter, WireChunk, chunk_json
from .common import (
    BatchesAnswered,
    ImageUrls,
    assistant_fields_dropped,
    error_for_failure,
    error_for_status,
    http_timeout,
    images_checked,
    in_batches,
    interruption_reason,
    provider_http_client,
    refusal_named,
    scrub,
    stream_interrupted,
    stream_unfinished,
    undecodable,
    upstream_deadline,
)
from .openai_shape import (
    MalformedReply,
    StreamShape,
    TextCompletionShape,
    completion_chunks,
    completion_conform,
    embeddings_conform,
    json_constant,
    numbers_finite,
    text_completion_chunks,
    text_parts_joined,
)
from .sse import ServerSentEvent, SSEParser, response_body
from .text_chunks import TextChunks

_CHAT_PATH = "/chat/completions"
# Claude's signed thinking, as a reply gives it (``translate_anthropic``) and a client or a stored Responses chain
# sends it back: Anthropic's alone.
_CLAUDE_THINKING = frozenset({"thinking_blocks"})
# The fields ``completions.create`` takes as keywords; any other field of the request goes as ``extra_body``.
_COMPLETION_PARAMS = (
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
)


# Where a chunk's text is, and a streamed tool call's next piece of arguments (``text_chunks``).
_TEXT_PATH = ("choices", 0, "delta", "content")
_ARGUMENTS_PATH = ("choices", 0, "delta", "tool_calls", 0, "function", "arguments")
# Self-hosted servers (Ollama, vLLM) take no key, but the SDK insists on one.
_PLACEHOLDER_KEY = "not-needed"
_RAW_STREAM = {openai._constants.RAW_RESPONSE_HEADER: "stream"}
# The fields ``embeddings.create`` takes as keywords; any other field of the request goes as ``extra_body``.
_EMBEDDING_PARAMS = ("input", "model", "dimensions", "encoding_format", "user")
# What the SDK and its transport raise; ValueError covers a body that is not the JSON it claims to be, and
# OutboundRefused the outbound policy (it reaches us unwrapped: the SDK neither retries nor wraps it).
_FAILURES = (openai.OpenAIError, httpx2.HTTPError, ValueError, OutboundRefused)


class _StreamState:
    __slots__ = ("arguments", "choices", "done", "ended", "finished", "texts")

    def __init__(self) -> None:
        self.done = False  # `[DONE]` came: what follows is read and dropped
        # The choices seen (n > 1: several), those that carried their finish_reason, and whether every one
        # seen has: with several, one choice's finish is not the stream's.
        self.choices: set[int] = set()
        self.ended: set[int] = set()
        self.finished = False
        # Text chunks, and a tool call's argument chunks, read without a decode.
        self.texts = TextChunks(_TEXT_PATH, padding="obfuscation")
        self.arguments = TextChunks(_ARGUMENTS_PATH, padding="obfuscation")

    def see(self, choices: Any) -> None:
        """Note the choices of a decoded chunk (a text chunk read without a decode belongs to a choice whose
        earlier chunks were decoded)."""
        for position, choice in enumerate(choices if isinstance(choices, list) else ()):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            index = index if type(index) is int else position
            self.choices.add(index)
            if choice.get("finish_reason"):
                self.ended.add(index)
        self.finished = bool(self.choices) and self.choices <= self.ended


def _output_limit_spelt(body: dict[str, Any], name: str | None) -> dict[str, Any]:
    """``body`` with its output limit under ``name`` (None: ``body`` as it is). Given under both of OpenAI's names,
    the one under ``name`` is kept: OpenAI acts on ``max_completion_tokens`` of the two, and admission reserved for
    the larger."""
    other = next((limit for limit in OUTPUT_LIMITS if limit != name), None) if name else None
    if other is None or other not in body:
        return body
    out = {key: value for key, value in body.items() if key != other}
    if out.get(name) is None and body[other] is not None:
        out[name] = body[other]
    return out


def _inputs_count(value: Any) -> int:
    """How many embeddings an ``input`` asks for: one per item of a list of texts or of token arrays, else one
    (a text, or a token array)."""
    return len(value) if isinstance(value, list) and value and isinstance(value[0], str | list) else 1


def _embed_prompt_tokens(response: dict[str, Any]) -> Any:
    """An embeddings response's ``usage.prompt_tokens`` as it came (None without usage)."""
    usage = response.get("usage")
    return usage.get("prompt_tokens") if isinstance(usage, dict) else None


class OpenAIAdapter(BaseAdapter):
    # The most inputs the provider embeds in one request (more go in several); None: the 2048 of OpenAI's API.
    embed_batch_limit: int | None = None
    # The one name the upstream is sent a chat reply's output limit under, whichever of OpenAI's two the request
    # has it in (``_chat_body``): OpenAI's own API takes ``max_completion_tokens`` (``OpenAIPlatformAdapter``).
    # None: as the request has it, for the OpenAI-compatible servers (vLLM, OpenRouter, …), which all read
    # ``max_tokens``, the name llmhub gives a limit it picks or translates (Ollama's reads nothing else: ``ollama.py``).
    output_limit: str | None = None
    # The image URLs the provider takes, where they are documented (OpenAI's and Azure's ``OPENAI_IMAGE_URLS``,
    # Ollama's): another is refused before the call (``_chat_body``). None: any goes as it came, for the
    # OpenAI-compatible servers (vLLM, OpenRouter, …), whose models read what their own processors read.
    image_urls: ImageUrls | None = None
    counts_every_request_search = True  # OpenAI's search models, an Azure deployment of one, an answer engine

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._client = self._sdk_client(config)
        # The provider row alone configures the client: the gateway's own environment
        # (OPENAI_ORG_ID, OPENAI_PROJECT_ID) must not be sent to a third-party server.
        self._client.organization = config.organization or None
        self._client.project = None

    def _sdk_client(self, config: ProviderConfig) -> openai.AsyncOpenAI:
        """The SDK client every call goes through (building its requests from templates: ``sdk_requests``);
        Azure OpenAI's adapter builds the SDK's Azure client instead."""
        return sdk_requests.AsyncOpenAI(
            api_key=config.api_key.reveal() or _PLACEHOLDER_KEY,
            organization=config.organization or None,
            base_url=config.base_url,
            timeout=http_timeout(config),
            max_retries=0,  # retries are the router's (chat.pipeline): the SDK's would multiply them
            default_headers=dict(config.extra_headers),
            http_client=provider_http_client(config),
        )

    def prepare_request(self, body: dict[str, Any], model: ResolvedModel) -> dict[str, Any]:
        """As every adapter's, without Claude's signed thinking in the assistant messages (``thinking_blocks``, kept
        for Anthropic, which wants it back in a tool-use round): no field of OpenAI's protocol, refused by strict
        servers (Mistral's 422), and signed for Anthropic alone, so of no use to another model."""
        return assistant_fields_dropped(super().prepare_request(body, model), _CLAUDE_THINKING)

    def web_searches(self, body: dict[str, Any], model: ResolvedModel) -> int:
        """The search ``web_search_options`` asks for, which the field is sent on for, or the one a model that searches
        on every request runs whatever it is asked (``searches_every_request``: OpenAI's search models; a Messages
        request translated to one too): ``chat_web_searches``. OpenAI's search models run it before each answer and
        bill it per call, as a server in front of them does. A text completion (``/v1/completions``: a ``prompt``, no
        ``messages``) runs none: OpenAI's completions take no ``web_search_options``, and its search models answer
        chat completions alone (``web_searches_bound`` counts none either)."""
        if not isinstance(body.get("messages"), list):
            return 0
        return chat_web_searches(body, every_request=model.searches_every_request)

    def _chat_body(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        """The chat request sent upstream for ``body``. A stream always asks for usage, whatever the client
        said, so that billing has real counts. The output limit goes under ``output_limit``. An image the provider
        cannot take (``image_urls``) is refused before the call. Overridden by providers that spell the request
        otherwise (Mistral: ``mistral.py``)."""
        if self.image_urls is not None:
            images_checked(body, self.image_urls)
        body = _output_limit_spelt(body, self.output_limit)
        if not stream:
            if "stream" in body or "stream_options" in body:
                body = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
            return body
        options = body.get("stream_options")
        return {
            **body,
            "stream": True,
            "stream_options": {**options, "include_usage": True}
            if isinstance(options, dict)
            else {"include_usage": True},
        }

    async def complete(self, body: dict[str, Any], *, path: str = _CHAT_PATH) -> dict[str, Any]:
        """``path``: the endpoint under the provider's base URL that answers a chat completion (Mistral's FIM too)."""
        with refusal_named(self.config):
            body = self._chat_body(body, stream=False)
        try:
            async with upstream_deadline(self.config):
                completion = await self._client.post(path, body=body, cast_to=object)
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        return self._completion_read(completion, body)

    def _completion_read(self, completion: Any, body: dict[str, Any]) -> dict[str, Any]:
        """A whole reply's decoded JSON as the chat completion it answers to ``body``, filled in where OpenAI's
        schema requires what it left out; ``ProviderError`` for an error it reports, malformed for anything else
        that is no chat completion."""
        if isinstance(completion, dict) and completion.get("error"):
            # Some servers (OpenRouter, vLLM) report a failure in a 200's body, as a stream does in-band.
            message = self._upstream_message(completion["error"]) or "no details given"
            raise ProviderError(
                f"The provider {self.config.name!r} reported an error: {message}", provider=self.config.name
            )
        try:
            if not isinstance(completion, dict):
                raise MalformedReply("not an object")
            return completion_conform(completion, model=str(body.get("model") or ""), content=self._content_spelt)
        except MalformedReply as exc:
            raise ProviderMalformedReplyError(
                f"The provider {self.config.name!r} answered with something other than a chat completion ({exc}).",
                provider=self.config.name,
            ) from None

    def stream(self, body: dict[str, Any], *, path: str = _CHAT_PATH) -> AsyncIterator[WireChunk]:
        async def opened() -> httpx2.Response:
            # The raw response, still through the SDK (auth, retries, error classes for a non-2xx
            # answer): the header is the SDK's own way to ask for it, as `with_streaming_response` does.
            with refusal_named(self.config):
                request = self._chat_body(body, stream=True)
            return await self._client.post(
                path, body=request, cast_to=httpx2.Response, options={"headers": _RAW_STREAM}
            )

        return self._relayed(
            opened,
            self._chunk,
            StreamShape(str(body.get("model") or ""), content=self._content_spelt),
            whole=lambda completion: completion_chunks(self._completion_read(completion, body)),
        )

    async def _relayed(
        self,
        opened: Callable[[], Awaitable[httpx2.Response]],
        read: Callable[[ServerSentEvent, _StreamState, Any], WireChunk | None],
        shape: Any,
        whole: Callable[[Any], list[dict[str, Any]]],
    ) -> AsyncIterator[WireChunk]:
        """The chunks of the event stream ``opened`` answers (it runs at the first ``anext``, as the request's
        whole work did when each stream read its own), each ``read`` from its event (chat completions'
        ``_chunk``, text completions' ``_text_chunk``): one reader for both, so that routing judges them alike. A
        failure after the first chunk, or a body that ends before every choice finished, is
        ``ProviderStreamInterruptedError``; malformed (``ProviderMalformedStreamError``) when it broke on a chunk
        that is no chunk of the protocol, a body not the encoding it declared, or held no chunk at all. A body that is
        one JSON document (a server that ignored ``stream``) is the chunks ``whole`` makes of it (chat completions' and
        text completions' alike)."""
        try:
            async with upstream_deadline(self.config):
                upstream = await opened()
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        if _is_json(upstream):
            # A server that ignores `stream: true` (vLLM, Ollama and proxies in front of them can) answers the
            # whole completion: relayed as the stream it would have been, rather than taken for no stream at all.
            try:
                completion = json.loads(await upstream.aread())
            except _FAILURES as exc:
                raise self.map_error(exc) from None
            finally:
                await upstream.aclose()
            for chunk in whole(completion):
                yield WireChunk(chunk, None)
            return
        state = _StreamState()
        parser = SSEParser()
        began = False
        try:
            async for piece in response_body(upstream):
                for event in parser.feed(piece):
                    chunk = read(event, state, shape)
                    if chunk is not None:
                        began = True
                        yield chunk
            for event in parser.end():
                chunk = read(event, state, shape)
                if chunk is not None:
                    began = True
                    yield chunk
        except _FAILURES as exc:
            # A ValueError: a chunk that is not JSON, or of types no fill can mend (``MalformedReply``); or a body
            # that is not the encoding it declared.
            reason = self._interruption_reason(exc)
            malformed = isinstance(exc, ValueError) or undecodable(exc)
            raise stream_interrupted(self.config, reason, malformed=malformed) from None
        finally:
            # Also on aclose() and cancellation: the upstream response stops at once.
            await upstream.aclose()
        if not state.finished:
            raise stream_unfinished(self.config, began=began)

    @staticmethod
    def _content_spelt(part: dict[str, Any]) -> bool:
        """Spell a message's or a delta's ``content`` that is not a string as OpenAI's string, in place; True when
        it could (any other is a malformed reply). Default: a list of text parts, as their text. Overridden by
        providers that write it otherwise (Mistral: ``mistral.py``)."""
        return text_parts_joined(part)

    def _chunk(self, event: ServerSentEvent, state: _StreamState, shape: StreamShape) -> WireChunk | None:
        """The chunk an event carries; None for ``[DONE]`` and whatever follows it (read to the end, so that
        the connection goes back to the pool)."""
        if state.done:
            return None
        data = event.data
        if event.event == "error":
            # Some servers name an in-band failure by the event's type rather than an `error` key in its data.
            raise stream_interrupted(
                self.config, f"the provider reported an error: {self._event_error(data) or 'no details'}"
            )
        plain = state.texts.read(data)
        if plain is None:
            plain = state.arguments.read(data)
        if plain is not None:
            return plain  # a text or argument chunk like the last one learned: nothing else in it to look at
        if data.startswith(b"[DONE]"):
            state.done = True
            return None
        chunk, constants = _decoded(data)
        if not isinstance(chunk, dict):
            raise ValueError("not a chunk object")
        if chunk.get("error"):
            # OpenAI reports a failure after the headers in-band, as `data: {"error": …}`.
            raise stream_interrupted(
                self.config,
                f"the provider reported an error: {self._upstream_message(chunk['error']) or 'no details'}",
            ) from None
        if not state.finished:
            state.see(chunk.get("choices"))
        # An event spread over several `data:` lines holds line breaks: relayed as it came, it would break
        # the client's SSE framing, so that one is encoded again.
        # So is one that held a number JSON has not (NaN, an infinity), replaced by another (``numbers_finite``).
        raw = data if b"\n" not in data and b"\r" not in data and not constants else None
        if shape.conform(chunk):
            relayed = raw
        else:
            # Filled in where the upstream left out (or said null for) what OpenAI's schema requires: encoded again.
            # A text chunk so filled is learned with those bytes, which the chunks like it are then relayed as
            # (``text_chunks``): vLLM's and LM Studio's every chunk says ``"tool_calls": null``.
            relayed = None if raw is None else chunk_json(chunk)
        if raw is not None and not state.finished:
            state.texts.learn(chunk, raw, None if relayed is raw else relayed)
            # A call piece the upstream numbered none of got its index from the stream's state (``shape.numbered``):
            # its filled bytes carry that call's index, so no template is learned from them for later pieces, which
            # may be another call's.
            if not shape.numbered:
                state.arguments.learn(chunk, raw, None if relayed is raw else relayed)
        return WireChunk(chunk, relayed)

    serves_completions = True

    def _completion_args(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        """``completions.create``'s keywords for ``body``; a stream asks for usage whatever the client said, as a
        chat stream does (``_chat_body``). Overridden by providers that refuse what OpenAI takes (Ollama)."""
        request = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
        if stream:
            options = body.get("stream_options")
            request["stream_options"] = (
                {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
            )
        args = {name: request[name] for name in _COMPLETION_PARAMS if name in request}
        extra = {name: value for name, value in request.items() if name not in _COMPLETION_PARAMS}
        return {**args, "extra_body": extra or None}

    async def text_complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Through the SDK's ``completions.create`` (the upstream's own ``/completions``), read raw: the upstream's
        JSON is relayed as it came, filled in where ``CreateCompletionResponse`` requires what it left out."""
        if not self.serves_completions:
            raise self._completions_refused()
        with refusal_named(self.config):
            args = self._completion_args(body, stream=False)
        try:
            async with upstream_deadline(self.config):
                raw = await self._client.completions.with_raw_response.create(**args)
            completion, _constants = _decoded(raw.content)
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        return self._text_completion_read(completion, body)

    def _text_completion_read(self, completion: Any, body: dict[str, Any]) -> dict[str, Any]:
        """A whole reply's decoded JSON as the text completion it answers to ``body``, filled in where
        ``CreateCompletionResponse`` requires what it left out; ``ProviderError`` for an error it reports, malformed
        for anything else that is no text completion."""
        if isinstance(completion, dict) and completion.get("error"):
            message = self._upstream_message(completion["error"]) or "no details given"
            raise ProviderError(
                f"The provider {self.config.name!r} reported an error: {message}", provider=self.config.name
            )
        try:
            if not isinstance(completion, dict):
                raise MalformedReply("not an object")
            TextCompletionShape(str(body.get("model") or "")).conform(completion, whole=True)
        except MalformedReply as exc:
            raise ProviderMalformedReplyError(
                f"The provider {self.config.name!r} answered with something other than a text completion ({exc}).",
                provider=self.config.name,
            ) from None
        return completion

    def text_stream(self, body: dict[str, Any]) -> AsyncIterator[WireChunk]:
        """Through the SDK's ``completions.create(stream=True)``, its response read raw as a chat stream is, by the
        same reader (``_relayed``): each chunk keeps the upstream's bytes unless it had to be filled in."""

        async def opened() -> httpx2.Response:
            if not self.serves_completions:
                raise self._completions_refused()
            with refusal_named(self.config):
                args = self._completion_args(body, stream=True)
            response = await self._client.completions.create(**args, stream=True, extra_headers=_RAW_STREAM)
            return response.http_response

        return self._relayed(
            opened,
            self._text_chunk,
            TextCompletionShape(str(body.get("model") or "")),
            whole=lambda completion: text_completion_chunks(self._text_completion_read(completion, body)),
        )

    def _text_chunk(self, event: ServerSentEvent, state: _StreamState, shape: TextCompletionShape) -> WireChunk | None:
        if state.done:
            return None
        data = event.data
        if event.event == "error":
            raise stream_interrupted(
                self.config, f"the provider reported an error: {self._event_error(data) or 'no details'}"
            )
        if data.startswith(b"[DONE]"):
            state.done = True
            return None
        chunk, constants = _decoded(data)
        if not isinstance(chunk, dict):
            raise ValueError("not a chunk object")
        if chunk.get("error"):
            raise stream_interrupted(
                self.config,
                f"the provider reported an error: {self._upstream_message(chunk['error']) or 'no details'}",
            ) from None
        raw = data if b"\n" not in data and b"\r" not in data and not constants else None
        if not shape.conform(chunk, whole=False):
            raw = None
        if not state.finished:
            state.see(chunk.get("choices"))
        return WireChunk(chunk, raw)

    async def embed(self, body: dict[str, Any], *, kept: BatchesAnswered | None = None) -> dict[str, Any]:
        """One request, or several of at most ``embed_batch_limit`` inputs answered as one list, in input
        order, their usage summed (left out, for the pipeline to estimate, if any call did not count it)."""
        inputs = body.get("input")
        limit = self.embed_batch_limit
        if limit is None or _inputs_count(inputs) <= limit:
            return await self._embed_once(body)
        responses = await in_batches(
            inputs,
            limit,
            lambda batch: self._embed_once({**body, "input": batch}),
            counted=_embed_prompt_tokens,
            kept=kept,
        )
        data = [
            {**item, "index": number * limit + item["index"]}
            for number, response in enumerate(responses)
            for item in response["data"]
        ]
        merged = {**responses[0], "data": data}
        counts = [_embed_prompt_tokens(response) for response in responses]
        if all(isinstance(count, int) for count in counts):
            tokens = sum(counts)
            merged["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        else:
            merged.pop("usage", None)
        return merged

    async def _embed_once(self, body: dict[str, Any]) -> dict[str, Any]:
        """Through the SDK's ``embeddings.create``, read raw so that the upstream's JSON is relayed as it
        came rather than rebuilt from the SDK's model. ``encoding_format`` is always sent: left out, the SDK
        would ask for base64 and decode it itself, which only its ``parse()`` does. An upstream that
        answers floats to a request for base64 (some OpenAI-compatible servers ignore the field) has them
        encoded here, as OpenAI encodes them: little-endian float32."""
        encoding = body.get("encoding_format") or "float"
        params = {name: body[name] for name in _EMBEDDING_PARAMS if body.get(name) is not None}
        extra = {name: value for name, value in body.items() if name not in _EMBEDDING_PARAMS}
        try:
            async with upstream_deadline(self.config):
                raw = await self._client.embeddings.with_raw_response.create(
                    **{**params, "encoding_format": encoding}, extra_body=extra or None
                )
            response = json.loads(raw.content)
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        data = response.get("data") if isinstance(response, dict) else None
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise ProviderError(
                f"The provider {self.config.name!r} answered with something other than a list of embeddings.",
                provider=self.config.name,
            )
        # Each item's index names its input; a server that embeds a batch in parallel may list them in another
        # order, and a client reads data[i] as input i. One that leaves the indexes out lists them in order.
        for position, item in enumerate(data):
            index = item.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                item["index"] = position
        data.sort(key=lambda item: item["index"])
        embeddings_conform(response)
        expected = _inputs_count(body.get("input"))
        if [item["index"] for item in data] != list(range(expected)):
            # A short (or doubled) list would pair the client's texts with the wrong vectors, or none.
            raise ProviderError(
                f"The provider {self.config.name!r} did not answer one embedding for each of the {expected} "
                f"inputs ({len(data)} came).",
                provider=self.config.name,
            )
        for item in data:
            if not _vector_of_numbers(item.get("embedding"), encoded=encoding == "base64"):
                # Relayed, a vector no client can use (a NaN in it, JSON no strict reader takes) or out of the spec.
                raise ProviderMalformedReplyError(
                    f"The provider {self.config.name!r} answered with an embedding that is not a list of finite "
                    f"numbers (input {item['index']}).",
                    provider=self.config.name,
                )
        if encoding == "base64":
            for item in data:
                vector = item.get("embedding")
                if isinstance(vector, list):
                    try:
                        packed = struct.pack(f"<{len(vector)}f", *vector)
                    except (struct.error, TypeError):
                        raise ProviderError(
                            f"The provider {self.config.name!r} answered with an embedding that is not numbers.",
                            provider=self.config.name,
                        ) from None
                    item["embedding"] = base64.b64encode(packed).decode()
        return response

    async def moderate(self, text: str | list[str], *, model: str) -> list[dict[str, Any]]:
        """Through the SDK's ``moderations.create``, read raw: the categories keep their wire names
        (``self-harm``, ``hate/threatening``) without a round trip through the SDK's model."""
        try:
            async with upstream_deadline(self.config):
                raw = await self._client.moderations.with_raw_response.create(input=text, model=model)
            response = json.loads(raw.content)
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        results = response.get("results") if isinstance(response, dict) else None
        if not isinstance(results, list) or not all(isinstance(item, dict) for item in results):
            raise ProviderError(
                f"The provider {self.config.name!r} answered with something other than moderation results.",
                provider=self.config.name,
            )
        return results

    async def list_models(self) -> list[UpstreamModel]:
        try:
            async with upstream_deadline(self.config):
                listing = await self._client.get("/models", cast_to=object)
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise ProviderError(
                f"The provider {self.config.name!r} answered its model list in an unknown shape.",
                provider=self.config.name,
            )
        return [_upstream_model(item) for item in data if isinstance(item, dict) and item.get("id")]

    def map_error(self, exc: BaseException) -> ProviderError:
        config = self.config
        if isinstance(exc, openai.APIStatusError):
            message = self._upstream_message(exc.body)
            param = exc.param
            invalid = _invalid_fields(exc.body)
            if not message and invalid:
                message = scrub("; ".join(f"{field}: {problem}" for field, problem in invalid), config)
                param = param or invalid[0][0]
            return error_for_status(
                config,
                exc.status_code,
                message or f"HTTP {exc.status_code}",
                headers=exc.response.headers,
                param=param,
                code=exc.code,
            )
        if isinstance(exc, openai.APIError) and not isinstance(exc, openai.APIConnectionError):
            message = self._upstream_message(exc.body) or "no details given"
            return ProviderError(f"The provider {config.name!r} reported an error: {message}", provider=config.name)
        return error_for_failure(
            config, exc, timeouts=(openai.APITimeoutError,), connection_errors=(openai.APIConnectionError,)
        )

    async def aclose(self) -> None:
        await self._client.close()

    def _interruption_reason(self, exc: BaseException) -> str:
        # The SDK wraps transport failures met while reading the stream in its own classes.
        if undecodable(exc):
            return interruption_reason(exc)
        if isinstance(exc, openai.APITimeoutError):
            return "no data arrived in time."
        if isinstance(exc, openai.APIConnectionError):
            return "the connection closed before the response was complete."
        if isinstance(exc, openai.APIError):
            return f"the provider reported an error: {self._upstream_message(exc.body) or 'no details given'}"
        if isinstance(exc, ValueError):
            return "the provider sent a malformed chunk."
        return interruption_reason(exc)

    def _event_error(self, data: bytes) -> str:
        """The provider's message in an ``error`` event's data: JSON (``{"error": {"message": …}}``, or the error
        object itself), or plain text."""
        try:
            body: object = json.loads(data)
        except ValueError:
            body = data.decode("utf-8", "replace")
        if isinstance(body, dict) and isinstance(body.get("error"), dict | str):
            body = body["error"]
        return self._upstream_message(body)

    def _upstream_message(self, body: object) -> str:
        """The provider's own error message (``body`` is the error object, or the text of an error page)."""
        message = body.get("message") if isinstance(body, dict) else body
        if not isinstance(message, str):
            return ""
        return scrub(message.strip(), self.config)


def _vector_of_numbers(vector: Any, *, encoded: bool) -> bool:
    """Whether ``vector`` is an embedding as the spec types it, a list of numbers, each finite (no NaN or infinity,
    which Python's JSON reads); for a request of base64 (``encoded``), also the upstream's own base64 string. One sum
    in C, not a look at each number: a None or a text in the list is its TypeError, a NaN or an infinity its sum's."""
    if encoded and type(vector) is str:
        return True
    if type(vector) is not list:
        return False
    try:
        return math.isfinite(sum(vector))
    except TypeError:
        return False


def _is_json(response: httpx2.Response) -> bool:
    """Whether ``response`` says it is one JSON document (``application/json``), not an event stream."""
    kind = response.headers.get("content-type", "")
    return kind.split(";", 1)[0].strip().lower() == "application/json"


def _decoded(data: bytes) -> tuple[Any, bool]:
    """A chunk's (or a text completion's) JSON decoded, and whether it held a number JSON has not (``NaN``,
    ``Infinity``, ``-Infinity``), replaced as ``numbers_finite`` says (a logprob by a finite one); only a chunk whose
    bytes spell one of those words is watched for them."""
    if b"NaN" not in data and b"Infinity" not in data:
        return json.loads(data), False
    seen: list[str] = []

    def constant(name: str) -> float:
        seen.append(name)
        return json_constant(name)

    document = json.loads(data, parse_constant=constant)
    if seen and isinstance(document, dict):
        numbers_finite(document)
    return document, bool(seen)


def _invalid_fields(body: object) -> list[tuple[str, str]]:
    """The fields a request validation error names, each with its problem: the list of pydantic errors that
    Mistral answers as ``message.detail`` and FastAPI-based servers as ``detail`` (``{"loc": ["body",
    "logprobs"], "msg": "Extra inputs are not permitted"}``), as ``("logprobs", "Extra inputs …")``. The
    ``input`` each error quotes is left out."""
    if not isinstance(body, dict):
        return []
    message = body.get("message")
    detail = message.get("detail") if isinstance(message, dict) else body.get("detail")
    found = []
    for error in detail if isinstance(detail, list) else ():
        if not isinstance(error, dict) or not isinstance(error.get("msg"), str):
            continue
        loc = error.get("loc")
        path = [part for part in loc if part != "body"] if isinstance(loc, list) else []
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
        found.append((field or "body", error["msg"]))
    return found


def _upstream_model(item: dict[str, Any]) -> UpstreamModel:
    # OpenRouter says `context_length`, vLLM `max_model_len`; OpenAI itself does not say.
    window = item.get("context_length") or item.get("context_window") or item.get("max_model_len")
    return UpstreamModel(
        id=str(item["id"]),
        owned_by=str(item.get("owned_by") or ""),
        display_name=str(item.get("name") or ""),
        context_window=window if isinstance(window, int) else None,
    )


# The image URLs OpenAI's chat completions take (its vision guide's image input requirements: PNG, JPEG, WEBP and
# non-animated GIF, as a data URL or an http(s) URL it fetches), Azure OpenAI's alike (its 400 "You uploaded an
# unsupported image ... in one of these formats: png, jpeg, gif, webp"). A data URL of another type (text/html, a PDF,
# HEIC) is refused before the call (``images_checked``), where the provider answered its own 400 after it.
OPENAI_IMAGE_URLS = ImageUrls("This model", ("image/png", "image/jpeg", "image/gif", "image/webp"), fetches=True)

# The most stop strings OpenAI's chat completions take (its ``stop``: "Up to 4 sequences"), on OpenAI's API and Azure's.
OPENAI_STOP_MAX = 4


class OpenAIPlatformAdapter(OpenAIAdapter):
    """OpenAI's own API (kind ``openai``): the OpenAI adapter, sending a chat reply's output limit as
    ``max_completion_tokens``. OpenAI deprecated ``max_tokens`` for all its models, and its reasoning models and
    gpt-5 refuse it (a 400 ``unsupported_parameter``), while every model of its takes ``max_completion_tokens`` as
    the same limit: a limit llmhub picks or translates (``max_tokens``: under a budget, a ``fixed`` rule's, a
    /v1/messages request's), and a client's ``max_tokens``, go under it. A /v1/messages request's ``standard_only``
    asks OpenAI's ``default`` tier (standard processing, whatever the project's default tier)."""

    output_limit = "max_completion_tokens"
    takes_allowed_tools = True
    messages_stop_max = OPENAI_STOP_MAX
    image_urls = OPENAI_IMAGE_URLS
    messages_standard_tier = "default"


class OpenRouterAdapter(OpenAIAdapter):
    """OpenRouter (kind ``openrouter``): the OpenAI adapter, counting the web results of OpenRouter's web plugin, which
    it bills per result, not per request (``web_plugin_results``: ``plugins: [{"id": "web"}]``, or a model id ending
    ``:online``), each one a unit of the deployment's ``web_search_per_1k`` (OpenRouter's $4 per 1,000 results), on
    a text completion too (its ``prompt`` is grounded as a chat's messages are: ``:online`` is the plugin for any
    request to the model, and a ``plugins`` field is sent on as the rest of the body is). A
    /v1/messages request's ``plugins`` is sent on in its translation, as a chat completion's is: OpenRouter's own
    field, which the other providers are not sent."""

    def web_searches(self, body: dict[str, Any], model: ResolvedModel) -> int:
        """``OpenAIAdapter``'s, and the web plugin's results."""
        return super().web_searches(body, model) + web_plugin_results(body, online=model.web_plugin_online)

    @classmethod
    def _chat_request(cls, request: dict[str, Any]) -> dict[str, Any]:
        body = super()._chat_request(request)
        if request.get("plugins") is not None:
            body["plugins"] = request["plugins"]
        return body
