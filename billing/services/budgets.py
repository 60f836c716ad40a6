"""Budgets: which counters a request is charged against, how much it may cost, and what the ledger says.

A request is charged against its user's monthly budget (USD), its user's daily token quota, its key's
budget (USD, daily / monthly / total), and the budget of every key above its key (a key created by a key
spends from its parent's budget too). Each counter holds ``spent`` (settled)
and ``reserved`` (requests in flight). Admission reserves the most a request can cost and refuses it
when a counter cannot pay; settlement swaps the reservation for the real cost. The arithmetic below is
the one the database path runs; ``redis_scripts/admission_acquire.lua`` runs the same steps in Redis.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from functools import lru_cache

from django.core.exceptions import ValidationError
from django.db.models import F, Sum
from django.db.models.functions import Coalesce

from providers.models import ModelMode
from providers.tokens import web_searches_bound
from providers.types import ResolvedModel

from ..exceptions import QuotaExceededError
from ..models import ApiKey, BudgetCounter, BudgetMetric, BudgetPeriod, ScopeKind, UsageRecord
from ..pricing import (
    COST_QUANTUM,
    cost_for,
    prompt_cost_ceiling,
    prompt_price_ceiling,
    reserved_tier,
    tier_factor,
    web_search_cost,
)
from ..selectors import KeyLimits, UserLimits, api_key_heirs, api_key_subtree_ids
from .spool import SpoolIndex

THRESHOLDS = (50, 80, 100)
# Longer than any request may run: an unsettled reservation older than this belonged to a dead process.
RESERVATION_TTL = timedelta(minutes=15)
# How long a settle is remembered after it happened: longer than the ledger row takes to be written.
SETTLED_MEMORY = timedelta(minutes=5)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KEY_PREFIX = "llmhub:bud:"


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime | None]:
    """[start, end) of the UTC period containing ``now``; a total budget never ends."""
    now = now.astimezone(UTC)
    if period == BudgetPeriod.DAILY:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == BudgetPeriod.MONTHLY:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return start, (start + timedelta(days=32)).replace(day=1)
    return _EPOCH, None


@lru_cache(maxsize=64)
def _period_start(period: str, second: int) -> datetime:
    """The start of the period containing the whole UTC second ``second``: a period starts on a whole second, so
    every instant of that second is in the same one. Cached, as every budgeted request asks it of each counter."""
    return period_bounds(period, datetime.fromtimestamp(second, UTC))[0]


@lru_cache(maxsize=4096)
def _counter_ref(scope_kind: str, scope_id: int, metric: str, period: str, period_start: datetime) -> CounterRef:
    """One shared (immutable) ``CounterRef`` per counter: a budgeted request names the same ones as the last."""
    return CounterRef(scope_kind, scope_id, metric, period, period_start)


def _period_label(period: str, start: datetime) -> str:
    # Not strftime, which was most of the cost of naming a budgeted request's counters on the hot path.
    if period == BudgetPeriod.DAILY:
        return f"d{start.year:04d}{start.month:02d}{start.day:02d}"
    if period == BudgetPeriod.MONTHLY:
        return f"m{start.year:04d}{start.month:02d}"
    return "total"


@dataclass(frozen=True, slots=True)
class CounterRef:
    """One scope's spend of one metric in one period; ``key`` names it in Redis and the database."""

    scope_kind: str
    scope_id: int
    metric: str
    period: str
    period_start: datetime
    # Named once: a request reads its counters' keys about ten times between admission and settle.
    key: str = field(init=False, repr=False, compare=False)
    # Found once too: admission and settle each read it for the counter's retention.
    period_end: datetime | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        label = _period_label(self.period, self.period_start)
        object.__setattr__(self, "key", f"{KEY_PREFIX}{self.scope_kind}:{self.scope_id}:{self.metric}:{label}")
        object.__setattr__(self, "period_end", period_bounds(self.period, self.period_start)[1])

    @classmethod
    def from_key(cls, key: str) -> CounterRef:
        scope_kind, scope_id, metric, label = key.removeprefix(KEY_PREFIX).split(":")
        if label == "total":
            return cls(scope_kind, int(scope_id), metric, BudgetPeriod.TOTAL, _EPOCH)
        if label.startswith("d"):
            start = datetime.strptime(label[1:], "%Y%m%d").replace(tzinfo=UTC)
            return cls(scope_kind, int(scope_id), metric, BudgetPeriod.DAILY, start)
        start = datetime.strptime(label[1:], "%Y%m").replace(tzinfo=UTC)
        return cls(scope_kind, int(scope_id), metric, BudgetPeriod.MONTHLY, start)

    def to_units(self, value: Decimal) -> int:
        """Integers for Redis: money in units of 1e-10 USD (the ledger's precision), rounded up."""
        if self.metric == BudgetMetric.COST:
            return int((value / COST_QUANTUM).to_integral_value(rounding=ROUND_CEILING))
        return int(value)

    def from_units(self, units: int | str) -> Decimal:
        if self.metric == BudgetMetric.COST:
            return Decimal(int(units)) * COST_QUANTUM
        return Decimal(int(units))

    def row(self, *, spent: Decimal = Decimal(0)) -> BudgetCounter:
        """The database's counter for this scope, metric and period, not saved, having spent ``spent``."""
        return BudgetCounter(
            key=self.key,
            scope_kind=self.scope_kind,
            scope_id=self.scope_id,
            metric=self.metric,
            period=self.period,
            period_start=self.period_start,
            spent=spent,
        )

    def retention(self, now: datetime) -> timedelta:
        """How long the counter is kept after its last use; it is rebuilt from the ledger if it goes."""
        end = self.period_end
        if end is None:
            return timedelta(days=35)
        return max(end - now, timedelta(0)) + timedelta(days=1)


