"""Admission: may this caller send this request now, and what is held for it until it settles.

``admission_acquire`` runs on every request, before anything goes upstream: the plan's and the key's
model allow-lists, then rate limits and budget reservations together (one Redis round trip, or one
database transaction without Redis). Limits come from an in-process cache, so a caller with nothing
to enforce costs no I/O at all. ``admission_settle`` runs once per admitted request, after the
response: the reservation is swapped for the real cost, and a budget that crosses a threshold alerts.

A ledger row that goes to the spool instead (the database was down, the server was stopping) carries
its admission (``admission_dump``), so that whichever process replays it settles the reservation too
(``admission_settle_spooled``), at once rather than when the reservation expires or its process is
declared dead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from providers.models import ModelMode
from providers.selectors import models_enabled
from providers.types import ResolvedModel

from ..exceptions import ModelNotAllowedError, OutputUnboundedError
from ..models import BudgetMetric, ScopeKind
from ..selectors import KeyLimits, UserLimits, key_limits, user_limits
from .alerts import Crossing, budget_alerts_raise, budget_crossings
from .budgets import CounterRef, CounterSpec, charge_for, counter_specs, requested_max_tokens
from .counters import Moved, SettleRequest, _ms, admission_store, reservation_settle_if_held
from .inflight import held_written, instance_id
from .keys import MAX_KEY_DEPTH
from .ratelimits import RateSpec, anthropic_ratelimit_headers, rate_specs, ratelimit_headers


@dataclass(frozen=True, slots=True)
class _Held:
    """What settlement needs to find the request's reservations and windows again."""

    counters: tuple[CounterSpec, ...]
    rates: tuple[RateSpec, ...]
    instance: str = ""  # the process that admitted it: Redis keeps the request's in-flight record under its name


@dataclass
class Admission:
    request_id: str
    user_id: int
    api_key_id: int | None
    reserved_cost: Decimal = Decimal("0")  # reserved against USD budgets; 0 when none applies
    max_tokens: int | None = None  # the clamp to send upstream when the request set none and a budget applies
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the client
    anthropic_headers: dict[str, str] = field(default_factory=dict)  # anthropic-ratelimit-*, on /v1/messages
    handle: Any = None  # _Held, or None when nothing was held
    byok_counts_against_budget: bool = False  # the plan counts spend on the user's own provider keys

    @property
    def budgeted(self) -> bool:
        """Whether a budget or token quota applies to the request: it holds a reservation on their counters, and a
        chat request without an output limit is sent the one admission picked (``max_tokens``)."""
        return isinstance(self.handle, _Held) and bool(self.handle.counters)


def _check_models(*, limits: UserLimits, key_allowed_model_ids: frozenset[int] | None, model: ResolvedModel) -> None:
    if not limits.allows(model):
        rule = limits.model_rule()
        raise ModelNotAllowedError(
            f"Your plan ({limits.plan_name}) does not include the model `{model.name}`: it includes "
            f"{rule}. Pick another model (GET /v1/models lists yours) or ask for a larger plan.",
            page_message=f"Your plan ({limits.plan_name}) does not include the model {model.name}: it includes "
            f"{rule}. Pick another model in the model menu, or ask your administrator for a larger plan.",
            param="model",
        )
    if key_allowed_model_ids is not None and model.id not in key_allowed_model_ids:
        raise ModelNotAllowedError(
            f"This API key may not use the model `{model.name}`: it is restricted to a list of models "
            "(GET /v1/models lists them). Use another key or ask its owner to allow the model.",
            param="model",
        )


