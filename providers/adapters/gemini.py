"""Adapter for Google Gemini (the Gemini API, ``generativelanguage``) over google-genai, behind the OpenAI
chat-completions shape.

Requests and responses are translated by the pure functions of :mod:`.translate_gemini`. The SDK client is
given our pooled ``httpx2.AsyncClient`` (``HttpOptions.httpx_async_client``; google-genai accepts httpx2
clients as well as httpx ones), so every connection goes through the outbound policy's guarded transport
(``providers.outbound``) like the other adapters': without it the SDK would open its own aiohttp session,
unguarded. The SDK's own retries are off (one attempt): the gateway's retry policy lives elsewhere, and
``upstream_deadline`` bounds each call. ``ProviderConfig.base_url`` has no version; ``api_version`` (the
provider's field) defaults to ``v1beta``, where the Gemini API serves everything this adapter uses.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from pydantic import ValidationError

from ..exceptions import ProviderBadRequestError, ProviderError, ProviderMalformedReplyError
from ..outbound import OutboundRefused
from ..types import ProviderConfig, ResolvedModel, UpstreamModel
from .base import BaseAdapter, WireChunk
from .common import (
    EMBEDDING_INPUT_TYPES,
    TEXT_ONLY,
    BatchesAnswered,
    embedding_input_type,
    error_for_failure,
    error_for_status,
    http_timeout,
    in_batches,
    interruption_reason,
    max_tool_calls,
    provider_http_client,
    refusal_named,
    scrub,
    stream_interrupted,
    stream_unfinished,
    undecodable,
    unhonoured_refused,
    upstream_deadline,
)
from .translate_anthropic import EFFORTS
from .translate_gemini import (
    THINKING_EFFORTS,
    StreamTranslator,
    completion_from_response,
    gemini_request,
    thinking_off_refused,
)

DEFAULT_API_VERSION = "v1beta"
_PLACEHOLDER_KEY = "not-configured"
_MODELS_PREFIX = "models/"
EMBED_BATCH_LIMIT = 100  # batchEmbedContents refuses more requests in one batch
_FAILURES = (genai_errors.APIError, httpx2.HTTPError, ValueError, ValidationError, OutboundRefused)
# The HTTP responses a stream's opening request received. The SDK reads a stream through several nested
# generators; closing the outer one leaves the inner ones (and the response) open until they are garbage
# collected, so the adapter closes the response itself.
_stream_responses: ContextVar[list[httpx2.Response] | None] = ContextVar("gemini_stream_responses", default=None)


async def _track_stream_response(response: httpx2.Response) -> None:
    opened = _stream_responses.get()
    if opened is not None:
        opened.append(response)


class GeminiAdapter(BaseAdapter):
    # A Messages client's ``output_config.effort`` Gemini has a thinking budget for (not ``xhigh`` nor ``max``).
    messages_efforts = tuple(effort for effort in EFFORTS if effort in THINKING_EFFORTS)
    # generationConfig.stopSequences: "The set of character sequences (up to 5) that will stop output generation".
    messages_stop_max = 5

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._http = provider_http_client(config)
        self._http.event_hooks["response"].append(_track_stream_response)
        timeout = http_timeout(config)
        self._client = genai.Client(
            api_key=config.api_key.reveal() or _PLACEHOLDER_KEY,
            http_options=genai_types.HttpOptions(
                base_url=config.base_url.rstrip("/") + "/",
                api_version=config.api_version or DEFAULT_API_VERSION,
                headers=dict(config.extra_headers),
                timeout=round(timeout.read * 1000) if timeout.read else None,
                retry_options=genai_types.HttpRetryOptions(attempts=1),
                httpx_async_client=self._http,
            ),
        )

    def prepare_request(self, body: dict[str, Any], model: ResolvedModel) -> dict[str, Any]:
        """As every adapter's, and ``reasoning_effort`` ``none`` refused for a model that always thinks, named as the
        client knows it (``model.name``), where the translation would know only its upstream id
        (``thinking_off_refused``)."""
        prepared = super().prepare_request(body, model)
        with refusal_named(self.config):
            thinking_off_refused(prepared, model.name)
        return prepared

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        with refusal_named(self.config):
            request = gemini_request(unhonoured_refused(body, TEXT_ONLY))
        try:
            async with upstream_deadline(self.config):
                response = await self._client.aio.models.generate_content(**request)
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        return completion_from_response(_dump(response), request["model"], max_calls=max_tool_calls(body))

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[WireChunk]:
        with refusal_named(self.config):
            request = gemini_request(unhonoured_refused(body, TEXT_ONLY))
        upstream = None
        opened: list[httpx2.Response] = []
        tracking = _stream_responses.set(opened)
        try:
            # The SDK sends the request when the stream is first read: the response's start (an error
            # status included) is awaited here, under the deadline, so that a refusal maps like complete's.
            async with upstream_deadline(self.config):
                upstream = await self._client.aio.models.generate_content_stream(**request)
                first = await _next_response(upstream)
        except _FAILURES as exc:
            await _close(upstream, opened)
            if isinstance(exc, httpx2.TransportError) and not isinstance(
                exc, httpx2.ConnectError | httpx2.TimeoutException
            ):
                # Connected and answered, then the body broke off: the stream had begun.
                raise stream_interrupted(self.config, interruption_reason(exc)) from None
            raise self.map_error(exc) from None
        finally:
            _stream_responses.reset(tracking)  # before the first yield: the caller's context stays its own
        translator = StreamTranslator(request["model"], max_calls=max_tool_calls(body))
        try:
            response = first
            while response is not None:
                dumped = _dump(response)
                if not _holds_gemini_chunk(dumped):
                    raise ValueError("not a chunk of Gemini's")
                chunk = translator.feed(dumped)
                if chunk is not None:
                    yield WireChunk(chunk, None)  # translated: no upstream bytes to relay
                response = await _next_response(upstream)
        except _FAILURES as exc:
            # A ValueError or a ValidationError: a chunk that is not JSON, or not Gemini's; or a body that is not the
            # encoding it declared. Malformed, as on an OpenAI deployment (``ProviderMalformedStreamError``).
            malformed = isinstance(exc, ValueError | ValidationError) or undecodable(exc)
            raise stream_interrupted(self.config, self._interruption_reason(exc), malformed=malformed) from None
        finally:
            # Also on aclose() and cancellation: the upstream response stops at once.
            await _close(upstream, opened)
        if not translator.finished:
            raise stream_unfinished(self.config, began=first is not None)
        last = translator.usage_chunk()
        if last is not None:
            yield WireChunk(last, None)

    async def embed(self, body: dict[str, Any], *, kept: BatchesAnswered | None = None) -> dict[str, Any]:
        """``models.embed_content`` (``batchEmbedContents``), answered in OpenAI's shape. The Gemini API
        reports no token usage for embeddings: the response has none, and the pipeline estimates it (and
        flags the ledger row as estimated). A batch takes at most 100 texts: more go in several calls."""
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) and text for text in texts):
            raise ProviderBadRequestError(
                "Gemini embeds text only: `input` must be a string or an array of strings, not token arrays.",
                provider=self.config.name,
                param="input",
                code="invalid_value",
            )
        config: dict[str, Any] = {"output_dimensionality": body["dimensions"]} if body.get("dimensions") else {}
        input_type = embedding_input_type(body, provider=self.config.name)
        if input_type is not None:  # none named: Gemini's own default, as before
            config["task_type"] = EMBEDDING_INPUT_TYPES[input_type]

        async def embed_batch(batch: list[str]) -> list[Any]:
            try:
                async with upstream_deadline(self.config):
                    response = await self._client.aio.models.embed_content(
                        model=str(body.get("model") or ""), contents=batch, config=config or None
                    )
            except _FAILURES as exc:
                raise self.map_error(exc) from None
            return list(response.embeddings or [])

        # Gemini counts no tokens: none of its calls is counted.
        batches = await in_batches(texts, EMBED_BATCH_LIMIT, embed_batch, counted=lambda _: None, kept=kept)
        embeddings = [embedding for batch in batches for embedding in batch]
        if len(embeddings) != len(texts):
            raise ProviderError(
                f"The provider {self.config.name!r} answered {len(embeddings)} embeddings for {len(texts)} inputs.",
                provider=self.config.name,
            )
        base64_wanted = body.get("encoding_format") == "base64"
        data = []
        for index, embedding in enumerate(embeddings):
            values = list(embedding.values or [])
            vector: Any = (
                base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() if base64_wanted else values
            )
            data.append({"object": "embedding", "index": index, "embedding": vector})
        return {"object": "list", "data": data, "model": str(body.get("model") or "")}

    async def list_models(self) -> list[UpstreamModel]:
        try:
            async with upstream_deadline(self.config):
                pager = await self._client.aio.models.list()
                models = [model async for model in pager]
        except _FAILURES as exc:
            raise self.map_error(exc) from None
        return [
            UpstreamModel(
                id=model.name.removeprefix(_MODELS_PREFIX),
                owned_by="google",
                display_name=model.display_name or "",
                context_window=model.input_token_limit,
            )
            for model in models
            if model.name
        ]

    def map_error(self, exc: BaseException) -> ProviderError:
        """google-genai's ``APIError`` carries the HTTP status (``code``) and Google's own ``status``; everything
        else (refusals, timeouts, transport failures, malformed bodies) is the shared mapping's."""
        if isinstance(exc, genai_errors.APIError):
            config = self.config
            message = scrub(str(exc.message or exc.status or f"HTTP {exc.code}").strip(), config)
            headers = getattr(getattr(exc, "response", None), "headers", None)
            status = int(exc.code or 500)
            if status == 400 and _error_reason(exc.details) == "API_KEY_INVALID":
                # Google refuses an unknown key with 400 INVALID_ARGUMENT where other providers say 401: the
                # same refusal (a user's own key turns invalid, the provider's key is the admin's to fix).
                status = 401
            error = error_for_status(
                config,
                status,
                message,
                headers=headers,
                # Gemini's wording: "The input token count (N) exceeds the maximum number of tokens allowed (M)."
                context_exceeded="input token count" in message.lower(),
            )
            if error.retry_after is None:
                error.retry_after = _retry_delay(exc.details)
            return error
        if isinstance(exc, ValidationError):  # the SDK could not read the body as a response: no reply of Gemini's
            return ProviderMalformedReplyError(
                f"The provider {self.config.name!r} answered in an unknown shape.", provider=self.config.name
            )
        return error_for_failure(self.config, exc)

    async def aclose(self) -> None:
        await self._http.aclose()

    def _interruption_reason(self, exc: BaseException) -> str:
        if isinstance(exc, genai_errors.APIError):
            return f"the provider reported an error: {scrub(str(exc.message or exc.status or exc.code), self.config)}"
        if isinstance(exc, ValueError | ValidationError):
            return "the provider sent a malformed chunk."
        return interruption_reason(exc)


