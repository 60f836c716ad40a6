"""The one pipeline every entry point runs: authenticate → resolve → admit → call → relay → settle.

REST (``api_openai``) and WebSocket (``consumers``) are thin adapters from their transport to this
module. A rule (a limit, a budget, a ledger field) is written here once. The settle step runs
whatever happens: success, upstream error, client gone, cancel — exactly one ledger row per
request, written in the background (``billing.services.ledger``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from billing.models import Endpoint, Operation, UsageStatus
from billing.pricing import cost_for
from billing.services.admission import Admission, admission_acquire, models_allowed
from billing.services.keys import api_key_authenticate, hash_key
from billing.services.ledger import UsageData, usage_record_submit
from providers.adapters import adapter_for
from providers.adapters.base import WireChunk, WireEvent
from providers.adapters.translate_anthropic import openai_usage
from providers.exceptions import DATABASE_OUTAGE_ERRORS, ApplicationError, DatabaseUnavailableError, ProviderError
from providers.models import ModelMode
from providers.selectors import model_resolve
from providers.types import ResolvedModel

from .validation import InvalidRequestError, validate_chat_request
from .validation_anthropic import validate_messages_request
from .validation_embeddings import embeddings_input_tokens, validate_embeddings_request

# How each operation's body is checked before anything else (``completion_start``).
_VALIDATORS = {
    Operation.CHAT: validate_chat_request,
    Operation.MESSAGES: validate_messages_request,
    Operation.EMBEDDINGS: validate_embeddings_request,
}


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: int
    username: str
    api_key_id: int | None = None
    key_allowed_model_ids: frozenset[int] | None = None


def caller_from_user(user: Any) -> Caller:
    return Caller(user_id=user.pk, username=user.get_username())


async def caller_from_api_key(raw: str | None) -> Caller:
    principal = await api_key_authenticate(raw)
    return Caller(
        user_id=principal.user_id,
        username=principal.username,
        api_key_id=principal.key_id,
        key_allowed_model_ids=principal.allowed_model_ids,
    )


async def models_for_caller(caller: Caller, *, mode: str | None = ModelMode.CHAT) -> list[ResolvedModel]:
    """The models ``caller`` may use, of one ``mode`` (chat: the picker's), or of every mode (None)."""
    return await models_allowed(user_id=caller.user_id, key_allowed_model_ids=caller.key_allowed_model_ids, mode=mode)


# Runs whose upstream call is in progress, with the task running each: a server shutting down cuts
# them (``runs_cut_all``) so that each settles in its own ``finally`` before the ledger is drained.
_active_runs: dict[CompletionRun, asyncio.Task[Any]] = {}
# The tasks serving a completion request, from its start until its last byte or event has gone: what a
# graceful shutdown waits for (``runs_drain``).
_requests_in_flight: set[asyncio.Task[Any]] = set()
# Seconds a client refused by a server that is shutting down is told to wait: time for another server
# (or this one, restarted) to take the request.
SHUTDOWN_RETRY_AFTER_SECONDS = 5


class ServerShuttingDownError(ApplicationError):
    """This server process is stopping: a new request is refused, and one it had to cut is told so."""

    status_code = 503
    error_type = "server_error"
    code = "server_shutting_down"
    retry_after = SHUTDOWN_RETRY_AFTER_SECONDS

    def __init__(self, message: str = "The server is restarting; retry the request.") -> None:
        super().__init__(message)


class _Shutdown:
    """A server's graceful shutdown, for the event loop it serves on (tests run several servers in one
    process, each on its own loop): once ``begun``, no request is admitted; once ``cut``, a run still
    talking to a provider (or one that gets that far) is ended and settled as ``server_shutdown``."""

    def __init__(self) -> None:
        self.begun = False
        self.cut = False
        self.waiters: set[asyncio.Future[None]] = set()


_shutdowns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Shutdown] = weakref.WeakKeyDictionary()