async def admission_acquire(
    *,
    user_id: int,
    api_key_id: int | None,
    key_allowed_model_ids: frozenset[int] | None,
    model: ResolvedModel,
    body: dict[str, Any],
    request_id: str,
    prompt_tokens_upper: int,
    prompt_tokens_estimate: int | None = None,
    endpoint: str = "",
    own_key_only: bool = False,
    output_unbounded: Sequence[ResolvedModel] = (),
    body_as_sent: dict[str, Any] | None = None,
    limits: UserLimits | None = None,
    answers: int = 1,
) -> Admission:
    """Admit the request or raise ``ModelNotAllowedError`` (403), ``QuotaExceededError`` or
    ``RateLimitExceededError`` (429); a refused request holds nothing.

    What it holds, it holds with a record of the request (``services.inflight``): should this process
    die before settling, the record becomes the request's ``lost`` ledger row and its holds are released.
    ``endpoint``: for that row.

    ``prompt_tokens_upper``: the prompt's bound, which everything is reserved at; ``prompt_tokens_estimate``: its
    likely size (``providers.tokens.prompt_tokens``' estimate), which alone decides whether the request is too large
    for a tokens-per-minute limit (``budgets.window_tokens_likely``).

    ``own_key_only``: every deployment that may serve the request runs on the user's own provider key
    (bring your own key). Unless the plan counts own-key spend, such a request costs the platform nothing
    (its ledger row's ``cost`` is 0, ``settlement.request_settle``), so no spending budget (USD: the plan's,
    the key's and its parents') reserves for it or refuses it; the token quota and rate limits still do.

    ``output_unbounded``: the models the request may end on whose parameter rules send a deployment no output
    limit (a ``drop``). Under a budget the request is reserved for the most they write (``_output_bounded``), or
    refused (``OutputUnboundedError``, 400) when the catalog does not say; with none, they change nothing.

    ``body_as_sent``: ``body`` as the models' parameter rules send it (``chat.pipeline._body_as_sent``), which is
    reserved for; None: ``body``. The tokens-per-minute windows count the client's own output limit, ``body``'s
    (``budgets.window_tokens``).

    ``limits``: the user's, as ``model_permission_check`` returned them for this request (None: looked up).

    ``answers``: how many attempts may answer the request (``chat.pipeline._answers_most``: a stream resumed on
    failure), each charged the web searches it ran before answering: so many are reserved (``charge_for``)."""
    limits = limits if limits is not None else await user_limits(user_id)
    _check_models(limits=limits, key_allowed_model_ids=key_allowed_model_ids, model=model)
    key = await key_limits(api_key_id) if api_key_id is not None else None
    ancestors = await _ancestors(key)
    now = timezone.now()
    counters = counter_specs(user_id=user_id, api_key_id=api_key_id, user=limits, key=key, now=now, ancestors=ancestors)
    if own_key_only and not limits.byok_counts_against_budget:
        counters = tuple(spec for spec in counters if spec.metric != BudgetMetric.COST)
    rates = _rates(user_id=user_id, api_key_id=api_key_id, limits=limits, key=key, ancestors=ancestors)
    admission = Admission(
        request_id=request_id,
        user_id=user_id,
        api_key_id=api_key_id,
        byok_counts_against_budget=limits.byok_counts_against_budget,
    )
    if not counters and not rates:
        return admission
    forced_limit = None
    reserved_body = body if body_as_sent is None else body_as_sent
    if counters and output_unbounded and model.mode != ModelMode.EMBEDDING:
        reserved_body, forced_limit = _output_bounded(reserved_body, output_unbounded)
    charge = charge_for(
        model=model,
        body=reserved_body,
        prompt_tokens_upper=prompt_tokens_upper,
        prompt_tokens_likely=prompt_tokens_estimate,
        cap=settings.LLMHUB_BUDGET_MAX_TOKENS_CAP,
        budgeted=bool(counters),
        client_body=body,
        answers=answers,
    )
    record = {
        "request_id": request_id,
        "user_id": user_id,
        "api_key_id": api_key_id,
        "model_id": model.id,
        "provider_id": model.provider.id,
        "model_name": model.name,
        "provider_name": model.provider.name,
        "endpoint": endpoint,
        "stream": bool(body.get("stream")),
        "prompt_tokens": charge.prompt_tokens,
        "web_search_requests": charge.web_searches,
        # What a ``lost`` row records as its prompt (``budgets.lost_tokens``): a resumed attempt's prefill is at
        # most the client's output limit; None when llmhub picks it, reserved per completion token.
        "resumes": charge.resumes,
        "prefill_tokens": None if charge.requested_max_tokens is None else charge.requested_max_tokens * charge.resumes,
        "admitted_at": now,
    }
    outcome = await admission_store().acquire(
        request_id=request_id, counters=counters, rates=rates, charge=charge, now=now, record=record
    )
    if any(spec.metric == BudgetMetric.COST for spec in counters):
        admission.reserved_cost = outcome.reserved.cost
    if charge.requested_max_tokens is None:
        admission.max_tokens = outcome.reserved.max_tokens
    elif forced_limit is not None:
        admission.max_tokens = forced_limit
    admission.headers = ratelimit_headers(outcome.rate_states)
    admission.anthropic_headers = anthropic_ratelimit_headers(outcome.rate_states, now_ms=_ms(now))
    admission.handle = _Held(counters=counters, rates=rates, instance=instance_id())
    return admission


