"""An experiment's results, per variant, from the ledger and the feedback: ``experiment_results``.

What is counted
---------------
Every ``billing.models.UsageRecord`` row with the experiment's ``experiment_id`` belongs to the variant
named by its ``experiment_variant_id``; ``experiments.models.Feedback`` rows are joined to them on
``request_id``. Per variant:

- ``requests``: every row (``statuses`` splits them by ledger status); ``users``: distinct users, plus
  distinct gateway keys among rows without a user.
- ``error_rate``: ``upstream_error`` and ``invalid`` rows (the provider failed or timed out, or refused
  the request as invalid, moderation blocked the reply: the variant's doing) over ``ok`` + those rows.
  Rows that are nobody's verdict on the variant are left out of both:
  ``rejected`` (the gateway refused before calling: budget, rate limit, moderation, validation),
  ``client_disconnected`` and ``cancelled`` (the client left), ``server_shutdown`` and ``lost`` (our
  process stopped or died).
- ``latency_ms`` (``duration_ms``) and ``ttft_ms`` (time to first token, streams only): ``ok`` rows.
- ``cost``: the request's price (``user_key_cost`` on a user's own key, else ``cost``) over every row
  but ``rejected`` ones; ``cost_per_positive``: that mean price over the positive rate (``_cost_per_positive``:
  the total price over the positive answers when every request is rated, without counting unrated ones as
  negative when not).
- ``positive_rate``: thumbs feedback with ``value > 0`` over the rated requests (a ``rejected`` one's rating
  left out: the variant never answered it); ``mean_score``: the mean
  of ``score`` feedback (a score sent without a name); named scores (``"metric": "helpfulness"``) are
  reported per variant under ``scores``, with an interval but no verdict.

How it is computed
------------------
Counts, sums and sums of squares add across days: they are read from the experiment's daily rollup
(``billing.models.DailyExperimentUsage``, per day, variant and status, folded in every 10 minutes) plus the
raw rows above the rollup's mark (``billing.selectors.experiment_usage_window``), so a month-long
experiment costs a few hundred rollup rows, not its millions of requests. What does not add across days is
read from the raw rows (the partial covering index over the experiment's rows): distinct users, and the
percentiles; the feedback is joined to the raw rows on ``request_id``. The percentiles are exact order
statistics read with ``ORDER BY … OFFSET`` (one short slice per percentile: its distribution-free interval's
two ranks and everything between), so no distribution is read into Python. Once retention has deleted an
experiment's old raw rows (``LLMHUB_LEDGER_RETENTION_DAYS``), the rollup still counts them, but the distinct
users and the percentiles cover only the rows that are left. Intervals: Wilson for rates, Student's t for
means, the binomial order-statistic interval for percentiles, the delta method for the cost per positive
answer (a ratio of two means). Verdicts against the control: ``experiments.stats.compare`` (an
anytime-valid mixture sequential probability ratio test, Bonferroni-corrected over the treatments), so
looking every hour does not inflate the error rate; ``method`` names it.

JSON shape (every figure may be null when there is no data; money is a decimal string)
---------------------------------------------------------------------------------------
::

    {
      "experiment": {"id": 3, "name": "tone-test", "model": "gpt-4o", "status": "running",
                     "starts_at": "2026-11-01T00:00:00Z" | null, "ends_at": null,
                     "primary_metric": "positive_rate", "guardrail_metrics": ["error_rate"],
                     "alpha": "0.050", "promoted_variant": null | "b"},
      "generated_at": "2026-12-01T16:00:00Z",
      "confidence": 0.95,                        # of every interval (1 - alpha)
      "method": "…test and reference…",
      "control": "a" | null,                     # the control variant's name
      "winner": "b" | null,                      # better on the primary metric, no guardrail worse
      "winner_reason": "…one sentence…",
      "metrics": [                               # in display order; key = a Metric value
        {"key": "positive_rate", "label": "Positive-feedback rate", "higher_is_better": true,
         "money": false, "primary": true, "guardrail": false},
        … "mean_score", "error_rate", "latency_ms", "ttft_ms", "cost", "cost_per_positive"
      ],
      "variants": [                              # in position order, control first among equals
        {"id": 7, "name": "a", "is_control": true, "allocation": "50.00",
         "requests": 1200, "users": 310,
         "statuses": {"ok": 1180, "upstream_error": 12, "rejected": 8},
         "metrics": {
           "positive_rate": {"value": 0.61, "interval": [0.57, 0.65], "n": 400, "successes": 244},
           "mean_score":    {"value": 4.1, "interval": [3.9, 4.3], "n": 50},
           "error_rate":    {"value": 0.0101, "interval": [0.005, 0.017], "n": 1192, "successes": 12},
           "latency_ms":    {"value": 812.4, "interval": [790.1, 834.7], "n": 1180,
                             "p50": 700, "p50_interval": [680, 720], "p95": 1900, "p95_interval": [1800, 2050]},
           "ttft_ms":       {"value": 210.3, "interval": [200.0, 220.6], "n": 900,
                             "p50": 190, "p50_interval": [185, 196]},
           "cost":          {"value": "0.0012000000", "interval": ["0.0011000000", "0.0013000000"], "n": 1192,
                             "total": "1.4304000000"},
           "cost_per_positive": {"value": "0.0058622951", "interval": ["…", "…"], "n": 244,
                                 "total": "1.4304000000"}
         },
         "comparisons": {                        # against the control; {} for the control itself
           "positive_rate": {"verdict": "better" | "worse" | "unknown",
                             "difference": 0.05,          # treatment - control (decimal string for money)
                             "interval": [0.01, 0.09],    # anytime-valid, corrected
                             "p_value": 0.004,            # anytime-valid
                             "samples_needed": 0 | 1800 | null},  # more per variant for a verdict
           …one per metric with data on both sides
         },
         "scores": {                             # named scores (feedback with a "metric"): no verdict
           "helpfulness": {"value": 3.8, "interval": [3.5, 4.1], "n": 40}
         }}
      ],
      "series": {                                # per UTC day of the requests, for charts
        "days": ["2026-11-01", "2026-11-02"],
        "variants": [{"name": "a", "requests": [600, 600], "rated": [200, 200],
                      "positive_rate": [0.6, 0.62] (null on a day without ratings)}]
      }
    }
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db.models import Count, F, Max, Min, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from billing.models import UsageRecord, UsageStatus
from billing.selectors import experiment_usage_sums, experiment_usage_window

from . import stats
from .models import HIGHER_IS_BETTER, Experiment, Feedback, FeedbackMetric, Metric, Variant

# Statuses that are a verdict on the variant: served, or failed upstream (errors, timeouts included), or
# refused as invalid after admission (the provider's 400s, moderation blocking replies: a variant whose
# prompt earns them is worse, though the provider is not to blame).
OK_STATUSES = (UsageStatus.OK,)
ERROR_STATUSES = (UsageStatus.UPSTREAM_ERROR, UsageStatus.INVALID)
# Every row but these counts towards cost: the gateway refused them before any upstream call.
UNSERVED_STATUSES = (UsageStatus.REJECTED,)

METRIC_ORDER = (
    Metric.POSITIVE_RATE,
    Metric.MEAN_SCORE,
    Metric.ERROR_RATE,
    Metric.LATENCY,
    Metric.TTFT,
    Metric.COST,
    Metric.COST_PER_POSITIVE,
)
MONEY_METRICS = frozenset({Metric.COST, Metric.COST_PER_POSITIVE})
_MONEY_PLACES = Decimal("1E-10")  # the ledger's

METHOD = (
    "Verdicts: mixture sequential probability ratio test (mSPRT, normal mixture) on the difference of means "
    "against the control, with its confidence sequence: Johari, Koomen, Pekelis & Walsh, 'Always Valid "
    "Inference: Continuous Monitoring of A/B Tests', Operations Research 70(3), 2022; Howard, Ramdas, "
    "McAuliffe & Sekhon, 'Time-uniform, nonparametric, nonasymptotic confidence sequences', Annals of "
    "Statistics 49(2), 2021. Valid however often the results are looked at; Bonferroni-corrected over "
    "{family} comparisons (treatments x decisive metrics) at alpha {alpha}. Latency and time to first token "
    "are compared on their means. Intervals per variant: Wilson score (rates), Student's t (means), "
    "binomial order statistics (percentiles), delta method on the log scale (cost per positive answer = "
    "mean price / positive rate)."
)


def _money(value: float | Decimal | None) -> str | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return f"{Decimal(str(value)).quantize(_MONEY_PLACES):f}"  # never "1E-7": a plain decimal string


def _interval(interval: Any, *, money: bool = False) -> list[Any] | None:
    if interval is None:
        return None
    low, high = interval
    if money:
        return [_money(low), _money(high)]
    return [_float(low), _float(high)]


def _float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _variance(n: int, total: float, total_squares: float) -> float:
    """The sample variance from a count, a sum and a sum of squares (as the database returns them)."""
    if n < 2:
        return 0.0
    return max((total_squares - total * total / n) / (n - 1), 0.0)


@dataclass(frozen=True, slots=True)
class _Figure:
    """One metric of one variant: its summary (what ``stats.compare`` takes) and its JSON."""

    summary: stats.Summary | None
    data: dict[str, Any]


def _empty(**extra: Any) -> _Figure:
    return _Figure(None, {"value": None, "interval": None, "n": 0, **extra})


def _rate(successes: int, n: int, confidence: float) -> _Figure:
    if n == 0:
        return _empty(successes=0)
    return _Figure(
        stats.summary_of_rate(successes, n),
        {
            "value": successes / n,
            "interval": _interval(stats.wilson_interval(successes, n, confidence)),
            "n": n,
            "successes": successes,
        },
    )


def _mean(n: int, total: float, total_squares: float, confidence: float, *, money: bool = False) -> _Figure:
    if n == 0:
        return _empty()
    summary = stats.Summary(n=n, mean=total / n, variance=_variance(n, total, total_squares))
    interval = stats.mean_interval(summary, confidence) if n >= 2 else None
    value = _money(summary.mean) if money else summary.mean
    return _Figure(summary, {"value": value, "interval": _interval(interval, money=money), "n": n})


def _percentile(rows: QuerySet, field: str, n: int, q: float, confidence: float) -> tuple[int | None, list | None]:
    """The nearest-rank ``q`` percentile of ``field`` over ``rows`` (``n`` of them) and its distribution-free
    interval (``stats.quantile_ranks``). Only the slice of sorted values between its ranks is read."""
    if n == 0:
        return None, None
    rank, low, high = stats.quantile_ranks(n, q, confidence)
    first, last = min(low, rank), max(high, rank)
    values = list(rows.order_by(field).values_list(field, flat=True)[first - 1 : last])
    if len(values) < last - first + 1:  # rows went away between the count and the read
        return (values[-1], None) if values else (None, None)
    return values[rank - first], [values[low - first], values[high - first]]


def _cost_per_positive(cost: _Figure, positive: _Figure, confidence: float) -> _Figure:
    """Mean price over positive rate: what one positive answer costs. Equal to total price / positive
    answers when every request is rated; with fewer rated it does not count the unrated ones as negative.
    Its interval: ``stats.ratio_of_means_interval`` (the delta method on the log scale)."""
    if cost.summary is None or positive.summary is None or positive.summary.mean <= 0:
        return _empty(total=cost.data.get("total"))
    c, p = cost.summary, positive.summary
    if c.mean <= 0:  # free answers (a free model, own keys not priced): every positive one costs nothing
        data = {"value": _money(0.0), "interval": [_money(0.0)] * 2, "n": positive.data["successes"]}
        return _Figure(stats.Summary(n=p.n, mean=0.0, variance=0.0), {**data, "total": cost.data.get("total")})
    ratio, low, high = stats.ratio_of_means_interval(c, p, confidence)
    relative_variance = c.variance / (c.n * c.mean**2) + p.variance / (p.n * p.mean**2)
    # For comparisons: a "sample" of the rated requests whose mean's variance is the ratio's.
    summary = stats.Summary(n=p.n, mean=ratio, variance=relative_variance * ratio**2 * p.n)
    return _Figure(
        summary,
        {
            "value": _money(ratio),
            "interval": [_money(low), _money(high)],
            "n": positive.data["successes"],
            "total": cost.data.get("total"),
        },
    )


_SUMS = tuple(experiment_usage_sums())  # the names of the rollup's sums, in one place (billing.selectors)


def _no_sums() -> dict[str, Any]:
    zeros = {"duration_squares": 0.0, "ttft_squares": 0.0, "price": Decimal(0), "price_squares": Decimal(0)}
    return {name: zeros.get(name, 0) for name in _SUMS}


@dataclass(slots=True)
class _Span:
    """The first and last request among some of the experiment's rows."""

    first: dt.datetime | None = None
    last: dt.datetime | None = None

    def add(self, first: dt.datetime | None, last: dt.datetime | None) -> None:
        if first is not None:
            self.first = first if self.first is None else min(self.first, first)
        if last is not None:
            self.last = last if self.last is None else max(self.last, last)