@dataclass(frozen=True, slots=True)
class CounterSpec:
    ref: CounterRef
    limit: Decimal
    title: str  # "the monthly budget of your plan (Pro)": used in messages and alerts

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def metric(self) -> str:
        return self.ref.metric


def counter_specs(
    *,
    user_id: int,
    api_key_id: int | None,
    user: UserLimits,
    key: KeyLimits | None,
    now: datetime,
    ancestors: Sequence[tuple[int, KeyLimits]] = (),
) -> tuple[CounterSpec, ...]:
    """``ancestors``: the keys above ``api_key_id`` (id, limits), nearest first; a request through a key
    is charged against each of their budgets too, once."""
    specs: list[CounterSpec] = []
    second = int(now.timestamp() // 1)
    if user.monthly_budget_usd is not None:
        start = _period_start(BudgetPeriod.MONTHLY, second)
        ref = _counter_ref(ScopeKind.USER, user_id, BudgetMetric.COST, BudgetPeriod.MONTHLY, start)
        specs.append(CounterSpec(ref, user.monthly_budget_usd, f"the monthly budget of your plan ({user.plan_name})"))
    if user.daily_token_quota is not None:
        start = _period_start(BudgetPeriod.DAILY, second)
        ref = _counter_ref(ScopeKind.USER, user_id, BudgetMetric.TOKENS, BudgetPeriod.DAILY, start)
        specs.append(
            CounterSpec(ref, Decimal(user.daily_token_quota), f"the daily token quota of your plan ({user.plan_name})")
        )
    if key is not None and api_key_id is not None and key.budget_usd is not None:
        start = _period_start(key.budget_period, second)
        ref = _counter_ref(ScopeKind.KEY, api_key_id, BudgetMetric.COST, key.budget_period, start)
        specs.append(CounterSpec(ref, key.budget_usd, f"this API key's {key.budget_period} budget"))
    for ancestor_id, ancestor in ancestors:
        if ancestor.budget_usd is None or ancestor_id == api_key_id:
            continue
        start = _period_start(ancestor.budget_period, second)
        ref = _counter_ref(ScopeKind.KEY, ancestor_id, BudgetMetric.COST, ancestor.budget_period, start)
        title = f"the {ancestor.budget_period} budget of the key {ancestor.prefix}… that this key was created under"
        specs.append(CounterSpec(ref, ancestor.budget_usd, title))
    return tuple(dict.fromkeys(specs))


@dataclass(frozen=True, slots=True)
class Charge:
    """The most a request can cost: a fixed part (the prompt's upper bound, and the completion when
    the client set max_tokens) plus ``token_price`` per completion token when llmhub picks max_tokens."""

    fixed_cost: Decimal
    token_price: Decimal
    requested_max_tokens: int | None
    cap: int
    prompt_tokens: int
    choices: int
    # The prompt's likely size (the ledger's estimate when no usage comes back); None: its bound.
    likely_prompt_tokens: int | None = None
    # The client's own output limit, which the tokens-per-minute windows count (``window_tokens``); None: it set
    # none. A limit a parameter rule sends instead (``requested_max_tokens``) is reserved, not counted there.
    window_max_tokens: int | None = None
    # The most web searches the request may run (``web_searches_bound``), in ``fixed_cost`` at the search price: what
    # a ``lost`` row, charged the reservation, records as its searches (``counters._lost_row``).
    web_searches: int = 0
    # The attempts past the first that may answer (a stream resumed on failure), each reserved its prompt and a
    # prefill of the reply so far: what a ``lost`` row, charged the reservation, records as its prompt
    # (``lost_tokens``).
    resumes: int = 0


def requested_max_tokens(body: Mapping[str, object]) -> int | None:
    """The client's output limit; of ``max_completion_tokens`` and ``max_tokens`` both given, the larger: which
    one a deployment honours is its own (a parameter rule may rename one onto the other, a provider may know only
    ``max_tokens``), so the reservation must pay for either."""
    values = [
        value
        for value in (body.get("max_completion_tokens"), body.get("max_tokens"))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0
    ]
    return max(values) if values else None


# A text completion's reply limit when the request names none: OpenAI's (``CreateCompletionRequest``) and vLLM's. The
# completions pipeline sends it (a budget's clamp would otherwise lift it) and the cost calculator prices it.
COMPLETIONS_MAX_TOKENS_DEFAULT = 16


def replies_billed(body: Mapping[str, object]) -> int:
    """How many replies of up to ``max_tokens`` the request may be billed for: ``n``; for a text completion
    (``/v1/completions``) the larger of ``n`` and ``best_of`` (the provider bills every candidate it generated),
    for each of its prompts (a list of texts or of token arrays is one request per prompt)."""
    counts = [body.get("n"), body.get("best_of")]
    choices = max([count for count in counts if isinstance(count, int) and not isinstance(count, bool)] + [1])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(item, str | list) for item in prompt):
        choices *= len(prompt)
    return choices