def _shutdown_here() -> _Shutdown:
    return _shutdowns.setdefault(asyncio.get_running_loop(), _Shutdown())


def shutdown_begin() -> None:
    """Refuse new requests from now on, and wake whatever waits in ``shutdown_began``."""
    shutdown = _shutdown_here()
    shutdown.begun = True
    for waiter in list(shutdown.waiters):
        if not waiter.done():
            waiter.set_result(None)


async def shutdown_began() -> None:
    """Return once the server has begun to shut down (the WebSocket consumer then closes its socket)."""
    shutdown = _shutdown_here()
    if shutdown.begun:
        return
    waiter = asyncio.get_running_loop().create_future()
    shutdown.waiters.add(waiter)
    try:
        await waiter
    finally:
        shutdown.waiters.discard(waiter)


def runs_cut_all() -> int:
    """End every run still talking to a provider, and any that gets that far from now on: each one's task
    is cancelled, the run settles as ``server_shutdown``, and its entry point tells the client in-band
    (``CompletionRun.shutdown_error``)."""
    shutdown_begin()
    _shutdown_here().cut = True
    loop = asyncio.get_running_loop()
    runs = [(run, task) for run, task in _active_runs.items() if task.get_loop() is loop]
    for run, task in runs:
        run.cut_by_shutdown(task)
    return len(runs)


async def runs_drain(*, grace_seconds: float, hurry: asyncio.Event | None = None, settle_seconds: float = 5.0) -> int:
    """A graceful shutdown of the pipeline: refuse new requests, let those in flight finish for up to
    ``grace_seconds`` (or until ``hurry`` is set), cut the rest, and wait up to ``settle_seconds`` for
    their entry points to tell their clients. Returns how many runs were cut."""
    shutdown_begin()
    loop = asyncio.get_running_loop()
    hurried = asyncio.ensure_future((hurry or asyncio.Event()).wait())
    try:
        await _requests_wait(until=loop.time() + grace_seconds, unless=hurried)
        cut = runs_cut_all()
        await _requests_wait(until=loop.time() + settle_seconds)
    finally:
        hurried.cancel()
    return cut


async def _requests_wait(*, until: float, unless: asyncio.Future[Any] | None = None) -> None:
    loop = asyncio.get_running_loop()
    while (left := until - loop.time()) > 0 and not (unless is not None and unless.done()):
        waiting: set[asyncio.Future[Any]] = {task for task in _requests_in_flight if task.get_loop() is loop}
        if not waiting:
            return
        if unless is not None:
            waiting.add(unless)
        await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)


async def runs_cancel_all(wait_seconds: float = 10.0) -> int:
    """Cut every run still talking to a provider (the server has given up on them) and wait until they
    have settled."""
    loop = asyncio.get_running_loop()
    tasks = {task for task in _active_runs.values() if task.get_loop() is loop}
    runs_cut_all()
    if tasks:
        await asyncio.wait(tasks, timeout=wait_seconds)
    return len(tasks)


def _request_track() -> None:
    task = asyncio.current_task()
    if task is not None and task not in _requests_in_flight:
        _requests_in_flight.add(task)
        task.add_done_callback(_requests_in_flight.discard)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class RunResult:
    status: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: Decimal
    usage_estimated: bool
    error_type: str = ""


def estimate_tokens(text: str) -> int:
    """Rough count for text we relayed when the provider sent no usage (about four characters a token)."""
    return math.ceil(len(text) / 4) if text else 0