def _output_bounded(body: dict[str, Any], models: Sequence[ResolvedModel]) -> tuple[dict[str, Any], int | None]:
    """``body`` as reserved under a budget when the parameter rules of ``models`` send a deployment no output
    limit: such a deployment may write all its model writes at most (the catalog's ``max_output_tokens``), so the
    limit reserved is the largest of those when it is more than the body's. Second: that limit when the body set
    none, which is then sent to every deployment that keeps a limit (the pipeline's ``_upstream_body``), so
    none writes past the reservation; else None. A model of which the catalog knows no such most is an
    administrator's misconfiguration under a budget: ``OutputUnboundedError``."""
    unknown = [model.name for model in models if not model.max_output_tokens]
    if unknown:
        names = ", ".join(f"`{name}`" for name in dict.fromkeys(unknown))
        raise OutputUnboundedError(
            f"This request cannot run under a budget: the parameter rules of the model {names} drop the output "
            "limit, so its deployments are sent none, and the catalog does not say how many tokens it writes at "
            "most (`max_output_tokens`), so nothing bounds what the request could cost. This is a misconfiguration "
            "of the model, not of your request: ask an administrator to set its `max_output_tokens` or to take the "
            "output limit out of its rules' `drop`.",
            param="model",
        )
    most = max(model.max_output_tokens or 0 for model in models)
    given = requested_max_tokens(body)
    if given is not None and given >= most:
        return body, None
    bounded = {name: value for name, value in body.items() if name != "max_completion_tokens"}
    bounded["max_tokens"] = most
    return bounded, most if given is None else None


async def admission_count_request(*, user_id: int, api_key_id: int | None, request_id: str) -> Admission:
    """Count a request that runs nothing upstream (``/v1/messages/count_tokens``) in the requests-per-minute
    windows of its key, the keys above it and its user, as ``admission_acquire`` would, or raise
    ``RateLimitExceededError``. It uses no tokens and costs nothing: no tokens window, no budget, nothing held
    and nothing to settle (the windows' entries leave them in a minute)."""
    limits = await user_limits(user_id)
    key = await key_limits(api_key_id) if api_key_id is not None else None
    ancestors = await _ancestors(key)
    rates = _rates(user_id=user_id, api_key_id=api_key_id, limits=limits, key=key, ancestors=ancestors)
    rates = tuple(rate for rate in rates if rate.rpm is not None)
    admission = Admission(request_id=request_id, user_id=user_id, api_key_id=api_key_id)
    if not rates:
        return admission
    now = timezone.now()
    states = await admission_store().requests_acquire(request_id=request_id, rates=rates, now=now)
    admission.headers = ratelimit_headers(states)
    admission.anthropic_headers = anthropic_ratelimit_headers(states, now_ms=_ms(now))
    return admission


def _rates(
    *,
    user_id: int,
    api_key_id: int | None,
    limits: UserLimits,
    key: KeyLimits | None,
    ancestors: list[tuple[int, KeyLimits]],
) -> tuple[RateSpec, ...]:
    """The per-minute windows a request counts in: its key's, its user's, and those of the keys above its key."""
    return rate_specs(
        user_id=user_id,
        api_key_id=api_key_id,
        user_rpm=limits.rpm,
        user_tpm=limits.tpm,
        key_rpm=key.rpm if key else None,
        key_tpm=key.tpm if key else None,
    ) + tuple(
        RateSpec(
            ScopeKind.KEY,
            ancestor_id,
            ancestor.rpm,
            ancestor.tpm,
            label=f"the key {ancestor.prefix}… that this key was created under",
        )
        for ancestor_id, ancestor in ancestors
        if ancestor.rpm is not None or ancestor.tpm is not None
    )


async def _ancestors(key: KeyLimits | None) -> list[tuple[int, KeyLimits]]:
    """The keys above a key, nearest first, from the same cache as the key's own limits."""
    chain: list[tuple[int, KeyLimits]] = []
    parent_id = key.parent_id if key is not None else None
    while parent_id is not None and len(chain) < MAX_KEY_DEPTH:
        parent = await key_limits(parent_id)
        if parent is None:
            break
        chain.append((parent_id, parent))
        parent_id = parent.parent_id
    return chain


