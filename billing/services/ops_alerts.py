"""Operations alerts beyond budgets: a deployment down, a model's error rate or p95 latency too high, a user's
daily token quota used up, spend in the last hour far above the usual hour.

``ops_alerts_evaluate`` runs every minute (``billing.tasks.ops_alerts_evaluate_task``). For each enabled
``OpsAlertRule`` it measures every subject the rule watches (a model, a user, all spend) from the ledger and
opens an ``OpsAlertIncident`` for each subject in breach that has none open, and clears each open incident
whose subject is no longer in breach. The open/clear transitions are the only thing that sends: one alert
when an incident opens, one when it clears, however often the evaluator runs, and however many run at once
(a unique constraint allows one open incident per rule and subject; opening and clearing take the rule's
lock in turn, and a run whose measure is older than another's writes nothing over it). Deliveries go
out after commit through Celery tasks with retries, on the channels every alert shares
(``alerts.alert_email_send`` / ``alerts.alert_webhook_send``), to the rule's recipients or, without any, to
``ADMINS`` (the superusers without them) and ``LLMHUB_ALERT_WEBHOOK_URL``. The incident records each delivery
made (``delivered``) and claims it before sending (``core.outbox``): a broker that cannot take the tasks when
the incident opens or clears is logged, and the alert sweep (``alert_sweep``) queues them again, once.

A deployment down is not measured again here: ``providers.models.Incident`` already is that incident, opened
by failing health checks and with its own down / back-up alerts. The evaluator adds what health checks miss
(a provider whose model list answers while its completions fail): a deployment whose circuit breaker is open
gets that same ``Incident`` opened (if none is), and an incident the evaluator opened this way is closed once
the breaker has closed again. So a deployment down is still one incident and one pair of alerts, whichever
signal found it.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, F, Max, Min, OuterRef, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.timesince import timesince

from core.outbox import DeliveryState, deliveries_unsent, delivery_done, delivery_release, task_queue
from core.time_limits import time_limit_reraise
from providers.fields import UNREADABLE, SecretUrl, UnreadableSecretUrl
from providers.models import BreakerOverride, CatalogModel, Deployment, Incident
from providers.routing.breaker_machine import CLOSED
from providers.routing.breakers import breaker_states
from providers.services.incidents import (
    BREAKER_REASON,
    incident_alert_recipients,
    incident_close,
    incident_open,
    incidents_out_of_service_close,
)

from ..exceptions import QuotaExceededError
from ..models import (
    ApiKey,
    BudgetMetric,
    BudgetPeriod,
    DailyUsage,
    OpsAlertIncident,
    OpsAlertKind,
    OpsAlertRule,
    Plan,
    ScopeKind,
    UsageRecord,
    UsageStatus,
    UserPlan,
)
from ..selectors import UserLimits, user_limits_sync
from .alerts import alert_email_send, alert_webhook_send
from .budgets import CounterRef, ledger_spend, period_bounds, usd

logger = logging.getLogger(__name__)

# The spend spike compares the last hour with the mean hour of the 7 days before it.
SPEND_BASELINE = timedelta(days=7)
# The least history a usual hour is taken from: a gateway (or its ledger, after retention) younger than this
# has no usual hour yet, and no spend spike.
SPEND_BASELINE_MIN = timedelta(days=1)
# Requests that reached no provider say nothing of a model's health.
_NOT_ANSWERED = (UsageStatus.REJECTED, UsageStatus.LOST)
# Nor do those refused through the request's own fault (``invalid``: a 400, moderation, a user's own key):
# counted as requests, a client's burst of them would dilute a provider's real failures.
_NOT_JUDGED = (*_NOT_ANSWERED, UsageStatus.INVALID)


# Why a model's incidents are closed, not recovered, when the model is deleted (``ops_model_incidents_close``); the
# evaluator reads it back so that the rows the model left in the window open no second incident.
MODEL_DELETED = "the model was deleted"


class OpsAlertEvent:
    OPEN = "open"
    CLEAR = "clear"


@dataclass(frozen=True, slots=True)
class Measure:
    """One subject of a rule as measured now: its value (in the rule's unit), whether that is a breach, and
    the measurement in words for the alert."""

    value: Decimal
    breached: bool
    detail: str
    # Whether an incident already open stays open, when that is not ``breached``: a minimum of requests keeps a
    # few from opening one, but traffic falling under it during an outage (clients backing off) is no recovery.
    holds: bool | None = None
    # The model measured (error rate, p95 latency; a spend spike's rule's model): its incident follows it across a
    # rename.
    model_id: int | None = None

    @property
    def keeps_open(self) -> bool:
        return self.breached if self.holds is None else self.holds


@dataclass(slots=True)
class Evaluation:
    """What one run of the evaluator changed, and the rules it could not evaluate (by name)."""

    opened: list[str]
    cleared: list[str]
    failed: list[str] = field(default_factory=list)


def _model_scoped(rows, rule: OpsAlertRule):
    rows = rows.exclude(model_name="")
    return rows.filter(model_name=rule.watched_model_name) if rule.watched_model_name else rows


def _per_model_now(rows, rule: OpsAlertRule):
    """``rows`` with their model's name now (``model_now``), for the measures per model: its catalog name, which
    an admin may have edited since the row was written, or the name on the row once the model is deleted. A model
    renamed during an outage is one model measured, its rows of either name together; a rule narrowed to one
    model watches it under its name now (``OpsAlertRule.watched_model_name``: the rule follows the model)."""
    rows = rows.exclude(model_name="").annotate(model_now=Coalesce(F("model__name"), F("model_name")))
    watched = rule.watched_model_name
    return rows.filter(model_now=watched) if watched else rows


def _percent(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.1'))} %"


def error_rate_measures(rule: OpsAlertRule, now: datetime) -> dict[str, Measure]:
    """Per model, the share of ``upstream_error`` rows among the requests that reached a provider in the
    window, those refused as ``invalid`` (the request's fault) left out of both; a breach only from
    ``minimum_requests`` requests on (one failure out of two is no incident)."""
    rows = UsageRecord.objects.filter(
        created_at__gt=now - timedelta(minutes=rule.window_minutes), created_at__lte=now
    ).exclude(status__in=_NOT_JUDGED)
    counts = (
        _per_model_now(rows, rule)
        .values("model_now")
        .annotate(
            total=Count("pk"),
            failed=Count("pk", filter=Q(status=UsageStatus.UPSTREAM_ERROR)),
            model_pk=Max("model_id"),
        )
    )
    measures = {}
    for row in counts:
        rate = Decimal(row["failed"] * 100) / row["total"]
        detail = (
            f"error rate of model {row['model_now']} is {_percent(rate)} over the last {rule.window_minutes} minutes "
            f"({row['failed']} of {row['total']} requests failed upstream)"
        )
        above = rate > rule.threshold
        measures[f"model:{row['model_now']}"] = Measure(
            rate, above and row["total"] >= rule.minimum_requests, detail, holds=above, model_id=row["model_pk"]
        )
    return measures


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (the smallest value with at least ``q`` of the values at or below it)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def latency_p95_measures(rule: OpsAlertRule, now: datetime) -> dict[str, Measure]:
    """Per model, the p95 latency of the requests answered in the window: time to first token for a stream
    (its length is the client's business), the whole reply otherwise."""
    rows = UsageRecord.objects.filter(
        created_at__gt=now - timedelta(minutes=rule.window_minutes), created_at__lte=now, status=UsageStatus.OK
    )
    latencies: dict[str, list[int]] = defaultdict(list)
    model_ids: dict[str, int] = {}
    for model_name, model_id, stream, ttft_ms, duration_ms in _per_model_now(rows, rule).values_list(
        "model_now", "model_id", "stream", "ttft_ms", "duration_ms"
    ):
        latencies[model_name].append(ttft_ms if stream and ttft_ms is not None else duration_ms)
        if model_id is not None:
            model_ids[model_name] = model_id
    measures = {}
    for model_name, values in latencies.items():
        p95 = percentile(values, 0.95)
        detail = (
            f"p95 latency of model {model_name} is {p95} ms over the last {rule.window_minutes} minutes "
            f"({len(values)} requests)"
        )
        above = p95 > rule.threshold
        measures[f"model:{model_name}"] = Measure(
            Decimal(p95),
            above and len(values) >= rule.minimum_requests,
            detail,
            holds=above,
            model_id=model_ids.get(model_name),
        )
    return measures


def token_quota_measures(rule: OpsAlertRule, now: datetime) -> dict[str, Measure]:
    """Per user with a daily token quota (UTC days, as admission counts them), the share of it the ledger shows
    used today. In breach from ``threshold`` percent used, or when the quota is refusing them: admission
    refuses a request the rest of the quota could not pay for at its largest, so a user is shut out well
    before 100 % is used. A refusal counts when it is an ``insufficient_quota`` rejection in the last
    ``window_minutes`` that no successful request of theirs followed, and the token quota is the most used of
    their limits (the monthly budget, the refused key's budget: the counter nearest its limit is the one that
    refused). It clears when their requests go through again, or none has been refused for the window."""
    quotas = [
        *Plan.objects.filter(daily_token_quota__isnull=False).values_list("daily_token_quota", flat=True),
        *UserPlan.objects.filter(daily_token_quota__isnull=False).values_list("daily_token_quota", flat=True),
    ]
    if not quotas:
        return {}
    day_start, _ = period_bounds(BudgetPeriod.DAILY, now)
    today = UsageRecord.objects.filter(created_at__gte=day_start, created_at__lte=now, user_id__isnull=False)
    refused = {
        row["user_id"]: row
        for row in today.filter(
            status=UsageStatus.REJECTED,
            error_type=QuotaExceededError.code,
            created_at__gt=now - timedelta(minutes=rule.window_minutes),
        )
        .values("user_id")
        .annotate(last=Max("created_at"), refused_key=Max("api_key_id"))
    }
    # Only users who used the threshold of the smallest quota there is, or were refused, can be in breach; the
    # others are not looked up one by one.
    floor = min(quotas) * rule.threshold / 100
    used = (
        today.values("user_id")
        .annotate(
            tokens=Coalesce(Sum(F("prompt_tokens") + F("completion_tokens")), 0),
            last_ok=Max("created_at", filter=Q(status=UsageStatus.OK)),
        )
        .filter(Q(tokens__gte=floor) | Q(user_id__in=list(refused)))
    )
    measures = {}
    rows = list(used)
    names = dict(get_user_model().objects.filter(pk__in=[row["user_id"] for row in rows]).values_list("pk", "username"))
    for row in rows:
        user_id = row["user_id"]
        limits = user_limits_sync(user_id)
        quota = limits.daily_token_quota
        if not quota:
            continue
        share = Decimal(row["tokens"] * 100) / quota
        rejection = refused.get(user_id)
        shut_out = (
            rejection is not None
            and (row["last_ok"] is None or row["last_ok"] < rejection["last"])
            and share >= _other_limits_share(user_id, limits, rejection["refused_key"], now)
        )
        name = names.get(user_id, f"#{user_id}")
        detail = f"user {name} has used {row['tokens']:,} tokens of a daily quota of {quota:,} ({_percent(share)})" + (
            " and is refused for it" if shut_out else ""
        )
        measures[f"user:{user_id}"] = Measure(share, share >= rule.threshold or shut_out, detail)
    return measures


def _other_limits_share(user_id: int, limits: UserLimits, api_key_id: int | None, now: datetime) -> Decimal:
    """The highest percent used of the user's USD limits that could have refused them: their monthly budget
    and the budget of a key their refused requests came with."""
    shares = [Decimal(0)]
    if limits.monthly_budget_usd:
        start, _ = period_bounds(BudgetPeriod.MONTHLY, now)
        ref = CounterRef(ScopeKind.USER, user_id, BudgetMetric.COST, BudgetPeriod.MONTHLY, start)
        shares.append(ledger_spend(ref) * 100 / limits.monthly_budget_usd)
    key = ApiKey.objects.filter(pk=api_key_id).values("budget_usd", "budget_period").first() if api_key_id else None
    if key and key["budget_usd"]:
        start, _ = period_bounds(key["budget_period"], now)
        ref = CounterRef(ScopeKind.KEY, api_key_id, BudgetMetric.COST, key["budget_period"], start)
        shares.append(ledger_spend(ref) * 100 / key["budget_usd"])
    return max(shares)


def spend_spike_measures(rule: OpsAlertRule, now: datetime) -> dict[str, Measure]:
    """The spend of the last hour against the mean hourly spend of the 7 days before it (every hour of the
    week, not only the same hour of each day: seven samples of one hour are too few to trust). A breach when
    the last hour costs more than ``threshold`` times that mean, and only when the mean reaches
    ``minimum_baseline_usd``: a quiet gateway's first busy hour is no spike.

    The mean is over the hours the ledger covers, from its first row (the watched model's, for a rule watching
    one that was first used within the week): a gateway or a model two days old spread over a week would have
    a usual hour of two sevenths of its real one, and its every hour a spike; under a day of history, nothing
    is measured.

    A rule watching one model reads the model's rows (its pk), whatever name each was written with: renamed, the
    model keeps its history, and its incident follows it (``_renames_follow``)."""
    hour_ago = now - timedelta(hours=1)
    week_start = hour_ago - SPEND_BASELINE
    # The ledger's first row, off the created_at index: how long the gateway has kept its spend (retention
    # keeps at least the current month and the last N days, so a short retention also shortens the week).
    since = UsageRecord.objects.order_by("created_at").values_list("created_at", flat=True).first()
    if since is None:
        return {}
    watched = rule.watched_model_name
    if rule.model_id is not None:
        rows = UsageRecord.objects.filter(model_id=rule.model_id)
    else:  # a name no model of the catalog has (its model deleted): the rows written with it
        rows = _model_scoped(UsageRecord.objects.all(), rule) if watched else UsageRecord.objects.all()
    # Over the whole week: no row is older than the history it is divided by, so only the hours differ.
    week = Q(created_at__gt=week_start, created_at__lte=hour_ago)
    sums = rows.aggregate(
        last=Coalesce(Sum("cost", filter=Q(created_at__gt=hour_ago, created_at__lte=now)), Decimal(0)),
        week=Coalesce(Sum("cost", filter=week), Decimal(0)),
        first=Min("created_at", filter=week),
    )
    if sums["first"] is None:
        return {}
    if watched and not _used_before(_names(rows, week, watched), week_start):
        since = max(since, sums["first"])
    if hour_ago - since < SPEND_BASELINE_MIN:
        return {}
    span = min(SPEND_BASELINE, hour_ago - since)
    hours = Decimal(round(span.total_seconds())) / 3600
    baseline = sums["week"] / hours
    ratio = (sums["last"] / baseline) if baseline > 0 else Decimal(0)
    what = f"spend on model {watched}" if watched else "spend"
    detail = (
        f"{what} in the last hour is {usd(sums['last'])}, {ratio.quantize(Decimal('0.1'))} times the usual hour "
        f"({usd(baseline.quantize(Decimal('0.0001')))}, the mean hour of the {_span_text(span)} before)"
    )
    breached = baseline >= rule.minimum_baseline_usd and baseline > 0 and ratio > rule.threshold
    subject = f"model:{watched}" if watched else "all"
    return {subject: Measure(ratio, breached, detail, model_id=rule.model_id)}


def _names(rows: QuerySet[UsageRecord], week: Q, watched: str) -> set[str]:
    """The names the watched model's rows of the week were written with, and its name now: a model renamed within
    the week has its days before it in the rollups under the old one."""
    return {watched, *rows.filter(week).values_list("model_name", flat=True).distinct()}


def _used_before(model_names: set[str], instant: datetime) -> bool:
    """Whether the model (by any of ``model_names``) was used on a day before ``instant``'s, as the daily rollups
    show (a few rows a day: cheaper than looking for the model's first row among the ledger's millions, which no
    index orders by model and time)."""
    return DailyUsage.objects.filter(model_name__in=model_names, day__lt=instant.date()).exists()


def _span_text(span: timedelta) -> str:
    return "7 days" if span >= SPEND_BASELINE else f"{span // timedelta(hours=1)} hours"


MEASURES: dict[str, Callable[[OpsAlertRule, datetime], dict[str, Measure]]] = {
    OpsAlertKind.ERROR_RATE: error_rate_measures,
    OpsAlertKind.LATENCY_P95: latency_p95_measures,
    OpsAlertKind.TOKEN_QUOTA: token_quota_measures,
    OpsAlertKind.SPEND_SPIKE: spend_spike_measures,
}


def ops_alerts_evaluate(*, now: datetime | None = None) -> Evaluation:
    """Measure every enabled rule now; open the incidents newly in breach and clear those no longer in it.
    Idempotent: running it again with nothing changed opens, clears and sends nothing. Each rule on its own: one
    that fails (its measure cut by a statement timeout) is logged and listed in ``failed``, and the others are
    evaluated."""
    now = now or timezone.now()
    evaluation = Evaluation(opened=[], cleared=[])
    _disabled_rules_close(now=now, evaluation=evaluation)
    ops_rules_model_bind()
    for rule in OpsAlertRule.objects.filter(enabled=True).select_related("model"):
        try:
            _rule_evaluate(rule, now=now, evaluation=evaluation)
        except Exception as exc:
            time_limit_reraise(exc)
            logger.exception("operations alert rule %s could not be evaluated; tried again next run", rule.name)
            evaluation.failed.append(rule.name)
    return evaluation


def _rule_evaluate(rule: OpsAlertRule, *, now: datetime, evaluation: Evaluation) -> None:
    if rule.kind == OpsAlertKind.DEPLOYMENT_DOWN:
        deployments_down_follow(now=now, evaluation=evaluation)
        return
    measures = MEASURES[rule.kind](rule, now)
    open_incidents = {incident.subject: incident for incident in rule.incidents.filter(cleared_at__isnull=True)}
    _renames_follow(rule, open_incidents, measures)
    unwatched = [incident for subject, incident in open_incidents.items() if not _watches(rule, subject)]
    if unwatched:
        for subject in _unwatched_close(rule, unwatched, now=now):
            evaluation.cleared.append(f"{rule.kind} {subject}")
        for incident in unwatched:
            del open_incidents[incident.subject]
    deleted = _models_deleted(rule, now)
    gone = _subjects_gone(rule, open_incidents)
    for because, incidents in gone.items():
        for subject in _gone_close(rule, incidents, because=because, now=now):
            evaluation.cleared.append(f"{rule.kind} {subject}")
        for incident in incidents:
            del open_incidents[incident.subject]
    for subject, measure in measures.items():
        incident = open_incidents.get(subject)
        if incident is None:
            if measure.model_id is None and subject in deleted:
                continue  # the rows a deleted model left in the window: its incident was closed at the deletion
            if measure.breached and ops_incident_open(rule=rule, subject=subject, measure=measure, now=now):
                evaluation.opened.append(f"{rule.kind} {subject}")
        elif measure.keeps_open:
            if measure.value > incident.peak:
                OpsAlertIncident.objects.filter(pk=incident.pk, peak__lt=measure.value).update(peak=measure.value)
            if incident.under_since is not None:
                # Above again: the wait for a steady recovery starts over (unless a run measuring later than
                # this one, overlapping it, already read it under).
                OpsAlertIncident.objects.filter(pk=incident.pk, under_since__lte=now).update(under_since=None)
    for subject, incident in open_incidents.items():
        measure = measures.get(subject)
        if measure is None or not measure.keeps_open:
            if not _steadily_under(rule, incident, now):
                continue
            if ops_incident_clear(incident=incident, measure=measure, now=now) is not None:
                evaluation.cleared.append(f"{rule.kind} {subject}")


def _renames_follow(
    rule: OpsAlertRule, open_incidents: dict[str, OpsAlertIncident], measures: dict[str, Measure]
) -> None:
    """Carry each open incident of a model across the model's rename (its catalog name edited in the admin or the
    shell): its subject takes the name the model has now, and keeps the one it opened as (``renamed_from``), in
    ``open_incidents`` too. Kept by the name alone, the next runs opened a second incident under the new name (a
    second "firing" for one outage) and cleared the first as a recovery once the old name's rows left the window.
    An incident opened without its model (by the previous release, during a rolling deploy) is given it from its
    measure. Under the rule's lock; an incident another evaluator moved meanwhile is left to the next run."""
    for subject, incident in open_incidents.items():
        measure = measures.get(subject)
        if incident.model_id is None and measure is not None and measure.model_id is not None:
            OpsAlertIncident.objects.filter(pk=incident.pk, model__isnull=True).update(model_id=measure.model_id)
            incident.model_id = measure.model_id
    followed = {incident.model_id: incident for incident in open_incidents.values() if incident.model_id is not None}
    if not followed:
        return
    for model_id, name in CatalogModel.objects.filter(pk__in=followed).values_list("pk", "name"):
        incident, subject = followed[model_id], f"model:{name}"
        if incident.subject == subject or subject in open_incidents:
            # One open under the new name already (opened by the previous release, which did not follow the
            # model): this one stays as it is, and clears as its name is no longer measured.
            continue
        renamed_from = incident.renamed_from or incident.subject
        try:
            with transaction.atomic():
                if not _rule_lock(rule.pk):
                    return
                moved = OpsAlertIncident.objects.filter(
                    pk=incident.pk, subject=incident.subject, cleared_at__isnull=True
                ).update(subject=subject, renamed_from=renamed_from)
        except IntegrityError:
            continue  # another evaluator opened one under the new name: as above
        del open_incidents[incident.subject]
        if moved:
            incident.subject, incident.renamed_from = subject, renamed_from
            open_incidents[subject] = incident


def _disabled_rules_close(*, now: datetime, evaluation: Evaluation) -> None:
    """Close the open incidents of rules disabled outside the admin (the shell, a bulk ``update``, ``loaddata``):
    only the admin's save closed them, and nothing evaluates a disabled rule, so each stayed a page that never
    resolves. Told once, as the admin's close is; one the admin closed already is not open any more. The
    deployment-down rule's incidents are the deployments' own, opened from their breakers: closed when no
    deployment-down rule is enabled any more."""
    still_open = OpsAlertIncident.objects.filter(cleared_at__isnull=True).values("rule_id")
    disabled = list(OpsAlertRule.objects.filter(enabled=False, pk__in=still_open))
    down = OpsAlertRule.objects.filter(kind=OpsAlertKind.DEPLOYMENT_DOWN)
    if not down.filter(enabled=True).exists():
        disabled += down.filter(enabled=False)[:1]
    for rule in disabled:
        for subject in ops_rule_incidents_close(rule=rule, because="the rule was disabled", now=now, if_disabled=True):
            evaluation.cleared.append(f"{rule.kind} {subject}")


def _steadily_under(rule: OpsAlertRule, incident: OpsAlertIncident, now: datetime) -> bool:
    """Whether an open incident whose measure now reads at or under the threshold (or is gone) has read so for
    the rule's ``clear_after_minutes``, across evaluator runs: a rate hovering around the threshold (9 %, 11 %,
    9 %) would otherwise open and clear every minute. The first reading under is stored on the incident; a
    reading above clears it again (``ops_alerts_evaluate``)."""
    if not rule.clear_after_minutes:
        return True
    if incident.under_since is None:
        OpsAlertIncident.objects.filter(pk=incident.pk, under_since__isnull=True).update(under_since=now)
        return False
    return now - incident.under_since >= timedelta(minutes=rule.clear_after_minutes)


def _rule_lock(rule_id: int) -> bool:
    """Lock the rule; whether it is still enabled. Opening and clearing a rule's incidents take turns, so that
    what one checks the other has not half done, and an evaluator that read the rule before an admin disabled
    it opens nothing after (the admin's close told the operator it is no longer watched)."""
    return bool(OpsAlertRule.objects.select_for_update().filter(pk=rule_id).values_list("enabled", flat=True).first())


def ops_incident_open(*, rule: OpsAlertRule, subject: str, measure: Measure, now: datetime) -> OpsAlertIncident | None:
    """Open the rule's incident for ``subject`` unless one is open; its alert goes out after commit. None when
    another evaluator opened it first, or when one measuring later than ``now`` cleared it already (a slow run
    overlapping the next: its breach is over)."""
    try:
        with transaction.atomic():
            if not _rule_lock(rule.pk):
                return None
            if OpsAlertIncident.objects.filter(rule=rule, subject=subject, cleared_at__gt=now).exists():
                return None
            incident = OpsAlertIncident.objects.create(
                rule=rule,
                subject=subject,
                opened_at=now,
                value_at_open=measure.value,
                threshold=rule.threshold,
                model_id=measure.model_id,
                peak=measure.value,
                detail=measure.detail[:300],
                delivery=_unsent(rule, OpsAlertEvent.OPEN),
            )
            transaction.on_commit(partial(_deliver, incident.pk, OpsAlertEvent.OPEN), robust=True)
    except IntegrityError:
        return None
    return incident


def ops_incident_clear(
    *, incident: OpsAlertIncident, measure: Measure | None, now: datetime
) -> OpsAlertIncident | None:
    """Clear ``incident`` unless another evaluator did, or one measuring later than ``now`` opened it (a slow run
    overlapping the next: its measure is older than the breach); its alert goes out after commit."""
    with transaction.atomic():
        _rule_lock(incident.rule_id)
        locked = OpsAlertIncident.objects.select_for_update().filter(pk=incident.pk, cleared_at__isnull=True).first()
        if locked is None or locked.opened_at > now:
            return None
        locked.cleared_at = now
        locked.value_at_clear = measure.value if measure is not None else None
        locked.delivery = {**locked.delivery, **_unsent(locked.rule, OpsAlertEvent.CLEAR)}
        locked.save(update_fields=["cleared_at", "value_at_clear", "delivery"])
        transaction.on_commit(partial(_deliver, locked.pk, OpsAlertEvent.CLEAR), robust=True)
    return locked


def ops_rules_delete(*, rules: Iterable[OpsAlertRule], by: str) -> None:
    """Delete ``rules``, each open incident of theirs closed first and told once as closed by ``by``'s deletion,
    not recovered (``ops_rule_incidents_close``); the deletion itself keeps what the rule said of who is told on
    its incidents (``ops_rule_deleting``)."""
    with transaction.atomic():
        for rule in rules:
            ops_rule_incidents_close(rule=rule, because=f"the rule was deleted by {by}")
            rule.delete()


def ops_rule_deleting(rule: OpsAlertRule, *, now: datetime | None = None) -> list[str]:
    """A rule being deleted, whatever deletes it (the admin through ``ops_rules_delete``, ``rule.delete()`` in the
    shell, a queryset's ``delete()``; from its ``pre_delete``): its open incidents are closed and told once as
    closed, not recovered, "the rule was deleted" (none left open when the admin closed them naming who). Left
    open, their rule gone, nothing evaluated them: a page that never resolved, and no word to on-call. The
    incidents outlive the rule, keeping its name, recipients and webhook (still encrypted) for that notice, and for
    any other delivery of theirs not made yet. Returns the subjects it closed."""
    with transaction.atomic():
        closed = ops_rule_incidents_close(rule=rule, because="the rule was deleted", now=now)
        rule.incidents.update(
            rule_name=rule.name, kept_recipients=rule.email_recipients, kept_webhook_url=rule.webhook_url
        )
    return closed


def ops_rule_incidents_close(
    *, rule: OpsAlertRule, because: str, now: datetime | None = None, if_disabled: bool = False
) -> list[str]:
    """Close the open incidents of a rule an admin disabled (``because``: "the rule was disabled by alice"):
    nothing evaluates it any more, and an incident left open would be a page that never resolves. Each is
    told once, on its usual channels, as closed for that reason, not recovered. For the deployment-down rule,
    the deployments' incidents its evaluator opened from their breakers. Returns the subjects it closed.

    ``if_disabled`` (the evaluator's sweep of rules disabled outside the admin): only while the rule, once
    locked, is still disabled; enabled again meanwhile, its incidents are watched again.

    The deployments' incidents are watched while any deployment-down rule is enabled: another one still enabled,
    they are left open (closed, the breaker still open would open them again a minute later, a second "down" page
    for one outage)."""
    now = now or timezone.now()
    if rule.kind == OpsAlertKind.DEPLOYMENT_DOWN:
        if OpsAlertRule.objects.filter(kind=OpsAlertKind.DEPLOYMENT_DOWN, enabled=True).exclude(pk=rule.pk).exists():
            return []
        open_ids = Incident.objects.filter(ended_at__isnull=True, reason=BREAKER_REASON).values_list(
            "deployment_id", flat=True
        )
        return [
            f"deployment:{deployment_id}"
            for deployment_id in list(open_ids)
            if incident_close(deployment_id=deployment_id, at=now, because=because) is not None
        ]
    with transaction.atomic():
        if _rule_lock(rule.pk) and if_disabled:
            return []
        return _incidents_close(OpsAlertIncident.objects.filter(rule=rule), rule=rule, because=because, now=now)


def _incidents_close(
    incidents: QuerySet[OpsAlertIncident], *, rule: OpsAlertRule, because: str, now: datetime
) -> list[str]:
    """Close the open ones of ``incidents`` (of ``rule``) as no recovery (``because``), each told once after
    commit; their subjects. In the caller's transaction, under the rule's lock."""
    closed = []
    for incident in incidents.select_for_update().filter(cleared_at__isnull=True):
        incident.cleared_at = max(now, incident.opened_at)
        incident.closed_because = because[:200]
        incident.delivery = {**incident.delivery, **_unsent(rule, OpsAlertEvent.CLEAR)}
        incident.save(update_fields=["cleared_at", "closed_because", "delivery"])
        transaction.on_commit(partial(_deliver, incident.pk, OpsAlertEvent.CLEAR), robust=True)
        closed.append(incident.subject)
    return closed


def _watches(rule: OpsAlertRule, subject: str) -> bool:
    """Whether ``rule`` as it is now measures ``subject``: its model (``watched_model_name``) narrows the models an
    error-rate or latency rule watches, and names the one spend a spend-spike rule watches (all spend without it)."""
    watched = rule.watched_model_name
    if rule.kind == OpsAlertKind.SPEND_SPIKE:
        return subject == (f"model:{watched}" if watched else "all")
    if rule.kind in (OpsAlertKind.ERROR_RATE, OpsAlertKind.LATENCY_P95):
        return not watched or subject == f"model:{watched}"
    return True


def _watched_text(rule: OpsAlertRule) -> str:
    watched = rule.watched_model_name
    if rule.kind == OpsAlertKind.SPEND_SPIKE:
        return f"spend on model {watched} only" if watched else "all spend"
    return f"model {watched} only" if watched else "every model"


def _unwatched_close(rule: OpsAlertRule, incidents: list[OpsAlertIncident], *, now: datetime) -> list[str]:
    """Close the open incidents of subjects the rule no longer watches (its model changed, in the admin or the
    shell): no longer measured, they read as gone and cleared after ``clear_after_minutes``, told as a
    recovery ("cleared … at worst 100 %") while the model still failed. Told once as closed, not recovered,
    saying what the rule watches now; nothing when the rule, once locked, was changed again or disabled."""
    with transaction.atomic():
        now_watched = (
            OpsAlertRule.objects.select_for_update()
            .filter(pk=rule.pk)
            .values_list("enabled", "model_id", "model_name")
            .first()
        )
        if now_watched != (True, rule.model_id, rule.model_name):
            return []
        return _incidents_close(
            OpsAlertIncident.objects.filter(pk__in=[incident.pk for incident in incidents]),
            rule=rule,
            because=f"the rule now watches {_watched_text(rule)}",
            now=now,
        )


def _subjects_gone(
    rule: OpsAlertRule, open_incidents: dict[str, OpsAlertIncident]
) -> dict[str, list[OpsAlertIncident]]:
    """The open incidents whose subject is gone, by why: a user deleted (their ledger rows go to null, and a
    token-quota incident would read as gone, told as a recovery after the rule's wait)."""
    if rule.kind != OpsAlertKind.TOKEN_QUOTA:
        return {}
    users = {
        int(subject.removeprefix("user:")): incident
        for subject, incident in open_incidents.items()
        if subject.startswith("user:") and subject.removeprefix("user:").isdigit()
    }
    present = set(get_user_model().objects.filter(pk__in=users).values_list("pk", flat=True))
    deleted = [incident for user_id, incident in users.items() if user_id not in present]
    return {"the user was deleted": deleted} if deleted else {}


def _models_deleted(rule: OpsAlertRule, now: datetime) -> set[str]:
    """The subjects of the rule's incidents closed as their model was deleted, recently enough that the rows it
    left may still be in the window: measured under the name on the rows, they would open a second incident (a
    "firing" for a model that is gone), cleared as a recovery once they left it."""
    window = timedelta(hours=1) if rule.kind == OpsAlertKind.SPEND_SPIKE else timedelta(minutes=rule.window_minutes)
    recent = rule.incidents.filter(closed_because=MODEL_DELETED, cleared_at__gt=now - window)
    return set(recent.values_list("subject", flat=True))


def ops_model_incidents_close(*, model_id: int, name: str, now: datetime | None = None) -> list[str]:
    """Close the open incidents of a model being deleted (its admin page, the bulk action, the shell), each told
    once as closed, not recovered, "the model was deleted": left open, its rows left the window and it cleared as
    a recovery, the model "back" when it was gone. An incident opened without its model (by the previous release,
    during a rolling deploy; the spend spike of a rule watching the model's name, bound to no model) is found by the
    model's name. Returns the subjects it closed."""
    now = now or timezone.now()
    incidents = OpsAlertIncident.objects.filter(cleared_at__isnull=True, rule__isnull=False).filter(
        Q(model_id=model_id)
        | Q(
            model__isnull=True,
            subject=f"model:{name}",
            rule__kind__in=[OpsAlertKind.ERROR_RATE, OpsAlertKind.LATENCY_P95, OpsAlertKind.SPEND_SPIKE],
        )
    )
    closed = []
    with transaction.atomic():
        # The rules narrowed to it keep its name, and watch by it: never every model.
        OpsAlertRule.objects.filter(model_id=model_id).update(model_name=name, model_name_bound=name)
        for rule_id in sorted(set(incidents.values_list("rule_id", flat=True))):
            _rule_lock(rule_id)
            rule = OpsAlertRule.objects.get(pk=rule_id)
            closed += _incidents_close(incidents.filter(rule_id=rule_id), rule=rule, because=MODEL_DELETED, now=now)
    return closed


def ops_rules_model_bind(*, name: str | None = None) -> int:
    """Bind to the catalog model that has its name now the rules watching a name by the name alone (given it before
    the model was added to the catalog, or after their model was deleted; the model added, or renamed to it), and
    the rules whose ``model_name`` was edited since they were bound (``model_name_bound``: a queryset's
    ``update()``, which no save sees) to the model it names, or to none (watched by that name; "": every model).
    Watched by the name only, the model renamed later was watched by them no more; kept, an edited rule watched its
    old model while its name said another. ``name``: only the rules watching it (a model saved with it, its
    ``post_save``); every such rule otherwise (the evaluator, each run: a model renamed through a queryset's
    ``update()``, a bulk load, sends no signal). A rule bound to a model for its name is left as it is, its model
    renamed or not. How many it bound."""
    named = CatalogModel.objects.filter(name=OuterRef("model_name")).values("pk")[:1]
    unbound = Q(Exists(named), model__isnull=True) & ~Q(model_name="")
    edited = ~Q(model_name=F("model_name_bound"))
    rules = OpsAlertRule.objects.filter(unbound | edited)
    if name is not None:
        rules = rules.filter(model_name=name)
    return rules.update(model_id=Subquery(named), model_name_bound=F("model_name"))


def _gone_close(rule: OpsAlertRule, incidents: list[OpsAlertIncident], *, because: str, now: datetime) -> list[str]:
    """Close the open incidents of subjects that are gone (``_subjects_gone``), told once as closed, not recovered
    (``because``: "the user was deleted"), as a deployment deleted while down is; nothing when the rule, once
    locked, was disabled meanwhile (its close told it already)."""
    with transaction.atomic():
        if not _rule_lock(rule.pk):
            return []
        return _incidents_close(
            OpsAlertIncident.objects.filter(pk__in=[incident.pk for incident in incidents]),
            rule=rule,
            because=because,
            now=now,
        )


# The deployments requests reach (routing leaves out those of a disabled model or provider), and no admin forced
# open: the others' breaker incidents are closed as taken out of service, and none is opened for them.
_IN_SERVICE = Q(enabled=True, model__enabled=True, provider__enabled=True)


def _out_of_service_close(*, now: datetime, evaluation: Evaluation) -> None:
    """Close the breaker incidents of deployments an admin took out of service (disabled, their model or their
    provider disabled, their breaker forced open): no request reaches them, so nothing would ever close the
    incident, and its page would never resolve. Told as closed by an admin, not as back up
    (``providers.services.incidents.incidents_out_of_service_close``)."""
    for name in incidents_out_of_service_close(at=now, breaker_incidents=True):
        evaluation.cleared.append(f"{OpsAlertKind.DEPLOYMENT_DOWN} deployment:{name}")


def _forced_closed_follow(*, now: datetime, evaluation: Evaluation) -> None:
    """Close the breaker incidents of deployments an admin forced closed once their requests succeed again. Forced
    closed, a deployment is always a candidate: its requests, not its breaker, say whether it is back (as back up,
    a recovery). Left alone with the other overrides, such an incident stayed open for good."""
    forced = Incident.objects.filter(
        ended_at__isnull=True,
        reason=BREAKER_REASON,
        deployment__in=Deployment.objects.filter(_IN_SERVICE, breaker_override=BreakerOverride.CLOSED),
    )
    for deployment_id, name, started_at in forced.values_list("deployment_id", "deployment__name", "started_at"):
        if not _answering_again(deployment_id, started_at, now):
            continue
        if incident_close(deployment_id=deployment_id, at=now) is not None:
            evaluation.cleared.append(f"{OpsAlertKind.DEPLOYMENT_DOWN} deployment:{name}")


def deployments_down_follow(*, now: datetime, evaluation: Evaluation) -> None:
    """Open a deployment's ``Incident`` when its breaker is open (or half-open: still not trusted) and none is
    open; close the ones opened this way once the breaker has closed. Deployments an admin forced open or
    closed (``breaker_override``) get none opened: that is a decision, not an outage; nor do those of a disabled
    model or provider, which no request reaches; the incident of one taken out of service (disabled, its model or
    provider disabled, forced open) is closed as such (``_out_of_service_close``), that of one forced closed
    once its requests succeed (``_forced_closed_follow``)."""
    _out_of_service_close(now=now, evaluation=evaluation)
    _forced_closed_follow(now=now, evaluation=evaluation)
    deployments = dict(Deployment.objects.filter(_IN_SERVICE, breaker_override="").values_list("pk", "name"))
    if not deployments:
        return
    states = breaker_states(deployments)
    open_incidents = {
        deployment_id: (reason, started_at)
        for deployment_id, reason, started_at in Incident.objects.filter(
            deployment_id__in=deployments, ended_at__isnull=True
        ).values_list("deployment_id", "reason", "started_at")
    }
    for deployment_id, name in deployments.items():
        state = states[deployment_id].state
        reason, started_at = open_incidents.get(deployment_id, (None, None))
        if state != CLOSED and reason is None:
            if incident_open(deployment_id=deployment_id, reason=BREAKER_REASON, at=now) is not None:
                evaluation.opened.append(f"{OpsAlertKind.DEPLOYMENT_DOWN} deployment:{name}")
        elif state == CLOSED and reason == BREAKER_REASON and _answering_again(deployment_id, started_at, now):
            if incident_close(deployment_id=deployment_id, at=now) is not None:
                evaluation.cleared.append(f"{OpsAlertKind.DEPLOYMENT_DOWN} deployment:{name}")


def _answering_again(deployment_id: int, since: datetime, now: datetime) -> bool:
    """Whether the latest request the deployment was judged on since its incident began succeeded. A closed
    breaker alone is no recovery: a passing health check closes it too (the model list answers) while the
    completions still fail, and the next failures open it again; the incident would clear and open again
    every round of health checks."""
    latest = (
        UsageRecord.objects.filter(deployment_id=deployment_id, created_at__gte=since, created_at__lte=now)
        .exclude(status__in=_NOT_JUDGED)
        .order_by("-created_at", "-pk")
        .values_list("status", flat=True)
        .first()
    )
    return latest == UsageStatus.OK


# DELIVERY


def _deliver(incident_id: int, event: str) -> None:
    # Queued after commit. A broker that cannot take the tasks is logged (``task_queue``) and does not undo the
    # incident: the alert sweep queues what its row does not record as delivered.
    from ..tasks import ops_alert_email, ops_alert_webhook

    incident = OpsAlertIncident.objects.select_related("rule").get(pk=incident_id)
    task_queue(ops_alert_email, incident_id, event, what=f"ops incident {incident_id}'s {event} email")
    kept = incident.rule.webhook_url if incident.rule else incident.kept_webhook_url
    if isinstance(kept, UnreadableSecretUrl):
        # Once per alert (the sweep and the tasks skip it quietly), by the rule's name only.
        logger.error(
            "operations alert rule %s: its webhook %s; its %s alert goes by email only (type the webhook again "
            "in the admin, or put its key back)",
            ops_incident_rule_name(incident),
            UNREADABLE,
            event,
        )
    if ops_incident_webhook_url(incident):
        task_queue(ops_alert_webhook, incident_id, event, what=f"ops incident {incident_id}'s {event} webhook")


def _unsent(rule: OpsAlertRule, event: str) -> dict[str, dict[str, str]]:
    """The event's webhook delivery recorded as having nobody to go to when neither the rule nor the gateway has a
    webhook (``core.outbox.deliveries_unsent``): one set up later is not sent the alerts of the day before."""
    return {} if ops_alert_webhook_url(rule) else deliveries_unsent(f"{event}:webhook")


def ops_alert_recipients(rule: OpsAlertRule) -> list[str]:
    """The rule's addresses; without any, the admins' (as the deployment incidents' alerts go)."""
    return rule.recipients or incident_alert_recipients()


def ops_alert_webhook_url(rule: OpsAlertRule) -> str:
    """The rule's own webhook (its secret plaintext, for the delivery only), else the global one; none when its
    own no key decrypts (the admin shows it so): the global one is not where the rule's alerts were meant to go."""
    return _webhook_plaintext(rule.webhook_url)


def _webhook_plaintext(url: SecretUrl) -> str:
    if isinstance(url, UnreadableSecretUrl):
        return ""
    return url.reveal() if url else settings.LLMHUB_ALERT_WEBHOOK_URL


def ops_incident_rule_name(incident: OpsAlertIncident) -> str:
    return incident.rule.name if incident.rule else incident.rule_name


def ops_incident_subject(incident: OpsAlertIncident) -> str:
    """What it is about, as its alerts say it: "model:gpt-4o"; a model renamed since it opened, by both names
    ("model:gpt-4o-2, model:gpt-4o when it opened"), so that the clear is read against the firing alert."""
    if incident.renamed_from:
        return f"{incident.subject}, {incident.renamed_from} when it opened"
    return incident.subject


def ops_incident_recipients(incident: OpsAlertIncident) -> list[str]:
    """Its rule's addresses (those the rule had, once it is deleted); without any, the admins'."""
    if incident.rule:
        return ops_alert_recipients(incident.rule)
    kept = OpsAlertRule(email_recipients=incident.kept_recipients)
    return ops_alert_recipients(kept)


def ops_incident_webhook_url(incident: OpsAlertIncident) -> str:
    """Its rule's webhook (the one the rule had, once it is deleted), else the global one."""
    if incident.rule:
        return ops_alert_webhook_url(incident.rule)
    return _webhook_plaintext(incident.kept_webhook_url)


def _in_rule_unit(rule: OpsAlertRule, value: Decimal, *, exact: bool = False) -> str:
    """``value`` as the rule's kind reads it: "87.5 %", "12000 ms", "4.2 times the usual hour". A threshold
    (``exact``) is shown as it was typed, a measure to a tenth (milliseconds whole)."""
    if exact:
        number = f"{value.normalize():f}"
    elif rule.kind == OpsAlertKind.LATENCY_P95:
        number = f"{value.quantize(Decimal('1'))}"
    else:
        number = f"{value.quantize(Decimal('0.1'))}"
    unit = {OpsAlertKind.LATENCY_P95: " ms", OpsAlertKind.SPEND_SPIKE: " times the usual hour"}.get(rule.kind, " %")
    return number + unit


def _opened_under(rule: OpsAlertRule, incident: OpsAlertIncident) -> tuple[str, str]:
    """The threshold the incident opened under, in the rule's unit, and the rule's own now when an admin has edited
    it since ("" otherwise): each alert quotes the first, so that a clearing after the edit does not read as if the
    incident had opened under the new one. An incident opened before the threshold was kept has the rule's."""
    now = _in_rule_unit(rule, rule.threshold, exact=True)
    if incident.threshold is None:
        return now, ""
    opened = _in_rule_unit(rule, Decimal(incident.threshold), exact=True)
    return opened, "" if opened == now else now


def _threshold_text(rule: OpsAlertRule, incident: OpsAlertIncident) -> str:
    """The rule the measure went past, in words, to follow it: whether the rule or the subject needs looking at."""
    threshold, edited = _opened_under(rule, incident)
    since = f"; the rule's threshold is {edited} now" if edited else ""
    if rule.kind == OpsAlertKind.TOKEN_QUOTA:
        return f"; the rule alerts at {threshold} of the quota used, or when the quota refuses the user{since}"
    if rule.kind == OpsAlertKind.SPEND_SPIKE:
        return f", above the rule's {threshold} (from a usual hour of {usd(rule.minimum_baseline_usd)}{since})"
    return f", above the rule's {threshold} (from {rule.minimum_requests} requests{since})"


def ops_alert_text(incident: OpsAlertIncident, event: str) -> str:
    """The alert in words: what, where, how bad, since when, against which threshold; once cleared, how long it
    lasted and how bad it got."""
    rule, subject = incident.rule, ops_incident_subject(incident)
    since = f"{incident.opened_at:%Y-%m-%d %H:%M} UTC"
    if event == OpsAlertEvent.CLEAR:
        lasted = "less than a minute"
        if incident.cleared_at and (incident.cleared_at - incident.opened_at) >= timedelta(minutes=1):
            lasted = timesince(incident.opened_at, incident.cleared_at)
        if rule is None:  # deleted: its kind and threshold went with it
            return (
                f"llmhub: closed, not recovered: {incident.rule_name} ({subject}): "
                f"{incident.closed_because or 'the rule was deleted'}, so nothing watches it now; after {lasted} "
                f"(since {since}). It began as: {incident.detail}."
            )
        worst, (threshold, edited) = _in_rule_unit(rule, incident.peak), _opened_under(rule, incident)
        if edited:
            threshold = f"{threshold} when it opened ({edited} now)"
        if incident.closed_because:
            return (
                f"llmhub: closed, not recovered: {rule.name} ({subject}): {incident.closed_because}, so "
                f"nothing watches it now; after {lasted} (since {since}), at worst {worst}, the rule's threshold "
                f"{threshold}. It began as: {incident.detail}."
            )
        return (
            f"llmhub: cleared: {rule.name} ({subject}), after {lasted} (since {since}); at worst {worst}, "
            f"the rule's threshold {threshold}. It began as: {incident.detail}."
        )
    if rule is None:  # deleted since: its threshold went with it
        return f"llmhub: {incident.rule_name}: {incident.detail} (since {since})."
    return f"llmhub: {rule.name}: {incident.detail}{_threshold_text(rule, incident)} (since {since})."


def _delivered(incident_id: int, mark: str) -> None:
    delivery_done(OpsAlertIncident, incident_id, mark, delivered_field="delivered")


def ops_alert_email_send(*, incident: OpsAlertIncident, event: str) -> bool:
    """Email one of the incident's two alerts; False when it went already or there is nobody to tell."""
    mark = f"{event}:email"
    if mark in incident.delivered:
        return False
    state = "firing"
    if event == OpsAlertEvent.CLEAR:
        state = "closed, not recovered" if incident.closed_because else "cleared"
    sent = alert_email_send(
        subject=f"[llmhub] {state}: {ops_incident_rule_name(incident)} ({ops_incident_subject(incident)})",
        body=ops_alert_text(incident, event),
        recipients=ops_incident_recipients(incident),
    )
    if sent:
        _delivered(incident.pk, mark)
    else:
        delivery_release(OpsAlertIncident, incident.pk, mark, state=DeliveryState.NOBODY)
    return sent


def ops_alert_webhook_send(*, incident: OpsAlertIncident, event: str) -> bool:
    """POST one of the incident's two alerts to the webhook; raises ``WebhookDeliveryError`` (retried by the
    task); False when it went already or no webhook is set."""
    mark = f"{event}:webhook"
    url = ops_incident_webhook_url(incident)
    if mark in incident.delivered or not url:
        return False
    alert_webhook_send(url=url, text=ops_alert_text(incident, event))
    _delivered(incident.pk, mark)
    return True
