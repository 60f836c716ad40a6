"""The one pipeline every entry point runs: authenticate → resolve → admit → call → relay → settle.

REST (``api_openai``) and WebSocket (``consumers``) are thin adapters from their transport to this
module. A rule (a limit, a budget, a ledger field) is written here once. The settle step runs
whatever happens: success, upstream error, client gone, cancel — exactly one ledger row per
request, written in the background (``billing.services.ledger``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings

from billing.exceptions import ModelNotAllowedError
from billing.models import BillingSource, Endpoint, Operation, UsageStatus
from billing.pricing import cache_write_1h_price, cache_write_price, message_tier
from billing.selectors import UserLimits
from billing.services.admission import Admission, admission_acquire, model_permission_check, models_permitted
from billing.services.budgets import COMPLETIONS_MAX_TOKENS_DEFAULT, replies_billed, requested_max_tokens
from billing.services.keys import hash_key
from billing.services.ledger import usage_record_submit
from billing.services.ledger_rows import UsageData
from billing.services.settlement import CutAttempt, answered_calls_usage, request_settle, settlement_tokens
from core.exceptions import DATABASE_OUTAGE_ERRORS, ApplicationError, DatabaseUnavailableError
from core.loops import LoopRegistry
from core.request_context import request_id_bind
from core.telemetry import (
    AttemptObservation,
    RequestObservation,
    request_ended,
    request_observed,
    request_started,
)
from core.text import text_quoted, text_storable
from core.tracing import TraceStart, trace_attempt_begin, trace_attempt_end, trace_begin
from experiments.assignment import Assignment, assignment_unit, experiment_assign
from experiments.overrides import overrides_for_messages
from providers.adapters import adapter_class_for_kind, adapter_for, sends_service_tier
from providers.adapters.base import WireChunk, WireEvent
from providers.adapters.common import CHAT_FIELD_PATH, BatchesAnswered
from providers.adapters.translate_anthropic import openai_usage, reasoning_text, thinking_requested
from providers.byok import (
    UserCredential,
    byok_bind,
    byok_in_use,
    byok_key_failure,
    byok_missing,
    byok_on_own_key,
    byok_only,
    byok_paused,
    byok_refused,
    byok_refused_hints,
    byok_required_in,
    byok_servable,
    user_credentials,
)
from providers.exceptions import (
    ModelNotFoundError,
    OwnKeyRequiredError,
    ProviderAuthenticationError,
    ProviderBadRequestError,
    ProviderContextLengthError,
    ProviderError,
    ProviderNotFoundError,
    ProviderRateLimitError,
    ProviderStreamInterruptedError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    UserKeyQuotaExhaustedError,
    UserKeyRefusedError,
    model_not_found,
    upstream_model_missing,
    upstream_model_missing_error,
)
from providers.models import ModelMode, ProviderKind, url_origin
from providers.routing import (
    Outcome,
    breaker_allows,
    breaker_is_open,
    breaker_release_probe,
    breakers_retry_after,
    call_finished,
    call_started,
    caps_retry_after,
    route_candidates,
)
from providers.routing.stats import CallTicket
from providers.rules import apply_parameter_rules
from providers.selectors import factor_ceiling, model_resolve
from providers.tokens import (
    REASONING_FIELDS,
    TOOL_CALL_BLOCKS,
    prompt_token_bounds_async,
    prompt_tokens,
    served_by,
    text_tokens,
)
from providers.types import ProviderConfig, ResolvedDeployment, ResolvedModel

from .callers import Caller, caller_from_api_key, caller_from_user, model_listed_for_caller, models_for_caller
from .models import StoredResponse
from .moderation import ContentPolicyViolationError, Moderation, ModerationError, ReplyGuard, moderation_for
from .prompt_runs import RenderedPrompt, prompt_messages_render, prompt_requested
from .responses_chain import Chain, chain
from .selectors import NotFoundError, StoredInput, conversation_reach, stored_response_get, stored_response_input
from .translate_responses import responses_request_to_chat
from .validation import InvalidRequestError, check_body_and_model, check_text_length, validate_chat_request
from .validation_anthropic import validate_messages_request
from .validation_completions import validate_completions_request
from .validation_embeddings import validate_embeddings_request

logger = logging.getLogger(__name__)

# How each operation's body is checked before anything else (``completion_start``).
_VALIDATORS = {
    Operation.CHAT: validate_chat_request,
    Operation.MESSAGES: validate_messages_request,
    Operation.EMBEDDINGS: validate_embeddings_request,
    # Checked as the chat completion it is translated into (``completion_start``), once its own checks passed.
    Operation.RESPONSES: validate_chat_request,
    Operation.COMPLETIONS: validate_completions_request,
}


# Runs whose upstream call is in progress, with the task running each: a server shutting down cuts
# them (``runs_cut_all``) so that each settles in its own ``finally`` before the ledger is drained.
_active_runs: weakref.WeakValueDictionary[CompletionRun, asyncio.Task[Any]] = weakref.WeakValueDictionary()
# The tasks serving a completion request, from its start until its last byte or event has gone: what a
# graceful shutdown waits for (``runs_drain``).
# Both hold the tasks weakly: the server serving a request holds its task, and one of a loop closed with the
# request pending (its tasks not cancelled) would keep that loop alive here for good.
_requests_in_flight: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
# Seconds a client refused by a server that is shutting down is told to wait: time for another server
# (or this one, restarted) to take the request.
SHUTDOWN_RETRY_AFTER_SECONDS = 5


class StreamInternalError(ApplicationError):
    """A stream failed after its headers for a reason of ours, not the provider's: told in-band, never a
    connection dropped without an error and without the stream's end (``CompletionRun.stream_failed``)."""

    status_code = 500
    error_type = "api_error"
    code = "internal_error"

    def __init__(self, message: str = "The server had an error while processing your request.") -> None:
        super().__init__(message)


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


# An entry refers to its loop only through the futures of ``shutdown_began`` still waiting: a loop closed with one
# pending (its tasks not cancelled) is dropped when the next loop makes its entry, or it would never be collected.
_shutdowns: LoopRegistry[_Shutdown] = LoopRegistry()


def _shutdown_here() -> _Shutdown:
    loop = asyncio.get_running_loop()
    shutdown = _shutdowns.get(loop)
    if shutdown is None:
        shutdown = _shutdowns.start(loop, _Shutdown())
    return shutdown


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
    """A new request's id, bound to the log context of the task serving it: every line logged from here
    on while the request is served carries it (``core.request_context``)."""
    request_id = "req_" + uuid.uuid4().hex
    request_id_bind(request_id)
    return request_id


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
    moderation: str = "",
    assignment: Assignment | None = None,
    trace: TraceStart | None = None,
) -> None:
    """The ``rejected`` ledger row of a request refused before any upstream call: for its input, its
    model, its budget, or before its body could be read at all (too large, not JSON, wrong method).
    ``moderation``: what the input check found (a refused input says why; a flag, what). ``assignment``:
    the experiment's variant the request was assigned to before it was refused."""
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
            model_name=model.name if model else text_storable(requested, 128) if requested is not None else "",
            duration_ms=_ms(time.perf_counter() - started) if started is not None else 0,
            error_type=error.code or type(error).__name__,
            moderation=moderation[:200],
            experiment_id=assignment.experiment_id if assignment is not None else None,
            experiment_variant_id=assignment.variant_id if assignment is not None else None,
        )
    )
    now_ns = time.time_ns()
    duration = time.perf_counter() - started if started is not None else 0.0
    request_observed(
        RequestObservation(
            request_id=request_id,
            transport=endpoint,
            operation=operation,
            status=UsageStatus.REJECTED,
            model=model.name if model else "",
            provider=model.provider.name if model else "",
            provider_kind=model.provider.kind if model else "",
            error_type=error.code or type(error).__name__,
            stream=bool(body.get("stream")) if isinstance(body, dict) else False,
            duration=duration,
            overhead=duration,
            started_ns=now_ns - int(duration * 1e9),
            ended_ns=now_ns,
            experiment=assignment.header if assignment is not None else "",
            trace=trace if trace is not None else trace_begin(),
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
            model_name=text_storable(requested, 128) if requested is not None else "",
            duration_ms=_ms(time.perf_counter() - started),
            error_type=error.code or type(error).__name__,
            key_hash=hash_key(raw_key),
        )
    )


async def completion_start(
    *,
    caller: Caller,
    body: dict[str, Any],
    endpoint: str,
    request_id: str | None = None,
    operation: str = Operation.CHAT,
    shape: Callable[[ResolvedModel], list[dict[str, Any]]] | None = None,
    route: str | None = None,
    new_input: list[dict[str, Any]] | None = None,
) -> CompletionRun:
    """Validate, resolve and admit a request. Nothing is sent upstream yet. ``operation``: the shape of
    ``body``, a chat completion or an Anthropic Messages request (``CompletionRun.messages_complete``); an
    OpenAI Responses request is run as the chat completion it translates into (``chat.translate_responses``),
    the run keeping the client's body as ``client_body``.

    ``shape``: for an entry point that builds the messages from the model (the chat page trims a
    conversation's history to the model's context window): called with the resolved model, it returns the
    ``messages`` to send. ``route``: the client's ``x-llmhub-route`` hint (cost, latency, quality).
    ``new_input``: the messages the input check reads, when the rest of ``messages`` is the server's own
    history, checked as it was written (the chat socket's: its new turn and the conversation's system prompt);
    None: every message, as the client wrote them all.

    The reservation covers the most expensive model the request may end on (its fallbacks included), so
    that no fallback can spend past a budget. A request refused here (bad input, unknown or forbidden model,
    no budget, rate limited) still gets its ledger row, with status ``rejected``, because every request an
    authenticated caller makes is accounted for."""
    request_id = request_id or new_request_id()
    request_id_bind(request_id)  # also an id the caller made (a prompt run's): its log lines carry it
    started = time.perf_counter()
    trace = trace_begin()
    model: ResolvedModel | None = None
    moderation: Moderation | None = None
    assignment: Assignment | None = None
    rendered: RenderedPrompt | None = None
    client_body: dict[str, Any] | None = None
    responses_chain: Chain | None = None  # the stored response a /v1/responses request continues
    field_names: dict[str, str] | None = None  # the client's names of the fields of a translated body
    limits: UserLimits | None = None  # the user's, read by the allow-list check, which admission reuses
    _request_track()
    try:
        shutdown = _shutdowns.get(asyncio.get_running_loop())
        if shutdown is not None and shutdown.begun:
            raise ServerShuttingDownError()
        if operation != Operation.EMBEDDINGS:
            # Before anything reads the text (a template's render, moderation, the token estimate): a body of 30 MB
            # of text took seconds of CPU in the input check alone. Embeddings are not moderated, and their
            # batches of texts are long by design.
            check_text_length(body, settings.LLMHUB_MAX_REQUEST_TEXT_CHARS)
        templated = operation == Operation.CHAT and prompt_requested(body)
        if shape is not None or templated:
            # The messages depend on the model (its context window) or on the experiment's variant (a
            # template version): resolved and assigned first.
            if templated:
                check_body_and_model(body)  # a missing or malformed name: the 400 a request with messages gets
            asked = await model_resolve(body.get("model"))
            limits = await _model_permitted(caller, asked)
            model, assignment = await _experiment_enter(caller, asked, body, operation)
            if templated:
                version_id = assignment.variant.prompt_version_id if assignment is not None else None
                rendered = await prompt_messages_render(body, version_id=version_id)
                if rendered.variant_left_out:
                    model, assignment = asked, None  # as ``_experiment_enter`` leaves out who a variant cannot serve
            if shape is not None:
                body["messages"] = shape(model)
        if operation == Operation.RESPONSES:
            client_body, body, field_names, responses_chain = await _responses_translate(caller, body)
        _VALIDATORS[operation](body)
        if operation == Operation.COMPLETIONS and body.get("max_tokens") is None:
            # OpenAI's default, spelt out: left to admission, a budget's clamp would lift it (and reserve for it).
            body["max_tokens"] = COMPLETIONS_MAX_TOKENS_DEFAULT
        if model is None:
            model = await model_resolve(body["model"])
            limits = await _model_permitted(caller, model)
            model, assignment = await _experiment_enter(caller, model, body, operation)
        if assignment is not None and assignment.variant.overrides:
            # The variant's parameters (set by an admin, e.g. temperature) replace the client's, as the
            # request's protocol spells them.
            body.update(_overrides_spelled(assignment.variant.overrides, operation))
        _check_mode(model, operation)
        _check_output_limit(model, body, field_names)
        if operation == Operation.COMPLETIONS:
            model = _completions_served(model)
        if body.get("stream") and not model.supports_streaming:
            raise ApplicationError(f"The model `{model.name}` does not support streaming.", param="stream")
        fallbacks, context_fallbacks = await _fallbacks_for(caller, model, operation=operation, body=body)
        credentials = await _credentials_for(caller, [model, *fallbacks, *context_fallbacks])
        # The input check, before admission: a refused input holds nothing and nothing goes upstream.
        moderation = await moderation_for(
            caller, model, operation, request_id=request_id, fallbacks=[*fallbacks, *context_fallbacks]
        )
        if moderation is not None:
            if rendered is not None:
                await moderation.check_input(body, operation, variables=rendered.variables)
            elif new_input is None:
                await moderation.check_input(body, operation, field_names=field_names)
            else:
                await moderation.check_input({**body, "messages": new_input}, operation, fields=False)
        servers = served_by([model, *fallbacks, *context_fallbacks])  # whose formulas bound an attachment
        prompt_upper, prompt_estimate = await prompt_token_bounds_async(body, operation=operation, servers=servers)
        as_sent, forced_limit, unbounded = _body_as_sent(body, [model, *fallbacks, *context_fallbacks])
        admission = await admission_acquire(
            user_id=caller.user_id,
            api_key_id=caller.api_key_id,
            key_allowed_model_ids=caller.key_allowed_model_ids,
            model=_price_ceiling(model, [*fallbacks, *context_fallbacks]),
            body=body,
            body_as_sent=as_sent,
            request_id=request_id,
            prompt_tokens_upper=prompt_upper,
            prompt_tokens_estimate=prompt_estimate,
            endpoint=endpoint,
            own_key_only=byok_only([model, *fallbacks, *context_fallbacks], credentials),
            output_unbounded=unbounded,
            limits=limits,
            answers=_answers_most(body, [model, *fallbacks, *context_fallbacks]),
        )
        if forced_limit is not None and admission.budgeted:
            # Under a budget llmhub sends a limit when the client set none (``_upstream_body``), which a rule then
            # replaces: the limit reserved is the rule's, and the deployments without the rule get it too.
            admission.max_tokens = forced_limit
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
            moderation=moderation.summary if moderation is not None else "",
            assignment=assignment,
            trace=trace,
        )
        raise error from exc
    except ApplicationError as exc:
        client_refusal_named(field_names, exc)  # a translated body's refusal, by the client's names
        completion_reject(
            caller=caller,
            endpoint=endpoint,
            request_id=request_id,
            error=exc,
            started=started,
            body=body,
            model=model,
            operation=operation,
            moderation=moderation.summary if moderation is not None else "",
            assignment=assignment,
            trace=trace,
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
        fallbacks=fallbacks,
        context_fallbacks=context_fallbacks,
        route=route,
        credentials=credentials,
        moderation=moderation,
        assignment=assignment,
        prompt=rendered,
        trace=trace,
        client_body=client_body,
        responses_chain=responses_chain,
        field_names=field_names,
    )