@dataclass(slots=True)
class _Usage:
    """The experiment's ledger figures: sums per variant and status, requests per variant and UTC day, and
    per variant what only the raw rows can say (distinct users; how many rows the percentiles rank)."""

    sums: dict[int, dict[str, dict[str, Any]]]
    by_day: dict[int, dict[dt.date, int]]
    raw: dict[int, dict[str, int]]


def _usage_read(experiment_id: int) -> _Usage:
    """The experiment's sums from its daily rollup plus the raw rows above the rollup's mark
    (``billing.selectors.experiment_usage_window``): a few rows a day however many requests it had. Then
    one pass over its raw rows (the covering index) for what does not add across days."""

    def read(rolled: QuerySet, live: QuerySet) -> _Usage:
        usage = _Usage({}, {}, {})

        def add(variant_id: int, status: str, found: dict[str, Any]) -> None:
            entry = usage.sums.setdefault(variant_id, {}).setdefault(status, _no_sums())
            for name in _SUMS:
                entry[name] += found[name]

        for row in rolled.values("experiment_variant_id", "status", "day", *_SUMS).order_by():
            add(row["experiment_variant_id"], row["status"], row)
            days = usage.by_day.setdefault(row["experiment_variant_id"], {})
            days[row["day"]] = days.get(row["day"], 0) + row["requests"]
        span = _Span()
        grouped = live.values("experiment_variant_id", "status").annotate(
            **experiment_usage_sums(), first=Min("created_at"), last=Max("created_at")
        )
        for row in grouped.order_by():
            span.add(row["first"], row["last"])
            add(row["experiment_variant_id"], row["status"], row)
        for variant_id, days in _requests_by_day(live, span).items():
            merged = usage.by_day.setdefault(variant_id, {})
            for day, n in days.items():
                merged[day] = merged.get(day, 0) + n
        return usage

    usage = experiment_usage_window(experiment_id=experiment_id, read=read)
    ok = Q(status__in=OK_STATUSES)
    raw = (
        UsageRecord.objects.filter(experiment_id=experiment_id)
        .values("experiment_variant_id")
        .annotate(
            users=Count("user_id", distinct=True),
            keys_alone=Count("api_key_id", distinct=True, filter=Q(user_id__isnull=True)),
            latency_ranked=Count("id", filter=ok),
            ttft_ranked=Count("id", filter=ok & Q(stream=True, ttft_ms__isnull=False)),
        )
    )
    for row in raw.order_by():
        usage.raw[row.pop("experiment_variant_id")] = row
    return usage


