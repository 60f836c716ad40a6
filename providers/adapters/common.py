"""What the adapters of every wire protocol share: the pooled HTTP client and the error mapping.

Both official SDKs send through ``httpx2``; each adapter hands its SDK client one explicitly
built ``httpx2.AsyncClient`` so that the connection pool is sized for a gateway (hundreds of
concurrent streams to one provider) rather than for a single application. The mapping from an
upstream failure to our ``ProviderError`` family is decided here once, by HTTP status, so that an
OpenAI-compatible server and Anthropic answer a client the same way for the same failure.

The client goes only where the outbound policy allows (``providers.outbound``: addresses judged at
connect time, no redirect off the provider's origin), and one call, retries and their waits
included, is bounded by one deadline (``upstream_deadline``): ``ProviderConfig.timeout`` is what a
client may wait for an answer, not what each of the SDK's attempts may take.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx2
from django.conf import settings

from core.tracing import trace_headers_add, tracing_active

from ..exceptions import (
    AnsweredCalls,
    ProviderAuthenticationError,
    ProviderBadRequestError,
    ProviderContextLengthError,
    ProviderError,
    ProviderMalformedReplyError,
    ProviderMalformedStreamError,
    ProviderNotFoundError,
    ProviderOverloadedError,
    ProviderQuotaExhaustedError,
    ProviderRateLimitError,
    ProviderStreamInterruptedError,
    ProviderStreamOverloadedError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from ..fields import Secret
from ..outbound import OutboundRefused, OutboundTransport, outbound_client
from ..types import ProviderConfig

# Enough connections for well over the 128 concurrent streams a busy gateway holds open to one
# provider; idle ones are kept for a while because chat traffic comes in bursts.
POOL_LIMITS = httpx2.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=30.0)
# An error page (HTML from a proxy, say) is cut to this many characters in our message.
_MAX_UPSTREAM_MESSAGE = 500


def http_timeout(config: ProviderConfig) -> httpx2.Timeout:
    """``config.timeout`` bounds every wait: connecting, each read (the gap between two streamed
    chunks), each write; connecting never needs more than 10 seconds."""
    return httpx2.Timeout(config.timeout, connect=min(config.timeout, 10.0))


# When the running upstream call must be over (loop time), for the response hook below.
_deadline: ContextVar[float | None] = ContextVar("upstream_deadline", default=None)


def provider_http_client(config: ProviderConfig) -> httpx2.AsyncClient:
    """The pooled client an adapter hands its SDK: bound to the provider's origin, under the outbound policy.

    It sends through aiohttp (the SDKs' ``DefaultAioHttpClient``, guarded alike:
    ``providers.adapters.aiohttp_client``; measured faster, docs/performance.md), or through httpx2's own
    pool when ``LLMHUB_PROVIDER_HTTP_CLIENT`` is "httpx"."""
    hooks = {"request": http_request_hooks(), "response": [_no_retry_past_deadline]}
    transport_class: Callable[..., httpx2.AsyncBaseTransport] = OutboundTransport
    if getattr(settings, "LLMHUB_PROVIDER_HTTP_CLIENT", "aiohttp") == "aiohttp":
        from .aiohttp_client import GuardedAiohttpTransport

        transport_class = GuardedAiohttpTransport
    return outbound_client(
        url=config.base_url,
        timeout=http_timeout(config),
        limits=POOL_LIMITS,
        transport_class=transport_class,
        event_hooks=hooks,
    )


def http_request_hooks() -> list[Callable[[Any], Awaitable[None]]]:
    """What every request to a provider passes through before it is sent: while tracing is on, the trace
    context of the attempt it belongs to (``core.tracing.trace_headers_add``); nothing otherwise, so that an
    untraced request pays for no hook."""
    return [trace_headers_add] if tracing_active() else []


async def _no_retry_past_deadline(response: httpx2.Response) -> None:
    """An upstream that asks to be retried later than the deadline allows is not retried: the SDK would
    sleep into the deadline and the client would get a timeout instead of the provider's answer."""
    deadline = _deadline.get()
    if deadline is None or response.status_code < 400:
        return
    wait = retry_after_seconds(response.headers)
    if wait is not None and wait >= deadline - asyncio.get_running_loop().time():
        response.headers["x-should-retry"] = "false"  # both SDKs honour it before their own rules


