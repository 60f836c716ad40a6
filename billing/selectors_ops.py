"""The operations dashboard's figures (``/ops/``): every provider and deployment with its health, its
breaker and its last hour from the ledger (requests, error rate, p50/p95 latency, requests per minute),
the spend per hour of the last 24 hours and per operation (chat, messages, responses, embeddings), the
requests refused in the last hour by reason, and the background tasks celery beat schedules, with when a
worker last finished each and how (``ops_periodic_tasks``).

Everything is aggregated in the database over a time range of ``UsageRecord.created_at`` (indexed), so the
cost of a read grows with the traffic of the window read, not with the size of the ledger. The percentiles
are exact nearest-rank order statistics, read for every deployment at once with window functions (one
query): no latency is loaded into Python. Billing sits above providers, so the breakers and the health
checks are read here directly."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from celery.schedules import crontab as celery_crontab
from celery.utils.time import ffwd
from django.db import connection
from django.db.models import Case, Count, ExpressionWrapper, F, IntegerField, OuterRef, Q, Subquery, Sum, When, Window
from django.db.models.functions import RowNumber, TruncHour
from django_celery_beat.models import PeriodicTask

from providers.models import BreakerOverride, Deployment, HealthCheck, HealthStatus, Incident, Provider
from providers.routing.breaker_machine import CLOSED, HALF_OPEN, OPEN
from providers.routing.breakers import breaker_states

from .models import Operation, TaskRun, UsageRecord, UsageStatus

WINDOW = timedelta(hours=1)
SPEND_HOURS = 24
# A deployment answering with at least this share of errors (over at least MIN_REQUESTS requests in the
# window) is marked failing, whatever its breaker says: a breaker only opens on consecutive failures.
FAILING_ERROR_RATE = 0.2
MIN_REQUESTS = 5

# What a refused request's ``error_type`` means, for people (any other code is shown as it is).
REJECTION_LABELS = {
    "rate_limit_exceeded": "Rate limit",
    "insufficient_quota": "Budget or quota",
    "model_not_allowed": "Model not allowed",
    "content_policy_violation": "Moderation",
    "moderation_unavailable": "Moderation unavailable",
    "no_deployment_available": "No deployment available",
    "deployments_at_capacity": "Deployments at capacity",
    "request_too_large": "Request too large",
    "invalid_value": "Invalid request",
    "model_not_found": "Unknown model",
    "own_key_required": "Own key required",
    "billing_unavailable": "Billing unavailable",
    "server_shutting_down": "Server shutting down",
}


@dataclass(frozen=True, slots=True)
class DeploymentOps:
    id: int
    model: str
    name: str
    provider: str
    enabled: bool
    health: str  # HealthStatus of its latest health check: ok, failing, unknown (never checked)
    health_at: datetime | None
    health_error: str
    incident_since: datetime | None  # an open incident
    incident_reason: str
    breaker: str  # closed, half_open, open (what routing sees, an admin's override included)
    breaker_forced: bool
    requests: int
    errors: int
    p50_ms: int | None
    p95_ms: int | None
    problems: tuple[str, ...]

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def rpm(self) -> float:
        return self.requests / (WINDOW.total_seconds() / 60)

    @property
    def failing(self) -> bool:
        return bool(self.problems)


@dataclass(frozen=True, slots=True)
class ProviderOps:
    name: str
    kind: str
    health: str
    health_at: datetime | None
    health_error: str
    deployments: int
    failing: int


@dataclass(frozen=True, slots=True)
class HourSpend:
    hour: datetime  # its start, UTC
    cost: Decimal
    requests: int


@dataclass(frozen=True, slots=True)
class OperationSpend:
    operation: str  # Operation
    label: str
    cost: Decimal
    requests: int


@dataclass(frozen=True, slots=True)
class Rejection:
    code: str
    label: str
    count: int


class TaskState:
    """A periodic task's state on the dashboard (``ops_periodic_tasks``)."""

    OK = "ok"
    OVERDUE = "overdue"
    FAILING = "failing"
    NEVER_RUN = "never_run"


