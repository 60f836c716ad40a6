"""Staff pages: ``/experiments/`` (every experiment, its status and links) and
``/experiments/<id>/results/`` (the results of one: a table per metric with every figure
``experiments.results.experiment_results`` returns, charts drawn by Chart.js from the same figures, the
CSV export and a button to promote a variant).

For the roles that may manage experiments (``accounts.roles.Capability.MANAGE_EXPERIMENTS``): others get
403, anonymous visitors the login page. The tables carry every figure, so the page reads the same without
its charts (a screen reader, scripts off); the charts' data is embedded with ``json_script`` and drawn by
``experiments/static/experiments/results.js``: no inline script."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from accounts.roles import Capability, role_can
from billing.services.budgets import usd
from core.exceptions import ApplicationError

from . import services
from .models import Experiment, ExperimentStatus, Metric, Variant
from .results import experiment_results

RATES = {Metric.POSITIVE_RATE, Metric.ERROR_RATE}
DURATIONS = {Metric.LATENCY, Metric.TTFT}
VERDICTS = {"better": "Better", "worse": "Worse", "unknown": "Not yet known"}


def _staff_only(request: HttpRequest) -> None:
    if not role_can(request.user, Capability.MANAGE_EXPERIMENTS):
        raise PermissionDenied


# Figures as the page prints them: one formatter per kind of metric, for values, bounds and differences.


def money(value: Decimal) -> str:
    """Dollars to four significant digits below $1 (a request costs fractions of a cent; the exact amount
    is in the cell's ``data-raw`` and the CSV)."""
    if value == 0 or abs(value) >= 1:
        return usd(value)
    return usd(round(value, 3 - value.adjusted()))


def figure(metric: str, value: Any) -> str:
    if value is None:
        return "—"
    if metric in RATES:
        return f"{float(value) * 100:.1f} %"
    if metric in DURATIONS:
        return f"{float(value):,.0f} ms"
    if metric in (Metric.COST, Metric.COST_PER_POSITIVE):
        return money(Decimal(str(value)))
    return f"{float(value):.2f}"


def difference(metric: str, value: Any) -> str:
    if value is None:
        return "—"
    number = Decimal(str(value))
    sign = "+" if number > 0 else "−" if number < 0 else "±"
    if metric in RATES:
        return f"{sign}{abs(float(number)) * 100:.1f} pp"
    return sign + figure(metric, abs(number))


def interval(metric: str, bounds: Any, *, of_difference: bool = False) -> str:
    if not bounds or bounds[0] is None or bounds[1] is None:
        return "—"
    show = difference if of_difference else figure
    return f"{show(metric, bounds[0])} to {show(metric, bounds[1])}"


def verdict_text(comparison: dict[str, Any]) -> str:
    text = VERDICTS.get(comparison.get("verdict") or "unknown", "Not yet known")
    needed = comparison.get("samples_needed")
    if comparison.get("verdict") == "unknown" and needed:
        text += f": about {needed:,} more samples per variant"
    return text


@dataclass(frozen=True, slots=True)
class Cell:
    """A figure as shown, with its raw value from the results JSON (``data-raw``: for tests and scripts)."""

    text: str
    raw: Any = None


@dataclass(slots=True)
class MetricRow:
    variant: str
    is_control: bool
    is_winner: bool
    value: Cell
    interval: Cell
    n: Cell
    percentiles: list[tuple[str, Cell, Cell]]
    difference: Cell
    difference_interval: Cell
    p_value: Cell
    verdict: str
    verdict_key: str


@dataclass(slots=True)
class MetricTable:
    key: str
    label: str
    higher_is_better: bool
    primary: bool
    guardrail: bool
    rows: list[MetricRow] = field(default_factory=list)
    has_percentiles: bool = False


def _raw(bounds: Any) -> str:
    return "" if not bounds else f"{bounds[0]},{bounds[1]}"


def metric_tables(results: dict[str, Any]) -> list[MetricTable]:
    winner = results.get("winner")
    tables = []
    for spec in results["metrics"]:
        key = spec["key"]
        table = MetricTable(key, spec["label"], spec["higher_is_better"], spec["primary"], spec["guardrail"])
        for variant in results["variants"]:
            figures = variant["metrics"].get(key) or {}
            comparison = variant["comparisons"].get(key) or {}
            percentiles = [
                (
                    name.upper(),
                    Cell(figure(key, figures[name]), figures[name]),
                    Cell(interval(key, figures.get(f"{name}_interval")), _raw(figures.get(f"{name}_interval"))),
                )
                for name in ("p50", "p95")
                if name in figures
            ]
            table.has_percentiles = table.has_percentiles or bool(percentiles)
            if variant["is_control"]:
                verdict, verdict_key = "Control", "control"
            elif comparison:
                verdict, verdict_key = verdict_text(comparison), comparison.get("verdict") or "unknown"
            else:
                verdict, verdict_key = "No data to compare", "none"
            table.rows.append(
                MetricRow(
                    variant=variant["name"],
                    is_control=variant["is_control"],
                    is_winner=variant["name"] == winner,
                    value=Cell(figure(key, figures.get("value")), figures.get("value")),
                    interval=Cell(interval(key, figures.get("interval")), _raw(figures.get("interval"))),
                    n=Cell("—" if figures.get("n") is None else f"{figures['n']:,}", figures.get("n")),
                    percentiles=percentiles,
                    difference=Cell(difference(key, comparison.get("difference")), comparison.get("difference")),
                    difference_interval=Cell(
                        interval(key, comparison.get("interval"), of_difference=True), _raw(comparison.get("interval"))
                    ),
                    p_value=Cell(
                        "—" if comparison.get("p_value") is None else f"{comparison['p_value']:.3g}",
                        comparison.get("p_value"),
                    ),
                    verdict=verdict,
                    verdict_key=verdict_key,
                )
            )
        tables.append(table)
    return tables


def daily_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-day series as table rows: each day, each variant's requests, rated requests and positive rate."""
    series = results.get("series") or {"days": [], "variants": []}
    rows = []
    for index, day in enumerate(series["days"]):
        cells = []
        for variant in series["variants"]:
            rate = variant["positive_rate"][index]
            cells += [
                {
                    "variant": variant["name"],
                    "field": "requests",
                    "raw": variant["requests"][index],
                    "text": f"{variant['requests'][index]:,}",
                },
                {
                    "variant": variant["name"],
                    "field": "rated",
                    "raw": variant["rated"][index],
                    "text": f"{variant['rated'][index]:,}",
                },
                {
                    "variant": variant["name"],
                    "field": "positive_rate",
                    "raw": rate,
                    "text": figure(Metric.POSITIVE_RATE, rate),
                },
            ]
        rows.append({"day": day, "cells": cells})
    return rows


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _interval_chart(results: dict[str, Any], key: str) -> dict[str, Any]:
    spec = next((m for m in results["metrics"] if m["key"] == key), {"label": Metric(key).label})
    values, lows, highs = [], [], []
    for variant in results["variants"]:
        figures = variant["metrics"].get(key) or {}
        bounds = figures.get("interval") or [None, None]
        values.append(_number(figures.get("value")))
        lows.append(_number(bounds[0]))
        highs.append(_number(bounds[1]))
    unit = "percent" if key in RATES else "ms" if key in DURATIONS else "usd" if "cost" in key else "number"
    return {
        "key": key,
        "label": spec["label"],
        "unit": unit,
        "variants": [v["name"] for v in results["variants"]],
        "values": values,
        "low": lows,
        "high": highs,
    }


def charts_data(results: dict[str, Any]) -> dict[str, Any]:
    """What ``results.js`` draws, every number taken from the results: the primary metric and the cost per
    positive answer with their intervals, and requests per UTC day per variant."""
    series = results.get("series") or {"days": [], "variants": []}
    return {
        "confidence": results.get("confidence"),
        "primary": _interval_chart(results, results["experiment"]["primary_metric"]),
        "cost_per_positive": _interval_chart(results, Metric.COST_PER_POSITIVE),
        "daily": {
            "days": series["days"],
            "variants": [{"name": s["name"], "requests": s["requests"]} for s in series["variants"]],
        },
    }


@login_required
def experiments_index(request: HttpRequest) -> HttpResponse:
    _staff_only(request)
    experiments = Experiment.objects.select_related("model", "promoted_variant").prefetch_related("variants")
    return render(request, "experiments/index.html", {"page": "experiments", "experiments": experiments})


@login_required
def experiment_results_page(request: HttpRequest, pk: int) -> HttpResponse:
    _staff_only(request)
    experiment = get_object_or_404(Experiment.objects.select_related("model"), pk=pk)
    results = experiment_results(experiment)
    promotable = experiment.status in (ExperimentStatus.RUNNING, ExperimentStatus.PAUSED)
    return render(
        request,
        "experiments/results.html",
        {
            "page": "experiments",
            "experiment": experiment,
            "results": results,
            "tables": metric_tables(results),
            "charts": charts_data(results),
            "daily_rows": daily_rows(results),
            "confidence_percent": f"{float(results['confidence']) * 100:g}",
            "promotable": promotable,
        },
    )


@require_POST
@login_required
def experiment_promote_page(request: HttpRequest, pk: int) -> HttpResponse:
    """The "Promote" button: the variant gets 100 % of the model's traffic (``experiment_promote`` records
    it), and the results page says so."""
    _staff_only(request)
    experiment = get_object_or_404(Experiment, pk=pk)
    variant = get_object_or_404(Variant, experiment=experiment, name=request.POST.get("variant", ""))
    try:
        services.experiment_promote(experiment=experiment, variant=variant, actor=request.user)
    except (ValidationError, ApplicationError) as exc:
        text = " ".join(exc.messages) if isinstance(exc, ValidationError) else exc.message
        messages.error(request, f"{variant.name} was not promoted: {text}")
    else:
        experiment.refresh_from_db(fields=["status"])
        share = f"100 % of {experiment.model.name}'s traffic"
        if experiment.status == ExperimentStatus.PAUSED:  # a paused experiment assigns nobody
            messages.success(
                request,
                f"{variant.name} promoted: it serves {share} once the experiment is resumed or concluded "
                "(it is paused, so nobody is assigned now).",
            )
        else:
            messages.success(request, f"{variant.name} promoted: it now serves {share}.")
    return redirect("experiment-results-page", pk=experiment.pk)