def _requests_by_day(rows: QuerySet, span: _Span) -> dict[int, dict[dt.date, int]]:
    """Requests per variant and UTC day over ``span``: one conditional count per day (``created_at`` in the
    day's range) rather than grouping by a truncated date: SQLite truncates dates in a Python function
    called per row, five times slower on 100,000 rows (the raw rows are every row before the first fold)."""
    if span.first is None or span.last is None:
        return {}
    last = span.last.astimezone(dt.UTC).date()
    first = max(span.first.astimezone(dt.UTC).date(), last - dt.timedelta(days=SERIES_MAX_DAYS - 1))
    days = _day_range(first, last)
    columns = {
        f"d{index}": Count(
            "id",
            filter=Q(
                created_at__gte=dt.datetime.combine(day, dt.time(), dt.UTC),
                created_at__lt=dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC),
            ),
        )
        for index, day in enumerate(days)
    }
    return {
        row["experiment_variant_id"]: {day: row[f"d{i}"] for i, day in enumerate(days) if row[f"d{i}"]}
        for row in rows.values("experiment_variant_id").annotate(**columns).order_by()
    }


def _variant_usage(usage: _Usage, variant_id: int) -> dict[str, Any]:
    """One variant's counts and sums as the figures take them, from its sums per status."""
    by_status = usage.sums.get(variant_id, {})
    raw = usage.raw.get(variant_id, {})

    def total(statuses: Any, name: str) -> Any:
        return sum((found[name] for status, found in by_status.items() if statuses(status)), _no_sums()[name])

    def ok(status: str) -> bool:
        return status in OK_STATUSES

    def served(status: str) -> bool:
        return status not in UNSERVED_STATUSES

    cost_total = total(served, "price")
    return {
        "requests": total(lambda _status: True, "requests"),
        "users": raw.get("users", 0) + raw.get("keys_alone", 0),
        "statuses": {status: found["requests"] for status, found in by_status.items() if found["requests"]},
        "ok": total(ok, "requests"),
        "errors": total(lambda status: status in ERROR_STATUSES, "requests"),
        "latency_n": total(ok, "requests"),
        "latency_sum": float(total(ok, "duration_sum")),
        "latency_squares": float(total(ok, "duration_squares")),
        "latency_ranked": raw.get("latency_ranked", 0),
        "ttft_n": total(ok, "ttft_n"),
        "ttft_sum": float(total(ok, "ttft_sum")),
        "ttft_squares": float(total(ok, "ttft_squares")),
        "ttft_ranked": raw.get("ttft_ranked", 0),
        "cost_n": total(served, "requests"),
        "cost_total": cost_total,
        "cost_sum": float(cost_total),
        "cost_squares": float(total(served, "price_squares")),
    }