@dataclass(frozen=True, slots=True)
class PeriodicTaskOps:
    name: str  # the schedule's name (the admin's)
    task: str  # the dotted task path
    schedule: str  # in words
    sent_at: datetime | None  # when beat last sent it (PeriodicTask.last_run_at)
    finished_at: datetime | None  # when a worker last finished it, whatever the outcome
    succeeded: bool | None  # how that run ended; None: never run
    error_class: str  # the exception's class of a failed run, never its message
    failures_in_a_row: int
    duration_seconds: float | None
    last_success_at: datetime | None
    overdue: bool  # no success within its allowance (``_overdue``)
    state: str  # TaskState

    @property
    def attention(self) -> bool:
        return self.state in (TaskState.OVERDUE, TaskState.FAILING)


@dataclass(frozen=True, slots=True)
class OpsSnapshot:
    now: datetime
    providers: list[ProviderOps]
    deployments: list[DeploymentOps]
    spend_per_hour: list[HourSpend]
    spend_per_operation: list[OperationSpend]
    rejections: list[Rejection]
    periodic_tasks: list[PeriodicTaskOps]
    totals: dict[str, int] = field(default_factory=dict)


# The ledger's reads here go through its ``created_at`` index, over the window's rows only. Grouped by the
# plain column, SQLite's planner prefers to walk the ``deployment_id`` index (rows come out grouped, no sort)
# and reads the whole ledger for it: 0.9 s instead of 0.1 s on 300,000 rows (30,000 in the window).
# ``deployment_id + 0`` (the classic way to keep SQLite off an index) leaves it the time range; PostgreSQL
# plans both alike.
_deployment = ExpressionWrapper(F("deployment_id") + 0, output_field=IntegerField())


# A request's latency: a stream's time to its first token (how long it lasts is the client's choice: a long answer
# streams for a minute on a healthy deployment), a whole reply's duration; as the p95 latency alert reads it
# (``services.ops_alerts.latency_p95_measures``).
_latency = Case(
    When(stream=True, ttft_ms__isnull=False, then=F("ttft_ms")), default=F("duration_ms"), output_field=IntegerField()
)


def _percentiles(since: datetime) -> dict[int, dict[str, int]]:
    """p50 and p95 of the latency (``_latency``) per deployment over the answered requests since ``since``: the values
    at ranks ceil(q·n) of each deployment's sorted latencies, picked in the database. Until 7 December they were of
    ``duration_ms``, streams' whole length too: a deployment serving long answers read a p50 of a minute."""
    ranked = (
        UsageRecord.objects.filter(created_at__gte=since, status=UsageStatus.OK)
        .annotate(
            deployment_key=_deployment,
            latency=_latency,
            rank=Window(RowNumber(), partition_by=[_deployment], order_by=[_latency.asc()]),
            n=Window(Count("pk"), partition_by=[_deployment]),
        )
        .values_list("deployment_key", "rank", "n", "latency")
    )
    # ceil(n/2) and ceil(95n/100) in integer arithmetic, which both databases agree on.
    picked = ranked.filter(Q(rank=(F("n") + 1) / 2) | Q(rank=(F("n") * 95 + 99) / 100))
    found: dict[int, dict[str, int]] = defaultdict(dict)
    for deployment_id, rank, n, duration in picked:
        if deployment_id is None:  # answered by a deployment deleted since
            continue
        if rank == (n + 1) // 2:
            found[deployment_id]["p50"] = duration
        if rank == (n * 95 + 99) // 100:
            found[deployment_id]["p95"] = duration
    return found


def _problems(
    *,
    enabled: bool,
    breaker: str,
    forced: bool,
    health: str,
    incident: bool,
    requests: int,
    errors: int,
    model_missing: datetime | None = None,
) -> tuple[str, ...]:
    if not enabled:
        return ()
    problems = []
    if model_missing is not None:
        # A catalog mistake (the health round found the provider without the upstream id): the admin's to fix.
        problems.append(f"upstream model missing since {model_missing.astimezone(UTC):%Y-%m-%d %H:%M} UTC")
    if incident:
        problems.append("open incident")
    if breaker == OPEN:
        problems.append("breaker forced open" if forced else "breaker open")
    elif breaker == HALF_OPEN:
        problems.append("breaker half-open")
    if health == HealthStatus.FAILING:
        problems.append("health check failing")
    if requests >= MIN_REQUESTS and errors / requests >= FAILING_ERROR_RATE:
        problems.append(f"{round(100 * errors / requests)} % errors")
    return tuple(problems)