def charge_for(
    *,
    model: ResolvedModel,
    body: Mapping[str, object],
    prompt_tokens_upper: int,
    cap: int,
    budgeted: bool,
    prompt_tokens_likely: int | None = None,
    client_body: Mapping[str, object] | None = None,
    answers: int = 1,
) -> Charge:
    """``budgeted``: a budget or quota applies, so a request without max_tokens gets one picked for it.
    ``prompt_tokens_likely``: the prompt's likely size, which alone decides whether a request is too large for a
    tokens-per-minute limit (``window_tokens_likely``); everything reserved is reserved at the bound.
    ``client_body``: the request as the client sent it, when ``body`` is as the models' parameter rules send it
    (``chat.pipeline._body_as_sent``): the windows count the client's own output limit, not a rule's.
    An embedding model produces no output tokens: its charge is the input alone, whatever the body says. The
    prompt is priced at the dearest of the input, cache-write and 1-hour cache-write prices
    (``prompt_cost_ceiling``): which of its tokens the provider writes to its cache is known only from the usage.
    The web searches a request's tools may run (``web_searches_bound``), and the one a model that searches on every
    request runs (``model.searches_every_request``), are reserved at the search price, the latter for each of the
    ``answers`` attempts that may answer it (a stream resumed on failure), as is the prompt, each resumed attempt's
    with its prefill (the reply so far: at most its output limit, or priced per output token when llmhub picks
    the limit). The tokens are reserved at the prices of
    the dearest service tier the request may be charged at (``reserved_tier``: its reply says the tier OpenAI served
    it at, which for ``auto`` or none is the project's default, maybe priority)."""
    choices = replies_billed(body)
    client_limit = requested_max_tokens(body if client_body is None else client_body)
    prompt_tokens = max(prompt_tokens_upper, 0)
    likely = None if prompt_tokens_likely is None else min(max(prompt_tokens_likely, 0), prompt_tokens)
    if model.mode == ModelMode.EMBEDDING:
        return Charge(
            cost_for(model=model, prompt_tokens=prompt_tokens, completion_tokens=0),
            Decimal(0),
            0,
            cap,
            prompt_tokens,
            1,
            likely,
        )
    max_tokens = requested_max_tokens(body)
    if max_tokens is None and not budgeted:
        # Nothing to clamp for; the tokens-per-minute window counts the prompt now and the rest at settle.
        max_tokens = 0
    searches = web_searches_bound(
        body, every_request=model.searches_every_request, answers=answers, web_plugin_online=model.web_plugin_online
    )
    searches_cost = _web_searches_cost(model, searches)
    tier = reserved_tier(model, body.get("service_tier"))
    # Each attempt that may answer is billed its prompt; a resumed one's holds the reply so far too, its prefill,
    # which is at most the reply's limit (settled by ``earlier_prompt_tokens``).
    resumes = max(answers - 1, 0)
    if max_tokens is not None:
        fixed = prompt_cost_ceiling(
            model=model,
            prompt_tokens=prompt_tokens * (1 + resumes) + max_tokens * resumes,
            completion_tokens=max_tokens * choices,
            service_tier=tier,
        )
        return Charge(
            fixed + searches_cost,
            Decimal(0),
            max_tokens,
            cap,
            prompt_tokens,
            choices,
            likely,
            client_limit,
            searches,
            resumes,
        )
    if model.max_output_tokens:
        cap = min(cap, model.max_output_tokens)
    fixed = (
        prompt_cost_ceiling(
            model=model, prompt_tokens=prompt_tokens * (1 + resumes), completion_tokens=0, service_tier=tier
        )
        + searches_cost
    )
    return Charge(
        fixed,
        (model.output_per_mtok + prompt_price_ceiling(model) * resumes) * tier_factor(model, tier) / Decimal(1_000_000),
        None,
        max(cap, 1),
        prompt_tokens,
        choices,
        likely,
        web_searches=searches,
        resumes=resumes,
    )