def prompt_tokens_upper_bound(body: dict[str, Any]) -> int:
    """A generous upper bound of the prompt's tokens, for reservations before the call.

    Real tokenizers average about four characters a token on English and rarely fall below two, so
    half the characters of the messages and tools, plus the per-message framing and a fixed charge
    per image, stays above what a provider later bills in practice. Chat-completion and Messages API
    bodies alike (Anthropic's ``system``, ``image``, ``tool_use`` and ``tool_result`` blocks)."""
    chars = 0
    images = 0
    system = body.get("system")
    if system:
        chars += len(str(system))
    for message in body.get("messages", ()):
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    chars += len(part.get("text", ""))
                elif kind in ("image_url", "input_audio", "file", "image", "document"):
                    images += 1
                elif kind in ("tool_use", "tool_result"):
                    chars += len(str(part.get("input") or part.get("content") or ""))
        for call in message.get("tool_calls") or ():
            chars += len(str(call.get("function", {}).get("arguments", "")))
    for tool in body.get("tools") or ():
        chars += len(str(tool))
    return math.ceil(chars / 2) + 8 * len(body.get("messages", ())) + 1_600 * images + 16


def completion_reject(
    *,
    caller: Caller,
    endpoint: str,
    request_id: str,
    error: ApplicationError,
    started: float | None = None,
    body: Any = None,
    model: ResolvedModel | None = None,
    operation: str = Operation.CHAT,
) -> None:
    """The ``rejected`` ledger row of a request refused before any upstream call: for its input, its
    model, its budget, or before its body could be read at all (too large, not JSON, wrong method)."""
    requested = body.get("model") if isinstance(body, dict) else None
    usage_record_submit(
        UsageData(
            request_id=request_id,
            endpoint=endpoint,
            operation=operation,
            stream=bool(body.get("stream")) if isinstance(body, dict) else False,
            status=UsageStatus.REJECTED,
            user_id=caller.user_id,
            api_key_id=caller.api_key_id,
            provider_id=model.provider.id if model else None,
            model_id=model.id if model else None,
            provider_name=model.provider.name if model else "",
            model_name=model.name if model else _storable(requested, 128) if requested is not None else "",
            duration_ms=_ms(time.perf_counter() - started) if started is not None else 0,
            error_type=error.code or type(error).__name__,
        )
    )


def completion_reject_unverified(
    *,
    raw_key: str,
    endpoint: str,
    request_id: str,
    error: ApplicationError,
    started: float,
    body: Any = None,
    operation: str = Operation.CHAT,
) -> None:
    """The ``rejected`` row of a request whose key could not be looked up (the database was down): kept
    under the key's hash and attributed to the key when the writer gets the database back, so that this
    answer's ``x-request-id`` has its row too. A key that turns out not to exist gets none, like a 401."""
    requested = body.get("model") if isinstance(body, dict) else None
    usage_record_submit(
        UsageData(
            request_id=request_id,
            endpoint=endpoint,
            operation=operation,
            stream=bool(body.get("stream")) if isinstance(body, dict) else False,
            status=UsageStatus.REJECTED,
            model_name=_storable(requested, 128) if requested is not None else "",
            duration_ms=_ms(time.perf_counter() - started),
            error_type=error.code or type(error).__name__,
            key_hash=hash_key(raw_key),
        )
    )


def _storable(value: Any, length: int) -> str:
    """A client's value as text any database can store: no NUL, no lone surrogate, at most ``length``."""
    return str(value)[:length].replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