# What the dashboard never reads of a provider: its secrets (a key written under an encryption key since dropped
# would fail the whole page, and each would be decrypted once per deployment at every refresh).
_PROVIDER_SECRETS = ("api_key", "extra_headers")


def ops_deployments(*, now: datetime) -> list[DeploymentOps]:
    since = now - WINDOW
    latest = HealthCheck.objects.filter(deployment=OuterRef("pk")).order_by("-checked_at")
    incident = Incident.objects.filter(deployment=OuterRef("pk"), ended_at__isnull=True)
    rows = list(
        Deployment.objects.select_related("model", "provider")
        .defer(*(f"provider__{name}" for name in _PROVIDER_SECRETS))
        .annotate(
            check_ok=Subquery(latest.values("ok")[:1]),
            check_at=Subquery(latest.values("checked_at")[:1]),
            check_error=Subquery(latest.values("error")[:1]),
            incident_since=Subquery(incident.values("started_at")[:1]),
            incident_reason=Subquery(incident.values("reason")[:1]),
        )
        .order_by("model__name", "priority", "pk")
    )
    traffic = {
        row["deployment_key"]: row
        for row in UsageRecord.objects.filter(created_at__gte=since)
        .values(deployment_key=_deployment)
        .annotate(requests=Count("pk"), errors=Count("pk", filter=Q(status=UsageStatus.UPSTREAM_ERROR)))
        .order_by()
    }
    latency = _percentiles(since)
    breakers = breaker_states(row.pk for row in rows)
    deployments = []
    for row in rows:
        forced = row.breaker_override
        breaker = {BreakerOverride.OPEN: OPEN, BreakerOverride.CLOSED: CLOSED}.get(forced, breakers[row.pk].state)
        health = (
            HealthStatus.UNKNOWN if row.check_ok is None else HealthStatus.OK if row.check_ok else HealthStatus.FAILING
        )
        seen = traffic.get(row.pk, {"requests": 0, "errors": 0})
        deployments.append(
            DeploymentOps(
                id=row.pk,
                model=row.model.name,
                name=row.name,
                provider=row.provider.name,
                enabled=row.enabled and row.model.enabled and row.provider.enabled,
                health=health,
                health_at=row.check_at,
                health_error=row.check_error or "",
                incident_since=row.incident_since,
                incident_reason=row.incident_reason or "",
                breaker=breaker,
                breaker_forced=bool(forced),
                requests=seen["requests"],
                errors=seen["errors"],
                p50_ms=latency.get(row.pk, {}).get("p50"),
                p95_ms=latency.get(row.pk, {}).get("p95"),
                problems=_problems(
                    enabled=row.enabled and row.model.enabled and row.provider.enabled,
                    breaker=breaker,
                    forced=forced == BreakerOverride.OPEN,
                    health=health,
                    incident=row.incident_since is not None,
                    requests=seen["requests"],
                    errors=seen["errors"],
                    model_missing=row.upstream_model_missing,
                ),
            )
        )
    return deployments


def ops_providers(deployments: list[DeploymentOps]) -> list[ProviderOps]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for deployment in deployments:
        counts[deployment.provider][0] += 1
        counts[deployment.provider][1] += deployment.failing
    return [
        ProviderOps(
            name=provider.name,
            kind=provider.kind,
            health=provider.last_health_status,
            health_at=provider.last_health_at,
            health_error=provider.last_health_error,
            deployments=counts[provider.name][0],
            failing=counts[provider.name][1],
        )
        for provider in Provider.objects.defer(*_PROVIDER_SECRETS).order_by("name")
    ]