async def admission_settle(
    *,
    admission: Admission,
    cost: Decimal,
    prompt_tokens: int,
    completion_tokens: int,
    ok: bool,
    row: dict[str, Any] | None = None,
) -> None:
    """Swap the reservation for the real cost. Called once per admitted request, whatever happened:
    a failed request settles with what it cost (often 0), which releases the rest of its reservation.
    ``ok`` does not change the accounting, the ledger's cost does.

    ``row``: the request's ledger row (``usage_data_dump``), not committed yet. The in-flight record is then
    kept, settled, with the row in it, until ``admission_records_forget``; without it the record goes."""
    held = admission.handle
    if not isinstance(held, _Held):
        return
    moved = await admission_store().settle(
        SettleRequest(
            request_id=admission.request_id,
            counters=held.counters,
            rates=held.rates,
            cost=cost,
            tokens=prompt_tokens + completion_tokens,
            now=timezone.now(),
            row=row,
        )
    )
    crossings = _crossings(moved)
    if crossings:
        await sync_to_async(budget_alerts_raise)(crossings=crossings, user_id=admission.user_id)


async def admission_settle_many(settles: Sequence[Mapping[str, Any]]) -> list[Exception | None]:
    """``admission_settle`` for several requests at once, each given by that function's arguments (the ledger
    writer's batch): their settles go to the counters' store together (Redis: one pipeline, not a round trip
    each), and each is settled, and alerts, as ``admission_settle`` would alone. Returns, in order, None for
    each that settled (or held nothing) and the error of each that did not."""
    outcomes: list[Exception | None] = [None] * len(settles)
    held = [(i, settle) for i, settle in enumerate(settles) if isinstance(settle["admission"].handle, _Held)]
    if not held:
        return outcomes
    now = timezone.now()
    moved_each = await admission_store().settle_many(
        [
            SettleRequest(
                request_id=settle["admission"].request_id,
                counters=settle["admission"].handle.counters,
                rates=settle["admission"].handle.rates,
                cost=settle["cost"],
                tokens=settle["prompt_tokens"] + settle["completion_tokens"],
                now=now,
                row=settle.get("row"),
            )
            for _, settle in held
        ]
    )
    for (i, settle), moved in zip(held, moved_each, strict=True):
        if isinstance(moved, Exception):
            outcomes[i] = moved
            continue
        crossings = _crossings(moved)
        if crossings:
            try:
                await sync_to_async(budget_alerts_raise)(crossings=crossings, user_id=settle["admission"].user_id)
            except Exception as exc:
                outcomes[i] = exc
    return outcomes


def admission_keeps_record(admission: Admission | None) -> bool:
    """Whether ``admission`` left an in-flight record, which its settle can keep, settled, with its row."""
    return (
        admission is not None
        and isinstance(admission.handle, _Held)
        and admission_store().keeps_record(admission.handle)
    )


def admission_records_held(entries: Iterable[tuple[Any, Admission | None]]) -> list[str]:
    """The request ids of ``entries`` (rows with their admissions) that left an in-flight record, which
    their settle kept, settled, until the rows are written."""
    return [admission.request_id for _, admission in entries if admission_keeps_record(admission)]


async def admission_records_forget(entries: Iterable[tuple[Any, Admission | None]]) -> None:
    """The rows of ``entries`` are committed or spooled: their settled in-flight records go."""
    by_instance: dict[str, list[str]] = {}
    for _, admission in entries:
        if admission_keeps_record(admission):
            by_instance.setdefault(admission.handle.instance, []).append(admission.request_id)
    if by_instance:
        await admission_store().records_forget(by_instance)


def admission_records_unmark(entries: Iterable[tuple[Any, Admission | None]]) -> None:
    """The rows of ``entries`` are spooled by a writer whose loop is gone, so that their settled records
    cannot be removed now: this process stops beating for them, and once it is gone the lost-request sweep
    removes them (writing rows the spool's replay writes too, which the ledger's unique id makes one)."""
    held_written(admission_records_held(entries))


def _crossings(moved: list[Moved]) -> list[Crossing]:
    return [c for spec, before, after in moved for c in budget_crossings(spec=spec, before=before, after=after)]


def admission_row_instant(admission: Admission | None, now: datetime) -> datetime:
    """The instant a settled request's ledger row is dated: ``now``, its settle, but never past the end of a
    period whose counter it was charged to. A request admitted in a day's (or a month's) last seconds holds
    its reservation on that period's counters and settles into them (``CounterRef.retention`` keeps them);
    dated in the next period, its row would be counted there by whatever reads the ledger: reconciliation
    would take the cost off the counter that paid it and the next period's budget would pay it again. It is
    dated instead at the last microsecond of the period it was admitted in, where every counter that held
    it is (a UTC day lies in one month)."""
    held = admission.handle if admission is not None else None
    if not isinstance(held, _Held):
        return now
    ends = [spec.ref.period_end for spec in held.counters if spec.ref.period_end is not None]
    if not ends or now < min(ends):
        return now
    return min(ends) - timedelta(microseconds=1)