async def completion_start(
    *,
    caller: Caller,
    body: dict[str, Any],
    endpoint: str,
    request_id: str | None = None,
    operation: str = Operation.CHAT,
) -> CompletionRun:
    """Validate, resolve and admit a request. Nothing is sent upstream yet. ``operation``: the shape of
    ``body``, a chat completion or an Anthropic Messages request (``CompletionRun.messages_complete``).

    A request refused here (bad input, unknown or forbidden model, no budget, rate limited) still
    gets its ledger row, with status ``rejected``, because every request an authenticated caller makes
    is accounted for."""
    request_id = request_id or new_request_id()
    started = time.perf_counter()
    model: ResolvedModel | None = None
    _request_track()
    try:
        shutdown = _shutdowns.get(asyncio.get_running_loop())
        if shutdown is not None and shutdown.begun:
            raise ServerShuttingDownError()
        _VALIDATORS[operation](body)
        model = await model_resolve(body["model"])
        _check_mode(model, operation)
        if body.get("stream") and not model.supports_streaming:
            raise ApplicationError(f"The model `{model.name}` does not support streaming.", param="stream")
        embeddings = operation == Operation.EMBEDDINGS
        admission = await admission_acquire(
            user_id=caller.user_id,
            api_key_id=caller.api_key_id,
            key_allowed_model_ids=caller.key_allowed_model_ids,
            model=model,
            body=body,
            request_id=request_id,
            prompt_tokens_upper=embeddings_input_tokens(body, upper_bound=True)
            if embeddings
            else prompt_tokens_upper_bound(body),
            endpoint=endpoint,
        )
    except DATABASE_OUTAGE_ERRORS as exc:
        # The admission's own queries (a row-lock budget, a counter seeded from the ledger): a 503 with its
        # ledger row, which the writer spools until the database is back.
        error = DatabaseUnavailableError()
        completion_reject(
            caller=caller,
            endpoint=endpoint,
            request_id=request_id,
            error=error,
            started=started,
            body=body,
            model=model,
            operation=operation,
        )
        raise error from exc
    except ApplicationError as exc:
        completion_reject(
            caller=caller,
            endpoint=endpoint,
            request_id=request_id,
            error=exc,
            started=started,
            body=body,
            model=model,
            operation=operation,
        )
        raise
    return CompletionRun(
        caller=caller,
        body=body,
        endpoint=endpoint,
        request_id=request_id,
        model=model,
        admission=admission,
        started=started,
        operation=operation,
    )


def _check_mode(model: ResolvedModel, operation: str) -> None:
    """An embedding model answers /v1/embeddings only, and a chat model everything else: refused before
    admission, so a request for the wrong kind of model holds nothing."""
    if operation == Operation.EMBEDDINGS and model.mode != ModelMode.EMBEDDING:
        raise InvalidRequestError(
            f"The model `{model.name}` is not an embedding model: it answers /v1/chat/completions. "
            "GET /v1/models lists the models you may use.",
            param="model",
            code="model_not_supported",
        )
    if operation != Operation.EMBEDDINGS and model.mode == ModelMode.EMBEDDING:
        raise InvalidRequestError(
            f"The model `{model.name}` is an embedding model: use it with /v1/embeddings, not for chat.",
            param="model",
            code="model_not_supported",
        )


@dataclass(slots=True)
class _Call:
    """How a call step ended: what its settlement records besides what the step gathered."""

    status: str = UsageStatus.UPSTREAM_ERROR
    error_type: str = ""


