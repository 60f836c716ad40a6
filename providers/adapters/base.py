"""The one interface every provider adapter implements.

Requests and responses are OpenAI chat-completion shapes (plain dicts, as they travel on the wire):
``complete`` returns a ``chat.completion`` object, ``stream`` yields ``chat.completion.chunk``
objects as ``WireChunk`` (a dict that also carries the upstream's bytes when it was read off the wire
as is; a translated chunk has none). An adapter for another wire protocol translates both ways, so
that everything above the adapter speaks one format. Model: LiteLLM's ``BaseConfig`` (required
methods, optional hooks).
"""

from __future__ import annotations

import functools
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

from ..exceptions import ProviderBadRequestError, ProviderError
from ..rules import apply_parameter_rules
from ..tokens import prompt_tokens
from ..types import HealthResult, ProviderConfig, ResolvedModel, UpstreamModel
from .common import BatchesAnswered, allowed_tools_narrowed
from .translate_anthropic import EventTranslator, chat_request, message_from_completion, messages_refusal_named


class BaseAdapter(ABC):
    """Wraps one pooled SDK client for one provider configuration."""

    # The chat-completions field a translated Messages request's end user (``metadata.user_id``) goes in (``messages``):
    # OpenAI's ``user``; None for a provider that refuses it.
    messages_end_user_field: str | None = "user"
    # The levels of a translated Messages request's ``output_config.effort`` the provider has a ``reasoning_effort``
    # for (``messages``); None: all of them. Another is refused naming the client's field.
    messages_efforts: ClassVar[tuple[str, ...] | None] = None
    # Whether the provider takes chat completions' ``tool_choice: {"type": "allowed_tools"}`` as OpenAI does (only
    # OpenAI's own API); any other gets the tools it allows alone, its mode as the choice (``prepare_request``).
    takes_allowed_tools: ClassVar[bool] = False
    # The most stop strings the provider takes in one request (a translated Messages request's ``stop_sequences``);
    # None: no limit known. More are refused before any call, naming the client's field.
    messages_stop_max: ClassVar[int | None] = None
    # The chat completions' ``service_tier`` a translated Messages request's ``standard_only`` (Anthropic's standard
    # processing) is sent as: OpenAI's ``default`` on OpenAI's own API (``OpenAIPlatformAdapter``); None: no tier is
    # sent (a provider without OpenAI's tiers: Mistral refuses the field, a compatible server's tiers are its own).
    messages_standard_tier: ClassVar[str | None] = None

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"<{type(self).__name__} provider={self.config.name!r} base_url={self.config.base_url!r}>"

    # Required -------------------------------------------------------------------------------------

    @abstractmethod
    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a non-streaming chat completion; ``body["model"]`` is already the provider's model id."""

    @abstractmethod
    def stream(self, body: dict[str, Any]) -> AsyncIterator[WireChunk]:
        """Yield OpenAI-style chunks as they arrive. The last chunk before the end carries ``usage``
        whenever the provider reports it (adapters ask for it even when the client did not).
        Closing the iterator (``aclose``) aborts the upstream request."""

    @abstractmethod
    async def list_models(self) -> list[UpstreamModel]:
        """The provider's own model list."""

    @abstractmethod
    def map_error(self, exc: BaseException) -> ProviderError:
        """Translate an SDK or transport exception into our ``ProviderError`` family."""

    # Optional hooks -------------------------------------------------------------------------------

    @classmethod
    def sends_service_tier(cls, config: ProviderConfig) -> bool:
        """Whether a request's ``service_tier`` is sent to the provider ``config`` (``prepare_request``): the tier a
        request is charged at when no reply says one, and the dearest it may be charged at, is the one sent
        (``chat.pipeline._asked_tier``). Default: yes; ``AzureOpenAIAdapter``: not on an api-version that refuses it."""
        return True

    def prepare_request(self, body: dict[str, Any], model: ResolvedModel) -> dict[str, Any]:
        """Rewrite a client request for ``model``: its upstream id and its parameter rules, and an ``allowed_tools``
        choice narrowed for a provider that does not take it (``takes_allowed_tools``).

        Overridden by adapters whose providers need more (none yet; Gemini will)."""
        prepared = apply_parameter_rules(body, model.parameter_rules)
        if not self.takes_allowed_tools:
            prepared = allowed_tools_narrowed(prepared)
        if prepared is body:
            prepared = dict(body)
        prepared["model"] = model.upstream_id
        return prepared

    # Whether ``web_searches`` counts the search of a model that searches on every request (a deployment's
    # ``searches_every_request``): OpenAI's protocol, whose search models do, counts it; a provider without such
    # models counts none, so a deployment on it is refused ``always`` where an admin sets it
    # (``registry.every_request_search_refusal``).
    counts_every_request_search: ClassVar[bool] = False

    def web_searches(self, body: dict[str, Any], model: ResolvedModel) -> int:
        """The web searches the provider runs for ``body`` on ``model`` and bills apart from the tokens without a word
        of them in its usage, for the settle step to charge: ``body`` a chat completion or a text completion as
        ``prepare_request`` made it, or a Messages request the adapter translates (``messages``, ``messages_stream``).
        Default: none (a translation leaves ``web_search_options`` out, and Anthropic's usage counts its own searches);
        ``OpenAIAdapter`` counts the one it asks for, and the one a model that searches on every request runs."""
        return 0

    async def messages(
        self, request: dict[str, Any], model: ResolvedModel, *, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Answer an Anthropic Messages request (``/v1/messages``) for ``model`` with a ``message``.
        Default: translated to a chat completion (then ``prepare_request``: upstream id, parameter rules)
        and back; ``AnthropicAdapter`` overrides it to pass the request through, with the client's
        Anthropic ``headers`` (``anthropic-beta``), which mean nothing to another protocol. A refusal of the
        translation (this adapter's before the call, or the provider's) names the client's fields, not the chat
        completion's (``messages_refusal_named``)."""
        body = self._chat_request(request)
        try:
            completion = await self.complete(self.prepare_request(body, model))
        except ProviderBadRequestError as exc:
            raise messages_refusal_named(request, exc) from None
        return message_from_completion(completion)

    # Whether the provider counts a Messages request's input tokens itself (``messages_count``).
    counts_messages: ClassVar[bool] = False

    async def messages_count(
        self, request: dict[str, Any], model: ResolvedModel, *, headers: Mapping[str, str] | None = None
    ) -> int | None:
        """The input tokens of a Messages request (``/v1/messages/count_tokens``) for ``model`` as its provider counts
        them. Default: None, the provider has no count of its own (llmhub's estimate is answered);
        ``AnthropicAdapter`` asks Anthropic's token counting."""
        return None

    @classmethod
    def messages_check(cls, request: dict[str, Any]) -> None:
        """Raise the 400 ``messages`` answers ``request`` with before any call: what its translation cannot express
        (a ``document`` block, a server tool, …), for ``/v1/messages/count_tokens``, which calls nothing. Default:
        translated as ``messages`` translates it; ``AnthropicAdapter`` overrides it: the provider judges the request
        as the client wrote it."""
        cls._chat_request(request)

    @classmethod
    def _chat_request(cls, request: dict[str, Any]) -> dict[str, Any]:
        """The chat completion a Messages request is translated into for this provider."""
        return chat_request(
            request,
            end_user_field=cls.messages_end_user_field,
            efforts=cls.messages_efforts,
            stop_max=cls.messages_stop_max,
            standard_tier=cls.messages_standard_tier,
        )

    async def messages_stream(
        self, request: dict[str, Any], model: ResolvedModel, *, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[WireEvent]:
        """Yield the Anthropic stream events answering a Messages request for ``model``. Default: the chat
        stream, translated (``EventTranslator``); ``AnthropicAdapter`` overrides it to relay the upstream's
        events."""
        translator = EventTranslator(input_tokens_estimate=prompt_tokens(request, operation="messages"))
        body = self._chat_request(request)
        try:
            chunks = self.stream({**self.prepare_request(body, model), "stream": True})
        except ProviderBadRequestError as exc:
            raise messages_refusal_named(request, exc) from None
        try:
            async for chunk in chunks:
                for event in translator.feed(chunk):
                    yield WireEvent(event, None)
        except ProviderError as exc:
            # A refusal, or an error in-band after the first chunk whose message quotes the chat completion's path.
            raise messages_refusal_named(request, exc) from None
        finally:
            await chunks.aclose()
        for event in translator.finish():
            yield WireEvent(event, None)

    async def embed(self, body: dict[str, Any], *, kept: BatchesAnswered | None = None) -> dict[str, Any]:
        """Answer an OpenAI embeddings request (``body["model"]`` is the provider's model id) with the
        upstream's ``list`` of embeddings and its usage. ``kept``: for a request the provider takes in several
        calls, those this deployment answered in the request's earlier attempts, not sent again
        (``common.in_batches``). Default: not served; ``OpenAIAdapter`` overrides it (Anthropic has no
        embeddings API)."""
        raise ProviderBadRequestError(
            f"The provider {self.config.name!r} ({self.config.kind}) does not serve embeddings.",
            provider=self.config.name,
            param="model",
            code="embeddings_not_supported",
        )

    # Whether ``text_complete`` and ``text_stream`` are served (``/v1/completions``): a chat-only provider's model
    # does not continue a text, so the gateway refuses such a request rather than pass a chat answer off as one.
    serves_completions: ClassVar[bool] = False

    async def text_complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer an OpenAI legacy text completion (``/v1/completions``; ``body["model"]`` is the provider's model
        id) with a ``text_completion``. Default: not served (``serves_completions``); ``OpenAIAdapter`` serves it."""
        raise self._completions_refused()

    def text_stream(self, body: dict[str, Any]) -> AsyncIterator[WireChunk]:
        """Yield the ``text_completion`` chunks of a streamed text completion, usage last whenever the provider
        reports it. Default: not served."""
        raise self._completions_refused()

    def _completions_refused(self) -> ProviderBadRequestError:
        return ProviderBadRequestError(
            f"The provider {self.config.name!r} ({self.config.kind}) does not serve text completions "
            "(/v1/completions): use /v1/chat/completions with this model.",
            provider=self.config.name,
            param="model",
            code="completions_not_supported",
        )

    async def moderate(self, text: str | list[str], *, model: str) -> list[dict[str, Any]]:
        """Classify ``text`` (or each of several texts, in one call) with the provider's moderation model:
        OpenAI's ``results``, one per text (each with ``flagged``, ``categories`` and ``category_scores``).
        Default: not served; ``OpenAIAdapter`` overrides it (``/v1/moderations``)."""
        raise ProviderBadRequestError(
            f"The provider {self.config.name!r} ({self.config.kind}) does not serve moderation.",
            provider=self.config.name,
            code="moderation_not_supported",
        )

    async def health_check(self) -> HealthResult:
        """Default: time a model listing. Overridden by providers without a model list endpoint."""
        started = time.perf_counter()
        try:
            models = await self.list_models()
        except ProviderError as exc:
            return HealthResult(ok=False, latency_ms=_ms_since(started), error=exc.message)
        return HealthResult(ok=True, latency_ms=_ms_since(started), models_seen=len(models))

    async def aclose(self) -> None:  # noqa: B027  (an optional hook: adapters without a client keep it)
        """Release the pooled HTTP client."""


def _ms_since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


_json_text = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class WireChunk(dict[str, Any]):
    """A ``chat.completion.chunk`` decoded from an OpenAI-protocol stream, with the exact JSON it came
    in as (``raw``), so that a chunk nobody changed is relayed upstream-byte for byte instead of being
    encoded again. Change it through ``set_model`` / ``drop_usage``, which keep ``raw`` right; any
    other change must set ``raw = None`` (the relay then encodes the dict)."""

    __slots__ = ("raw",)

    def __init__(self, data: dict[str, Any], raw: bytes | None) -> None:
        super().__init__(data)
        self.raw = raw

    def set_model(self, name: str) -> None:
        old = self.get("model")
        if old == name:
            return
        self["model"] = name
        raw = self.raw
        if raw is None:
            return
        self.raw = None
        if not isinstance(old, str):
            return
        self.raw = _model_replaced(raw, old, name)

    def drop_usage(self) -> None:
        """Remove a usage report the client did not ask for (``"usage": null`` may stay: it is valid)."""
        if self.get("usage") is not None:
            del self["usage"]
            self.raw = None


def _model_replaced(raw: bytes, old: str, name: str) -> bytes | None:
    # An unescaped `"model":"…"` cannot occur inside a JSON string (its quotes would be escaped),
    # so the first match is the object's own key. A spelling we do not find is encoded again (None).
    needles, replacement = _model_needles(old, name)
    for needle in needles:
        at = raw.find(needle)
        if at >= 0:
            return raw[:at] + replacement + raw[at + len(needle) :]
    return None


@functools.lru_cache(maxsize=256)
def _model_needles(old: str, name: str) -> tuple[tuple[bytes, bytes], bytes]:
    """The spellings of ``"model": old`` to look for and what replaces them: the same for every chunk of a
    stream, so encoded once (a stream's chunks were encoding both names again each)."""
    old_value = _json_text(old).encode()
    return (b'"model":' + old_value, b'"model": ' + old_value), b'"model":' + _json_text(name).encode()


class WireEvent(WireChunk):
    """An Anthropic Messages stream event (``ping``, ``message_start``, …) with the exact JSON of its
    ``data:`` line when it was read off the wire (``raw``); the SSE event name is its ``type``. Only
    ``message_start`` names the model (``message.model``), which ``set_model`` rewrites in place."""

    __slots__ = ()

    def set_model(self, name: str) -> None:
        message = self.get("message")
        if self.get("type") != "message_start" or not isinstance(message, dict) or message.get("model") == name:
            return
        old = message.get("model")
        message["model"] = name
        raw = self.raw
        self.raw = _model_replaced(raw, old, name) if raw is not None and isinstance(old, str) else None

    def sse(self) -> bytes:
        """The event as Anthropic frames it: ``event: <type>`` and one ``data:`` line."""
        return b"event: " + str(self.get("type")).encode() + b"\ndata: " + chunk_json(self) + b"\n\n"


def chunk_json(chunk: dict[str, Any]) -> bytes:
    """The JSON of a stream chunk: the upstream's own bytes when it is an unchanged ``WireChunk``."""
    raw = getattr(chunk, "raw", None)
    return raw if raw is not None else _json_text(chunk).encode()