def _error_reason(body: Any) -> str:
    """The ``reason`` of a Google error's ``ErrorInfo`` detail (``API_KEY_INVALID``), or ""."""
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo"):
            return str(detail.get("reason") or "")
    return ""


def _retry_delay(body: Any) -> float | None:
    """Seconds from a Google error's ``RetryInfo`` detail (``"retryDelay": "37s"``): Google sends its 429s'
    delay there, with no ``Retry-After`` header."""
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            try:
                seconds = float(str(delay).removesuffix("s"))
            except ValueError:
                return None
            return max(seconds, 0.0) if math.isfinite(seconds) else None  # never "inf" in a header
    return None


async def _close(upstream: AsyncIterator[Any] | None, opened: list[httpx2.Response]) -> None:
    for response in opened:
        await response.aclose()
    if upstream is not None:
        await upstream.aclose()  # type: ignore[attr-defined]


async def _next_response(upstream: AsyncIterator[genai_types.GenerateContentResponse]) -> Any:
    """The stream's next response, None at its end. The SDK reads each chunk's JSON into its model itself, and JSON of
    another shape (a list, a candidate that is a number) fails there with a TypeError, an AttributeError or a
    KeyError: a chunk that is not Gemini's, raised as the ValueError such a chunk is."""
    try:
        return await anext(upstream, None)
    except (TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"not a chunk of Gemini's ({type(exc).__name__})") from None


def _holds_gemini_chunk(response: dict[str, Any]) -> bool:
    """Whether a stream's chunk, as the SDK read it, holds anything of Gemini's: a candidate, prompt feedback or usage,
    or only the response's id or model version (nothing to relay, but Gemini's own). The SDK leaves out every field it
    does not know, so JSON of another shape comes out empty."""
    return any(response.get(name) for name in _GEMINI_CHUNK_FIELDS) or any(response.get("candidates") or ())


_GEMINI_CHUNK_FIELDS = ("prompt_feedback", "usage_metadata", "response_id", "model_version")


def _dump(response: genai_types.GenerateContentResponse) -> dict[str, Any]:
    return response.model_dump(exclude={"sdk_http_response", "automatic_function_calling_history"}, exclude_none=True)