@dataclass(slots=True)
class _Feedback:
    """The feedback on the experiment's requests: per variant and metric, the count, positives, sum and sum
    of squares of the values; per variant and UTC day of the request, thumbs ratings and positive ones."""

    by_variant: dict[int, dict[str, dict[str, Any]]]
    thumbs_by_day: dict[int, dict[dt.date, tuple[int, int]]]


def _feedback_aggregates(experiment_id: int) -> _Feedback:
    """One join of the feedback to the experiment's ledger rows (``Feedback.usage``), grouped by variant,
    metric and the request's UTC day: the day is read only from the rated requests' rows."""
    value = F("value")
    grouped = (
        Feedback.objects.filter(usage__experiment_id=experiment_id)
        # A refused request got no answer from its variant: its rating is no verdict on it (as for errors).
        .exclude(usage__status__in=UNSERVED_STATUSES)
        .values("usage__experiment_variant_id", "metric", day=TruncDate("usage__created_at", tzinfo=dt.UTC))
        .annotate(
            n=Count("id"),
            positives=Count("id", filter=Q(value__gt=0)),
            total=Sum(value),
            squares=Sum(value * value),
        )
        .order_by()
    )
    found = _Feedback({}, {})
    for row in grouped:
        variant_id, metric = row["usage__experiment_variant_id"], row["metric"]
        entry = found.by_variant.setdefault(variant_id, {}).setdefault(
            metric, {"n": 0, "positives": 0, "total": 0.0, "squares": 0.0}
        )
        for name in ("n", "positives", "total", "squares"):
            entry[name] += row[name]
        if metric == FeedbackMetric.THUMBS:
            found.thumbs_by_day.setdefault(variant_id, {})[row["day"]] = (row["n"], row["positives"])
    return found