def lost_tokens(*, prompt_tokens: int, resumes: int, prefill_tokens: int | None, tokens: int) -> tuple[int, int]:
    """The prompt and completion tokens a request's reservation holds, as a ``lost`` row (charged that reservation)
    records them: the prompt of each attempt that may answer, ``prompt_tokens`` once and once more for each of
    ``resumes``, and each resumed attempt's prefill (``charge_for``): ``prefill_tokens`` when the client set the output
    limit, else priced per completion token reserved, once a resume; the completion, the replies reserved. ``tokens``:
    what the token budgets hold (``_tokens_with``: prompt and replies once an attempt)."""
    completion = max(tokens - prompt_tokens * (1 + resumes), 0) // (1 + resumes)
    prefill = resumes * completion if prefill_tokens is None else prefill_tokens
    return prompt_tokens * (1 + resumes) + prefill, completion


def _web_searches_cost(model: ResolvedModel, searches: int) -> Decimal:
    """What ``searches`` web searches cost at most on ``model``, to the ledger's places; 0 without any."""
    if not model.web_search_per_1k or not searches:
        return Decimal(0)
    return web_search_cost(model, searches).quantize(COST_QUANTUM, rounding=ROUND_CEILING)


@dataclass(frozen=True, slots=True)
class Reserved:
    max_tokens: int
    cost: Decimal
    tokens: int

    def amount_for(self, spec: CounterSpec) -> Decimal:
        return self.cost if spec.metric == BudgetMetric.COST else Decimal(self.tokens)


def window_tokens(charge: Charge, reserved: Reserved) -> int:
    """The tokens a request counts in the tokens-per-minute windows when admitted: its prompt plus the client's
    own max_tokens, or its prompt alone when the client set none (the max_tokens picked for a budget, or the one a
    parameter rule sends, fixed or the model's most for a dropped one, pays for the budget, and a window refusing a
    request for it would refuse a limit the client never asked for); the rest is counted when it settles, as for a
    request under no budget."""
    if charge.window_max_tokens is None:
        return charge.prompt_tokens
    return charge.prompt_tokens + min(charge.window_max_tokens, reserved.max_tokens) * charge.choices


def window_tokens_likely(charge: Charge, reserved: Reserved) -> int:
    """``window_tokens`` with the prompt at its likely size: only a request whose likely count is over a
    tokens-per-minute limit is too large for it, for ever. One whose bound alone is over the limit is counted in
    the window as the whole limit (``ratelimits``): admitted when nothing else is in the window, and corrected to
    what it really used when it settles, as every request is."""
    if charge.likely_prompt_tokens is None:
        return window_tokens(charge, reserved)
    return window_tokens(charge, reserved) - charge.prompt_tokens + charge.likely_prompt_tokens