def ops_spend(*, now: datetime) -> tuple[list[HourSpend], list[OperationSpend]]:
    """The spend and requests of the last ``SPEND_HOURS`` UTC hours (the current one, so far, last; hours without
    spend included), and of the same range of ``created_at`` per operation (largest spend first; operations
    without requests left out): one read of the range's raw rows, grouped by hour and operation."""
    current = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    starts = [current - timedelta(hours=SPEND_HOURS - 1 - offset) for offset in range(SPEND_HOURS)]
    rows = UsageRecord.objects.filter(created_at__gte=starts[0], created_at__lte=now)
    found: list[tuple[datetime, str, Decimal | None, int]] = []  # (hour, operation, cost, requests)
    if connection.vendor == "sqlite":
        # SQLite truncates a date with a Python function called on every row (TruncHour): 24 filtered sums
        # over the one range scan are several times faster there. PostgreSQL's own date_trunc is faster still.
        sums: dict[str, Any] = {}
        for index, start in enumerate(starts):
            hour = Q(created_at__gte=start, created_at__lt=start + timedelta(hours=1))
            sums[f"cost_{index}"] = Sum("cost", filter=hour)
            sums[f"requests_{index}"] = Count("pk", filter=hour)
        for row in rows.values("operation").annotate(**sums).order_by():
            found += [
                (start, row["operation"], row[f"cost_{i}"], row[f"requests_{i}"]) for i, start in enumerate(starts)
            ]
    else:
        grouped = rows.annotate(hour=TruncHour("created_at", tzinfo=UTC)).values("hour", "operation")
        for row in grouped.annotate(cost=Sum("cost"), requests=Count("pk")).order_by():
            found.append((row["hour"], row["operation"], row["cost"], row["requests"]))
    per_hour: dict[datetime, list] = defaultdict(lambda: [Decimal(0), 0])
    per_operation: dict[str, list] = defaultdict(lambda: [Decimal(0), 0])
    for hour, operation, cost, requests in found:
        if not requests:
            continue
        for entry in (per_hour[hour], per_operation[operation]):
            entry[0] += cost or Decimal(0)
            entry[1] += requests
    names = dict(Operation.choices)
    operations = [
        OperationSpend(operation, names.get(operation, operation), *_spent(spent))
        for operation, spent in per_operation.items()
    ]
    return (
        [HourSpend(start, *_spent(per_hour.get(start))) for start in starts],
        sorted(operations, key=lambda spend: (-spend.cost, -spend.requests, spend.label)),
    )


def _spent(found: tuple[Decimal | None, int] | None) -> tuple[Decimal, int]:
    return (found[0] or Decimal(0), found[1]) if found else (Decimal(0), 0)


def ops_rejections(*, now: datetime) -> list[Rejection]:
    """Requests refused in the last hour (rate limit, budget, moderation, …) by reason, most first."""
    rows = (
        UsageRecord.objects.filter(created_at__gte=now - WINDOW, status=UsageStatus.REJECTED)
        .values("error_type")
        .annotate(n=Count("pk"))
        .order_by("-n", "error_type")
    )
    return [
        Rejection(row["error_type"], REJECTION_LABELS.get(row["error_type"], row["error_type"] or "unknown"), row["n"])
        for row in rows
    ]


# A task is overdue when no run of it has succeeded for twice its interval and this grace (a worker busy with
# a long task, a beat restart): a missed run alone is not yet an alarm, two are. A crontab task, when none
# succeeded since its last due time, this grace after it (a nightly job takes minutes).
OVERDUE_GRACE = timedelta(minutes=5)
# How far back a crontab's last due time is looked for: a yearly schedule's is at most a year (and a leap day).
_CRONTAB_LOOKBACK = timedelta(days=2 * 366)


def _crontab_last_due(schedule: celery_crontab, at: datetime) -> datetime | None:
    """The latest time before ``at`` when ``schedule`` was due, or None (none in the lookback). Walks its
    due times forward from windows that double back in time, so that a minutely schedule costs a few steps
    and a yearly one a few dozen."""
    window = timedelta(hours=1)
    while window <= _CRONTAB_LOOKBACK:
        found = None
        moment = at - window
        while True:
            start, delta, _ = schedule.remaining_delta(moment, ffwd=ffwd)
            after, moment = moment, start + delta  # its next due time strictly after ``moment``
            if moment <= after:
                raise ValueError("the schedule does not move forward")
            if moment >= at:
                break
            found = moment
        if found is not None:
            return found
        window *= 2
    return None