def _variant_figures(
    experiment: Experiment,
    variant: Variant,
    usage: dict[str, Any],
    feedback: dict[str, dict[str, Any]],
    confidence: float,
) -> tuple[dict[str, _Figure], dict[str, dict[str, Any]]]:
    """The variant's figures by metric, and its named scores (``POST /v1/feedback`` with a ``metric``)."""
    rows = UsageRecord.objects.filter(experiment_id=experiment.pk, experiment_variant_id=variant.pk)
    thumbs = feedback.get(FeedbackMetric.THUMBS, {})
    scores = feedback.get(FeedbackMetric.SCORE, {})

    figures: dict[str, _Figure] = {}
    figures[Metric.POSITIVE_RATE] = _rate(thumbs.get("positives", 0), thumbs.get("n", 0), confidence)
    figures[Metric.MEAN_SCORE] = _mean(
        scores.get("n", 0), scores.get("total") or 0.0, scores.get("squares") or 0.0, confidence
    )
    figures[Metric.ERROR_RATE] = _rate(usage["errors"], usage["ok"] + usage["errors"], confidence)

    latency = _mean(usage["latency_n"], usage["latency_sum"] or 0.0, usage["latency_squares"] or 0.0, confidence)
    ok_rows = rows.filter(status__in=OK_STATUSES)
    for q, key in ((0.5, "p50"), (0.95, "p95")):
        point, interval = _percentile(ok_rows, "duration_ms", usage["latency_ranked"], q, confidence)
        latency.data[key], latency.data[f"{key}_interval"] = point, interval
    figures[Metric.LATENCY] = latency

    ttft = _mean(usage["ttft_n"], usage["ttft_sum"] or 0.0, usage["ttft_squares"] or 0.0, confidence)
    ttft_rows = ok_rows.filter(stream=True, ttft_ms__isnull=False)
    ttft.data["p50"], ttft.data["p50_interval"] = _percentile(
        ttft_rows, "ttft_ms", usage["ttft_ranked"], 0.5, confidence
    )
    figures[Metric.TTFT] = ttft

    cost = _mean(usage["cost_n"], usage["cost_sum"] or 0.0, usage["cost_squares"] or 0.0, confidence, money=True)
    cost.data["total"] = _money(usage["cost_total"] or Decimal(0))
    figures[Metric.COST] = cost
    figures[Metric.COST_PER_POSITIVE] = _cost_per_positive(cost, figures[Metric.POSITIVE_RATE], confidence)
    named = {
        name: _mean(found["n"], found["total"] or 0.0, found["squares"] or 0.0, confidence).data
        for name, found in sorted(feedback.items())
        if name not in (FeedbackMetric.THUMBS, FeedbackMetric.SCORE)
    }
    return figures, named


