"""Reads of billing data: a user's keys and ledger (the management API), the limits checked on every
request (cached in-process), and the usage dashboards' figures."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import Count, DecimalField, ExpressionWrapper, F, FloatField, Q, QuerySet, Sum
from django.db.models.functions import Cast, Coalesce, TruncDate

from core.cache import TTLCache
from core.id_batches import id_batches
from providers.byok import byok_callable, byok_required_in, user_credentials_sync
from providers.exceptions import model_not_found
from providers.models import ByokMode, ModelMode
from providers.selectors import model_resolve_sync, models_enabled_sync
from providers.types import ResolvedModel

from .exceptions import ModelNotAllowedError
from .models import (
    ApiKey,
    ApiKeyHeir,
    DailyExperimentUsage,
    DailyStaffUsage,
    DailyUsage,
    DailyUsageMark,
    DailyUserUsage,
    ExperimentUsageMark,
    Operation,
    Plan,
    UsageRecord,
    UserPlan,
)
from .pricing import CostBreakdown, cost_breakdown

# API KEYS AND LEDGER (management API)


def api_key_list(*, user: Any, root_key_id: int | None = None) -> QuerySet[ApiKey]:
    """The user's keys; with ``root_key_id``, only that key and the keys created under it (what a key
    with the ``keys:manage`` scope may see)."""
    keys = ApiKey.objects.filter(user=user)
    if root_key_id is not None:
        keys = keys.filter(pk__in=api_key_subtree_ids(root_key_id))
    return keys.prefetch_related("allowed_models").order_by("-created_at", "-pk")


def api_key_get(*, user: Any, key_id: int, root_key_id: int | None = None) -> ApiKey | None:
    """One of the user's own keys (in ``root_key_id``'s subtree, if given); any other key is None, exactly
    like a missing one."""
    return api_key_list(user=user, root_key_id=root_key_id).filter(pk=key_id).first()


def api_key_subtree_ids(key_id: int) -> list[int]:
    """The key and every key created under it, at any depth."""
    ids, frontier = [key_id], [key_id]
    while frontier:
        frontier = [pk for pk in ApiKey.objects.filter(parent_id__in=frontier).values_list("pk", flat=True)]
        frontier = [pk for pk in frontier if pk not in ids]  # a loop made by hand ends the walk
        ids += frontier
    return ids


def api_keys_subtree(key_ids: Iterable[int]) -> dict[int, int | None]:
    """The keys ``key_ids`` (those that exist) and every key created under any of them, at any depth, each with
    its parent: a query a level for each ``IDS_A_STATEMENT`` keys (an admin's selection across the list), not a
    walk a key."""
    found: dict[int, int | None] = {}
    frontier = sorted(set(key_ids))
    column = "pk__in"
    while frontier:
        level: list[int] = []
        for batch in id_batches(frontier):
            for pk, parent_id in ApiKey.objects.filter(**{column: batch}).values_list("pk", "parent_id"):
                if pk not in found:  # a loop made by hand ends the walk
                    found[pk] = parent_id
                    level.append(pk)
        frontier, column = sorted(level), "parent_id__in"
    return found


def api_key_heirs(key_ids: Collection[int]) -> dict[int, int]:
    """Of these keys, the deleted ones whose heir exists (the key above them that their delete left: ``ApiKeyHeir``,
    their rows' key now), each with its heir; a key that exists, or that was deleted with no key left above it or
    whose heir went later with its whole tree, is not in it. Two queries at most (docs/ledger.md, "A deleted key's
    spend")."""
    if not key_ids:
        return {}
    heirs = dict(ApiKeyHeir.objects.filter(deleted_key_id__in=key_ids).values_list("deleted_key_id", "heir_key_id"))
    alive = set(ApiKey.objects.filter(pk__in=set(heirs.values())).values_list("pk", flat=True)) if heirs else set()
    return {deleted: heir for deleted, heir in heirs.items() if heir in alive}


def api_key_ancestor_ids(key_id: int) -> list[int]:
    """The keys above this one, nearest first."""
    ids: list[int] = []
    parent_id = ApiKey.objects.filter(pk=key_id).values_list("parent_id", flat=True).first()
    while parent_id is not None and parent_id not in ids and parent_id != key_id:
        ids.append(parent_id)
        parent_id = ApiKey.objects.filter(pk=parent_id).values_list("parent_id", flat=True).first()
    return ids


@dataclass(frozen=True)
class UsageFilters:
    start: date | datetime | None = None
    end: date | datetime | None = None
    model: str | None = None
    key: str | None = None  # a key's id or its prefix
    status: str | None = None

    def created_range(self) -> tuple[datetime | None, datetime | None]:
        """[since, until): a date start is its midnight (UTC); a date end includes its whole day; a
        date-time end is inclusive."""
        since = until = None
        if self.start is not None:
            since = self.start if isinstance(self.start, datetime) else datetime.combine(self.start, time(), UTC)
        if self.end is not None:
            if isinstance(self.end, datetime):
                until = self.end + timedelta(microseconds=1)
            else:
                until = datetime.combine(self.end + timedelta(days=1), time(), UTC)
        return since, until


def usage_record_list(
    *, user: Any, filters: UsageFilters, key_ids: Collection[int] | None = None
) -> QuerySet[UsageRecord]:
    """The user's own ledger rows, newest first, with ``key_prefix`` of the key used (None without one);
    with ``key_ids``, only the rows of those keys (a gateway key's subtree, ``api_key_subtree_ids``)."""
    rows = UsageRecord.objects.filter(user=user)
    if key_ids is not None:
        rows = rows.filter(api_key_id__in=key_ids)
    since, until = filters.created_range()
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    if filters.model:
        rows = rows.filter(model_name=filters.model)
    if filters.status:
        rows = rows.filter(status=filters.status)
    if filters.key:
        rows = (
            rows.filter(api_key_id=int(filters.key))
            if filters.key.isdigit()
            else rows.filter(api_key__prefix=filters.key)
        )
    return rows.annotate(key_prefix=F("api_key__prefix")).order_by("-created_at", "-pk")


# A request whose model name matched no model of the catalog (mistyped, disabled, removed) is refused
# before a provider is chosen: its ledger row (status ``rejected``, $0) has no provider name, in the
# ledger and in its daily rollup alike. It counts as a request, but lists of spend per model or provider
# leave it out: its name is whatever the client typed, not a model.
NAMED_NO_MODEL = Q(provider_name="")

_TOTALS = {
    "requests": Count("pk"),
    "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
    "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
    "cached_tokens": Coalesce(Sum("cached_tokens"), 0),
    "cache_write_tokens": Coalesce(Sum("cache_write_tokens"), 0),
    "cache_write_1h_tokens": Coalesce(Sum("cache_write_1h_tokens"), 0),
    "web_search_requests": Coalesce(Sum("web_search_requests"), 0),
    "cost": Coalesce(Sum("cost"), Decimal(0)),
}


def usage_summary(*, user: Any, filters: UsageFilters, key_ids: Collection[int] | None = None) -> dict[str, Any]:
    """Totals, per UTC day, per model and per operation, of the rows ``usage_record_list`` would return;
    requests that named no model of the catalog are in the total, the days and their operation but under no
    model."""
    rows = usage_record_list(user=user, filters=filters, key_ids=key_ids).order_by()
    by_day = rows.annotate(day=TruncDate("created_at", tzinfo=UTC)).values("day").annotate(**_TOTALS).order_by("day")
    by_model = rows.exclude(NAMED_NO_MODEL).values("model_name").annotate(**_TOTALS).order_by("model_name")
    by_operation = rows.values("operation").annotate(**_TOTALS).order_by("operation")
    return {
        "total": rows.aggregate(**_TOTALS),
        "by_day": list(by_day),
        "by_model": [{"model": entry.pop("model_name"), **entry} for entry in by_model],
        "by_operation": list(by_operation),
    }


# LIMITS (request path)

# Limits on the request path: one query per TTL per user or key, not per request. The process that
# changes a plan or key clears its copy at once and again after commit (``forget_now_and_after_commit``);
# other processes follow within LLMHUB_LOOKUP_CACHE_TTL.
limits_cache: TTLCache[Any] = TTLCache("billing-limits")


@dataclass(frozen=True, slots=True)
class UserLimits:
    plan_name: str | None  # None: the user has no plan and nothing limits them
    allow_all_models: bool
    allowed_model_ids: frozenset[int]
    max_output_price_per_mtok: Decimal | None
    daily_token_quota: int | None
    monthly_budget_usd: Decimal | None
    rpm: int | None
    tpm: int | None
    byok_counts_against_budget: bool = False  # whether spend on the user's own provider keys counts
    moderation_policy_id: int | None = None  # the plan's moderation policy

    def allows(self, model: ResolvedModel) -> bool:
        if self.allow_all_models or model.id in self.allowed_model_ids:
            return True
        return self.max_output_price_per_mtok is not None and model.output_per_mtok <= self.max_output_price_per_mtok

    def model_rule(self) -> str:
        """The allow-list in words, for the message that refuses a model."""
        parts = []
        if self.max_output_price_per_mtok is not None:
            parts.append(
                f"models whose output price is at most ${self.max_output_price_per_mtok:.2f} per million tokens"
            )
        if self.allowed_model_ids:
            parts.append("the models it lists")
        return " and ".join(parts) or "no models"


UNRESTRICTED = UserLimits(
    plan_name=None,
    allow_all_models=True,
    allowed_model_ids=frozenset(),
    max_output_price_per_mtok=None,
    daily_token_quota=None,
    monthly_budget_usd=None,
    rpm=None,
    tpm=None,
)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    budget_usd: Decimal | None
    budget_period: str
    rpm: int | None
    tpm: int | None
    parent_id: int | None = None  # the key that created this one: its limits apply to this key's requests too
    prefix: str = ""


def _pick(override: Any, plan_value: Any) -> Any:
    return plan_value if override is None else override


def user_limits_from(user_plan: UserPlan, allowed_model_ids: Iterable[int]) -> UserLimits:
    plan = user_plan.plan
    return UserLimits(
        plan_name=plan.name,
        allow_all_models=plan.allow_all_models,
        allowed_model_ids=frozenset(allowed_model_ids),
        max_output_price_per_mtok=plan.max_output_price_per_mtok,
        daily_token_quota=_pick(user_plan.daily_token_quota, plan.daily_token_quota),
        monthly_budget_usd=_pick(user_plan.monthly_budget_usd, plan.monthly_budget_usd),
        rpm=_pick(user_plan.rpm, plan.rpm),
        tpm=_pick(user_plan.tpm, plan.tpm),
        byok_counts_against_budget=plan.byok_counts_against_budget,
        moderation_policy_id=plan.moderation_policy_id,
    )


async def _load_user_limits(user_id: int) -> UserLimits:
    from .services.plans import user_plan_ensure

    user_plan = await UserPlan.objects.select_related("plan").filter(user_id=user_id).afirst()
    if user_plan is None:
        user_plan = await sync_to_async(user_plan_ensure)(user_id=user_id)
        if user_plan is None:
            return UNRESTRICTED
    allowed: list[int] = []
    if not user_plan.plan.allow_all_models:
        allowed = [pk async for pk in user_plan.plan.allowed_models.values_list("pk", flat=True)]
    return user_limits_from(user_plan, allowed)


async def user_limits(user_id: int) -> UserLimits:
    return await limits_cache.get_or_load(("user", user_id), lambda: _load_user_limits(user_id))


async def _load_key_limits(api_key_id: int) -> KeyLimits | None:
    row = await (
        ApiKey.objects.filter(pk=api_key_id)
        .values("budget_usd", "budget_period", "rpm", "tpm", "parent_id", "prefix")
        .afirst()
    )
    return None if row is None else KeyLimits(**row)


async def key_limits(api_key_id: int) -> KeyLimits | None:
    return await limits_cache.get_or_load(("key", api_key_id), lambda: _load_key_limits(api_key_id))


def user_limits_sync(user_id: int) -> UserLimits:
    """For pages and commands: the same limits, uncached, without creating a plan row."""
    user_plan = UserPlan.objects.select_related("plan").filter(user_id=user_id).first()
    if user_plan is None:
        plan = Plan.objects.filter(name=settings.LLMHUB_DEFAULT_PLAN).first() if settings.LLMHUB_DEFAULT_PLAN else None
        if plan is None:
            return UNRESTRICTED
        user_plan = UserPlan(user_id=user_id, plan=plan)
    allowed = [] if user_plan.plan.allow_all_models else user_plan.plan.allowed_models.values_list("pk", flat=True)
    return user_limits_from(user_plan, allowed)


# USAGE DASHBOARDS
# Days before yesterday come from the rollups (DailyUsage; everyone's figures not per user, DailyStaffUsage;
# figures per user not by key, provider, model or operation, DailyUserUsage).
# Yesterday and today, the days the rollup task still rebuilds (every 10 minutes), are their rollup plus the raw
# ledger rows above the rollup's mark (DailyUsageMark): minutes of raw rows rather than whole days, which is
# what keeps the staff pages fast at millions of requests a day (docs/ledger.md), and yesterday stays whole
# between midnight and the task's next run (or while the task is down).


@dataclass(frozen=True, slots=True)
class DaySpend:
    day: date
    cost: Decimal
    requests: int


@dataclass(frozen=True, slots=True)
class SpendShare:
    label: str
    requests: int
    tokens: int
    cost: Decimal


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


_T = TypeVar("_T")
_M = TypeVar("_M")


def _recent_marks(today: date) -> tuple[int | None, int | None]:
    """The marks of yesterday and today (None: that day is not rolled up)."""
    yesterday = today - timedelta(1)
    found = dict(DailyUsageMark.objects.filter(day__in=(yesterday, today)).values_list("day", "through_id"))
    return found.get(yesterday), found.get(today)


# What the rollups derived from DailyUsage group by besides the day (services.rollups.rollup_derive writes them).
STAFF_USAGE_GROUP = ("provider_name", "model_name", "operation")
USER_USAGE_GROUP = ("user_id",)


def _rollup_for(columns: set[str]) -> type[DailyUsage] | type[DailyStaffUsage] | type[DailyUserUsage]:
    """The smallest rollup that has ``columns`` (besides the day and the sums): the staff rollup (a hundred rows a
    day), the per-user rollup (a row a day per user), else ``DailyUsage``."""
    if columns <= set(STAFF_USAGE_GROUP):
        return DailyStaffUsage
    if columns <= set(USER_USAGE_GROUP):
        return DailyUserUsage
    return DailyUsage


def _usage_window(
    *,
    days: int,
    today: date,
    user_id: int | None,
    read: Callable[[QuerySet, QuerySet], _T],
    columns: tuple[str, ...] = (),
) -> _T:
    """``read(rolled, live)`` over the ``days`` days up to today: ``rolled`` the rollup's rows, ``live``
    the raw ledger rows the rollup does not hold (yesterday's and today's above their marks; all of a
    day's when it has no rollup yet). Both are the ledger's figures exactly, with nothing counted twice.

    ``rolled`` is the smallest rollup with the columns ``read`` groups or filters by (``columns``, and ``user_id``
    for one user's figures; ``_rollup_for``): everyone's figures not per user from the staff rollup
    (``DailyStaffUsage``: per day, provider, model and operation, a hundred rows a day), figures per user not by
    key, provider, model or operation from the per-user rollup (``DailyUserUsage``: per day and user), the
    others from ``DailyUsage``. All hold the same rows up to the same marks.

    Read at steady marks (``_at_a_steady_mark``)."""
    first = today - timedelta(days=days - 1)
    recent = (today - timedelta(1), today)

    def window(marks: tuple[int | None, int | None]) -> _T:
        held = [(day, mark) for day, mark in zip(recent, marks, strict=True) if day >= first]
        rollup = _rollup_for(set(columns) | ({"user_id"} if user_id is not None else set()))
        rolled = rollup.objects.filter(day__gte=first, day__lte=today)
        unrolled = Q(pk__in=[])
        for day, mark in held:
            rows = Q(created_at__gte=_day_start(day), created_at__lt=_day_start(day + timedelta(1)))
            if mark is None:
                rolled = rolled.exclude(day=day)
                unrolled |= rows
            else:
                unrolled |= rows & Q(pk__gt=mark)
        live = UsageRecord.objects.filter(unrolled)
        if all(mark is not None for _, mark in held):  # the same rows, with a bound the planner takes to the pk
            live = live.filter(pk__gt=min(mark for _, mark in held))
        if user_id is not None:
            rolled, live = rolled.filter(user_id=user_id), live.filter(user_id=user_id)
        return read(rolled, live)

    # Without marks (neither day rolled up yet, or in the end) both days are read raw whole, which no rollup
    # committing meanwhile can change: the rollup's rows of those days are not read.
    return _at_a_steady_mark(
        lambda: _recent_marks(today),
        window,
        steady=lambda marks: marks == (None, None),
        settle=lambda: window((None, None)),
    )


def _at_a_steady_mark(
    mark: Callable[[], _M],
    window: Callable[[_M], _T],
    *,
    settle: Callable[[], _T],
    steady: Callable[[_M], bool] | None = None,
) -> _T:
    """``window(m)`` for a rollup's mark ``m`` (``mark()``), its rollup and raw rows read in separate
    statements: the mark and the rollup are written in one transaction, but a rollup committing between
    the reads would pair an old mark with a newer rollup, so the mark is read again afterwards and the
    window read again if it moved (unless ``steady(m)``: a window no rollup can change). Rollups run
    every 10 minutes, so this almost never repeats; if the mark kept moving, ``settle()`` reads a window
    that holds without it."""
    for _attempt in range(3):
        seen = mark()
        result = window(seen)
        if (steady is not None and steady(seen)) or mark() == seen:
            return result
    return settle()


def usage_daily(*, days: int, today: date, user_id: int | None = None) -> list[DaySpend]:
    """Spend per UTC day for the ``days`` days up to and including today, zero-filled; everyone's when
    ``user_id`` is None."""

    def read(rolled: QuerySet, live: QuerySet) -> dict[date, list]:
        found: dict[date, list] = {}
        for row in rolled.values("day").annotate(cost=Sum("cost"), requests=Sum("requests")).order_by():
            found[row["day"]] = [row["cost"], row["requests"]]
        live_days = live.annotate(day=TruncDate("created_at", tzinfo=UTC)).values("day")
        for row in live_days.annotate(cost=Sum("cost"), requests=Count("pk")).order_by():
            entry = found.setdefault(row["day"], [Decimal(0), 0])
            entry[0] += row["cost"]
            entry[1] += row["requests"]
        return found

    found = _usage_window(days=days, today=today, user_id=user_id, read=read)
    first = today - timedelta(days=days - 1)
    return [DaySpend(day, *found.get(day, (Decimal(0), 0))) for day in (first + timedelta(n) for n in range(days))]


_BREAKDOWN_FIELDS = {"model": "model_name", "provider": "provider_name", "user": "user_id", "operation": "operation"}
# Rollup rows from before DailyUsage kept the operation have none (their day not rebuilt since).
OPERATION_UNKNOWN = "(unknown)"


def usage_breakdown(*, by: str, days: int, today: date, user_id: int | None = None) -> list[SpendShare]:
    """Spend over the last ``days`` days grouped by ``by`` ("model", "provider", "user" or "operation"), largest
    first.

    By model or provider, requests that named no model of the catalog are left out (see NAMED_NO_MODEL);
    by user or operation they count, as they do in ``usage_daily`` (the operation was asked for all the same)."""
    group = _BREAKDOWN_FIELDS[by]  # the same column name in the rollups and UsageRecord

    def read(rolled: QuerySet, live: QuerySet) -> dict[Any, list]:
        if by in ("model", "provider"):
            rolled, live = rolled.exclude(NAMED_NO_MODEL), live.exclude(NAMED_NO_MODEL)
        merged: dict[Any, list] = {}
        for rows, requests in ((rolled, Sum("requests")), (live, Count("pk"))):
            grouped = rows.values(group).annotate(
                n=requests,
                tokens=Coalesce(Sum("prompt_tokens"), 0) + Coalesce(Sum("completion_tokens"), 0),
                spent=Coalesce(Sum("cost"), Decimal(0)),
            )
            for row in grouped.order_by():
                entry = merged.setdefault(row[group], [0, 0, Decimal(0)])
                entry[0] += row["n"]
                entry[1] += row["tokens"]
                entry[2] += row["spent"]
        return merged

    columns = (group, "provider_name") if by in ("model", "provider") else (group,)  # NAMED_NO_MODEL reads it
    merged = _usage_window(days=days, today=today, user_id=user_id, read=read, columns=columns)
    if by == "user":
        from django.contrib.auth import get_user_model

        # A batch of users a query: everyone who spent in the window is more than a statement can name.
        users = get_user_model().objects
        usernames = {
            pk: username
            for batch in id_batches(sorted(k for k in merged if k))
            for pk, username in users.filter(pk__in=batch).values_list("pk", "username")
        }
        labels = {key: usernames.get(key, "(deleted user)") for key in merged}
    elif by == "operation":
        names = dict(Operation.choices)
        labels = {key: names.get(key, key) if key else OPERATION_UNKNOWN for key in merged}
    else:
        labels = {key: key or "(unknown)" for key in merged}
    shares = [SpendShare(labels[key], requests, tokens, cost) for key, (requests, tokens, cost) in merged.items()]
    return sorted(shares, key=lambda share: (-share.cost, -share.requests, share.label))


# EXPERIMENTS' USAGE
# An experiment's figures add across days: DailyExperimentUsage holds them per day, variant and status for
# every ledger row up to ExperimentUsageMark.through_id (services.rollups.experiment_usage_fold, every 10
# minutes); the rows above it are read raw. experiments.results reads both.


def experiment_usage_sums() -> dict[str, Any]:
    """The sums an experiment's results add up, as aggregates over ledger rows: the fold writes them per day
    into ``DailyExperimentUsage`` (same names), the results read them from the raw rows the fold has not
    reached yet. ``price`` is what the request cost whoever paid; ``ttft_*`` cover streamed rows with a
    time to first token. The price's sums stay decimal: PostgreSQL casts numeric to float through text,
    which cost more than the rest of the pass."""
    price = Coalesce("user_key_cost", "cost")
    ttft = Q(stream=True, ttft_ms__isnull=False)
    duration, first_token = Cast("duration_ms", FloatField()), Cast("ttft_ms", FloatField())
    return {
        "requests": Count("pk"),
        "duration_sum": Coalesce(Sum("duration_ms"), 0),
        "duration_squares": Coalesce(Sum(duration * duration), 0.0),
        "ttft_n": Count("pk", filter=ttft),
        "ttft_sum": Coalesce(Sum("ttft_ms", filter=ttft), 0),
        "ttft_squares": Coalesce(Sum(first_token * first_token, filter=ttft), 0.0),
        "price": Coalesce(Sum(price), Decimal(0), output_field=DecimalField()),
        "price_squares": Coalesce(
            Sum(ExpressionWrapper(price * price, output_field=DecimalField())), Decimal(0), output_field=DecimalField()
        ),
    }


def _experiment_mark() -> int:
    return ExperimentUsageMark.objects.filter(pk=1).values_list("through_id", flat=True).first() or 0


def experiment_usage_window(*, experiment_id: int, read: Callable[[QuerySet, QuerySet], _T]) -> _T:
    """``read(rolled, live)`` for one experiment: ``rolled`` its ``DailyExperimentUsage`` rows, ``live`` its
    ledger rows the rollup does not hold (above the mark). Together they are every row of the experiment
    that was ever written, each counted once (the rollup keeps rows retention has deleted since).

    Read at a steady mark (``_at_a_steady_mark``). If folds kept moving it, the window is read in one
    transaction holding the mark's row lock, which a fold waits for: the raw rows alone would miss those
    retention has deleted since they were folded."""
    live = UsageRecord.objects.filter(experiment_id=experiment_id)
    rolled = DailyExperimentUsage.objects.filter(experiment_id=experiment_id)

    def window(mark: int) -> _T:
        return read(rolled, live.filter(pk__gt=mark) if mark else live)  # no mark: the covering index's plan

    def settle() -> _T:
        with transaction.atomic():
            mark = ExperimentUsageMark.objects.select_for_update().filter(pk=1).values_list("through_id", flat=True)
            return window(mark.first() or 0)

    return _at_a_steady_mark(_experiment_mark, window, settle=settle)


@dataclass(frozen=True, slots=True)
class Meter:
    """How much of one limit is used in its current period."""

    title: str
    used: Decimal
    limit: Decimal
    metric: str  # "cost" or "tokens"
    period: str

    @property
    def percent(self) -> int:
        return 100 if self.limit <= 0 else min(100, int(self.used * 100 / self.limit))

    @property
    def left(self) -> Decimal:
        return max(self.limit - self.used, Decimal(0))


def usage_meters(*, user: Any, now: datetime) -> list[Meter]:
    """The user's plan budget and token quota, and each active key's budget, as the ledger has them."""
    from .models import BudgetMetric, BudgetPeriod, ScopeKind
    from .services.budgets import CounterRef, ledger_spend, period_bounds

    limits = user_limits_sync(user.pk)
    meters = []
    if limits.monthly_budget_usd is not None:
        start, _ = period_bounds(BudgetPeriod.MONTHLY, now)
        used = ledger_spend(CounterRef(ScopeKind.USER, user.pk, BudgetMetric.COST, BudgetPeriod.MONTHLY, start))
        meters.append(Meter("Monthly budget", used, limits.monthly_budget_usd, BudgetMetric.COST, "this month"))
    if limits.daily_token_quota is not None:
        start, _ = period_bounds(BudgetPeriod.DAILY, now)
        used = ledger_spend(CounterRef(ScopeKind.USER, user.pk, BudgetMetric.TOKENS, BudgetPeriod.DAILY, start))
        meters.append(Meter("Daily tokens", used, Decimal(limits.daily_token_quota), BudgetMetric.TOKENS, "today"))
    keys = ApiKey.objects.filter(user=user, revoked_at__isnull=True, budget_usd__isnull=False).order_by("name")
    for key in keys:
        start, _ = period_bounds(key.budget_period, now)
        used = ledger_spend(CounterRef(ScopeKind.KEY, key.pk, BudgetMetric.COST, key.budget_period, start))
        period = {"daily": "today", "monthly": "this month", "total": "in total"}[key.budget_period]
        meters.append(Meter(f"Key “{key.name}” ({key.prefix}…)", used, key.budget_usd, BudgetMetric.COST, period))
    return meters


# COST ESTIMATES


@dataclass(frozen=True, slots=True)
class DeploymentCost:
    provider: str
    upstream: str
    model: ResolvedModel  # the prices the estimate used
    cost: CostBreakdown


@dataclass(frozen=True, slots=True)
class CostEstimate:
    model: str
    deployments: list[DeploymentCost]
    currency: str = "USD"

    @property
    def min_total(self) -> Decimal:
        return min(deployment.cost.total_cost for deployment in self.deployments)

    @property
    def max_total(self) -> Decimal:
        return max(deployment.cost.total_cost for deployment in self.deployments)


def cost_estimate(
    *,
    user_id: int,
    key_allowed_model_ids: frozenset[int] | None,
    model_name: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    service_tier: str = "",
) -> CostEstimate:
    """What a request of these token counts would cost on each deployment of ``model_name`` that the
    caller may use, priced by the ledger's own function (``pricing.cost_breakdown``), at ``service_tier``'s
    factor of each deployment's token prices (OpenAI's priority and flex; else the standard prices). An unknown or
    disabled model is ``ModelNotFoundError`` (404); one the plan or the key excludes ``ModelNotAllowedError``
    (403), as on /v1. An alias is priced as the model it names."""
    model = model_resolve_sync(model_name)
    deployments = [model.on(deployment) for deployment in model.deployments] if model is not None else []
    if not deployments:
        raise model_not_found(model_name)
    limits = user_limits_sync(user_id)
    assert model is not None
    # The public model (at its highest prices), as admission checks it.
    if not limits.allows(model):
        raise ModelNotAllowedError(
            f"Your plan ({limits.plan_name}) does not include the model `{model.name}`: it includes "
            f"{limits.model_rule()}.",
            param="model",
        )
    if key_allowed_model_ids is not None and model.id not in key_allowed_model_ids:
        raise ModelNotAllowedError(
            f"This API key may not use the model `{model.name}`: it is restricted to a list of models.",
            param="model",
        )
    return CostEstimate(
        model=model_name,
        deployments=[
            DeploymentCost(
                provider=deployment.provider.name,
                upstream=deployment.upstream_id,
                model=deployment,
                cost=cost_breakdown(
                    model=deployment,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    cached_tokens=cached_tokens,
                    cache_write_tokens=cache_write_tokens,
                    cache_write_1h_tokens=cache_write_1h_tokens,
                    service_tier=service_tier,
                ),
            )
            for deployment in deployments
        ],
    )


# THE CATALOG AS A CALLER SEES IT (/api/models/, the chat picker)


@dataclass(frozen=True, slots=True)
class PriceRange:
    min: Decimal
    max: Decimal


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """A public model with what a picker shows: its providers, capabilities and the span of its deployments'
    prices; ``locked`` when the caller's plan or key does not include it, or when only their own provider key
    could serve it and they have none (shown, but not usable)."""

    model: ResolvedModel  # an alias under its own name, with its target's deployments
    providers: tuple[str, ...]  # distinct provider names of its deployments, in priority order
    input_per_mtok: PriceRange
    output_per_mtok: PriceRange
    locked: bool
    locked_reason: str  # "plan", "key", "own_key" or "" (not locked)
    # With "own_key": the providers a key of the caller's own would unlock it on, in priority order.
    own_key_providers: tuple[str, ...] = ()


def models_catalog_for(*, user_id: int, key_allowed_model_ids: frozenset[int] | None) -> list[CatalogEntry]:
    """Every chat model of the catalog (aliases included, under their own name), each marked ``locked``
    when the caller's plan or key does not include it, instead of being left out: the picker shows what an
    upgrade would bring. Admission checks the same rules (``UserLimits.allows`` and the key's list). A model
    they may use but that only their own provider key could serve, which they lack (or have had refused),
    is locked as ``own_key``: the rule /v1/models leaves it out by (``byok_callable``)."""
    limits = user_limits_sync(user_id)
    models = [model for model in models_enabled_sync() if model.mode == ModelMode.CHAT]
    reasons: dict[str, str] = {}
    for model in models:
        if not limits.allows(model):
            reasons[model.name] = "plan"
        elif key_allowed_model_ids is not None and model.id not in key_allowed_model_ids:
            reasons[model.name] = "key"
    allowed = [model for model in models if model.name not in reasons]
    credentials = user_credentials_sync(user_id) if any(byok_required_in(m) for m in allowed) else {}
    callable_names = {model.name for model in byok_callable(allowed, credentials)}
    entries = []
    for model in models:
        reason = reasons.get(model.name) or ("" if model.name in callable_names else "own_key")
        inputs = [deployment.input_per_mtok for deployment in model.deployments]
        outputs = [deployment.output_per_mtok for deployment in model.deployments]
        own_key_providers = ()
        if reason == "own_key":
            own_key_providers = tuple(
                dict.fromkeys(d.provider.name for d in model.deployments if d.provider.byok == ByokMode.REQUIRED)
            )
        entries.append(
            CatalogEntry(
                model=model,
                providers=tuple(dict.fromkeys(deployment.provider.name for deployment in model.deployments)),
                input_per_mtok=PriceRange(min(inputs), max(inputs)),
                output_per_mtok=PriceRange(min(outputs), max(outputs)),
                locked=bool(reason),
                locked_reason=reason,
                own_key_providers=own_key_providers,
            )
        )
    return entries