@asynccontextmanager
async def upstream_deadline(config: ProviderConfig) -> AsyncIterator[None]:
    """Bound everything inside, the SDK's retries and the waits between them included, by ``config.timeout``.

    A stream is bounded until its response begins; after that, each gap between two chunks is bounded
    by the HTTP client's read timeout (the same number).

    A call whose loop was closed under it (without its tasks cancelled) is closed by the collector, outside the
    loop and the call's context: what the transport's cleanup then raises on the dead loop (``Event loop is
    closed``), and the context variable's reset from another context (a ``ValueError``), are no failure of the
    provider, and would be reported as one (malformed JSON). The signal that closed it goes on instead."""
    loop = asyncio.get_running_loop()
    token = _deadline.set(loop.time() + config.timeout)
    try:
        async with asyncio.timeout(config.timeout):
            yield
    except TimeoutError:
        raise timeout_error(config) from None
    except Exception as exc:
        signal = loop_end_signal(exc) if loop.is_closed() else None
        if signal is None:
            raise
        raise signal from None
    finally:
        if not loop.is_closed():
            _deadline.reset(token)


def loop_end_signal(exc: BaseException) -> BaseException | None:
    """The ``GeneratorExit`` or ``CancelledError`` (a ``BaseException`` that is no ``Exception``) that ``exc`` was
    raised while handling, if any: the signal a cleanup's failure replaced."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if not isinstance(current, Exception):
            return current
        seen.add(id(current))
        current = current.__context__
    return None


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait before retrying, from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


# An extra header's value this short is no credential, and masking it would garble messages ("red" in "requested").
_SCRUBBED_HEADER_MIN = 8


def scrub(text: str, config: ProviderConfig) -> str:
    """``text`` without the provider's credentials in it: a provider may quote the key it refused, or a
    credential header (``extra_headers``)."""
    headers = (Secret(value) for _, value in config.extra_headers if len(value) >= _SCRUBBED_HEADER_MIN)
    for secret in (config.api_key, *headers):
        plaintext = secret.reveal()
        if plaintext and plaintext in text:
            text = text.replace(plaintext, secret.hint or "…")
    return text[:_MAX_UPSTREAM_MESSAGE]


def fields_renamed(body: dict[str, Any], renames: Mapping[str, str]) -> dict[str, Any]:
    """``body`` with OpenAI's name of each field in ``renames`` replaced by the provider's (Mistral's
    ``random_seed``, Ollama's ``max_tokens``), for a provider that reads only its own. A value under OpenAI's
    name wins over one the client gave under the provider's too: of ``max_completion_tokens`` and
    ``max_tokens`` both given, OpenAI acts on the newer. A None is dropped, as absent."""
    out = dict(body)
    for ours, theirs in renames.items():
        if ours in out:
            value = out.pop(ours)
            if value is not None:
                out[theirs] = value
    return out


def allowed_tools_narrowed(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as an upstream without chat completions' ``allowed_tools`` choice takes it: only the tools that
    choice allows are sent, and its mode (``auto`` or ``required``) is the tool choice. The model can call the same
    tools as under OpenAI's own choice; it no longer sees the others, which OpenAI keeps in the prompt for its cache.
    ``body`` itself without such a choice. Its tools were checked against ``tools`` (``chat.validation``). The one
    narrowing: ``BaseAdapter.prepare_request`` applies it for a provider that does not take the choice, and the
    Responses API's translation (``chat.translate_responses``) for every provider."""
    choice = body.get("tool_choice")
    if type(choice) is not dict or choice.get("type") != "allowed_tools":
        return body
    allowed = choice.get("allowed_tools") or {}
    names = {
        (entry.get("type"), entry.get(entry.get("type"), {}).get("name"))
        for entry in allowed.get("tools") or ()
        if isinstance(entry, dict) and isinstance(entry.get(entry.get("type")), dict)
    }
    tools = [
        tool
        for tool in body.get("tools") or ()
        if isinstance(tool, dict)
        and isinstance(tool.get(tool.get("type")), dict)
        and (tool["type"], tool[tool["type"]].get("name")) in names
    ]
    return {**body, "tools": tools, "tool_choice": allowed.get("mode", "auto")}


def assistant_fields_dropped(body: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """``body`` with the fields ``names`` left out of its assistant messages: what a reply carried that a client
    sends back as it came and the upstream does not take (Mistral refuses the fields of OpenAI's replies that its
    messages lack). ``body`` itself when no assistant message has one."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(
        isinstance(message, dict) and message.get("role") == "assistant" and not names.isdisjoint(message)
        for message in messages
    ):
        return body
    return {
        **body,
        "messages": [
            {key: value for key, value in message.items() if key not in names}
            if isinstance(message, dict) and message.get("role") == "assistant"
            else message
            for message in messages
        ],
    }


def message_text(content: Any, *, refusals: bool = False) -> str:
    """The text of an OpenAI message's ``content``, for a provider that takes one text where OpenAI takes parts (a
    tool message's result, Gemini's ``function_response`` and Cohere's tool content; Cohere's system and assistant
    text): a string as it is, a list's ``text`` parts concatenated as OpenAI reads them, with nothing put between
    (a client that split a text mid-line or mid-word meant it whole, and one that wanted a break wrote it), other
    parts left to the caller; anything else ``""``. With ``refusals`` (an assistant message, whose parts OpenAI's
    spec types as text or ``refusal``: ChatCompletionRequestAssistantMessageContentPart), a ``refusal`` part's text is
    read in its place too, as Claude's translation sends it on as text: what the model said when it refused is part
    of the turn it is shown again."""
    kinds = ("text", "refusal") if refusals else ("text",)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part[part["type"]]
            for part in content
            if isinstance(part, dict) and part.get("type") in kinds and isinstance(part.get(part["type"]), str)
        )
    return ""


def refusals_as_text(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with each ``refusal`` part of its assistant messages (OpenAI's spec types an assistant's parts as text
    or ``refusal``) a text part of the same text, in its place, for an OpenAI-protocol upstream whose messages have no
    refusal part: Mistral refuses one with its 422 (its chunks are text, images, documents, thinking...), Ollama with
    its 400 ``invalid message format`` (text and image_url parts alone). What the model said when it refused is part
    of the turn it is shown again, as Claude's, Cohere's and Gemini's translations send it on. ``body`` itself when
    no assistant message has one."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(_with_refusal(message) for message in messages):
        return body
    return {
        **body,
        "messages": [
            {
                **message,
                "content": [
                    {"type": "text", "text": part["refusal"]} if _is_refusal(part) else part
                    for part in message["content"]
                ],
            }
            if _with_refusal(message)
            else message
            for message in messages
        ],
    }


def _with_refusal(message: Any) -> bool:
    """Whether ``message`` is the assistant's and has a ``refusal`` part among its content parts."""
    return (
        isinstance(message, dict)
        and message.get("role") == "assistant"
        and isinstance(message.get("content"), list)
        and any(_is_refusal(part) for part in message["content"])
    )


def _is_refusal(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "refusal" and isinstance(part.get("refusal"), str)


# ``text_parts_only``'s remedy for a part that is not text in a tool message (Gemini's and Cohere's tool results). A
# system, developer or assistant message's other parts are chat validation's 400 (``ROLE_CONTENT_PARTS``).
TOOL_TEXT_REMEDY = "give the tool's text there, and an attachment in a user message"


def text_parts_only(content: Any, where: str, *, takes: str, remedy: str) -> None:
    """A 400 for a part other than text in ``content``, the message at ``where``, for a provider that takes that
    message as text alone (``takes``: "Gemini takes a tool's result as text only") where the gateway's validation
    takes other parts (a tool message's image, which Claude's tool_result takes): naming
    ``{where}.content[M].type`` and what to do instead (``remedy``), where the translation's ``message_text``
    would drop the part without a word and the model answer as if it had never been sent."""
    for index, part in enumerate(content if isinstance(content, list) else ()):
        if isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] != "text":
            raise ProviderBadRequestError(
                f"{takes}, and `{where}.content[{index}]` is a {part['type']!r} part: {remedy}.",
                param=f"{where}.content[{index}].type",
                code="invalid_value",
            )


# A chat completion's path of a message's field, as a refusal names it (``messages[3].content[1].image_url.url``;
# OpenAI's own 400s write ``messages.[3].content.[1].type`` too), and of a tool's: what an entry point that translated
# the client's request into a chat completion renames in a refusal's message (``/v1/messages``: ``translate_anthropic.
# messages_refusal_named``; ``/v1/responses``: ``chat.pipeline.client_refusal_named``).
CHAT_FIELD_PATH = re.compile(r"(?P<list>messages|tools)\.?\[(?P<index>\d+)\](?P<rest>(?:\.\w+|\.?\[\d+\])*)")

# A data URL's media type clients write that is no registered one, for the registered one its bytes are: many write
# ``data:image/jpg;base64,...`` for a JPEG (OpenAI and Ollama read it).
_IMAGE_TYPE_ALIASES = {"image/jpg": "image/jpeg"}


def image_media_type(declared: str) -> str:
    """A data URL's image media type as a provider that reads registered types alone takes it (Gemini's
    ``inlineData.mimeType``, Claude's base64 source): in lower case (a MIME type is case-insensitive, RFC 2045), and
    ``image/jpg`` as ``image/jpeg`` (``_IMAGE_TYPE_ALIASES``)."""
    lowered = declared.lower()
    return _IMAGE_TYPE_ALIASES.get(lowered, lowered)


@dataclass(frozen=True, slots=True)
class ImageUrls:
    """The image URLs a provider takes as they came, for ``images_checked``: base64 data URLs of ``types``, compared as
    written (``as_written``: Ollama's prefixes, ``data:;base64,`` without a type too) or as media types
    (case-insensitive, ``image/jpg`` a JPEG: ``image_media_type``); http(s) URLs when it fetches them (``fetches``).
    ``provider`` names it in the refusal."""

    provider: str
    types: tuple[str, ...]
    fetches: bool
    as_written: bool = False

    def refusal(self, url: str) -> str | None:
        """Why ``url`` cannot go to the provider as it came (the refusal's code), or None when it can. Compared as
        media types, a URL neither a data URL nor an http(s) one is the provider's to answer."""
        if url.startswith(("http://", "https://")):
            return None if self.fetches else "image_url_not_supported"
        if self.as_written:
            taken = url.startswith((*(f"data:{kind};base64," for kind in self.types), "data:;base64,"))
            return None if taken else "invalid_image_format"
        if not url.startswith("data:"):
            return None
        declared = url[5:].split(",", 1)[0].split(";", 1)[0]
        return None if not declared or image_media_type(declared) in self.types else "invalid_image_format"


def images_checked(body: dict[str, Any], urls: ImageUrls) -> None:
    """A 400 naming ``messages[N].content[M].image_url.url`` before any call for an image the provider cannot take
    (``urls``): one it would have to fetch (``image_url_not_supported``), or a data URL of a type it does not read
    (``invalid_image_format``, OpenAI's code for an image of a format it does not read), as Gemini's and Claude's
    translations refuse one: from ``OpenAIAdapter._chat_body``, for the kinds whose ``image_urls`` are known."""
    messages = body.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        for position, part in enumerate(content if isinstance(content, list) else ()):
            image = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
            url = image.get("url") if isinstance(image, dict) else None
            code = urls.refusal(url) if isinstance(url, str) else None
            if code is None:
                continue
            param = f"messages[{index}].content[{position}].image_url.url"
            if code == "image_url_not_supported":
                message_text = (
                    f"`{param}`: {urls.provider} takes images as base64 data URLs (data:image/png;base64,…) only; it "
                    "cannot fetch an image from a URL."
                )
            elif urls.as_written:
                message_text = (
                    f"`{param}`: {urls.provider} takes images as base64 data URLs of type {', '.join(urls.types)} only "
                    "(written in lower case, data:image/png;base64,…)."
                )
            else:
                declared = url[5:].split(",", 1)[0].split(";", 1)[0].lower()
                message_text = (
                    f"`{param}`: {urls.provider} takes images of type {', '.join(urls.types)} only, and this data "
                    f"URL's is {declared}."
                )
            raise ProviderBadRequestError(message_text, param=param, code=code)


# OpenAI's request-level prompt-caching hints an upstream without OpenAI's cache controls is not sent
# (``prompt_cache_hints_dropped``); ``prompt_cache_key`` only where it means nothing.
PROMPT_CACHE_HINTS = frozenset({"prompt_cache_options", "prompt_cache_retention"})


def prompt_cache_hints_dropped(body: dict[str, Any], *, key_taken: bool = False) -> dict[str, Any]:
    """``body`` without OpenAI's prompt-caching controls, for an upstream that caches implicitly or not at all
    (Ollama, Mistral): ``prompt_cache_options``, ``prompt_cache_retention`` (neither keeps a cache for as long as
    asked), each content part's ``prompt_cache_breakpoint``, and ``prompt_cache_key`` unless ``key_taken`` (Mistral's
    chat completions take it: requests sharing it are routed to its cache). A hint that cannot be honoured changes
    no answer; sent, Mistral refused it (its 422, a 400 to the client) and Ollama ignored it. ``body`` itself when it
    has none."""
    hints = PROMPT_CACHE_HINTS if key_taken else PROMPT_CACHE_HINTS | {"prompt_cache_key"}
    messages = body.get("messages")
    marked = isinstance(messages, list) and any(
        isinstance(message, dict)
        and isinstance(message.get("content"), list)
        and any(isinstance(part, dict) and "prompt_cache_breakpoint" in part for part in message["content"])
        for message in messages
    )
    if not marked and hints.isdisjoint(body):
        return body
    dropped = {key: value for key, value in body.items() if key not in hints}
    if marked:
        dropped["messages"] = [
            {
                **message,
                "content": [
                    {key: value for key, value in part.items() if key != "prompt_cache_breakpoint"}
                    if isinstance(part, dict)
                    else part
                    for part in message["content"]
                ],
            }
            if isinstance(message, dict) and isinstance(message.get("content"), list)
            else message
            for message in messages
        ]
    return dropped


T = TypeVar("T")
R = TypeVar("R")
# How many of one request's batch calls run at once: a large request is answered sooner than one call after
# another, and the provider's rate limit sees a few calls at a time, not dozens.
BATCH_CALLS_AT_ONCE = 4


# What an embeddings request may name as ``input_type`` (Cohere's field and words, which LiteLLM takes too), and
# Gemini's ``taskType`` for each. A retrieval app embeds its documents as one and each question as the other.
EMBEDDING_INPUT_TYPES = {
    "search_document": "RETRIEVAL_DOCUMENT",
    "search_query": "RETRIEVAL_QUERY",
    "classification": "CLASSIFICATION",
    "clustering": "CLUSTERING",
}


def embedding_input_type(body: dict[str, Any], *, provider: str) -> str | None:
    """The request's ``input_type``, checked against ``EMBEDDING_INPUT_TYPES``; None when it names none."""
    value = body.get("input_type")
    if value is None:
        return None
    if value not in EMBEDDING_INPUT_TYPES:
        raise ProviderBadRequestError(
            f"Invalid value for 'input_type': {value!r}. Expected one of {', '.join(EMBEDDING_INPUT_TYPES)}.",
            provider=provider,
            param="input_type",
        )
    return value


class BatchesAnswered:
    """The calls of one split request that a deployment has answered, kept across the request's attempts on it
    (``in_batches``' ``kept``): a retry sends only the calls not answered yet and keeps the vectors it has (the
    same deployment and upstream model, so one space), so that each input is embedded, and paid, at most once
    per request. Keyed by the call's first input's position."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[list[Any], Any, Any]] = {}  # start: (inputs, result, counted)

    def get(self, start: int, size: int) -> tuple[bool, Any]:
        call = self._calls.get(start)
        if call is None or len(call[0]) != size:
            return False, None
        return True, call[1]

    def add(self, start: int, inputs: list[Any], result: Any, count: Any) -> None:
        self._calls[start] = (inputs, result, count)

    def answered(self) -> AnsweredCalls | None:
        """Every call answered so far, as ``ProviderError.answered`` says them; None before the first."""
        if not self._calls:
            return None
        calls = [self._calls[start] for start in sorted(self._calls)]
        counts = [count for _, _, count in calls]
        whole = all(isinstance(count, int) and not isinstance(count, bool) and count >= 0 for count in counts)
        return AnsweredCalls(
            inputs=tuple(item for inputs, _, _ in calls for item in inputs), tokens=sum(counts) if whole else None
        )


async def in_batches(
    items: Sequence[T],
    size: int,
    call: Callable[[list[T]], Awaitable[R]],
    *,
    counted: Callable[[R], Any],
    kept: BatchesAnswered | None = None,
) -> list[R]:
    """``call`` on consecutive slices of at most ``size`` of ``items`` (for a provider that embeds fewer
    inputs a call than the 2048 OpenAI's API takes), the results in the slices' order. The first failure
    cancels the calls still running and is raised as it came, so routing judges it as a single call's; a
    ``ProviderError`` carries the calls answered before it (``answered``: the provider billed them), their
    tokens as ``counted`` reads them from a result (None, or anything but a count: not counted).

    ``kept``: the calls this deployment answered in the request's earlier attempts, which are not sent again;
    each call answered now is added to it as it comes (a failure, a timeout or a cancel later keeps it), and a
    failure's ``answered`` is then all of them."""
    slices = [(start, list(items[start : start + size])) for start in range(0, len(items), size)]
    if len(slices) == 1:
        return [await call(slices[0][1])]
    kept = kept if kept is not None else BatchesAnswered()
    gate = asyncio.Semaphore(BATCH_CALLS_AT_ONCE)

    async def gated(start: int, part: list[T]) -> R:
        done, result = kept.get(start, len(part))
        if done:
            return result
        async with gate:
            result = await call(part)
        kept.add(start, part, result, counted(result))
        return result

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(gated(start, part)) for start, part in slices]
    except BaseExceptionGroup as failed:
        error = failed.exceptions[0]
        if isinstance(error, ProviderError):
            error.answered = kept.answered()
        raise error from None
    return [task.result() for task in tasks]


def max_tool_calls(body: dict[str, Any]) -> int | None:
    """How many tool calls a choice may carry: one when the client asked for no parallel calls, which Gemini and
    Cohere cannot be told (their translations keep the first), else any number."""
    return 1 if body.get("parallel_tool_calls") is False else None


def one_choice_only(body: dict[str, Any]) -> None:
    """Refuse a request for several choices (``n`` > 1) to a provider that answers one whatever ``n`` says
    (Cohere, Ollama): one choice where several were asked for would be a silent short answer."""
    if body.get("n") not in (None, 1):
        raise ProviderBadRequestError(
            "This model returns one choice per request: `n` must be 1.", param="n", code="unsupported_value"
        )


@dataclass(frozen=True, slots=True)
class Unhonoured:
    """A parameter some providers cannot honour: a request that asks for it (``refused``, given the parameter's
    value) is refused with a 400 naming it, before any upstream call, rather than answered without it; the fields
    of its harmless form (``dropped``: asking for nothing) are not sent, since a strict server (Mistral) refuses a
    field it does not take."""

    param: str
    refused: Callable[[Any], bool]
    dropped: tuple[str, ...]
    message: str
    code: str


# ``logprobs: true`` to a provider whose answers carry none (Anthropic, Cohere, Mistral) is refused, as OpenAI's
# reasoning models refuse it, rather than answered with ``logprobs: null``; ``false`` (and a null ``top_logprobs``)
# asks for nothing.
LOGPROBS = Unhonoured(
    param="logprobs",
    refused=lambda value: value is True,
    dropped=("logprobs", "top_logprobs"),
    message="This model does not return log probabilities: `logprobs` is not supported with it.",
    code="unsupported_parameter",
)
# Audio output (``modalities`` with ``"audio"``, which OpenAI answers in ``message.audio``) from a provider that
# answers in text only is refused, rather than answered in text the client did not ask for alone; a ``modalities``
# of text only, and ``audio``, ask for nothing more.
AUDIO_OUTPUT = Unhonoured(
    param="modalities",
    refused=lambda value: isinstance(value, list) and "audio" in value,
    dropped=("modalities", "audio"),
    message='This model answers in text only: `modalities` cannot include "audio".',
    code="unsupported_value",
)
# A ``logit_bias`` (tokens banned or favoured by their ids in OpenAI's tokenizers) to a provider that has none (all
# but OpenAI's protocol) is refused, rather than answered with the tokens it bans; an empty one asks for nothing.
LOGIT_BIAS = Unhonoured(
    param="logit_bias",
    refused=lambda value: bool(value),
    dropped=("logit_bias",),
    message="This model has no logit bias: `logit_bias` cannot be applied to it; remove it.",
    code="unsupported_parameter",
)
# ``moderation`` (OpenAI's moderation of the input and the reply, by the model it names) to a provider that has no
# such thing is refused, rather than answered unmoderated; a null one asks for nothing. llmhub's own moderation is an
# admin's policy, not a request's (``chat.moderation``).
MODERATION = Unhonoured(
    param="moderation",
    refused=lambda value: value is not None,
    dropped=("moderation",),
    message="This model's provider runs no moderation of its own: `moderation` is not supported with it.",
    code="unsupported_parameter",
)
# The legacy ``functions`` (answered in ``message.function_call``) to a provider that has only tools are refused,
# rather than answered as if no function had been offered; an empty list (and ``function_call`` beside it) asks for
# nothing. A client gives them as ``tools`` instead.
LEGACY_FUNCTIONS = Unhonoured(
    param="functions",
    refused=lambda value: bool(value),
    dropped=("functions", "function_call"),
    message="This model takes `tools`, not the legacy `functions`: give each function as a tool of type 'function'.",
    code="unsupported_parameter",
)
# What a provider that answers in text only, with none of OpenAI's logit bias, moderation and legacy functions, cannot
# honour (Gemini, Ollama).
TEXT_ONLY = (AUDIO_OUTPUT, LOGIT_BIAS, MODERATION, LEGACY_FUNCTIONS)
# The same, for a provider with no log probabilities either (Anthropic, Cohere, Mistral).
TEXT_WITHOUT_LOGPROBS = (AUDIO_OUTPUT, LOGPROBS, LOGIT_BIAS, MODERATION, LEGACY_FUNCTIONS)


@contextmanager
def refusal_named(config: ProviderConfig) -> Iterator[None]:
    """Around an adapter's own checks of a request (before any upstream call): a ``ProviderError`` raised there
    names the provider, as an upstream's refusal does (``error_for_status``), for the log line and the attempt's
    report; the checks themselves (``unhonoured_refused``, ``one_choice_only``, the translations) know no config."""
    try:
        yield
    except ProviderError as exc:
        exc.provider = exc.provider or config.name
        raise


def unhonoured_refused(body: dict[str, Any], unhonoured: Sequence[Unhonoured]) -> dict[str, Any]:
    """``body`` for a provider that cannot honour ``unhonoured``: ``ProviderBadRequestError`` for the first of them
    it asks for, in their order, else ``body`` without their harmless forms (``body`` itself when it has none)."""
    for rule in unhonoured:
        if rule.param in body and rule.refused(body[rule.param]):
            raise ProviderBadRequestError(rule.message, param=rule.param, code=rule.code)
    dropped = [key for rule in unhonoured for key in rule.dropped if key in body]
    if dropped:
        return {key: value for key, value in body.items() if key not in dropped}
    return body


def error_for_status(
    config: ProviderConfig,
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
    context_exceeded: bool = False,
) -> ProviderError:
    """The error for an upstream HTTP error status, whatever the protocol; ``message`` is the provider's own,
    already scrubbed, and ``code`` its machine-readable error code if it gives one. A context-length error is
    recognised by OpenAI's code or by its wording (compatible servers and Anthropic only say it in words);
    ``context_exceeded`` is for a provider whose wording only its adapter knows."""
    name = config.name
    context_exceeded = context_exceeded or code == "context_length_exceeded" or is_context_length_message(message)
    kwargs = {"provider": name, "upstream_status": status}
    if status in (401, 403):
        # The client's own key was fine (it got this far): this is the gateway's credential, and
        # the upstream text is left out because it may describe (or partly quote) that credential.
        return ProviderAuthenticationError(
            f"The provider {name!r} refused the gateway's credentials (HTTP {status}); "
            "an administrator must update the provider's API key.",
            **kwargs,
        )
    if status == 429 and code == "insufficient_quota":
        return ProviderQuotaExhaustedError(
            f"The provider {name!r} says the account's quota is exhausted: {message}",
            retry_after=retry_after_seconds(headers),
            **kwargs,
        )
    if status == 429:
        # On a user's own key (bring your own key), the limit is that key's account's, not the gateway's.
        limited = "the gateway"
        if config.credential_id is not None:
            limited = f"your own API key {config.credential_hint}".strip()
        return ProviderRateLimitError(
            f"The provider {name!r} is rate limiting {limited}: {message}",
            retry_after=retry_after_seconds(headers),
            **kwargs,
        )
    if status == 529:
        return ProviderOverloadedError(f"The provider {name!r} is overloaded: {message}", **kwargs)
    if status in (408, 504):
        return ProviderTimeoutError(f"The provider {name!r} timed out (HTTP {status}): {message}", **kwargs)
    if status == 404:
        return ProviderNotFoundError(f"The provider {name!r} answered 404 Not Found: {message}", **kwargs)
    if status in (400, 413, 422):
        if context_exceeded:
            return ProviderContextLengthError(message, param=param or "messages", **kwargs)
        return ProviderBadRequestError(message, param=param, **kwargs)
    if status >= 500:
        return ProviderUnavailableError(f"The provider {name!r} is unavailable (HTTP {status}): {message}", **kwargs)
    return ProviderError(f"The provider {name!r} failed (HTTP {status}): {message}", **kwargs)


def error_for_failure(
    config: ProviderConfig,
    exc: BaseException,
    *,
    timeouts: tuple[type[BaseException], ...] = (),
    connection_errors: tuple[type[BaseException], ...] = (),
) -> ProviderError:
    """The error for a failure that is not an upstream HTTP error status: one of ours already, the outbound
    policy's refusal, a timeout, a connection that failed, a body that is not JSON, or anything else.
    ``timeouts`` and ``connection_errors`` are the SDK's own classes for the transport's failures (which it
    raises in place of, or besides, httpx2's)."""
    if isinstance(exc, ProviderError):
        return exc
    refusal = outbound_refusal(exc)
    if refusal is not None:
        return refused_error(config, refusal)
    if undecodable(exc):
        return ProviderMalformedReplyError(
            f"The provider {config.name!r} answered with a malformed body (not the encoding it declared).",
            provider=config.name,
        )
    if isinstance(exc, (httpx2.TimeoutException, *timeouts)):
        return timeout_error(config)
    if isinstance(exc, (httpx2.TransportError, *connection_errors)):
        return connection_error(config)
    if isinstance(exc, ValueError):
        return ProviderMalformedReplyError(
            f"The provider {config.name!r} answered with malformed JSON.", provider=config.name
        )
    return ProviderError(
        f"The provider {config.name!r} failed unexpectedly ({type(exc).__name__}).", provider=config.name
    )


def timeout_error(config: ProviderConfig) -> ProviderTimeoutError:
    return ProviderTimeoutError(
        f"The provider {config.name!r} did not answer within {config.timeout:g} seconds.", provider=config.name
    )


def undecodable(exc: BaseException) -> bool:
    """Whether ``exc`` is, or wraps (the SDKs take it for a connection error), httpx2's failure to decode a body
    that is not the ``Content-Encoding`` it declares (a corrupt gzip): the provider was reached and answered a
    malformed reply, which the same deployment would answer again."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, httpx2.DecodingError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def outbound_refusal(exc: BaseException) -> OutboundRefused | None:
    """The policy's refusal behind ``exc``: the openai SDK lets it through as is, the anthropic SDK wraps it
    in its connection error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OutboundRefused):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def refused_error(config: ProviderConfig, exc: OutboundRefused) -> ProviderError:
    """The outbound policy stopped the call: a configuration problem of the provider, so a 502."""
    return ProviderError(
        f"The gateway may not connect where the provider {config.name!r} leads: {exc.message}",
        provider=config.name,
        code="upstream_destination_refused",
    )