def _comparison(metric: str, control: _Figure, treatment: _Figure, *, alpha: float, comparisons: int) -> dict | None:
    if control.summary is None or treatment.summary is None:
        return None
    result = stats.compare(
        control.summary,
        treatment.summary,
        alpha=alpha,
        comparisons=comparisons,
        higher_is_better=HIGHER_IS_BETTER.get(metric, False),
    )
    money = metric in MONEY_METRICS
    difference = result.difference
    return {
        "verdict": result.verdict,
        "difference": _money(difference) if money else _float(difference),
        "interval": _interval(result.interval, money=money),
        "p_value": _float(result.p_value),
        "samples_needed": result.samples_needed,
    }


SERIES_MAX_DAYS = 366  # the series covers at most the last year of an experiment


def _series(usage: _Usage, variants: list[Variant], feedback: _Feedback) -> dict[str, Any]:
    """Requests and the positive-feedback rate per UTC day of the request, per variant, from the first to
    the last day with a request (at most ``SERIES_MAX_DAYS``)."""
    every_day = {day for days in usage.by_day.values() for day in days}
    if not every_day:
        return {
            "days": [],
            "variants": [{"name": v.name, "requests": [], "rated": [], "positive_rate": []} for v in variants],
        }
    last = max(every_day)
    days = _day_range(max(min(every_day), last - dt.timedelta(days=SERIES_MAX_DAYS - 1)), last)
    series = []
    for variant in variants:
        requests = usage.by_day.get(variant.pk, {})
        thumbs = feedback.thumbs_by_day.get(variant.pk, {})
        n_rated = [thumbs.get(day, (0, 0))[0] for day in days]
        n_positive = [thumbs.get(day, (0, 0))[1] for day in days]
        series.append(
            {
                "name": variant.name,
                "requests": [requests.get(day, 0) for day in days],
                "rated": n_rated,
                "positive_rate": [p / n if n else None for n, p in zip(n_rated, n_positive, strict=True)],
            }
        )
    return {"days": [day.isoformat() for day in days], "variants": series}