def _overdue(periodic: PeriodicTask, run: TaskRun | None, *, now: datetime) -> bool:
    """No success within its allowance: an interval task, none for ``2 × interval + OVERDUE_GRACE``; a crontab
    task, none since its last due time more than ``OVERDUE_GRACE`` ago. A task that never ran is not overdue (nothing
    says it was expected yet: a fresh install, or a nightly task not yet due since the upgrade that began
    recording); one that ran and never succeeded is. Clocked and solar schedules have no rule."""
    if run is None:
        return False
    last_success = run.last_success_at
    if periodic.interval is not None:
        allowance = 2 * periodic.interval.schedule.run_every + OVERDUE_GRACE
        return last_success is None or now - last_success > allowance
    if periodic.crontab is not None:
        try:
            due = _crontab_last_due(periodic.crontab.schedule, now - OVERDUE_GRACE)
        except Exception:  # a schedule celery cannot walk (a 30th of February): no rule rather than no page
            return False
        return due is not None and (last_success is None or last_success < due)
    return False


def _schedule_text(periodic: PeriodicTask) -> str:
    if periodic.interval is not None:
        return str(periodic.interval)
    if periodic.crontab is not None:
        return periodic.crontab.human_readable
    if periodic.clocked is not None:
        return f"once, at {periodic.clocked}"
    if periodic.solar is not None:
        return str(periodic.solar)
    return "—"


def ops_periodic_tasks(*, now: datetime) -> list[PeriodicTaskOps]:
    """Every enabled schedule of celery beat, with the latest run a worker recorded of its task and a state:
    failing (that run failed), overdue (``_overdue``), never run (no run recorded), else ok. Two queries."""
    periodic_tasks = list(
        PeriodicTask.objects.filter(enabled=True)
        .select_related("interval", "crontab", "clocked", "solar")
        .order_by("name")
    )
    runs = {run.task: run for run in TaskRun.objects.filter(task__in={p.task for p in periodic_tasks})}
    listed = []
    for periodic in periodic_tasks:
        run = runs.get(periodic.task)
        overdue = _overdue(periodic, run, now=now)
        if run is None:
            state = TaskState.NEVER_RUN
        elif not run.succeeded:
            state = TaskState.FAILING
        else:
            state = TaskState.OVERDUE if overdue else TaskState.OK
        listed.append(
            PeriodicTaskOps(
                name=periodic.name,
                task=periodic.task,
                schedule=_schedule_text(periodic),
                sent_at=periodic.last_run_at,
                finished_at=run.finished_at if run else None,
                succeeded=run.succeeded if run else None,
                error_class=run.error_class if run else "",
                failures_in_a_row=run.failures_in_a_row if run else 0,
                duration_seconds=run.duration_seconds if run else None,
                last_success_at=run.last_success_at if run else None,
                overdue=overdue,
                state=state,
            )
        )
    return listed


def ops_snapshot(*, now: datetime) -> OpsSnapshot:
    deployments = ops_deployments(now=now)
    rejections = ops_rejections(now=now)
    periodic_tasks = ops_periodic_tasks(now=now)
    spend_per_hour, spend_per_operation = ops_spend(now=now)
    return OpsSnapshot(
        now=now,
        providers=ops_providers(deployments),
        deployments=deployments,
        spend_per_hour=spend_per_hour,
        spend_per_operation=spend_per_operation,
        rejections=rejections,
        periodic_tasks=periodic_tasks,
        totals={
            "requests": sum(d.requests for d in deployments),
            "errors": sum(d.errors for d in deployments),
            "failing": sum(d.failing for d in deployments),
            "rejected": sum(r.count for r in rejections),
            "tasks_attention": sum(t.attention for t in periodic_tasks),
        },
    )