def charge_clamp(charge: Charge, counters: Sequence[tuple[CounterSpec, Decimal, Decimal]]) -> Reserved:
    """Pick max_tokens (the client's, or the most every counter still pays for) and the amounts to reserve.
    ``counters``: (spec, spent, reserved). Raises ``QuotaExceededError`` if not even one token is paid for."""
    max_tokens = charge.requested_max_tokens
    if max_tokens is None:
        max_tokens = charge.cap
        tightest: tuple[CounterSpec, Decimal, Decimal] | None = None
        for spec, spent, reserved in counters:
            left = spec.limit - spent - reserved
            if spec.metric == BudgetMetric.COST:
                left -= charge.fixed_cost
                if charge.token_price > 0:
                    affordable = int((left / (charge.token_price * charge.choices)).to_integral_value(ROUND_FLOOR))
                else:
                    affordable = charge.cap if left >= 0 else -1
            else:
                answers = 1 + charge.resumes  # each attempt that may answer holds the prompt and the reply
                per_token = charge.choices * answers
                affordable = int(((left - charge.prompt_tokens * answers) / per_token).to_integral_value(ROUND_FLOOR))
            if affordable < max_tokens:
                max_tokens, tightest = affordable, (spec, spent, reserved)
        if max_tokens < 1 and tightest is not None:
            spec, spent, reserved = tightest
            one_token = Reserved(1, _cost_with(charge, 1), _tokens_with(charge, 1))
            raise quota_error(spec, spent=spent, reserved=reserved, needed=one_token.amount_for(spec))
    return Reserved(max_tokens, _cost_with(charge, max_tokens), _tokens_with(charge, max_tokens))


def _tokens_with(charge: Charge, max_tokens: int) -> int:
    """The tokens a token budget holds for a request given ``max_tokens``: its prompt and its replies, once for each
    attempt that may answer it (a stream resumed on failure: each attempt is billed its prompt, each resumed one with
    the reply so far as its prefill, at most its limit; the row counts them all, ``lost_tokens``)."""
    return (charge.prompt_tokens + max_tokens * charge.choices) * (1 + charge.resumes)


def _cost_with(charge: Charge, max_tokens: int) -> Decimal:
    variable = (Decimal(max_tokens * charge.choices) * charge.token_price).quantize(COST_QUANTUM, ROUND_CEILING)
    return charge.fixed_cost + variable


def charge_check(reserved: Reserved, counters: Sequence[tuple[CounterSpec, Decimal, Decimal]]) -> None:
    for spec, spent, held in counters:
        amount = reserved.amount_for(spec)
        if spent + held + amount > spec.limit:
            raise quota_error(spec, spent=spent, reserved=held, needed=amount)


def _amount(metric: str, value: Decimal) -> str:
    if metric == BudgetMetric.COST:
        return usd(value)
    return f"{int(value):,} tokens"


def usd(value: Decimal) -> str:
    """Dollars, with as many decimals as a small amount needs to be told apart from zero."""
    if value == 0 or abs(value) >= 1:
        return f"${value:,.2f}"
    whole, _, fraction = f"{value:.10f}".rstrip("0").partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def quota_error(spec: CounterSpec, *, spent: Decimal, reserved: Decimal, needed: Decimal) -> QuotaExceededError:
    metric = spec.metric
    # "… used", "… held": no verb to agree with "$0.50" and with "675 tokens" alike.
    held = f", {_amount(metric, reserved)} held by requests in progress" if reserved > 0 else ""
    advice = (
        "Raise the key's budget or wait for its next period."
        if spec.ref.scope_kind == ScopeKind.KEY
        else "Wait for the next period or ask an administrator for a larger plan."
    )
    return QuotaExceededError(
        f"You exceeded your current quota: {spec.title} is {_amount(metric, spec.limit)}; "
        f"{_amount(metric, spent)} used so far{held}, and this request could need up to {_amount(metric, needed)}. "
        f"{advice}"
    )


# Ledger sums. The ledger is the truth; counters are rebuilt from it.


def _ledger_rows(ref: CounterRef, *, until: datetime | None = None):
    # A key's counter is charged by its own requests and by those of every key created under it.
    if ref.scope_kind == ScopeKind.KEY:
        scope = {"api_key_id__in": api_key_subtree_ids(ref.scope_id)}
    else:
        scope = {"user_id": ref.scope_id}
    rows = UsageRecord.objects.filter(created_at__gte=ref.period_start, **scope)
    if ref.period_end is not None:
        rows = rows.filter(created_at__lt=ref.period_end)
    if until is not None:
        rows = rows.filter(created_at__lte=until)
    return rows