def connection_error(config: ProviderConfig) -> ProviderUnavailableError:
    return ProviderUnavailableError(f"The gateway could not reach the provider {config.name!r}.", provider=config.name)


def stream_interrupted(
    config: ProviderConfig, reason: str, *, malformed: bool = False, overloaded: bool = False
) -> ProviderStreamInterruptedError:
    """``malformed``: it broke on a chunk that is no chunk of its protocol (``ProviderMalformedStreamError``);
    ``overloaded``: the provider ended it saying it is overloaded (``ProviderStreamOverloadedError``)."""
    kind = ProviderMalformedStreamError if malformed else ProviderStreamInterruptedError
    if overloaded:
        kind = ProviderStreamOverloadedError
    return kind(f"The stream from the provider {config.name!r} was interrupted: {reason}", provider=config.name)


def stream_unfinished(config: ProviderConfig, *, began: bool) -> ProviderStreamInterruptedError:
    """A stream's body that ended before the model finished. ``began``: whether it held a chunk; one that held
    none (an empty body, only its end, a page or a whole reply for a stream never asked of it) is no stream of
    its protocol: malformed, so routing does not ask the same deployment again (``ProviderMalformedStreamError``)."""
    if began:
        return stream_interrupted(config, "the stream ended before the model finished.")
    return stream_interrupted(config, "the provider answered no stream (a 200 without a single chunk).", malformed=True)


def interruption_reason(
    exc: BaseException,
    *,
    undecodable_errors: tuple[type[BaseException], ...] = (),
    timeouts: tuple[type[BaseException], ...] = (),
    connection_errors: tuple[type[BaseException], ...] = (),
) -> str:
    """Why an open stream broke, in words a client can read (never the exception's own text,
    which for a transport error may quote the request). ``undecodable_errors``, ``timeouts`` and
    ``connection_errors``: the classes of a transport other than httpx2 for the same failures (as
    ``error_for_failure`` takes them: Cohere's SDK sends through plain httpx)."""
    if undecodable(exc) or isinstance(exc, undecodable_errors):
        return "the provider sent a malformed body (not the encoding it declared)."
    if isinstance(exc, (httpx2.TimeoutException, *timeouts)):
        return "no data arrived in time."
    if isinstance(exc, (httpx2.TransportError, *connection_errors)):
        return "the connection closed before the response was complete."
    return "the provider reported an error."


def is_context_length_message(message: str) -> bool:
    """OpenAI says ``context_length_exceeded`` in ``code``; compatible servers and Anthropic only in words."""
    lowered = message.lower()
    return any(
        marker in lowered
        for marker in ("context length", "context_length", "context window", "maximum context", "prompt is too long")
    )