class CompletionRun:
    """One admitted request: call the provider once, relay, and settle exactly once."""

    def __init__(
        self,
        *,
        caller: Caller,
        body: dict[str, Any],
        endpoint: str,
        request_id: str,
        model: ResolvedModel,
        admission: Admission,
        started: float,
        operation: str = Operation.CHAT,
    ) -> None:
        self.caller = caller
        self.operation = operation
        self.body = body
        self.endpoint = endpoint
        self.request_id = request_id
        self.model = model
        self.admission = admission
        self.started = started
        self.result: RunResult | None = None
        self._cancelled = False
        self._cut_by_shutdown = False
        self._settled = False
        self._upstream_started: float | None = None
        self._first_token_at: float | None = None
        self._upstream_done: float | None = None

    @property
    def response_headers(self) -> dict[str, str]:
        return self.admission.headers

    def mark_cancelled(self) -> None:
        """The user asked to stop (as opposed to going away): record the run as ``cancelled``."""
        self._cancelled = True

    def cut_by_shutdown(self, task: asyncio.Task[Any]) -> None:
        """The server is stopping and will not wait for this run: cancel its task (see ``shutdown_error``)."""
        self._cut_by_shutdown = True
        task.cancel()

    def shutdown_error(self) -> ServerShuttingDownError | None:
        """For an entry point that caught a ``CancelledError``: when the shutdown cut this run, consume that
        cancellation and return the error to tell the client (a 503, or an in-band error once a stream has
        begun); otherwise ``None``, and the cancellation must go on."""
        if not self._cut_by_shutdown:
            return None
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()
        return ServerShuttingDownError("The server is restarting and ended this reply; retry the request.")

    def _interrupted_status(self) -> str:
        if self._cancelled:
            return UsageStatus.CANCELLED
        if self._cut_by_shutdown:
            return UsageStatus.SERVER_SHUTDOWN
        return UsageStatus.CLIENT_DISCONNECTED

    def _activate(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            _active_runs[self] = task
            shutdown = _shutdowns.get(task.get_loop())
            if shutdown is not None and shutdown.cut:
                # Admitted before the shutdown's cut, reaching the provider after it: ended like the others.
                self.cut_by_shutdown(task)

    def abandon(self, *, status: str = UsageStatus.CANCELLED, error_type: str = "abandoned") -> None:
        """Settle a run that will never be called (its entry point failed after admission): the
        reservation is released and the request still gets its one ledger row, at no cost."""
        self._settle(status=status, usage={}, delivered_text="", finish_reason=None, error_type=error_type)

    def overhead_ms(self, now: float | None = None) -> float:
        """Time spent in llmhub so far, upstream time excluded."""
        now = time.perf_counter() if now is None else now
        upstream = 0.0
        if self._upstream_started is not None:
            upstream = (self._upstream_done or now) - self._upstream_started
        return max(0.0, (now - self.started - upstream) * 1000)

    def _upstream_body(self) -> dict[str, Any]:
        adapter_body = dict(self.body)
        if (
            self.admission.max_tokens is not None
            and "max_tokens" not in adapter_body
            and "max_completion_tokens" not in adapter_body
        ):
            adapter_body["max_tokens"] = self.admission.max_tokens
        return adapter_body

    @contextlib.asynccontextmanager
    async def _upstream_call(self, settle: Callable[[_Call], None]) -> AsyncIterator[_Call]:
        """The frame of every call step: time the upstream, register the run (so a shutdown can cut it),
        classify how the call ended, and settle once whatever happened. ``settle`` reads what the call
        step gathered and hands it, with the call's status, to ``_settle``."""
        call = _Call()
        self._upstream_started = time.perf_counter()
        self._activate()
        try:
            yield call
            call.status = UsageStatus.OK
        except ProviderError as exc:
            call.error_type = exc.code or type(exc).__name__
            raise
        except (asyncio.CancelledError, GeneratorExit):
            call.status = self._interrupted_status()
            raise
        finally:
            _active_runs.pop(self, None)
            self._upstream_done = time.perf_counter()
            settle(call)

    async def complete(self) -> dict[str, Any]:
        adapter = adapter_for(self.model.provider)
        body = adapter.prepare_request(self._upstream_body(), self.model)
        body.pop("stream", None)
        body.pop("stream_options", None)
        response: dict[str, Any] | None = None

        def settle(call: _Call) -> None:
            choices = (response or {}).get("choices")
            self._settle(
                status=call.status,
                usage=(response or {}).get("usage") or {},
                delivered_text="",
                finish_reason=choices[0].get("finish_reason") if choices else None,
                error_type=call.error_type,
            )

        async with self._upstream_call(settle):
            response = await adapter.complete(body)
        response["model"] = self.model.name
        return response

    async def stream(self) -> AsyncIterator[WireChunk]:
        """Relay chunks as they arrive. The client's ``stream_options.include_usage`` decides whether
        the usage chunk is passed on; the adapter always asks for it, since settlement needs it."""
        adapter = adapter_for(self.model.provider)
        body = adapter.prepare_request(self._upstream_body(), self.model)
        body["stream"] = True
        wants_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        public_name = self.model.name
        usage: dict[str, Any] = {}
        delivered: list[str] = []
        finish_reason: str | None = None

        def settle(call: _Call) -> None:
            self._settle(
                status=call.status,
                usage=usage,
                delivered_text="".join(delivered),
                finish_reason=finish_reason,
                error_type=call.error_type,
            )

        upstream = adapter.stream(body)
        async with self._upstream_call(settle):
            try:
                async for chunk in upstream:
                    if self._first_token_at is None:
                        self._first_token_at = time.perf_counter()
                    chunk.set_model(public_name)
                    chunk_usage = chunk.get("usage")
                    if chunk_usage:
                        usage = chunk_usage
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            delivered.append(delta["content"])
                        for call in delta.get("tool_calls") or ():
                            arguments = (call.get("function") or {}).get("arguments")
                            if arguments:
                                delivered.append(arguments)
                        if choice.get("finish_reason"):
                            finish_reason = choice["finish_reason"]
                    if not wants_usage and chunk_usage:
                        if not chunk.get("choices"):
                            continue
                        chunk.drop_usage()
                    yield chunk
            finally:
                await upstream.aclose()

    async def messages_complete(self, *, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """``complete`` for an Anthropic Messages request: the adapter answers with a ``message`` (passed
        through by an Anthropic-protocol provider, with the client's ``headers``; translated by the
        others), settled from its usage."""
        adapter = adapter_for(self.model.provider)
        request = {key: value for key, value in self.body.items() if key != "stream"}
        message: dict[str, Any] | None = None

        def settle(call: _Call) -> None:
            usage = (message or {}).get("usage")
            self._settle(
                status=call.status,
                usage=openai_usage(usage) if isinstance(usage, dict) else {},
                delivered_text="",
                finish_reason=(message or {}).get("stop_reason"),
                error_type=call.error_type,
            )

        async with self._upstream_call(settle):
            message = await adapter.messages(request, self.model, headers=headers)
        message["model"] = self.model.name
        return message

    async def messages_stream(self, *, headers: dict[str, str] | None = None) -> AsyncIterator[WireEvent]:
        """``stream`` for an Anthropic Messages request: relay the events as they arrive (an unchanged
        event keeps the upstream's bytes; ``message_start`` gets the public model name). Usage is read
        from ``message_start`` and ``message_delta``; a stream cut before ``message_delta`` is charged
        for what was relayed, as a cut chat stream is."""
        adapter = adapter_for(self.model.provider)
        usage: dict[str, Any] = {}
        final = False
        delivered: list[str] = []
        stop_reason: str | None = None

        def settle(call: _Call) -> None:
            self._settle(
                status=call.status,
                usage=openai_usage(usage) if final else {},
                delivered_text="".join(delivered),
                finish_reason=stop_reason,
                error_type=call.error_type,
            )

        upstream = adapter.messages_stream(self.body, self.model, headers=headers)
        async with self._upstream_call(settle):
            try:
                async for event in upstream:
                    kind = event.get("type")
                    if kind == "content_block_delta":
                        if self._first_token_at is None:
                            self._first_token_at = time.perf_counter()
                        delta = event.get("delta") or {}
                        delivered.append(delta.get("text") or delta.get("partial_json") or delta.get("thinking") or "")
                    elif kind == "message_start":
                        event.set_model(self.model.name)
                        usage = dict((event.get("message") or {}).get("usage") or {})
                    elif kind == "message_delta":
                        final = True
                        usage.update(
                            (name, value) for name, value in (event.get("usage") or {}).items() if value is not None
                        )
                        stop_reason = (event.get("delta") or {}).get("stop_reason") or stop_reason
                    yield event
            finally:
                await upstream.aclose()

    async def embed(self) -> dict[str, Any]:
        """The call and settle steps of an embeddings request: one upstream call, priced on input tokens
        only. They come from the upstream's ``usage.prompt_tokens``, else from the input (estimated, and the
        ledger row says so)."""
        adapter = adapter_for(self.model.provider)
        body = {**self.body, "model": self.model.upstream_id}
        response: dict[str, Any] | None = None
        usage: dict[str, Any] = {}
        estimated = False

        def settle(call: _Call) -> None:
            nonlocal usage, estimated
            if response is not None:
                reported = (response.get("usage") or {}).get("prompt_tokens")
                estimated = not isinstance(reported, int) or isinstance(reported, bool) or reported < 0
                if estimated:
                    reported = embeddings_input_tokens(self.body, upper_bound=False)
                usage = {"prompt_tokens": reported}
            self._settle(
                status=call.status,
                usage=usage,
                delivered_text="",
                finish_reason=None,
                error_type=call.error_type,
                usage_estimated=estimated,
            )

        async with self._upstream_call(settle):
            response = await adapter.embed(body)
        response["model"] = self.model.name
        # OpenAI's schema requires both: an upstream that left them out gets them, the usage being the
        # estimate the request was charged for.
        response.setdefault("object", "list")
        if estimated:
            response["usage"] = {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]}
        return response

    def _settle(
        self,
        *,
        status: str,
        usage: dict[str, Any],
        delivered_text: str,
        finish_reason: str | None,
        error_type: str,
        usage_estimated: bool = False,
    ) -> None:
        if self._settled:
            return
        self._settled = True
        estimated = usage_estimated or not usage
        if usage:
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        else:
            # No usage from the provider (a stream cut short, a disconnect, an error): charge for what was
            # relayed, and for the prompt only if the provider got as far as producing output.
            completion_tokens = estimate_tokens(delivered_text)
            prompt_tokens = self._prompt_estimate() if delivered_text else 0
            cached_tokens = 0
            estimated = bool(delivered_text)
        cost = cost_for(
            model=self.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
        )
        now = time.perf_counter()
        self.result = RunResult(
            status=status,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            cost=cost,
            usage_estimated=estimated,
            error_type=error_type,
        )
        upstream_ms = None
        if self._upstream_started is not None:
            upstream_ms = _ms((self._upstream_done or now) - self._upstream_started)
        ttft_ms = None
        if self._first_token_at is not None and self._upstream_started is not None:
            ttft_ms = _ms(self._first_token_at - self.started)
        usage_record_submit(
            UsageData(
                request_id=self.request_id,
                endpoint=self.endpoint,
                operation=self.operation,
                stream=bool(self.body.get("stream")),
                status=status,
                user_id=self.caller.user_id,
                api_key_id=self.caller.api_key_id,
                provider_id=self.model.provider.id,
                model_id=self.model.id,
                provider_name=self.model.provider.name,
                model_name=self.model.name,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=cached_tokens,
                cost=cost,
                usage_estimated=estimated,
                upstream_latency_ms=upstream_ms,
                ttft_ms=ttft_ms,
                duration_ms=_ms(now - self.started),
                error_type=error_type,
            ),
            admission=self.admission,
        )

    def _prompt_estimate(self) -> int:
        text = []
        for message in self.body.get("messages", ()):
            content = message.get("content")
            if isinstance(content, str):
                text.append(content)
            elif isinstance(content, list):
                text.extend(part.get("text", "") for part in content if isinstance(part, dict))
        return estimate_tokens("".join(text)) + 3 * len(self.body.get("messages", ()))


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


__all__ = [
    "Caller",
    "CompletionRun",
    "Endpoint",
    "RunResult",
    "ServerShuttingDownError",
    "caller_from_api_key",
    "caller_from_user",
    "completion_reject",
    "completion_reject_unverified",
    "completion_start",
    "models_for_caller",
    "new_request_id",
    "runs_cancel_all",
    "runs_cut_all",
    "runs_drain",
    "shutdown_began",
    "shutdown_begin",
]