def admission_dump(admission: Admission | None) -> dict[str, Any] | None:
    """What settling ``admission`` needs, as JSON, for a ledger row that waits in the spool; None when it
    holds nothing. The counters keep their limits and titles, for the alerts their settle may raise."""
    held = admission.handle if admission is not None else None
    if not isinstance(held, _Held):
        return None
    return {
        "request_id": admission.request_id,
        "user_id": admission.user_id,
        "api_key_id": admission.api_key_id,
        "instance": held.instance,
        "counters": [[spec.key, str(spec.limit), spec.title] for spec in held.counters],
        "rates": [[rate.scope_kind, rate.scope_id] for rate in held.rates],
    }


def admission_load(raw: Mapping[str, Any]) -> Admission:
    """The admission ``admission_dump`` wrote, as far as settling it goes (a rate scope's limits are not
    needed to correct its window)."""
    held = _Held(
        counters=tuple(
            CounterSpec(CounterRef.from_key(key), Decimal(limit), title) for key, limit, title in raw["counters"]
        ),
        rates=tuple(RateSpec(kind, int(scope_id), None, None) for kind, scope_id in raw["rates"]),
        instance=raw["instance"],
    )
    return Admission(
        request_id=raw["request_id"], user_id=raw["user_id"], api_key_id=raw.get("api_key_id"), handle=held
    )


def admission_settle_spooled(
    *, admission: Admission, cost: Decimal, prompt_tokens: int, completion_tokens: int, now: datetime | None = None
) -> bool:
    """``admission_settle`` for a row replayed from the spool, from any process, synchronously: the
    reservation is swapped for the row's cost if it is still held, and not again once it is not (settled by
    its request, by an earlier replay, or as a lost request; ``counters.reservation_settle_if_held``).
    Returns whether it settled. Raises ``redis.RedisError`` or ``DatabaseError`` when the counters' store is
    down: the row then waits in the spool with its admission."""
    held = admission.handle
    if not isinstance(held, _Held):
        return False
    moved = reservation_settle_if_held(
        request_id=admission.request_id,
        instance=held.instance,
        counters=held.counters,
        rates=held.rates,
        cost=cost,
        tokens=prompt_tokens + completion_tokens,
        now=now or timezone.now(),
    )
    if moved is None:
        return False
    crossings = _crossings(moved)
    if crossings:
        budget_alerts_raise(crossings=crossings, user_id=admission.user_id)
    return True


async def models_allowed(
    *, user_id: int, key_allowed_model_ids: frozenset[int] | None, mode: str | None = ModelMode.CHAT
) -> list[ResolvedModel]:
    """For /v1/models and the chat model picker: the plan's allow-list ∩ the key's ∩ the enabled catalog,
    of one ``mode`` (chat by default: the picker never offers an embedding model), or of all (None)."""
    limits = await user_limits(user_id)
    return [
        m
        for m in await models_enabled()
        if (mode is None or m.mode == mode)
        and limits.allows(m)
        and (key_allowed_model_ids is None or m.id in key_allowed_model_ids)
    ]


async def model_permission_check(
    *, user_id: int, key_allowed_model_ids: frozenset[int] | None, model: ResolvedModel
) -> UserLimits:
    """``ModelNotAllowedError`` (403) when the plan's or the key's allow-list excludes ``model``, in the words
    admission uses: for an endpoint that answers about a model without running a request (an estimate), and for a
    request as soon as its model is resolved, before any check that reads the model would answer for one the caller
    may not use. The user's limits it read, which ``admission_acquire`` then takes (``limits``), not looking again."""
    limits = await user_limits(user_id)
    _check_models(limits=limits, key_allowed_model_ids=key_allowed_model_ids, model=model)
    return limits


async def models_permitted(
    *, user_id: int, key_allowed_model_ids: frozenset[int] | None, models: list[ResolvedModel]
) -> list[ResolvedModel]:
    """Those of ``models`` that the plan's and the key's allow-lists include (the fallbacks a request may be
    answered by), without walking the whole catalog as ``models_allowed`` does."""
    limits = await user_limits(user_id)
    return [m for m in models if limits.allows(m) and (key_allowed_model_ids is None or m.id in key_allowed_model_ids)]