def _metric_sum(rows, metric: str) -> Decimal:
    if metric == BudgetMetric.COST:
        total = rows.aggregate(total=Coalesce(Sum("cost"), Decimal(0)))["total"]
    else:
        total = rows.aggregate(total=Coalesce(Sum(F("prompt_tokens") + F("completion_tokens")), 0))["total"]
    return Decimal(total)


def ledger_spend(ref: CounterRef) -> Decimal:
    """Spend (USD) or tokens of the counter's scope in its period according to the ledger."""
    return _metric_sum(_ledger_rows(ref), ref.metric)


def expected_spend(
    *,
    ref: CounterRef,
    at: datetime | None,
    open_ids: Collection[str],
    settled: Mapping[str, Decimal],
    spooled: SpoolIndex | None = None,
) -> Decimal:
    """What the counter should hold at the instant ``at`` of a snapshot (None: now), from the ledger.

    The ledger row of a request is written around the time it settles, before or after. So from the
    ledger rows up to ``at`` take away those of requests still open at ``at`` (they have not settled
    yet), and add the settles the ledger does not show yet (their rows are on their way), and the rows
    waiting in the ledger spool (the database was down) however long ago they settled.

    The spool is read before the ledger: a row replayed in between is then in both, and counted once.
    ``spooled``: the run's ``SpoolIndex``, for a caller that reads many counters (reconciliation)."""
    spooled = spooled_spend(ref, until=at, spooled=spooled)
    rows = _ledger_rows(ref, until=at)
    total = _metric_sum(rows, ref.metric)
    if open_ids:
        total -= _metric_sum(rows.filter(request_id__in=list(open_ids)), ref.metric)
    if settled:
        written = set(UsageRecord.objects.filter(request_id__in=list(settled)).values_list("request_id", flat=True))
        total += sum((amount for rid, amount in settled.items() if rid not in written), Decimal(0))
    waiting = {rid: amount for rid, amount in spooled.items() if rid not in settled and rid not in open_ids}
    if waiting:
        written = set(UsageRecord.objects.filter(request_id__in=list(waiting)).values_list("request_id", flat=True))
        total += sum((amount for rid, amount in waiting.items() if rid not in written), Decimal(0))
    return total


def spooled_spend(
    ref: CounterRef, *, until: datetime | None = None, spooled: SpoolIndex | None = None
) -> dict[str, Decimal]:
    """Spend (USD) or tokens of the counter's scope in its period in the rows waiting in the ledger spool,
    by request id (some may be in the ledger already: a replay is under way). ``spooled``: the caller's
    run's ``SpoolIndex`` (without it, the spool is read for this counter alone)."""
    spooled = spooled or SpoolIndex()
    if ref.scope_kind == ScopeKind.KEY:
        keys = set(api_key_subtree_ids(ref.scope_id))
        # A row of a key deleted since it was spooled is its heir's, as the replay will write it.
        keys |= {deleted for deleted, heir in spooled.heirs(api_key_heirs).items() if heir in keys}
        rows = spooled.of_keys(keys)
    else:
        rows = spooled.of_user(ref.scope_id)
    spent: dict[str, Decimal] = {}
    for row in rows:
        if row.created_at < ref.period_start or (ref.period_end is not None and row.created_at >= ref.period_end):
            continue
        if until is not None and row.created_at > until:
            continue
        if ref.metric == BudgetMetric.COST:
            spent[row.request_id] = row.cost
        else:
            spent[row.request_id] = Decimal(row.prompt_tokens + row.completion_tokens)
    return spent


def api_key_limits_set(
    *,
    api_key: ApiKey,
    budget_usd: Decimal | None,
    budget_period: str = BudgetPeriod.MONTHLY,
    rpm: int | None = None,
    tpm: int | None = None,
) -> ApiKey:
    """Set a key's own budget and rate limits (None: no limit of the key's own)."""
    if budget_usd is not None and budget_usd < 0:
        raise ValidationError({"budget_usd": "A budget cannot be negative."})
    if budget_period not in BudgetPeriod.values:
        raise ValidationError({"budget_period": f"Choose one of {', '.join(BudgetPeriod.values)}."})
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 0:
            raise ValidationError({name: "A rate limit cannot be negative."})
    api_key.budget_usd = budget_usd
    api_key.budget_period = budget_period
    api_key.rpm = rpm
    api_key.tpm = tpm
    api_key.full_clean(exclude=["user", "prefix", "secret_hash"])
    api_key.save(update_fields=["budget_usd", "budget_period", "rpm", "tpm"])  # signals clear cached limits
    return api_key