def _day_range(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def _winner(
    control: Variant | None, variants: list[Variant], comparisons: dict[str, dict], primary: str, guardrails: list[str]
) -> tuple[Variant | None, str]:
    label = str(Metric(primary).label).lower() if primary in Metric.values else primary
    if control is None:
        return None, "No control variant: nothing to compare against."
    treatments = [v for v in variants if v.pk != control.pk]
    if not treatments:
        return None, "Only the control: nothing to compare."
    candidates = []
    for variant in treatments:
        found = comparisons[variant.name]
        primary_verdict = (found.get(primary) or {}).get("verdict")
        worse = [g for g in guardrails if (found.get(g) or {}).get("verdict") == "worse"]
        if primary_verdict == "better" and not worse:
            candidates.append(variant)
    if candidates:
        sign = 1 if HIGHER_IS_BETTER.get(primary, False) else -1

        def gain(variant: Variant) -> float:
            return sign * float(comparisons[variant.name][primary]["difference"])

        best = max(candidates, key=gain)
        return best, f"{best.name} is better than {control.name} on {label} and worse on no guardrail metric."
    if all((comparisons[v.name].get(primary) or {}).get("verdict") == "worse" for v in treatments):
        return control, f"Every variant is worse than the control {control.name} on {label}."
    return None, f"No variant is yet known to be better than {control.name} on {label} without a guardrail worse."


def experiment_results(experiment: Experiment, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The experiment's results as JSON-ready data: the shape is in this module's docstring."""
    now = now or timezone.now()
    alpha = float(experiment.alpha)
    confidence = 1 - alpha
    variants = list(experiment.variants.all())
    control = next((v for v in variants if v.is_control), None)
    read = _usage_read(experiment.pk)
    usage = {v.pk: _variant_usage(read, v.pk) for v in variants}
    feedback = _feedback_aggregates(experiment.pk)
    computed = {
        v.pk: _variant_figures(experiment, v, usage[v.pk], feedback.by_variant.get(v.pk, {}), confidence)
        for v in variants
    }
    figures = {pk: found[0] for pk, found in computed.items()}

    treatments = [v for v in variants if control is not None and v.pk != control.pk]
    guardrails = [str(g) for g in experiment.guardrail_metrics or [] if g != experiment.primary_metric]
    # The Bonferroni family: every treatment on every metric that decides (the primary and the guardrails).
    family = max(1, len(treatments) * (1 + len(guardrails)))
    comparisons: dict[str, dict[str, Any]] = {}
    for variant in variants:
        comparisons[variant.name] = {}
        if variant in treatments:
            for metric in METRIC_ORDER:
                found = _comparison(
                    metric,
                    figures[control.pk][metric],
                    figures[variant.pk][metric],
                    alpha=alpha,
                    comparisons=family,
                )
                if found is not None:
                    comparisons[variant.name][metric] = found
    winner, reason = _winner(control, variants, comparisons, experiment.primary_metric, guardrails)

    return {
        "experiment": {
            "id": experiment.pk,
            "name": experiment.name,
            "model": experiment.model.name,
            "status": experiment.status,
            "starts_at": _instant(experiment.starts_at),
            "ends_at": _instant(experiment.ends_at),
            "primary_metric": experiment.primary_metric,
            "guardrail_metrics": guardrails,
            "alpha": str(experiment.alpha),
            "promoted_variant": experiment.promoted_variant.name if experiment.promoted_variant_id else None,
        },
        "generated_at": _instant(now),
        "confidence": confidence,
        "method": METHOD.format(family=family, alpha=experiment.alpha),
        "control": control.name if control else None,
        "winner": winner.name if winner else None,
        "winner_reason": reason,
        "metrics": [
            {
                "key": str(metric),
                "label": metric.label,
                "higher_is_better": HIGHER_IS_BETTER.get(metric, False),
                "money": metric in MONEY_METRICS,
                "primary": metric == experiment.primary_metric,
                "guardrail": metric in guardrails,
            }
            for metric in METRIC_ORDER
        ],
        "variants": [
            {
                "id": v.pk,
                "name": v.name,
                "is_control": v.is_control,
                "allocation": str(v.allocation),
                "requests": usage[v.pk]["requests"],
                "users": usage[v.pk]["users"],
                "statuses": usage[v.pk]["statuses"],
                "metrics": {str(metric): figures[v.pk][metric].data for metric in METRIC_ORDER},
                "comparisons": comparisons[v.name],
                "scores": computed[v.pk][1],
            }
            for v in variants
        ],
        "series": _series(read, variants, feedback),
    }


def _instant(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