async def _responses_translate(
    caller: Caller, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], Chain | None]:
    """A Responses API request as the chat completion it means (``chat.translate_responses``): the client's body
    (with a ``previous_response_id``, the stored response's input and output items before its ``input``: the
    whole conversation is the prompt, for moderation, the estimate, budgets and the ledger alike), the chat
    completion, the client's names of its fields, and the stored response it continues (None: none)."""
    if isinstance(body, dict) and body.get("store") is not None and type(body["store"]) is not bool:
        raise InvalidRequestError("Invalid type for 'store': expected a boolean.", param="store", code="invalid_type")
    previous = body.get("previous_response_id") if isinstance(body, dict) else None
    if previous is None:
        return body, *responses_request_to_chat(body), None
    if not isinstance(previous, str) or not previous:
        raise InvalidRequestError(
            "Invalid type for 'previous_response_id': expected a response's id.",
            param="previous_response_id",
            code="invalid_type",
        )
    try:
        stored, stored_input = await sync_to_async(_stored_response_reached)(caller, previous)
    except NotFoundError:
        # OpenAI's answer for an id unknown, expired or another's alike (a 400, as the SDKs and Codex expect it); the
        # id quoted as JSON can carry it (a lone surrogate cannot be encoded) and not 100,000 characters long.
        raise InvalidRequestError(
            f"Previous response with id '{text_storable(text_quoted(previous))}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        ) from None
    chained = chain(
        body,
        input_items=stored_input.items,
        output_items=stored.output_items,
        previous=stored.pk,
        length=stored_input.length,
    )
    try:
        chat, fields = responses_request_to_chat(chained.body)
    except InvalidRequestError as exc:
        exc.param = chained.field_named(exc.param) if exc.param else exc.param
        raise
    return chained.body, chat, chained.fields_named(fields), chained


def _stored_response_reached(caller: Caller, response_id: str) -> tuple[StoredResponse, StoredInput]:
    stored = stored_response_get(reach=conversation_reach(caller), response_id=response_id)
    return stored, stored_response_input(stored)


def client_field(field_names: dict[str, str] | None, param: str | None) -> str | None:
    """``param``, a field of a translated body (a ``/v1/responses`` request's chat completion), as the client named
    it (``field_names``); a field inside one the client wrote otherwise (a tool call's
    ``messages[2].tool_calls[0].function.arguments``, given as the item ``input[3]``) as that one. Any other as it
    is."""
    if not field_names or not param:
        return param
    if param in field_names:
        return field_names[param]
    end = len(param)
    while (end := max(param.rfind(".", 0, end), param.rfind("[", 0, end))) > 0:
        if param[:end] in field_names:
            return field_names[param[:end]]
    return param


def client_refusal_named(field_names: dict[str, str] | None, exc: ApplicationError) -> None:
    """``exc``, a refusal of a field of a translated body (chat validation's, an adapter's or the provider's), naming
    the client's own fields (``field_names``, ``client_field``): its ``param``, and each chat completion's path its
    message quotes, so that the two name the same field (a ``/v1/responses`` image refused as ``input[0].content``,
    its message no longer quoting ``messages[0].content[1].image_url.url``, which the client never wrote)."""
    if not field_names:
        return

    def named(path: str) -> str:
        return client_field(field_names, re.sub(r"\.\[", "[", path)) or path  # OpenAI's 400s: messages.[3].content

    exc.message = CHAT_FIELD_PATH.sub(lambda found: named(found[0]), exc.message)
    exc.args = (exc.message,)
    if exc.param is not None:
        exc.param = named(exc.param)


def _end_user(body: dict[str, Any], operation: str) -> Any:
    """The end user a request names, where its protocol puts it: OpenAI's ``user``; on ``/v1/messages``,
    which has no such field, Anthropic's ``metadata.user_id``."""
    if operation == Operation.MESSAGES:
        metadata = body.get("metadata")
        return metadata.get("user_id") if isinstance(metadata, dict) else None
    return body.get("user")


async def _model_permitted(caller: Caller, model: ResolvedModel) -> UserLimits:
    """Refuse ``model`` when the caller's plan or key excludes it (``ModelNotAllowedError``, which /v1 answers as
    a model that does not exist: ``model_refused_as_unknown``), right where a model that does not exist is refused
    (``model_resolve``) and before anything reads the model (experiment, mode, output limit, streaming, moderation,
    own keys, parameter rules), whose answer would tell a key that the model exists. The user's limits it read."""
    return await model_permission_check(
        user_id=caller.user_id, key_allowed_model_ids=caller.key_allowed_model_ids, model=model
    )


async def _experiment_enter(
    caller: Caller, model: ResolvedModel, body: dict[str, Any], operation: str
) -> tuple[ResolvedModel, Assignment | None]:
    """The model the request runs on and its experiment's variant (``experiments.assignment``), if the
    model has a running experiment and the caller's unit falls in a variant. A deployment variant narrows
    the model to that deployment; a model variant serves another public model, which the caller's plan
    and key must allow (else the caller is left out of the experiment, served as usual, and not recorded
    in it); a variant whose deployment is gone or disabled is left out the same way, and so are a text completion's
    caller of a variant only chat-only providers serve (``_completions_narrowed``), a caller of a model variant
    that does not stream or writes less than the client's output limit (the 400 would name a model the client
    never asked for), a caller of a variant whose overrides set an output limit past its model's
    (``_overrides_over``), and a caller without the own provider key a variant's deployments all require
    (``_own_keys_serve``)."""
    if operation == Operation.EMBEDDINGS:
        return model, None
    unit = assignment_unit(user_id=caller.user_id, api_key_id=caller.api_key_id, end_user=_end_user(body, operation))
    assignment = await experiment_assign(model_id=model.id, unit=unit)
    if assignment is None:
        return model, None
    variant = assignment.variant
    if variant.target_model_name is not None:
        try:
            target = await model_resolve(variant.target_model_name)
        except ModelNotFoundError:
            return model, None
        permitted = await models_permitted(
            user_id=caller.user_id, key_allowed_model_ids=caller.key_allowed_model_ids, models=[target]
        )
        if not permitted or (target.mode == ModelMode.EMBEDDING) != (operation == Operation.EMBEDDINGS):
            return model, None
        if operation == Operation.COMPLETIONS and _completions_narrowed(target) is None:
            return model, None  # a chat-only model cannot continue a text: left out, not refused
        if (body.get("stream") and not target.supports_streaming) or _output_limit_over(target, body) is not None:
            return model, None  # it cannot honour what the client asked of the model it named: left out, not refused
        if _overrides_over(target, variant.overrides, operation):
            return model, None
        if not await _own_keys_serve(caller, target):
            return model, None
        return target, assignment
    if variant.deployment_id is not None:
        chosen = next((d for d in model.deployments if d.id == variant.deployment_id), None)
        if chosen is None:
            return model, None
        if operation == Operation.COMPLETIONS and not adapter_class_for_kind(chosen.provider.kind).serves_completions:
            return model, None
        narrowed = replace(
            model,
            deployments=(chosen,),
            upstream_id=chosen.upstream_id,
            provider=chosen.provider,
            input_per_mtok=chosen.input_per_mtok,
            output_per_mtok=chosen.output_per_mtok,
            cached_input_per_mtok=chosen.cached_input_per_mtok,
            cache_write_per_mtok=chosen.cache_write_per_mtok,
            cache_write_1h_per_mtok=chosen.cache_write_1h_per_mtok,
            web_search_per_1k=chosen.web_search_per_1k,
            searches_every_request=chosen.searches_every_request,
            web_plugin_online=chosen.web_plugin_online,
            priority_price_factor=chosen.priority_price_factor,
            flex_price_factor=chosen.flex_price_factor,
        )
        if _overrides_over(narrowed, variant.overrides, operation) or not await _own_keys_serve(caller, narrowed):
            return model, None
        return narrowed, assignment
    if _overrides_over(model, variant.overrides, operation):
        return model, None
    return model, assignment


def _overrides_spelled(overrides: dict[str, Any], operation: str) -> dict[str, Any]:
    """A variant's overrides as the request's protocol spells them."""
    return overrides_for_messages(overrides) if operation == Operation.MESSAGES else overrides


def _overrides_over(model: ResolvedModel, overrides: dict[str, Any], operation: str) -> bool:
    """Whether a variant's own output limit (its ``overrides``, set by an admin) is past what ``model`` writes at
    most: every caller in it would get a 400 naming a field they never sent, so they are left out instead (the
    experiment's save and start refuse such a variant: ``experiments.services.variants_serving_problems``)."""
    return bool(overrides) and _output_limit_over(model, _overrides_spelled(overrides, operation)) is not None


async def _own_keys_serve(caller: Caller, model: ResolvedModel) -> bool:
    """Whether some deployment of ``model`` (a variant's: its deployment, or its other model) can serve the
    caller: its provider does not require the user's own key, or they have a usable one (``byok_servable``).
    Else the variant would answer 403 ``own_key_required`` for a model the caller is served on as usual:
    they are left out instead. The caller's keys are read (cached) only when some deployment requires one."""
    if not byok_required_in(model):
        return True
    credentials = await user_credentials(caller.user_id)
    return any(byok_servable(d, credentials) for d in model.deployments)


async def _credentials_for(caller: Caller, models: list[ResolvedModel]) -> dict[int, UserCredential] | None:
    """The caller's own provider keys, when any model the request may end on can use one (else None, and no
    lookup). Refused here when no deployment of any of them can serve the caller: each needs the caller's
    own key for its provider and they have none."""
    if not any(byok_in_use(m) for m in models):
        return None
    credentials = dict(await user_credentials(caller.user_id))
    missing = byok_missing(models[0], credentials)
    if missing and not any(byok_servable(d, credentials) for m in models for d in m.deployments):
        paused = {name: key for name, key in byok_paused(models[0], credentials).items() if name in missing}
        refused = await byok_refused_hints(caller.user_id, missing)
        if paused:
            # They have a key, agreed for the host the provider was moved from: not sent to the new one unasked.
            now_at = {d.provider.name: url_origin(d.provider.base_url) for d in models[0].deployments}
            moved = "; ".join(
                f"{key.hint} for {name}, given for {key.origin or 'its former host'}, now sent to {now_at[name]}"
                for name, key in sorted(paused.items())
            )
            todo = (
                f"your own API key is paused because the administrator moved the provider to another host ({moved}): "
                "confirm the new host under your provider keys (POST /api/provider-keys/{id}/confirm-host/) to use "
                "it there."
            )
        elif refused:
            # They have a key, which the provider refused: "add one" would send them looking for it.
            keys = ", ".join(f"{hint} for {name}" for name, hint in sorted(refused.items()))
            todo = (
                f"your own API key {keys} was refused by the provider: replace it under your provider keys "
                "(POST /api/provider-keys/)."
            )
        else:
            todo = "add one under your provider keys (POST /api/provider-keys/)."
        raise OwnKeyRequiredError(
            f"The model `{models[0].name}` is served only on your own API key for {', '.join(missing)}: {todo}",
            param="model",
        )
    return credentials


async def _fallbacks_for(
    caller: Caller, model: ResolvedModel, *, operation: str, body: dict[str, Any]
) -> tuple[list[ResolvedModel], list[ResolvedModel]]:
    """The model's ``fallbacks`` and ``context_window_fallbacks`` that this caller may use for this request:
    known and enabled, in the caller's plan and key allow-lists, of the right mode, streaming if asked, writing as
    much as the client's output limit asks (the model's own is checked before: ``_check_output_limit``). One
    level: a fallback's own fallbacks are not followed. Others are left out silently (the ledger row says
    which model answered). An embedding request follows none: another model's vectors are in another space,
    which the client's index cannot compare with the ones it holds (the catalog refuses such fallbacks; this
    covers rows saved before it did)."""
    if operation == Operation.EMBEDDINGS or (not model.fallbacks and not model.context_window_fallbacks):
        return [], []
    known: dict[str, ResolvedModel] = {}
    for name in {*model.fallbacks, *model.context_window_fallbacks}:
        with contextlib.suppress(ModelNotFoundError):
            known[name] = await model_resolve(name)  # cached, like the model's own lookup
    permitted = await models_permitted(
        user_id=caller.user_id, key_allowed_model_ids=caller.key_allowed_model_ids, models=list(known.values())
    )
    permitted_ids = {m.id for m in permitted}
    allowed = {name: m for name, m in known.items() if m.id in permitted_ids}

    def usable(names: tuple[str, ...]) -> list[ResolvedModel]:
        chosen: list[ResolvedModel] = []
        for name in names:
            candidate = allowed.get(name)
            if (
                candidate is None
                or candidate.id == model.id
                or any(c.id == candidate.id for c in chosen)
                or (candidate.mode == ModelMode.EMBEDDING) != (operation == Operation.EMBEDDINGS)
                or (body.get("stream") and not candidate.supports_streaming)
                # It would refuse the client's output limit, which is never lowered behind the client's back.
                or _output_limit_over(candidate, body) is not None
            ):
                continue
            if operation == Operation.COMPLETIONS:
                candidate = _completions_narrowed(candidate)
                if candidate is None:
                    continue  # a chat-only model: it would only refuse the request
            chosen.append(candidate)
        return chosen

    return usable(model.fallbacks), usable(model.context_window_fallbacks)


def _body_as_sent(
    body: dict[str, Any], models: list[ResolvedModel]
) -> tuple[dict[str, Any], int | None, list[ResolvedModel]]:
    """``body`` as admission prices it: its output limit, ``n`` and ``best_of`` each the largest that the models'
    parameter rules send (``providers.rules``: a ``fixed`` value replaces the client's, a ``rename`` moves it), so
    that the reservation covers what any deployment the request may end on is really sent. Second: when the client
    set no output limit, the largest a rule puts in place of the one llmhub sends under a budget
    (``_upstream_body``), which is then reserved instead of one picked by the budget; else None. Third: the models
    whose rules send no output limit at all (a ``drop``, of the client's or of the one llmhub sends under a
    budget), which admission reserves for at what they write at most when a budget applies
    (``admission._output_bounded``)."""
    client_limit = requested_max_tokens(body)
    out = dict(body)
    limits: list[int] = []
    unbounded: list[ResolvedModel] = []
    counts: dict[str, list[int]] = {"n": [], "best_of": []}
    for target in models:
        if not target.parameter_rules:
            continue
        # With no client limit: as sent with the one llmhub puts in under a budget (any, 1 here), which a rule may fix.
        sent = apply_parameter_rules(
            body if client_limit is not None else {**body, "max_tokens": 1}, target.parameter_rules
        )
        if sent.get("service_tier") != body.get("service_tier"):
            # A tier a rule fixes or drops (then the project's default): reserved as one not asked, at the dearest
            # tier any deployment may serve it at (``billing.pricing.reserved_tier``).
            out.pop("service_tier", None)
        limit = requested_max_tokens(sent)
        if limit is None:
            unbounded.append(target)
        elif client_limit is not None or limit != 1:
            limits.append(limit)
        for name, values in counts.items():
            value = sent.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                values.append(value)
    for name, values in counts.items():
        given = out.get(name)
        if values and not (isinstance(given, int) and not isinstance(given, bool) and given >= max(values)):
            out[name] = max(values)
    if not limits or (client_limit is not None and client_limit >= max(limits)):
        return out, None, unbounded
    out.pop("max_completion_tokens", None)
    out["max_tokens"] = max(limits)
    return out, None if client_limit is not None else max(limits), unbounded


def _asked_tier(body: dict[str, Any], model: ResolvedModel) -> str:
    """The service tier a request asked of ``model`` (``service_tier``, as the model's parameter rules send it), what
    it is charged at when no reply said one, and the dearest it may be charged at (``billing.pricing.billed_tier``).
    Empty when its provider is sent no tier (``BaseAdapter.sends_service_tier``: an Azure api-version without the
    field serves standard processing whatever was asked)."""
    if not sends_service_tier(model.provider):
        return ""
    tier = (apply_parameter_rules(body, model.parameter_rules) if model.parameter_rules else body).get("service_tier")
    return tier if isinstance(tier, str) else ""


def _price_ceiling(model: ResolvedModel, others: list[ResolvedModel]) -> ResolvedModel:
    """``model`` priced at the highest prices among it and ``others``: what admission reserves, so that the
    request may end on any of them without spending past a budget. (An unbound model is already priced at
    its most expensive deployment.)"""
    if not others:
        return model
    every = [model, *others]

    def cached(m: ResolvedModel) -> Decimal:
        return m.input_per_mtok if m.cached_input_per_mtok is None else m.cached_input_per_mtok

    caps = [m.max_output_tokens for m in every]
    return replace(
        model,
        input_per_mtok=max(m.input_per_mtok for m in every),
        output_per_mtok=max(m.output_per_mtok for m in every),
        cached_input_per_mtok=max(cached(m) for m in every),
        cache_write_per_mtok=max(cache_write_price(m) for m in every),
        cache_write_1h_per_mtok=max(cache_write_1h_price(m) for m in every),
        web_search_per_1k=max(m.web_search_per_1k for m in every),
        searches_every_request=any(m.searches_every_request for m in every),
        web_plugin_online=any(m.web_plugin_online for m in every),
        priority_price_factor=factor_ceiling([m.priority_price_factor for m in every]),
        flex_price_factor=factor_ceiling([m.flex_price_factor for m in every]),
        max_output_tokens=None if any(cap is None for cap in caps) else max(caps),  # type: ignore[type-var]
    )


def _replies_several(body: dict[str, Any], plan: list[ResolvedModel]) -> bool:
    """Whether a request may be answered with more than one reply (``n``; a text completion's ``best_of`` or several
    prompts), as the models' parameter rules send it (``_body_as_sent``): a stream of several choices is not resumed,
    since one prefill continues one reply, and the text so far is all of theirs run together (until 7 December each
    choice of the resumed attempt went on from that)."""
    return replies_billed(_body_as_sent(body, plan)[0]) > 1


def _answers_most(body: dict[str, Any], plan: list[ResolvedModel]) -> int:
    """How many attempts may answer a request that may end on ``plan``'s models, each charged what its provider ran
    before it answered (a search model's web search): one, or for a stream one more for each time it may be resumed
    on another deployment (``CompletionRun._may_resume``: a model with ``resume_on_failure``, at most its
    ``retries`` times, at least once, and never on a deployment that already failed, so at most the others; never a
    stream of several replies, ``_replies_several``)."""
    resuming = [model for model in plan if model.resume_on_failure]
    if not body.get("stream") or not resuming or _replies_several(body, plan):
        return 1
    deployments = {deployment.id for model in plan for deployment in model.deployments}
    return 1 + min(max(max(1, model.retries) for model in resuming), max(len(deployments) - 1, 0))


@contextlib.contextmanager
def model_refused_as_unknown(name: Any) -> Iterator[None]:
    """A /v1 API client's refusal of a model its plan or key excludes (``ModelNotAllowedError``) answered as that of
    a model that does not exist (``model_not_found``, 404), as OpenAI answers both and ``/v1/models/{model}`` does:
    a 403 would tell a key which models exist. Raised after the rejected ledger row, which says why."""
    try:
        yield
    except ModelNotAllowedError as exc:
        raise refusal_as_unknown_model(exc, name) from None


def refusal_as_unknown_model(exc: ApplicationError, name: Any) -> ApplicationError:
    """``exc`` as an API client is answered it (``model_refused_as_unknown``): a model the plan or key excludes as
    one that does not exist; any other refusal as it is. For a refusal reported rather than raised: the chat
    socket's, signed in with a key or a token (a program, as on /v1; the chat page's names the plan)."""
    return model_not_found(name) if isinstance(exc, ModelNotAllowedError) else exc


async def model_for_estimate(*, caller: Caller, name: Any, operation: str) -> ResolvedModel:
    """The model an endpoint that runs nothing names (``/v1/messages/count_tokens``), refused as a run of
    ``operation`` would refuse it: unknown, or excluded by the caller's plan or key (both 404, the latter before
    any check of the model), or of the wrong mode (400). An estimate for a model the caller may not use would tell
    them what the catalog holds."""
    model = await model_resolve(name)
    with model_refused_as_unknown(name):
        await _model_permitted(caller, model)
    _check_mode(model, operation)
    return model


def messages_takeable_check(model: ResolvedModel, body: dict[str, Any]) -> None:
    """Refuse, as ``/v1/messages`` would before any call, a Messages ``body`` none of ``model``'s deployments can
    take: all of them translate it (``BaseAdapter.messages_check``) and the translation cannot express it. An
    estimate for such a request would count one the model refuses."""
    kinds = {deployment.provider.kind for deployment in model.deployments} or {model.provider.kind}
    refusals: list[ProviderBadRequestError] = []
    for kind in sorted(kinds):
        try:
            adapter_class_for_kind(kind).messages_check(body)
        except ProviderBadRequestError as exc:
            refusals.append(exc)
        else:
            return
    raise refusals[0]


async def messages_counted(
    caller: Caller, model: ResolvedModel, body: dict[str, Any], *, headers: dict[str, str], request_id: str
) -> int | None:
    """The input tokens of a Messages ``body`` as ``model``'s provider counts them (``/v1/messages/count_tokens``):
    asked of the first of its deployments whose provider counts (``BaseAdapter.counts_messages``: Anthropic's API,
    exact, as it bills the request, and free) and whose circuit breaker is not open (``breaker_is_open``, as the
    router leaves it out: a provider known down would only make the caller wait out its deadline), on the caller's
    own key where that provider takes one, under the provider's deadline and outbound policy as any call. None when
    no such deployment is left, or when the one asked failed: the caller then gets the estimate, which is no failure
    of theirs, and the failure is logged at INFO (naming the provider and its error, no text of the request) for an
    operator who wonders why counts are estimated; a provider that is down says so on its real calls."""
    credentials = await user_credentials(caller.user_id) if byok_in_use(model) else {}
    for deployment in model.deployments:
        if not adapter_class_for_kind(deployment.provider.kind).counts_messages:
            continue
        if breaker_is_open(deployment):
            continue  # not asked, as no call goes there now: the next one that counts, or the estimate at once
        target = byok_bind(model.on(deployment), credentials)
        if target is None:
            continue  # served on the caller's own key only, and they have none
        try:
            return await adapter_for(target.provider).messages_count(body, target, headers=headers)
        except ProviderError as exc:
            logger.info(
                "count_tokens %s: the provider %r of %r could not count (%s), the estimate answered",
                request_id,
                target.provider.name,
                model.name,
                exc.code or type(exc).__name__,
            )
            return None
    return None


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


def _check_output_limit(model: ResolvedModel, body: dict[str, Any], field_names: dict[str, str] | None) -> None:
    """A client's output limit past what the model writes at most (the catalog's ``max_output_tokens``) is our 400
    naming it, before any upstream call, whatever protocol the model speaks: the provider would refuse it (Anthropic's
    ``max_tokens: 100000 > 64000``, OpenAI's ``max_tokens is too large``), after a call, and it is a cost ceiling the
    client set, which llmhub does not lower behind its back. ``field_names``: the client's names of a translated
    body's fields (the Responses API's ``max_output_tokens``)."""
    over = _output_limit_over(model, body)
    if over is not None:
        name, value = over
        limit = model.max_output_tokens
        given = field_names.get(name, name) if field_names else name
        raise InvalidRequestError(
            f"Invalid '{given}': {value} is more than the model `{model.name}` writes at most ({limit} tokens):"
            f" set '{given}' to {limit} or less, or leave it out.",
            param=given,
        )


def _output_limit_over(model: ResolvedModel, body: dict[str, Any]) -> tuple[str, int] | None:
    """The client's output limit (its field and value) that is past what ``model`` writes at most (the catalog's
    ``max_output_tokens``), or None: the model asked for refuses it (``_check_output_limit``), a fallback that
    cannot honour it is left out (``_fallbacks_for``)."""
    limit = model.max_output_tokens
    if not limit:
        return None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            return name, value
    return None


def _completions_narrowed(model: ResolvedModel) -> ResolvedModel | None:
    """``model`` with only the deployments whose provider serves text completions (``/v1/completions``: an
    OpenAI-compatible one, ``BaseAdapter.serves_completions``), so that routing never picks one that would refuse
    the request; None when none does. Its unbound prices stay the dearest of all its deployments: a ceiling."""
    deployments = model.deployments
    if not deployments:
        return model if adapter_class_for_kind(model.provider.kind).serves_completions else None
    serving = tuple(d for d in deployments if adapter_class_for_kind(d.provider.kind).serves_completions)
    if not serving:
        return None
    return model if len(serving) == len(deployments) else replace(model, deployments=serving)


@contextlib.contextmanager
def _prompt_named() -> Iterator[None]:
    """A text completion's context-length failure names its ``prompt``: a provider that names no field, or chat's
    ``messages`` (OpenAI-compatible servers share chat's wording), was told of no messages."""
    try:
        yield
    except ProviderContextLengthError as exc:
        if exc.param in (None, "messages"):
            exc.param = "prompt"
        raise


def _completions_served(model: ResolvedModel) -> ResolvedModel:
    """A text completion's model, narrowed to the deployments that serve one (``_completions_narrowed``); a model
    only chat-only providers serve (Anthropic, Gemini, Cohere, Azure's chat deployments) is refused before
    admission: a chat model answers a message, it does not continue a text, and a chat reply passed off as the
    prompt's continuation would not be one (``docs/completions.md``)."""
    narrowed = _completions_narrowed(model)
    if narrowed is None:
        raise InvalidRequestError(
            f"The model `{model.name}` is a chat model: it answers messages and does not continue a text, so it "
            "does not serve /v1/completions. Use it with /v1/chat/completions, or pick a model served by an "
            "OpenAI-compatible provider.",
            param="model",
            code="model_not_supported",
        )
    return narrowed


@dataclass(slots=True)
class _Call:
    """How a call step ended: what its settlement records besides what the step gathered."""

    status: str = UsageStatus.UPSTREAM_ERROR
    error_type: str = ""


T = TypeVar("T")
_END = object()


class NoDeploymentAvailableError(ProviderUnavailableError):
    """Every deployment the request could go to has its circuit breaker open (or none is left to try)."""

    status_code = 503
    code = "no_deployment_available"


def _told_to_wait(error: ProviderError, wait: float) -> ProviderError:
    """``error`` telling the client to come back in ``wait`` seconds: ``Retry-After`` whole seconds, at least 1,
    and ``retry-after-ms`` exactly, under a second too (``core.errors.error_headers``)."""
    error.retry_after = max(1.0, wait)
    error.retry_after_ms = math.ceil(round(wait * 1000, 3))
    return error


class DeploymentsAtCapacityError(ProviderRateLimitError):
    """Every deployment the request could go to is at its rpm/tpm cap for this minute."""

    code = "deployments_at_capacity"


def _retryable(exc: ProviderError) -> bool:
    """Whether another attempt (the next deployment, a fallback) may succeed where this one failed: rate
    limits, overload, 5xx, timeouts, refused or cut connections, and the failures of one deployment's own
    set-up (``_misconfigured``). A 400 never is, nor a moderation verdict (another deployment's reply would
    be checked by the same policy)."""
    if isinstance(exc, (ProviderBadRequestError, ModerationError)):
        return False
    if isinstance(exc, (ProviderAuthenticationError, ProviderNotFoundError)):
        return True
    return exc.upstream_status is None or exc.upstream_status in (408, 429, 500, 502, 503, 504, 529)


def _cannot_take(exc: ProviderError) -> bool:
    """Whether a deployment refused the request as one it cannot take: its adapter before any call (``logprobs`` to a
    provider that returns none, audio output to one that answers in text, ``providers.adapters.common``), or its
    provider with its own 400 (a parameter, or a value of one, that its model does not take: ``reasoning_effort`` to
    one that cannot reason, a ``max_tokens`` past what it writes; Mistral's 422 for a field it lacks). Met on a
    fallback, where the model asked for took the request, it says that fallback cannot serve it, not that the request
    is wrong. A moderation verdict is no such refusal."""
    return isinstance(exc, ProviderBadRequestError) and not isinstance(exc, ModerationError)


def _misconfigured(exc: ProviderError) -> bool:
    """A failure of the deployment's own set-up, not of the request: its provider refused the credentials
    (401, 403: a key revoked, rotated or without access to the model) or does not know the model id the
    catalog maps to (404). Another deployment, with its own key and id, may answer, so the request moves on
    to it at once; this deployment is not tried again for it (no wait makes the same key good)."""
    return isinstance(exc, (ProviderAuthenticationError, ProviderNotFoundError))


def _not_again(exc: ProviderError) -> bool:
    """Whether the deployment that failed so is left out for the rest of the request, and the next one tried at
    once, with no backoff: its own set-up (``_misconfigured``), or a reply that is no reply of its protocol
    (``ProviderError.malformed``: not JSON, no choices, fields of types no fill can mend), which the same
    deployment asked again at once would answer again."""
    return _misconfigured(exc) or exc.malformed


def _failed_over(exc: ProviderError, tried: list[tuple[ResolvedModel, ProviderError]]) -> None:
    """Name, in the message of ``exc`` (the failure answered), each model ``tried`` in order, each of its deployments
    that failed and how: its code, and a refusal of the request in its provider's words, which may say that the request
    itself is wrong (a fallback's is skipped, and the model's own failure answered: it must not hide it). Only the
    status, code and Retry-After of the one answered reach an SDK; LiteLLM's router likewise names the model group and
    its fallbacks in the message of the failure it raises."""
    failures: dict[str, list[str]] = {}
    for target, failure in tried:
        deployment = target.deployment.name if target.deployment is not None else target.provider.name
        said = f"{deployment}: {failure.code or type(failure).__name__}"
        if _cannot_take(failure):
            said += f": {text_quoted(failure.message.rstrip('.'), 300)}"
        if said not in failures.setdefault(target.name, []):
            failures[target.name].append(said)
    each = "; ".join(f"`{name}` ({', '.join(said)})" for name, said in failures.items())
    exc.message = f"{exc.message.rstrip()} Models tried, none answered: {each}."


def _request_at_fault(exc: ProviderError, served: ResolvedModel | None = None) -> bool:
    """Whether a failure is the request's own doing and says nothing of the provider: a request found wrong
    (the provider's 400, context length, a translation refusing a field before any call, moderation
    blocking the reply) or, met on ``served`` (the attempt's target), a failure of the user's own provider
    key (``byok_key_failure``: refused, out of quota, rate limited, without the model). Its ledger row is
    ``invalid``, not ``upstream_error``, and the deployment's breaker does not count it."""
    if isinstance(exc, (ProviderBadRequestError, UserKeyRefusedError, UserKeyQuotaExhaustedError)):
        return True
    return served is not None and byok_key_failure(served, exc)


def _outcome(exc: ProviderError, served: ResolvedModel | None = None) -> str:
    """What a failed attempt (on ``served``) says about the deployment, for its breaker: a failure that is
    the request's fault (``_request_at_fault``) says nothing, nor does moderation (its own service
    unavailable included); anything else, the platform's bad credentials included, counts against it."""
    if _request_at_fault(exc, served) or isinstance(exc, ModerationError):
        return Outcome.NEUTRAL
    return Outcome.FAILURE


class CompletionRun:
    """One admitted request: route it to a deployment (retrying on others and on the model's fallbacks
    until one answers), relay, and settle exactly once."""

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
        fallbacks: list[ResolvedModel] | None = None,
        context_fallbacks: list[ResolvedModel] | None = None,
        route: str | None = None,
        credentials: dict[int, UserCredential] | None = None,
        moderation: Moderation | None = None,
        assignment: Assignment | None = None,
        prompt: RenderedPrompt | None = None,
        trace: TraceStart | None = None,
        client_body: dict[str, Any] | None = None,
        responses_chain: Chain | None = None,
        field_names: dict[str, str] | None = None,
    ) -> None:
        self.caller = caller
        # The body as the client wrote it, when ``body`` is its translation (``/v1/responses``); None: the same.
        self.client_body = client_body
        # The client's names of the translated body's fields (``max_completion_tokens`` -> ``max_output_tokens``).
        self.field_names = field_names
        # The stored response a ``/v1/responses`` request continues (``previous_response_id``); None: none.
        self.responses_chain = responses_chain
        self.trace = trace  # its place in a trace while tracing is on (``core.tracing``); None: not traced
        self.assignment = assignment  # the experiment's variant this request was assigned to; None: none
        self.prompt = prompt  # the prompt template version a templated request ran (chat.prompt_runs); None: none
        self.credentials = credentials  # the caller's own provider keys; None: no model here can use one
        self.operation = operation
        self.body = body
        self.endpoint = endpoint
        self.request_id = request_id
        self.model = model
        self.admission = admission
        self.started = started
        self.fallbacks = fallbacks or []
        self.context_fallbacks = context_fallbacks or []
        self.route = route
        # The model bound to the deployment of the latest attempt: the one that answered, once one has.
        self.served: ResolvedModel | None = None
        self.attempts = 0
        self.resumed = False  # a stream that failed midway and was continued on another deployment
        # Each attempt that failed midway before a resume: on whose key it ran, its prompt and completion tokens
        # (``request_settle`` charges each payer its own attempts' part of the row).
        self._cut_billed: list[CutAttempt] = []
        # The service tier the provider said it served the request at (OpenAI's reply's, or a chunk's,
        # ``service_tier``): what its tokens are charged at; "" until a reply says one (then the one asked is).
        # A stream resumed on another deployment forgets the failed attempt's: the row is charged the answering
        # attempt's usage at that deployment's prices, so at the tier that attempt says.
        self.served_tier = ""
        # The request's moderation policies and what they found (the ledger row's ``moderation``); None: none.
        self.moderation = moderation
        self._input_refused: Exception | None = None  # what every fallback's own policy refused: the answer
        self.result: RunResult | None = None
        self._ticket: CallTicket | None = None
        self._cancelled = False
        self._cut_by_shutdown = False
        self._settled = False
        self._upstream_started: float | None = None
        self._first_token_at: float | None = None
        self._upstream_done: float | None = None
        # Every upstream call made, for the operator's metrics and traces (``core.telemetry``).
        self.attempt_log: list[AttemptObservation] = []
        self._attempt_started: tuple[float, int, int] | None = None  # perf_counter, time_ns, its span's id
        request_started()

    @property
    def response_headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` from admission, and who answered: provider, deployment and attempts made."""
        headers = dict(self.admission.headers)
        served = self.served
        if served is not None and served.deployment is not None:
            headers["x-llmhub-provider"] = served.provider.name
            headers["x-llmhub-deployment"] = served.deployment.name
            headers["x-llmhub-model"] = served.name
        if self.attempts:
            headers["x-llmhub-attempts"] = str(self.attempts)
        if self.assignment is not None:
            headers["x-llmhub-experiment"] = self.assignment.header
        if self.prompt is not None:
            headers["x-llmhub-prompt"] = self.prompt.header
        return headers

    @property
    def answered_by(self) -> ResolvedModel:
        """The model (bound to its deployment) that answered, or the one asked for before any attempt."""
        return self.served or self.model

    def mark_cancelled(self) -> None:
        """The user asked to stop (as opposed to going away): record the run as ``cancelled``."""
        self._cancelled = True

    def cut_by_shutdown(self, task: asyncio.Task[Any]) -> None:
        """The server is stopping and will not wait for this run: cancel its task (see ``shutdown_error``)."""
        self._cut_by_shutdown = True
        task.cancel()

    def client_refusal_named(self, exc: ApplicationError) -> None:
        """An error about the body sent (a provider's refusal) naming the client's fields, in its ``param`` and its
        message: a ``/v1/responses`` request's own names, not its chat completion's (``client_refusal_named``)."""
        client_refusal_named(self.field_names, exc)

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

    def stream_failed(self, exc: Exception) -> StreamInternalError:
        """For an entry point whose stream raised something other than ``ProviderError`` after its headers:
        log it with the request id (its traceback, no request body) and return the in-band error to end the
        stream with. The row was settled already, once, by the call step (``_upstream_call``)."""
        logger.error(
            "the stream of %s failed after it began (%s); ended with an in-band internal_error",
            self.request_id,
            type(exc).__name__,
            exc_info=exc,
        )
        return StreamInternalError()

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

    def _upstream_body(self, target: ResolvedModel) -> dict[str, Any]:
        """The body for an attempt on ``target``, with the output limit admission picked under a budget when the
        client set none: fitted under what ``target`` writes at most, since it was picked under the largest such
        limit of the model and its fallbacks (``_price_ceiling``), which a fallback may not reach."""
        adapter_body = dict(self.body)
        if (
            self.admission.max_tokens is not None
            and "max_tokens" not in adapter_body
            and "max_completion_tokens" not in adapter_body
        ):
            most = target.max_output_tokens
            adapter_body["max_tokens"] = min(self.admission.max_tokens, most) if most else self.admission.max_tokens
        return adapter_body

    @contextlib.asynccontextmanager
    async def _upstream_call(self, settle: Callable[[_Call], None]) -> AsyncIterator[_Call]:
        """The frame of every call step: time the upstream, register the run (so a shutdown can cut it),
        classify how the call ended, and settle once whatever happened. ``settle`` reads what the call
        step gathered and hands it, with the call's status, to ``_settle``."""
        call = _Call()
        self._upstream_started = time.perf_counter()
        self._activate()
        loop = asyncio.get_running_loop()
        ended = False
        try:
            yield call
            call.status = UsageStatus.OK
            ended = True
        except ProviderError as exc:
            call.error_type = exc.code or type(exc).__name__
            if _request_at_fault(exc, self.served):
                call.status = UsageStatus.INVALID
            self._ticket_close(_outcome(exc, self.served))
            raise
        except InvalidRequestError as exc:
            if exc is self._input_refused:  # by a fallback's policy before any call (a prompt of token ids)
                call.error_type = exc.code or type(exc).__name__
                call.status = UsageStatus.INVALID
            raise
        except (asyncio.CancelledError, GeneratorExit):
            call.status = self._interrupted_status()
            self._ticket_close(Outcome.NEUTRAL)
            raise
        finally:
            _active_runs.pop(self, None)
            self._upstream_done = time.perf_counter()
            if not loop.is_closed():
                self._call_settle(settle, call, ended=ended)
            else:
                # Its loop was closed under it (its tasks not cancelled), and the collector closes it here, outside
                # any loop: no row can be submitted (the ledger's writer is a task of a loop). Its in-flight record
                # stays in Redis, and the lost-request sweep writes its row. This process runs it no more: it
                # leaves the in-flight gauge, which only a settlement would otherwise take it from.
                request_ended()

    def _call_settle(self, settle: Callable[[_Call], None], call: _Call, *, ended: bool) -> None:
        """``settle`` the call step that ended as ``call`` says (``ended``: it had ended well)."""
        try:
            settle(call)
        except Exception:
            # What the call step gathered could not be settled (a piece of the reply that is no text): the
            # row is written all the same, its tokens estimated without the reply, and a call that had
            # ended well fails now, for the entry point to report (``stream_failed``).
            logger.exception("settling %s failed; its row is written without the reply", self.request_id)
            self._settle(
                status=UsageStatus.UPSTREAM_ERROR,
                usage=None,
                delivered_text="",
                finish_reason=None,
                error_type=StreamInternalError.code,
            )
            if ended:
                raise

    # The call loop -----------------------------------------------------------------------------------

    def _ticket_close(self, outcome: str, *, tokens: int = 0, error_type: str = "") -> None:
        """Report the attempt still open (a stream's, until its end) to routing; once."""
        ticket, self._ticket = self._ticket, None
        opened, self._attempt_started = self._attempt_started, None
        if opened is not None and self.served is not None and self.served.deployment is not None:
            served = self.served
            self.attempt_log.append(
                AttemptObservation(
                    deployment=served.deployment.name,
                    provider=served.provider.name,
                    provider_kind=served.provider.kind,
                    model=served.name,
                    upstream_model=served.upstream_id,
                    started=opened[0],
                    ended=time.perf_counter(),
                    started_ns=opened[1],
                    ended_ns=time.time_ns(),
                    outcome=outcome,
                    error_type=error_type,
                    span_id=opened[2],
                    base_url=served.provider.base_url,
                )
            )
            if outcome == Outcome.FAILURE:
                # The operator's first clue to a provider going bad; the request id is on the line.
                logger.warning(
                    "upstream attempt %d on deployment %s (provider %s, model %s) failed: %s",
                    len(self.attempt_log),
                    served.deployment.name,
                    served.provider.name,
                    served.upstream_id,
                    error_type or "error",
                )
        if ticket is not None:
            ttft = None
            if self._first_token_at is not None and self._first_token_at >= ticket.started:
                ttft = self._first_token_at - ticket.started
            call_finished(ticket, outcome=outcome, ttft_s=ttft, tokens=tokens)

    def _plan(self) -> list[ResolvedModel]:
        return [self.model, *self.fallbacks]

    async def _call(
        self, once: Callable[[ResolvedModel], Awaitable[T]], *, exclude: frozenset[int] | set[int] = frozenset()
    ) -> T:
        """Run ``once`` on one deployment after another until one answers: the model's deployments in the
        order its strategy gives (``1 + retries`` attempts, skipping open breakers), then each fallback
        model's the same way. A retryable failure moves on after a backoff with full jitter (honouring the
        provider's Retry-After before the same deployment is tried again); any other failure is the answer.
        A context-length failure moves to the model's ``context_window_fallbacks`` instead. One deadline
        bounds the whole loop. The attempt that answered stays open for routing's statistics until the run
        settles (a stream, at its end), when its tokens are known (the deployment's tpm cap).

        A failure answered once a fallback was tried names every model tried and how it failed (``_failed_over``):
        the one answered is one attempt's, and the client would not know the others', a fallback's refusal of the
        request among them."""
        tried: list[tuple[ResolvedModel, ProviderError]] = []
        try:
            return await self._call_plan(once, exclude=exclude, tried=tried)
        except ProviderError as exc:
            if any(target.name != self.model.name for target, _ in tried) and not isinstance(exc, ModerationError):
                _failed_over(exc, tried)
            raise

    async def _call_plan(
        self,
        once: Callable[[ResolvedModel], Awaitable[T]],
        *,
        exclude: frozenset[int] | set[int],
        tried: list[tuple[ResolvedModel, ProviderError]],
    ) -> T:
        """``_call``'s loop; each failed attempt (a skipped fallback's refusal too) is added to ``tried``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.LLMHUB_REQUEST_DEADLINE_SECONDS
        plan = self._plan()
        switched_for_context = False
        last: ProviderError | None = None
        last_deployment: ResolvedDeployment | None = None
        failures = 0
        index = 0
        refused: Exception | None = None  # the first fallback's refusal by a moderation policy of its own
        # The first fallback that could not take the request (its adapter or its provider refused it, ``_cannot_take``,
        # or its window is too small for it), and the target of the last failed attempt, which the row names when that
        # failure is the answer.
        unsent: ProviderError | None = None
        failed_on: ResolvedModel | None = None
        # The deployments' rpm/tpm caps stand for the platform's account: an attempt on the user's own key is
        # neither held to them nor counted toward them.
        own_key = functools.partial(byok_on_own_key, credentials=self.credentials) if self.credentials else None
        while index < len(plan):
            model = plan[index]
            index += 1
            if model is not self.model and self.moderation is not None:
                # A fallback's own input policy, applied before it is tried: a refusal skips it.
                verdict = await self.moderation.check_fallback(model)
                if verdict is not None:
                    refused = refused or verdict
                    continue
            candidates = [d for d in route_candidates(model, hint=self.route, own_key=own_key) if d.id not in exclude]
            if self.credentials is not None:  # a provider that requires the caller's own key they lack: skipped
                candidates = [d for d in candidates if byok_servable(d, self.credentials)]
            budget = 1 + model.retries
            skipped = 0
            position = 0
            while budget > 0 and candidates and skipped < len(candidates):
                deployment = candidates[position % len(candidates)]
                position += 1
                if not await breaker_allows(deployment):
                    skipped += 1
                    continue
                skipped = 0
                if last is not None and not _not_again(last):
                    try:
                        await self._backoff(failures, last, same=deployment == last_deployment, deadline=deadline)
                    except BaseException:
                        breaker_release_probe(deployment.id)  # a half-open probe it claimed goes unused
                        raise
                budget -= 1
                target = model.on(deployment)
                if self.credentials is not None:
                    target = byok_bind(target, self.credentials) or target
                self.served = target
                self.attempts += 1
                self._ticket = call_started(deployment.id, own_key=target.provider.credential_id is not None)
                self._attempt_started = (
                    time.perf_counter(),
                    time.time_ns(),
                    trace_attempt_begin(self.trace, target.provider.kind),
                )
                try:
                    async with asyncio.timeout_at(deadline):
                        try:
                            result = await once(target)
                        finally:
                            trace_attempt_end()
                except TimeoutError:
                    self._ticket_close(Outcome.FAILURE, error_type="timeout")
                    raise ProviderTimeoutError(
                        f"No deployment answered within {settings.LLMHUB_REQUEST_DEADLINE_SECONDS:g} seconds, "
                        "the request's deadline.",
                        provider=target.provider.name,
                    ) from None
                except ProviderContextLengthError as exc:
                    self._ticket_close(Outcome.NEUTRAL)
                    tried.append((target, exc))
                    if model is not self.model and not switched_for_context:
                        # Too long for a fallback's smaller window, not for the model asked for: skipped as one that
                        # cannot take the request (``_cannot_take``); its other deployments share its window.
                        unsent = unsent or exc
                        break
                    if switched_for_context or not self.context_fallbacks:
                        raise
                    # Too long for this model: the models with larger windows, in their order, and nothing else.
                    switched_for_context = True
                    plan, index, last, last_deployment, failures = list(self.context_fallbacks), 0, None, None, 0
                    break
                except ProviderError as exc:
                    # A 404 for an upstream id the health round found missing: the catalog's, on any key.
                    failure = upstream_model_missing(target, exc)
                    refusal = byok_refused(target, failure)
                    # A failure of a user's own key says nothing of the deployment: its breaker does not count it.
                    self._ticket_close(_outcome(failure, target), error_type=failure.code or type(failure).__name__)
                    tried.append((target, failure))
                    if refusal is not failure:
                        raise refusal from exc
                    if model is not self.model and _cannot_take(failure):
                        # A fallback that cannot take what the request asks and the model asked for took: skipped,
                        # as one that cannot stream is left out, never asked again. Its other deployments (another
                        # provider may take it) are tried: the refusal is no failure to spend a retry on. Told to
                        # the operator, whose fallback may be set up wrong (a model that takes less than the first).
                        logger.warning(
                            "fallback model %s refused the request on deployment %s (provider %s): %s; skipped",
                            model.name,
                            deployment.name,
                            target.provider.name,
                            failure.code or type(failure).__name__,
                        )
                        unsent = unsent or failure
                        candidates = [c for c in candidates if c is not deployment]
                        position -= 1
                        budget += 1
                        continue
                    if not _retryable(failure):  # never one ``upstream_model_missing`` made: a 404 moves on
                        raise
                    if _not_again(failure):
                        # Not this deployment again for this request; the next one moves into its place.
                        candidates = [c for c in candidates if c is not deployment]
                        position -= 1
                    if exc.answered is not None:
                        # Part of a split request was answered here, and paid: only this deployment finishes it,
                        # sending the rest (another would embed every input again, maybe in another space).
                        candidates = [c for c in candidates if c is deployment]
                        position, index = 0, len(plan)
                    last, last_deployment, failed_on = failure, deployment, target
                    failures += 1
                    continue
                except BaseException:
                    self._ticket_close(Outcome.NEUTRAL)
                    raise
                return result
        if refused is not None and last is None:
            # No attempt failed (none was made, or the plan was switched for context): every model left was refused
            # by its own policy, and the first refusal is the answer. A failed attempt's error is, when there is one.
            self._input_refused = refused
            raise refused
        if last is not None:
            if unsent is not None:
                self.served = failed_on  # the failure answered is that attempt's, not the skipped fallback's
            raise last
        if unsent is not None:  # no attempt failed (the plan was switched for context): what it would answer
            raise unsent
        waits = [wait for wait in (caps_retry_after(m, own_key=own_key) for m in plan) if wait is not None]
        if waits:
            error = DeploymentsAtCapacityError(
                f"Every deployment of the model `{self.model.name}` is at its rate limit for this minute; "
                "retry after the time in Retry-After.",
                provider="",
            )
            raise _told_to_wait(error, min(waits))
        missing = [d for m in plan for d in m.deployments]
        if missing and all(d.upstream_model_missing_since is not None for d in missing):
            # Left out by the breakers the health round opened because the provider lacks every one's upstream id:
            # say what is wrong rather than "retry shortly".
            raise upstream_model_missing_error(self.model.name, missing)
        error = NoDeploymentAvailableError(
            f"No deployment of the model `{self.model.name}` is available right now (every one is failing and "
            "its circuit breaker is open); retry after the time in Retry-After.",
            provider="",
        )
        # When the first breaker lets a call through again: without it the SDKs retried within a second, and failed.
        wait = breakers_retry_after(plan)
        raise error if wait is None else _told_to_wait(error, wait)

    async def _backoff(self, failures: int, last: ProviderError, *, same: bool, deadline: float) -> None:
        """Full jitter: a uniform wait in [0, min(cap, base * 2**(n-1))]; at least the provider's Retry-After
        before the same deployment is tried again. A wait that would pass the deadline, or a Retry-After
        longer than ``LLMHUB_RETRY_AFTER_MAX_SECONDS``, ends the loop with the last failure instead."""
        ceiling = min(
            settings.LLMHUB_RETRY_BACKOFF_CAP_SECONDS,
            settings.LLMHUB_RETRY_BACKOFF_BASE_SECONDS * 2 ** max(failures - 1, 0),
        )
        wait = random.uniform(0, ceiling)  # noqa: S311 (spreading retries, not secrets)
        if same and last.retry_after:
            if last.retry_after > settings.LLMHUB_RETRY_AFTER_MAX_SECONDS:
                raise last
            wait = max(wait, last.retry_after)
        loop = asyncio.get_running_loop()
        if loop.time() + wait >= deadline:
            raise last
        if wait > 0:
            await asyncio.sleep(wait)

    def _idle_timeout(self) -> float:
        served = self.answered_by
        return served.stream_idle_timeout or settings.LLMHUB_STREAM_IDLE_TIMEOUT_SECONDS

    async def _relay(
        self, first: Any, upstream: AsyncIterator[Any], *, keepalive: Callable[[Any], bool] | None = None
    ) -> AsyncIterator[Any]:
        """The chunks of an opened stream: ``first`` (already received), then the rest, each within the idle
        timeout. A stall, like a cut, ends the stream with ``ProviderStreamInterruptedError``. An item
        ``keepalive`` says is one (Claude's ``ping``) is relayed but is no progress: the upstream's waits before it
        and after it count as one, so an upstream that only pings is a stall (until 7 December each ping reset the
        timeout of a ``/v1/messages`` stream, which was held open for as long as its upstream pinged).

        The idle timeout is one watchdog per stream (``_IdleWatch``), not an ``asyncio.timeout`` per chunk:
        that armed and cancelled a timer (a heap entry) for every chunk, the relay's largest cost after the
        socket write."""
        if first is not _END:
            yield first
        idle = self._idle_timeout()
        watch = _IdleWatch(idle)
        step = upstream.__anext__
        owed = 0.0  # the upstream's waits since its last item that was not a keep-alive
        try:
            while True:
                # The wait for the next chunk begins: time the client took to read the last one is not counted.
                watch.last = watch.loop.time() - owed
                watch.waiting = True
                try:
                    item = await step()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not watch.expired():
                        raise
                    name = self.answered_by.provider.name
                    raise ProviderStreamInterruptedError(
                        f"The stream from the provider {name!r} was interrupted: nothing arrived for {idle:g} seconds.",
                        provider=name,
                    ) from None
                watch.waiting = False
                owed = watch.loop.time() - watch.last if keepalive is not None and keepalive(item) else 0.0
                yield item
        finally:
            watch.close()

    @staticmethod
    async def _first(upstream: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
        """Open a stream: wait for its first item (``_END`` if it has none). A failure before it closes the
        stream and raises, so that the call loop can try elsewhere."""
        try:
            first = await anext(upstream)
        except StopAsyncIteration:
            first = _END
        except BaseException:
            with contextlib.suppress(Exception):
                await upstream.aclose()  # type: ignore[attr-defined]
            raise
        return first, upstream

    # The call steps ----------------------------------------------------------------------------------

    async def complete(self) -> dict[str, Any]:
        response: dict[str, Any] | None = None
        searches = 0  # the web searches the latest attempt had its provider run (``BaseAdapter.web_searches``)

        async def once(target: ResolvedModel) -> dict[str, Any]:
            nonlocal searches
            adapter = adapter_for(target.provider)
            body = adapter.prepare_request(self._upstream_body(target), target)
            body.pop("stream", None)
            body.pop("stream_options", None)
            searches = adapter.web_searches(body, target)
            if self.operation == Operation.COMPLETIONS:
                with _prompt_named():
                    return await adapter.text_complete(body)
            return await adapter.complete(body)

        def settle(call: _Call) -> None:
            choices = (response or {}).get("choices")
            usage = _mapping((response or {}).get("usage"))
            self._settle(
                status=call.status,
                usage=usage,
                # Counted when the upstream reported no usage billing can take (none, or none it can read): the
                # reply is what was delivered.
                delivered_text="" if response is None else _completion_text(response, calls=True),
                finish_reason=choices[0].get("finish_reason") if choices else None,
                error_type=call.error_type,
                # Those of the attempt that answered; a refused or failed one is billed none.
                web_searches=searches if response is not None else 0,
            )

        async with self._upstream_call(settle):
            response = await self._call(once)
            self._tier_said(response)
            await self._reply_check(_completion_text(response), _completion_arguments(response))
        response["model"] = self.answered_by.name
        if self.result is not None and self.result.usage_estimated:
            # What the request was charged, which OpenAI's clients read (the upstream reported none it could read,
            # or left one of its counts out: its breakdowns stay).
            prompt, completion = self.result.prompt_tokens, self.result.completion_tokens
            response["usage"] = {
                **(_mapping(response.get("usage")) or {}),
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return response

    async def _reply_guard(self, current: ReplyGuard | None = None) -> ReplyGuard | None:
        """The output check of the reply of the model that answered (``answered_by``, a fallback too): built once
        the call loop has chosen it, before anything it wrote is relayed (``Moderation.output_for``). ``current``:
        the guard of a stream that attempt resumes, kept while the writer's policies are the same."""
        if self.moderation is None:
            return None
        return await self.moderation.output_for(self.answered_by, current)

    async def _reply_check(self, text: str, arguments: list[str]) -> None:
        """The output check of a whole reply, once it has come (and been paid for): its text and its tool calls'
        ``arguments`` (JSON, read decoded). A ``block`` hit answers ``content_policy_violation`` instead of the
        reply, which is billed all the same."""
        guard = await self._reply_guard()
        if guard is None:
            return
        try:
            await guard.check(text, arguments=arguments)
        finally:
            guard.close()

    async def stream_open(self) -> AsyncIterator[WireChunk]:
        """``stream``, once its first chunk has arrived: every entry point waits for it before answering, so
        that a failure before any output (every deployment and fallback failed) is a proper error (an HTTP
        status, an ``error`` event) and not a stream that begins and breaks. Raises ``ProviderError`` then."""
        return await _opened(self.stream())

    async def stream(self) -> AsyncIterator[WireChunk]:
        """Relay chunks as they arrive. Until the first chunk, a failure falls over to the next deployment
        (``_call``); after it, a failure (a cut, a stall past the idle timeout, a malformed chunk) ends the
        stream with ``ProviderError``, which the entry point reports in-band, never as a clean end; unless
        the model opted into ``resume_on_failure`` (``_resume``). The client's
        ``stream_options.include_usage`` decides whether the usage chunk is passed on; the adapter always
        asks for it, since settlement needs it."""
        wants_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        usage: dict[str, Any] = {}
        delivered: list[str] = []
        # Whether the model wrote anything, relayed or not: a stream the output check cuts on its first words
        # relays nothing, but the provider processed the prompt and billed it.
        output_arrived = False
        # What the model wrote, relayed or held back by the output check when the client left or the stream was
        # cut: the provider billed it all. What the client has is ``delivered``.
        written: list[str] = []
        text: list[str] = []  # the reply's text alone: what a resumed attempt is given as its prefill
        finish_reason: str | None = None
        # The client holds what no prefill continues: part of a call, or Claude's signed thinking.
        unresumable = False
        thought = False  # the current attempt's upstream request had Claude think: it refuses a text prefill
        # Whether the client has the model's reasoning, and whether a resumed attempt's is to be set apart from it.
        reasoned = set_apart = False
        # Completion tokens of the parts delivered by attempts that failed midway, before a resume; and where in
        # ``delivered`` the attempt relayed now began.
        earlier_tokens = 0
        attempt_began = 0
        # The prompts of those attempts, which the provider billed each (``_prompt_billed``); and the prefill the
        # attempt relayed now was given, part of its prompt.
        earlier_prompt = 0
        prefilled = ""
        # The upstream's usage left one of its counts out, which the client was told as the estimate it is charged.
        usage_filled = False
        # The output check, built for the model that answered once it has (each piece is fed to it before it is
        # relayed). What it reads: the reply and the model's reasoning, which every client shows (the chat page too).
        guard: ReplyGuard | None = None
        checked = _chunk_pieces
        # The web searches of every attempt that answered (its first chunk came: a search model searched before it
        # wrote), a resumed stream's failed ones too, which the provider billed; and those the latest attempt asked.
        searched = asking = 0

        def once_with(prefill: str | None) -> Callable[[ResolvedModel], Awaitable[tuple[Any, Any]]]:
            async def once(target: ResolvedModel) -> tuple[Any, AsyncIterator[WireChunk]]:
                nonlocal asking
                adapter = adapter_for(target.provider)
                body = self._upstream_body(target)
                if prefill is not None:
                    given = _prefill_for(target, prefill)
                    body["messages"] = [*body["messages"], {"role": "assistant", "content": given}]
                    # The reply's token limit (the reservation's too) covers both parts: the rest only.
                    for limit in ("max_tokens", "max_completion_tokens"):
                        if isinstance(body.get(limit), int):
                            body[limit] = max(1, body[limit] - text_tokens(prefill))
                body = adapter.prepare_request(body, target)
                body["stream"] = True
                nonlocal thought
                thought = _claude_thinks(target.provider, body)
                asking = adapter.web_searches(body, target)
                if self.operation == Operation.COMPLETIONS:
                    with _prompt_named():
                        return await self._first(adapter.text_stream(body))
                return await self._first(adapter.stream(body))

            return once

        def settle(call: _Call) -> None:
            reported = usage
            if reported and earlier_tokens:
                completion = int(reported.get("completion_tokens") or 0) + earlier_tokens
                reported = {**reported, "completion_tokens": completion}
            self._settle(
                status=call.status,
                usage=reported,
                delivered_text=_reply_counted(delivered, written, call),
                output_arrived=output_arrived or bool(delivered),
                finish_reason=finish_reason,
                error_type=call.error_type,
                usage_partly_estimated=bool(earlier_tokens) or usage_filled,
                earlier_prompt_tokens=earlier_prompt,
                web_searches=searched,
            )

        def arrived(chunk: WireChunk) -> None:
            nonlocal usage, output_arrived
            self._tier_said(chunk)
            if chunk.get("usage"):
                usage = chunk["usage"]
            pieces = [piece for _, piece, _ in _chunk_pieces(chunk) if piece]
            written.extend(pieces)
            output_arrived = output_arrived or bool(pieces)

        upstream: AsyncIterator[WireChunk] | None = None
        opening: WireChunk | None = None  # the stream's first chunk: its id and time, for a usage chunk owed
        async with self._upstream_call(settle):
            try:
                first, upstream = await self._call(once_with(None))
                searched += asking
                guard = await self._reply_guard()
                public_name = self.answered_by.name  # the name the stream began with, kept if it is resumed
                failed: set[int] = set()
                while True:
                    chunks = self._relay(first, upstream)
                    if guard is not None:
                        # The output check: each chunk's text is checked before it is relayed (held back
                        # while the text so far may end in a blocked word), and the whole reply at its end.
                        chunks = guard.relay(chunks, checked, arrived=arrived)
                    try:
                        async for chunk in chunks:
                            if self._first_token_at is None:
                                self._first_token_at = time.perf_counter()
                                opening = chunk
                            if failed and _role_only(chunk) and not _resumed_reasoning(chunk, apart=set_apart):
                                continue  # a resumed attempt's opening chunk: the client's stream began long ago
                            chunk.set_model(public_name)
                            self._tier_said(chunk)
                            chunk_usage = chunk.get("usage")
                            if chunk_usage:
                                usage = chunk_usage
                            # What the model wrote: its text, its tool calls' and its function call's arguments.
                            pieces = [piece for _, piece, _ in _chunk_pieces(chunk) if piece]
                            delivered.extend(pieces)
                            if guard is None:  # else the check saw it arrive (``arrived``)
                                written.extend(pieces)
                            for choice in chunk.get("choices") or ():
                                delta = choice.get("delta") or {}
                                if reasoning_text(delta):
                                    reasoned, set_apart = True, False
                                if delta.get("content"):
                                    text.append(delta["content"])
                                if delta.get("tool_calls") or delta.get("function_call"):
                                    unresumable = True  # a call the client holds part of: no prefill ends it
                                if delta.get("thinking_blocks"):
                                    # Claude's thinking, signed by the model that wrote it: with thinking on,
                                    # Anthropic wants a prefill to begin with it (as on /v1/messages).
                                    unresumable = True
                                if choice.get("finish_reason"):
                                    finish_reason = choice["finish_reason"]
                            if chunk_usage and self._usage_completed(chunk_usage, "".join(delivered[attempt_began:])):
                                chunk.raw = None
                                usage_filled = True
                            if not wants_usage and chunk_usage:
                                if not chunk.get("choices"):
                                    continue
                                chunk.drop_usage()
                            yield chunk
                        if wants_usage and not usage and opening is not None:
                            yield self._usage_estimated(opening, public_name, "".join(delivered))
                        break
                    except ProviderError as exc:
                        continuable = bool(text) and not unresumable and not thought
                        if not self._may_resume(exc, failed, continuable, self.body):
                            raise
                        # Resume: the next deployment continues the reply from what the client already has.
                        await self._attempt_abandon(upstream, failed)
                        upstream = None
                        cut_prompt = self._prompt_billed(usage, prefilled)
                        cut_tokens = text_tokens("".join(written))  # held back or not, it was billed
                        self._cut_attempt_billed(cut_prompt, cut_tokens - earlier_tokens)
                        earlier_tokens = cut_tokens
                        earlier_prompt += cut_prompt
                        prefilled = "".join(text)
                        attempt_began = len(delivered)
                        usage = {}
                        self.served_tier = ""  # the usage charged is the next attempt's: at its tier
                        set_apart = reasoned
                        first, upstream = await self._call(
                            once_with(prefilled), exclude=failed | self._prefill_refusers(self.body)
                        )
                        searched += asking
                        guard = await self._reply_guard(guard)  # it may be a fallback under another policy
            finally:
                if guard is not None:
                    guard.close()
                if upstream is not None:
                    await upstream.aclose()  # type: ignore[attr-defined]

    def _tier_said(self, reply: dict[str, Any] | WireChunk) -> None:
        """Keep the service tier a reply (or a stream's chunk) says the provider served the request at: OpenAI
        bills that one, which may not be the one asked (``auto`` served at the project's default tier, priority at
        default past its ramp limits)."""
        tier = reply.get("service_tier")
        if isinstance(tier, str) and tier:
            self.served_tier = tier

    def _message_tier_said(self, usage: Any) -> None:
        """Keep the service tier a message's usage says (Anthropic's ``service_tier``: its Priority Tier, or an OpenAI
        reply's tier translated, ``messages_tier``) as the one the request is charged at."""
        tier = message_tier(usage.get("service_tier") if isinstance(usage, dict) else None)
        if tier:
            self.served_tier = tier

    def _cut_attempt_billed(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Keep what the attempt that just failed midway was billed (before a resume), and on whose key it ran."""
        self._cut_billed.append(CutAttempt(_billing_source(self.answered_by), prompt_tokens, completion_tokens))

    def _prompt_billed(self, usage: Mapping[str, Any], prefill: str) -> int:
        """The prompt tokens of an attempt that failed midway, before a resume, which its provider billed as a
        request of its own: its usage's count when it gave one before failing (some servers report usage in every
        chunk; Anthropic's ``message_start``), else the estimate of the body and of the prefill it was given, as the
        settle step estimates a prompt (``settlement_tokens``)."""
        counted = usage.get("prompt_tokens")
        if type(counted) is int and counted >= 0:
            return counted
        return prompt_tokens(self.body, operation=self.operation) + (text_tokens(prefill) if prefill else 0)

    def _usage_completed(self, usage: dict[str, Any], delivered_text: str) -> bool:
        """Fill in, in place, the count an upstream's usage left out (``prompt_tokens`` or ``completion_tokens``)
        with the estimate settlement charges for it (``settlement_tokens``, from the same body and the text this
        attempt relayed), and its total; True when it did. A usage that counts both is left as it came."""
        if type(usage.get("prompt_tokens")) is int and type(usage.get("completion_tokens")) is int:
            return False
        prompt, completion, _, _, estimated = settlement_tokens(
            operation=self.operation, body=self.body, status=UsageStatus.OK, usage=usage, delivered_text=delivered_text
        )
        if not estimated:
            return False
        usage.update(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        return True

    def _usage_estimated(self, opening: WireChunk, name: str, delivered_text: str) -> WireChunk:
        """The usage chunk owed to a client that asked for one (``stream_options.include_usage``) when the
        upstream sent none (servers that ignore the option): the estimate the request is charged, counted as
        the settle step counts it (``settlement_tokens``, from the same body and relayed text)."""
        prompt, completion, _, _, _ = settlement_tokens(
            operation=self.operation, body=self.body, status=UsageStatus.OK, usage=None, delivered_text=delivered_text
        )
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        kind = "text_completion" if self.operation == Operation.COMPLETIONS else "chat.completion.chunk"
        data = {"id": opening.get("id"), "object": kind, "created": opening.get("created")}
        return WireChunk({**data, "model": name, "choices": [], "usage": usage}, None)

    def _messages_usage_estimated(self, written: str) -> dict[str, int]:
        """Anthropic's usage for a message whose upstream reported none: the estimate it is charged
        (``settlement_tokens``, from the same body and text as the settle step)."""
        prompt, completion, _, _, _ = settlement_tokens(
            operation=self.operation, body=self.body, status=UsageStatus.OK, usage=None, delivered_text=written
        )
        return {"input_tokens": prompt, "output_tokens": completion}

    def _may_resume(self, exc: ProviderError, failed: set[int], continuable: bool, body: dict[str, Any]) -> bool:
        """Whether a stream that failed midway is continued on the next deployment (``resume_on_failure``):
        the model opted in, the failure is one another deployment may not share, what was sent can be
        continued (``continuable``: text, no tool call nor legacy ``function_call``, no thinking block, and the
        attempt did not have Claude think), the stream has one reply (``_replies_several``: admission reserved no
        resume for one of several), the model's attempts are not spent, and a deployment not tried yet takes the
        prefill (``_prefill_refusers``)."""
        served = self.answered_by
        if not (
            served.resume_on_failure
            and _retryable(exc)
            and continuable
            and served.deployment is not None
            and len(failed) < max(1, served.retries)
            and not _replies_several(body, [self.model, *self.fallbacks, *self.context_fallbacks])
        ):
            return False
        passed = failed | self._prefill_refusers(body) | {served.deployment.id}
        return any(deployment.id not in passed for model in self._plan() for deployment in model.deployments)

    def _prefill_refusers(self, body: dict[str, Any]) -> set[int]:
        """The deployments (of the model and its fallbacks) a resume leaves out: Claude asked to think by ``body``.
        With thinking on, Anthropic refuses a prefill that does not begin with the thinking, signed by the model that
        wrote it, which no other attempt has (and resumed without the prefill, the model would begin its reply
        again after the text the client has). Any other deployment takes the text so far as a prefill."""
        return {
            deployment.id
            for model in self._plan()
            for deployment in model.deployments
            if _claude_thinks(deployment.provider, body)
        }

    async def _attempt_abandon(self, upstream: AsyncIterator[Any], failed: set[int]) -> None:
        """Give up the attempt that failed midway, before a resume: its deployment is not tried again for
        this request, routing hears of the failure, its stream is closed and the run is marked resumed."""
        failed.add(self.answered_by.deployment.id)  # type: ignore[union-attr]  (checked by _may_resume)
        self._ticket_close(Outcome.FAILURE)
        await upstream.aclose()  # type: ignore[attr-defined]
        self.resumed = True

    async def messages_complete(self, *, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """``complete`` for an Anthropic Messages request: the adapter answers with a ``message`` (passed
        through by an Anthropic-protocol provider, with the client's ``headers``; translated by the
        others), settled from its usage."""
        request = {key: value for key, value in self.body.items() if key != "stream"}
        message: dict[str, Any] | None = None
        searches = 0  # those the latest attempt's provider runs unreported (a search model's: ``web_searches``)

        async def once(target: ResolvedModel) -> dict[str, Any]:
            nonlocal searches
            adapter = adapter_for(target.provider)
            searches = adapter.web_searches(request, target)
            return await adapter.messages(request, target, headers=headers)

        def settle(call: _Call) -> None:
            usage = (message or {}).get("usage")
            written = _message_written(message) if message is not None else ""
            reported = _reported_usage(usage if isinstance(usage, dict) else {}, written)
            self._settle(
                status=call.status,
                usage=reported,
                delivered_text="" if reported else written,
                finish_reason=(message or {}).get("stop_reason"),
                error_type=call.error_type,
                web_searches=searches if message is not None else 0,
            )

        async with self._upstream_call(settle):
            message = await self._call(once)
            self._message_tier_said(message.get("usage"))
            await self._reply_check(_message_text(message), _message_arguments(message))
        message["model"] = self.answered_by.name
        if self.result is not None and self.result.usage_estimated:
            # The upstream (translated) reported no usage: the client reads what the request was charged.
            counted = {"input_tokens": self.result.prompt_tokens, "output_tokens": self.result.completion_tokens}
            message["usage"] = {**(message.get("usage") or {}), **counted}
        return message

    async def messages_stream_open(self, *, headers: dict[str, str] | None = None) -> AsyncIterator[WireEvent]:
        """``messages_stream`` once its first event has arrived (see ``stream_open``)."""
        return await _opened(self.messages_stream(headers=headers))

    async def messages_stream(self, *, headers: dict[str, str] | None = None) -> AsyncIterator[WireEvent]:
        """``stream`` for an Anthropic Messages request: relay the events as they arrive (an unchanged
        event keeps the upstream's bytes; ``message_start`` gets the public model name). Usage is read
        from ``message_start`` and ``message_delta``; a stream cut before ``message_delta`` is charged
        the prompt ``message_start`` counted and an estimate of what was relayed (a translated stream's
        ``message_start`` holds an estimate of the prompt: the row is an estimate either way). A model that
        opted into ``resume_on_failure`` has a stream cut midway continued by the next deployment, as
        ``stream`` does (``_MessagesSplice``)."""
        usage: dict[str, Any] = {}
        final = False
        delivered: list[str] = []
        generated: list[str] = []  # what the model wrote, relayed or held back by the output check (``stream``)
        stop_reason: str | None = None
        # Output tokens of the parts delivered by attempts that failed midway, before a resume.
        earlier_tokens = 0
        # Web searches whose results arrived (``web_search_tool_result`` blocks), which ran whatever the usage says
        # (``settle``). Never of an attempt that failed midway: a message with one is no text, so it is not resumed
        # (``_MessagesSplice.resumable``), and an attempt that failed before its first event ran none.
        searched = 0
        # The searches every attempt that answered ran unreported (a translated search model's: ``web_searches``),
        # a resumed message's failed ones too, which the provider billed; and those the latest attempt asked.
        unreported = asking = 0
        # The prompts of the attempts that failed midway, which the provider billed each (``_prompt_billed``); and
        # the prefill the attempt relayed now was given, part of its prompt.
        earlier_prompt = 0
        prefilled = ""
        splice = _MessagesSplice()
        thought = False  # the current attempt's upstream request had Claude think: it refuses a text prefill

        def once_with(prefill: str | None) -> Callable[[ResolvedModel], Awaitable[tuple[Any, Any]]]:
            async def once(target: ResolvedModel) -> tuple[Any, AsyncIterator[WireEvent]]:
                body = self.body
                if prefill is not None:
                    given = _prefill_for(target, prefill)
                    body = {**body, "messages": [*body["messages"], {"role": "assistant", "content": given}]}
                    # The reply's token limit (the reservation's too) covers both parts: the rest only.
                    if isinstance(body.get("max_tokens"), int):
                        body["max_tokens"] = max(1, body["max_tokens"] - text_tokens(prefill))
                nonlocal thought, asking
                thought = _claude_thinks(target.provider, body)
                adapter = adapter_for(target.provider)
                asking = adapter.web_searches(body, target)
                return await self._first(adapter.messages_stream(body, target, headers=headers))

            return once

        def settle(call: _Call) -> None:
            written = _reply_counted(delivered, generated, call)
            reported = openai_usage(usage) if final and usage else {}
            partly_estimated = bool(earlier_tokens)
            if reported and earlier_tokens:
                completion = int(reported.get("completion_tokens") or 0) + earlier_tokens
                reported = {**reported, "completion_tokens": completion}
            elif not final and (written or output_arrived) and usage.get("input_tokens") is not None:
                # Cut after ``message_start``, which counted the prompt (the cached part apart, to be priced at
                # its own rate): that count, and an estimate of everything relayed, the row flagged so; also when
                # the output check cut it on its first words, relayed none of them.
                reported = {**openai_usage(usage), "completion_tokens": text_tokens(written)}
                partly_estimated = True
            # A stream cut before ``message_delta`` counted no search: those whose results arrived ran.
            searches = int(reported.get("web_search_requests") or 0) if final else searched
            if reported and searches:
                reported = {**reported, "web_search_requests": searches}
            self._settle(
                status=call.status,
                usage=reported,
                delivered_text=written,
                finish_reason=stop_reason,
                error_type=call.error_type,
                usage_partly_estimated=partly_estimated,
                earlier_prompt_tokens=earlier_prompt,
                web_searches=unreported,
            )

        upstream: AsyncIterator[WireEvent] | None = None
        guard: ReplyGuard | None = None  # the output check of the model that answered, once one has
        output_arrived = False  # the model wrote something, relayed or not

        def arrived(event: WireEvent) -> None:
            nonlocal output_arrived
            pieces = [piece for _, piece, _ in _event_pieces(event) if piece]
            generated.extend(pieces)
            output_arrived = output_arrived or bool(pieces)

        async with self._upstream_call(settle):
            try:
                first, upstream = await self._call(once_with(None))
                unreported += asking
                guard = await self._reply_guard()
                public_name = self.answered_by.name
                failed: set[int] = set()
                while True:
                    events = self._relay(first, upstream, keepalive=_is_ping)
                    if guard is not None:
                        # The output check, as for chat streams; the last check before ``message_stop``.
                        events = guard.relay(events, _event_pieces, last=_is_message_stop, arrived=arrived)
                    try:
                        async for event in splice.continued(events) if failed else events:
                            kind = event.get("type")
                            if kind == "content_block_delta":
                                if self._first_token_at is None:
                                    self._first_token_at = time.perf_counter()
                                delta = event.get("delta") or {}
                                piece = delta.get("text") or delta.get("partial_json") or delta.get("thinking") or ""
                                delivered.append(piece)
                                if guard is None:  # else the check saw it arrive (``arrived``)
                                    generated.append(piece)
                            elif kind == "message_start":
                                usage = dict((event.get("message") or {}).get("usage") or {})
                                self._message_tier_said(usage)
                                if failed:
                                    continue  # a resumed attempt's: the client's message began long ago
                                event.set_model(public_name)
                            elif kind == "content_block_start" or kind == "content_block_stop":
                                splice.block(event)
                                block = event.get("content_block")
                                if type(block) is dict and block.get("type") == "web_search_tool_result":
                                    searched += 1
                            elif kind == "message_delta":
                                final = True
                                usage.update(
                                    (name, value)
                                    for name, value in (event.get("usage") or {}).items()
                                    if value is not None
                                )
                                stop_reason = (event.get("delta") or {}).get("stop_reason") or stop_reason
                                written = "".join(delivered)
                                if not _reported_usage(usage, written):
                                    # No count from the upstream (translated): the client reads the estimate
                                    # the request is charged, which the settle step counts the same way.
                                    usage = {}
                                    event["usage"] = self._messages_usage_estimated(written)
                                    event.raw = None
                            yield event
                        break
                    except ProviderError as exc:
                        continuable = splice.resumable(delivered) and not final and not thought
                        if not self._may_resume(exc, failed, continuable, self.body):
                            raise
                        # Resume: the next deployment continues the message from the text the client has.
                        await self._attempt_abandon(upstream, failed)
                        upstream = None
                        cut_prompt = self._prompt_billed(openai_usage(usage) if usage else {}, prefilled)
                        cut_tokens = text_tokens("".join(generated))  # held back or not, it was billed
                        self._cut_attempt_billed(cut_prompt, cut_tokens - earlier_tokens)
                        earlier_tokens = cut_tokens
                        earlier_prompt += cut_prompt
                        prefilled = "".join(delivered)
                        usage = {}
                        self.served_tier = ""  # the usage charged is the next attempt's: at its tier
                        first, upstream = await self._call(
                            once_with(prefilled), exclude=failed | self._prefill_refusers(self.body)
                        )
                        unreported += asking
                        guard = await self._reply_guard(guard)  # it may be a fallback under another policy
            finally:
                if guard is not None:
                    guard.close()
                if upstream is not None:
                    await upstream.aclose()  # type: ignore[attr-defined]

    async def embed(self) -> dict[str, Any]:
        """The call and settle steps of an embeddings request, priced on input tokens only. They come from
        the upstream's ``usage.prompt_tokens``, else from the input (estimated, and the ledger row says so).

        Each input is embedded at most once per request, and the request pays for what the upstream embedded. A
        request split into several calls keeps the calls a deployment answered (``BatchesAnswered``): a retry
        sends only the others, and only to that deployment (``_call``), so a success pays every call once; a
        request that failed (or was cancelled) pays the calls answered, at that deployment's prices, never more
        than its success would have."""
        response: dict[str, Any] | None = None
        kept: dict[int, BatchesAnswered] = {}  # by deployment

        async def once(target: ResolvedModel) -> dict[str, Any]:
            batches = kept.setdefault(target.deployment.id, BatchesAnswered())  # type: ignore[union-attr]
            try:
                return await adapter_for(target.provider).embed(
                    {**self.body, "model": target.upstream_id}, kept=batches
                )
            except ProviderError as exc:
                # A provider that names no field (or chat's) was told of no `messages`: the input is too long.
                if isinstance(exc, ProviderContextLengthError) and exc.param in (None, "messages"):
                    exc.param = "input"
                raise

        def settle(call: _Call) -> None:
            usage, partly_estimated = _mapping((response or {}).get("usage")), False
            answered = [calls for calls in (batches.answered() for batches in kept.values()) if calls is not None]
            if response is None and answered:
                usage, partly_estimated = answered_calls_usage(answered)
            self._settle(
                status=call.status,
                usage=usage,
                delivered_text="",
                finish_reason=None,
                error_type=call.error_type,
                usage_partly_estimated=partly_estimated,
            )

        async with self._upstream_call(settle):
            response = await self._call(once)
        response["model"] = self.answered_by.name
        # OpenAI's schema requires both: an upstream that left them out gets them, the usage being the
        # estimate the request was charged for.
        response.setdefault("object", "list")
        if self.result is not None and self.result.usage_estimated:
            counted = self.result.prompt_tokens
            response["usage"] = {"prompt_tokens": counted, "total_tokens": counted}
        return response

    def _settle(
        self,
        *,
        status: str,
        usage: dict[str, Any] | None,
        delivered_text: str,
        finish_reason: str | None,
        error_type: str,
        usage_partly_estimated: bool = False,
        output_arrived: bool = False,
        web_searches: int = 0,
        earlier_prompt_tokens: int = 0,
    ) -> None:
        """Once per run, whatever happened: billing decides the tokens (the provider's usage, or an estimate
        from what was relayed), the cost at the answering deployment's prices and the reservation's release
        together (``request_settle``); the attempt still open is reported to routing with its tokens.
        ``web_searches``: those the provider ran that its usage does not report (``BaseAdapter.web_searches``).
        ``earlier_prompt_tokens``: the prompts of a resumed stream's attempts that failed midway
        (``_prompt_billed``)."""
        if self._settled:
            return
        self._settled = True
        now = time.perf_counter()
        upstream_ms = None
        if self._upstream_started is not None:
            upstream_ms = _ms((self._upstream_done or now) - self._upstream_started)
        ttft = ttft_ms = None
        if self._first_token_at is not None and self._upstream_started is not None:
            ttft = self._first_token_at - self.started
            ttft_ms = _ms(ttft)
        served = self.answered_by
        asked = _asked_tier(self.body, served)  # the served model's rules applied once
        settled = request_settle(
            request_id=self.request_id,
            endpoint=self.endpoint,
            operation=self.operation,
            body=self.body,
            status=status,
            user_id=self.caller.user_id,
            api_key_id=self.caller.api_key_id,
            model=served,
            admission=self.admission,
            usage=usage or None,
            delivered_text=delivered_text,
            output_arrived=output_arrived,
            error_type=error_type,
            requested_model=_requested_name(self.body, served),
            attempts=self.attempts,
            resumed=self.resumed,
            usage_partly_estimated=usage_partly_estimated,
            earlier_prompt_tokens=earlier_prompt_tokens,
            web_searches=web_searches,
            billing_source=_billing_source(served),
            cut_attempts=self._cut_billed,
            moderation=self.moderation.summary if self.moderation is not None else "",
            experiment_id=self.assignment.experiment_id if self.assignment is not None else None,
            experiment_variant_id=self.assignment.variant_id if self.assignment is not None else None,
            service_tier=self.served_tier or asked,
            requested_tier=asked or None,
            upstream_latency_ms=upstream_ms,
            ttft_ms=ttft_ms,
            duration_ms=_ms(now - self.started),
        )
        self._ticket_close(
            Outcome.OK if status == UsageStatus.OK else Outcome.NEUTRAL,
            tokens=settled.prompt_tokens + settled.completion_tokens,
        )
        duration = now - self.started
        now_ns = time.time_ns()
        deployment = served.deployment
        request_observed(
            RequestObservation(
                request_id=self.request_id,
                transport=self.endpoint,
                operation=self.operation,
                status=status,
                model=served.name,
                deployment=deployment.name if deployment is not None else "",
                provider=served.provider.name,
                provider_kind=served.provider.kind,
                upstream_model=served.upstream_id,
                error_type=error_type,
                stream=bool(self.body.get("stream")),
                duration=duration,
                # Unrounded, as the duration is: the ledger's whole milliseconds could put it past the duration.
                ttft=ttft,
                overhead=self.overhead_ms(now) / 1000,
                prompt_tokens=settled.prompt_tokens,
                completion_tokens=settled.completion_tokens,
                cost=settled.cost,
                started_ns=now_ns - int(duration * 1e9),
                ended_ns=now_ns,
                attempts=tuple(self.attempt_log),
                experiment=self.assignment.header if self.assignment is not None else "",
                finish_reason=finish_reason or "",
                trace=self.trace,
            )
        )
        request_ended()
        self.result = RunResult(
            status=status,
            finish_reason=finish_reason,
            prompt_tokens=settled.prompt_tokens,
            completion_tokens=settled.completion_tokens,
            cached_tokens=settled.cached_tokens,
            cost=settled.cost,
            usage_estimated=settled.usage_estimated,
            error_type=error_type,
        )


def _reply_counted(delivered: list[str], written: list[str], call: _Call) -> str:
    """The reply's text a stream without the provider's usage is charged: what the model wrote, relayed or held
    back by the output check when the client left or the stream was cut (the provider billed it). A reply the
    check refused is charged what was relayed, as documented (``docs/moderation.md``)."""
    if call.error_type == ContentPolicyViolationError.code:
        return "".join(delivered)
    return "".join(written)


def _mapping(value: Any) -> dict[str, Any] | None:
    """An upstream's ``usage`` if it is an object at all (what it holds, billing checks)."""
    return value if isinstance(value, dict) and value else None


# The "choice" a message's extended thinking is read as: a text of its own beside the reply's (choice 0), so that
# the thinking's last word and the reply's first do not run into one.
_THINKING = -1


def _event_pieces(event: WireEvent) -> list[tuple[int, str, int | None]]:
    """The reply's text in a Messages API event, a tool call's input included (a part of its JSON, with the
    index of its block), and the model's thinking (``thinking_delta``, read as a text of its own, ``_THINKING``;
    a line break where a thinking block begins and where its ``signature_delta`` ends it, so that two blocks'
    words stay apart and the last word is settled without waiting for the reply's end): what the output check
    reads (a message has no choices). ``redacted_thinking`` is encrypted: nothing to read."""
    kind = event.get("type")
    if kind == "content_block_start":
        block = event.get("content_block") or {}
        return [(_THINKING, "\n", None)] if block.get("type") == "thinking" else []
    if kind != "content_block_delta":
        return []
    delta = event.get("delta") or {}
    if isinstance(delta.get("partial_json"), str):
        index = event.get("index")
        return [(0, delta["partial_json"], index if isinstance(index, int) else 0)]
    if delta.get("type") == "thinking_delta":
        return [(_THINKING, delta.get("thinking") or "", None)]
    if delta.get("type") == "signature_delta":
        return [(_THINKING, "\n", None)]
    return [(0, delta.get("text") or "", None)]


def _is_message_stop(event: WireEvent) -> bool:
    return event.get("type") == "message_stop"


def _is_ping(event: WireEvent) -> bool:
    """Claude's keep-alive: it says the connection is up, not that the message goes on (``_relay``)."""
    return event.get("type") == "ping"


# The call a legacy ``function_call``'s arguments are fed as (tool calls are numbered from 0).
_FUNCTION_CALL = -1


def _reasoning_of(index: int) -> int:
    """The "choice" the reasoning of choice ``index`` is read as: a text of its own beside the choice's reply (the
    choices are numbered from 0), so that the reasoning's last word and the reply's first do not run into one."""
    return -1 - index


def _chunk_pieces(chunk: WireChunk, *, reasoning: bool = True) -> list[tuple[int, str, int | None]]:
    """The reply's text in a chunk, each choice's (index, text, None), its tool calls' arguments (index, a part
    of the call's JSON, the call's index; a legacy ``function_call``'s, ``_FUNCTION_CALL``) and, unless told not
    to, its reasoning (``reasoning_content`` or ``reasoning``, read as a text of its own, ``_reasoning_of``): what
    the output check reads (the arguments and the reasoning are the model's words as much as its text: a client
    acts on the one and shows the other) and what the model wrote, for counting it."""
    pieces: list[tuple[int, str, int | None]] = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        index = choice.get("index") if isinstance(choice.get("index"), int) else 0
        if reasoning and (thought := reasoning_text(delta)):
            pieces.append((_reasoning_of(index), thought, None))
        pieces.append((index, delta.get("content") or "", None))
        if isinstance(text := choice.get("text"), str):  # a text completion's chunk (``/v1/completions``)
            pieces.append((index, text, None))
        for number, call in enumerate(delta.get("tool_calls") or ()):
            if isinstance(call, dict) and isinstance(arguments := (call.get("function") or {}).get("arguments"), str):
                pieces.append((index, arguments, call["index"] if isinstance(call.get("index"), int) else number))
        if isinstance(function := delta.get("function_call"), dict) and isinstance(function.get("arguments"), str):
            pieces.append((index, function["arguments"], _FUNCTION_CALL))
    return pieces


def _completion_text(response: dict[str, Any], *, calls: bool = False) -> str:
    """The text of a completion's choices, each choice's reasoning (``reasoning_content`` or ``reasoning``) on a
    line of its own before it; with ``calls``, their tool calls' and legacy ``function_call``'s arguments too
    (what the model wrote, for counting it)."""
    parts: list[str] = []
    for choice in response.get("choices") or ():
        message = choice.get("message") or {}
        if reasoning := reasoning_text(message):
            parts.append(reasoning)
        if isinstance(content := message.get("content"), str):
            parts.append(content)
        if isinstance(text := choice.get("text"), str):  # a text completion's (``/v1/completions``)
            parts.append(text)
    if calls:
        parts.extend(_completion_arguments(response))
    return "\n".join(parts)


def _completion_arguments(response: dict[str, Any]) -> list[str]:
    """The arguments of a completion's tool calls and legacy ``function_call`` (JSON texts), each choice's in
    turn."""
    arguments: list[str] = []
    for choice in response.get("choices") or ():
        message = choice.get("message") or {}
        functions = [call.get("function") for call in message.get("tool_calls") or () if isinstance(call, dict)]
        functions.append(message.get("function_call"))
        arguments.extend(
            function["arguments"]
            for function in functions
            if isinstance(function, dict) and isinstance(function.get("arguments"), str)
        )
    return arguments


def _reported_usage(usage: dict[str, Any], written: str) -> dict[str, Any]:
    """Anthropic-shaped ``usage`` as OpenAI's, for the settle step; or nothing (the request is then counted)
    when it cannot be the provider's count: a message that wrote something reported at 0 output tokens is
    one translated from an upstream that reported no usage."""
    reported = openai_usage(usage)
    if written and not reported.get("completion_tokens"):
        return {}
    return reported


def _message_written(message: dict[str, Any]) -> str:
    """What a message's blocks wrote (text, thinking, tool calls' input: a ``tool_use``'s, a server tool's and an
    MCP tool's), for counting it."""
    parts: list[str] = []
    for block in message.get("content") or ():
        if not isinstance(block, dict):
            continue
        for name in ("text", "thinking"):
            if isinstance(block.get(name), str):
                parts.append(block[name])
        if block.get("type") in TOOL_CALL_BLOCKS and block.get("input"):
            parts.append(json.dumps(block["input"]))
    return "".join(parts)


def _message_text(message: dict[str, Any]) -> str:
    """A message's text and its thinking (``thinking`` blocks; a ``redacted_thinking`` is encrypted), each block
    on its own line: what the output check reads with its tool calls' input (``_message_arguments``)."""
    texts: list[str] = []
    for block in message.get("content") or ():
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "thinking" and isinstance(block.get("thinking"), str):
            texts.append(block["thinking"])
    return "\n".join(texts)


def _message_arguments(message: dict[str, Any]) -> list[str]:
    """A message's tool calls' input (a ``tool_use``'s, a server tool's and an MCP tool's), as JSON texts (which
    the output check reads decoded)."""
    return [
        json.dumps(block["input"], ensure_ascii=False)
        for block in message.get("content") or ()
        if isinstance(block, dict) and block.get("type") in TOOL_CALL_BLOCKS and block.get("input")
    ]


def _claude_thinks(provider: ProviderConfig, body: dict[str, Any]) -> bool:
    """Whether an upstream request for ``body`` to ``provider`` has Claude think (Anthropic's protocol, thinking
    on): it then refuses a text prefill."""
    return provider.kind == ProviderKind.ANTHROPIC and thinking_requested(body)


def _prefill_for(target: ResolvedModel, text: str) -> str:
    """The text a resumed attempt is given as its assistant prefill. Anthropic refuses a final assistant
    message that ends in whitespace (a 400), so a reply cut after a space or a newline is given to an
    Anthropic deployment without it; the continuation then begins with it."""
    return text.rstrip() if target.provider.kind == ProviderKind.ANTHROPIC else text


class _MessagesSplice:
    """What the client of a ``/v1/messages`` stream has been sent of the message's content blocks, so
    that a resumed attempt's events continue that message (``continued``): the next deployment is given
    the text so far as an assistant prefill and begins a message of its own, whose ``message_start`` is
    dropped, whose first text block continues the text block the client has open, and whose blocks are
    renumbered after the client's. Only a message of text blocks is resumed: a tool call or a thinking
    block (signed by the model that wrote it) cannot be continued by another. The relay tells it of
    ``content_block_start`` and ``_stop`` alone, so that a delta costs nothing more."""

    __slots__ = ("blocks", "open_text", "other")

    def __init__(self) -> None:
        self.blocks = 0  # content blocks the client has seen begin
        self.open_text: int | None = None  # the index of the text block the client has open
        self.other = False  # a block that is not text was sent

    def block(self, event: WireEvent) -> None:
        if event.get("type") == "content_block_stop":
            self.open_text = None
            return
        self.blocks += 1
        if (event.get("content_block") or {}).get("type") == "text":
            self.open_text = event.get("index")
        else:
            self.other = True

    def resumable(self, delivered: list[str]) -> bool:
        """Text and nothing else was sent (``delivered``, then, is the text): a prefill can continue it."""
        return not self.other and bool("".join(delivered).strip())

    async def continued(self, events: AsyncIterator[WireEvent]) -> AsyncIterator[WireEvent]:
        """A resumed attempt's events as the client's message goes on: its first text block joined to the
        client's open one, the other blocks numbered after the client's (re-encoded only then)."""
        join = isinstance(self.open_text, int)
        offset = self.open_text if join else self.blocks
        async for event in events:
            index = event.get("index")
            if isinstance(index, int) and event.get("type") in _BLOCK_EVENTS:
                if join and index == 0 and event.get("type") == "content_block_start":
                    if (event.get("content_block") or {}).get("type") == "text":
                        continue  # the client's open text block goes on
                    # Not text after all: the client's block is closed and this one is numbered after it.
                    yield WireEvent({"type": "content_block_stop", "index": offset}, None)
                    join, offset = False, offset + 1
                if offset:
                    event["index"] = index + offset
                    event.raw = None
            yield event


_BLOCK_EVENTS = frozenset({"content_block_start", "content_block_delta", "content_block_stop"})


def _role_only(chunk: WireChunk) -> bool:
    """A chunk that only opens the assistant's message (its role, no text, no call, a legacy ``function_call``
    included, no finish)."""
    choices = chunk.get("choices") or ()
    if len(choices) != 1 or chunk.get("usage"):
        return False
    choice = choices[0]
    delta = choice.get("delta") or {}
    return not (
        choice.get("finish_reason") or delta.get("content") or delta.get("tool_calls") or delta.get("function_call")
    )


def _resumed_reasoning(chunk: WireChunk, *, apart: bool) -> bool:
    """Whether a resumed attempt's chunk that opens no text carries its reasoning, which is relayed: the next
    deployment reasons again before it goes on (and bills it), and the chat completions protocol lets reasoning
    follow text. Its role goes (the client's message opened long ago), and the first piece of a new pass is set
    ``apart`` from the reasoning the client has by a blank line, so the two do not read as one."""
    delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
    name = next((name for name in REASONING_FIELDS if isinstance(delta.get(name), str) and delta[name]), None)
    if name is None:
        return False
    delta.pop("role", None)
    if apart:
        delta[name] = "\n\n" + delta[name]
    chunk.raw = None
    return True


def _billing_source(served: ResolvedModel) -> str:
    """Whose provider key an attempt on ``served`` (bound to its deployment) ran on: the user's own, or the
    platform's."""
    return BillingSource.PLATFORM if served.provider.credential_id is None else BillingSource.USER_KEY


def _requested_name(body: dict[str, Any], served: ResolvedModel) -> str:
    """The name the client sent, when another public model answered (an alias's target, a fallback)."""
    requested = body.get("model")
    return text_storable(requested, 128) if isinstance(requested, str) and requested != served.name else ""


async def _opened(items: AsyncIterator[T]) -> AsyncIterator[T]:
    """``items`` once its first item has arrived; what came before it (a failure) is raised here."""
    try:
        first = await anext(items)
    except StopAsyncIteration:
        first = _END
    except BaseException:
        await items.aclose()  # type: ignore[attr-defined]
        raise
    return _Prepended(first, items)


class _Prepended:
    """``first``, then the rest of ``items``: an iterator object rather than an async generator, so that the
    rest is ``items``' own ``__anext__`` (no frame of its own resumed for every chunk of a stream)."""

    __slots__ = ("_first", "_items")

    def __init__(self, first: Any, items: AsyncIterator[Any]) -> None:
        self._first = first
        self._items = items

    def __aiter__(self) -> _Prepended:
        return self

    def __anext__(self) -> Awaitable[Any]:
        first = self._first
        if first is _TAKEN:
            return self._items.__anext__()
        self._first = _TAKEN
        return _now(first)

    async def aclose(self) -> None:
        self._first = _TAKEN
        await self._items.aclose()  # type: ignore[attr-defined]


_TAKEN = object()


async def _now(item: Any) -> Any:
    if item is _END:
        raise StopAsyncIteration
    return item


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class _IdleWatch:
    """A stream's idle timeout, as one timer for the whole stream: the relay only notes when its wait for
    the next chunk began (``last``) and whether it is still waiting (``waiting``); the timer, when it fires,
    either finds a chunk came since (and sleeps until ``last + idle``) or cancels the waiting task, which
    ``expired`` then tells apart from any other cancellation (a client gone, a shutdown), as
    ``asyncio.timeout`` does."""

    __slots__ = ("_cancelling", "_fired", "_handle", "_task", "idle", "last", "loop", "waiting")

    def __init__(self, idle: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle = idle
        self.last = self.loop.time()
        self.waiting = False
        self._fired = False
        self._task = asyncio.current_task()
        self._cancelling = self._task.cancelling() if self._task is not None else 0
        self._handle: asyncio.TimerHandle | None = self.loop.call_at(self.last + idle, self._check)

    def _check(self) -> None:
        due = self.last + self.idle
        if not self.waiting or self.loop.time() < due:
            self._handle = self.loop.call_at(max(due, self.loop.time() + self.idle / 8), self._check)
            return
        self._handle = None
        if self._task is not None and not self._task.done():
            self._fired = True
            self._task.cancel()

    def expired(self) -> bool:
        """Whether the ``CancelledError`` just caught is this watchdog's (consumed) and nothing else's."""
        if not self._fired:
            return False
        self._fired = False
        assert self._task is not None
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


__all__ = [
    "Caller",
    "CompletionRun",
    "DeploymentsAtCapacityError",
    "Endpoint",
    "NoDeploymentAvailableError",
    "RunResult",
    "ServerShuttingDownError",
    "caller_from_api_key",
    "caller_from_user",
    "completion_reject",
    "completion_reject_unverified",
    "completion_start",
    "model_listed_for_caller",
    "models_for_caller",
    "new_request_id",
    "runs_cancel_all",
    "runs_cut_all",
    "runs_drain",
    "shutdown_began",
    "shutdown_begin",
]
