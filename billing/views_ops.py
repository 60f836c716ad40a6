"""The operations dashboard: ``/ops/`` (the page, its figures embedded for the first drawing) and
``/ops/data.json`` (the same figures, fetched by ``billing/static/billing/ops.js`` every 15 s to redraw the
charts and the tables without reloading the page).

For the roles that may read everyone's usage (``Capability.VIEW_ALL_USAGE``: operators and admins); others
get 403 and the anonymous the login page (the JSON answers them 401 or 403: a script cannot log in)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.cache import never_cache

from accounts.roles import Capability, role_can

from .selectors_ops import (
    FAILING_ERROR_RATE,
    OVERDUE_GRACE,
    WINDOW,
    DeploymentOps,
    OpsSnapshot,
    PeriodicTaskOps,
    TaskState,
    ops_snapshot,
)
from .services.budgets import usd

REFRESH_SECONDS = 15
HEALTH_LABELS = {"ok": "OK", "failing": "Failing", "unknown": "Not checked"}
BREAKER_LABELS = {"closed": "Closed", "half_open": "Half-open", "open": "Open"}
TASK_STATE_LABELS = {
    TaskState.OK: "OK",
    TaskState.OVERDUE: "Overdue",
    TaskState.FAILING: "Failing",
    TaskState.NEVER_RUN: "Never run",
}


def _iso(instant: datetime | None) -> str | None:
    return instant.isoformat() if instant is not None else None


def _percent(rate: float | None) -> str:
    return "—" if rate is None else f"{100 * rate:.1f} %"


def _ms(value: int | None) -> str:
    return "—" if value is None else f"{value:,} ms"


def _health_text(deployment: DeploymentOps, now: datetime) -> str:
    """Its latest health check (with the error of a failing one) and its open incident, if any: since when, with
    its date once that is another day (an incident open since 23:50 read "since 23:50" the next afternoon, and
    one open for three days as if it had begun that morning)."""
    text = HEALTH_LABELS.get(deployment.health, deployment.health)
    if deployment.health == "failing" and deployment.health_error:
        text += f": {deployment.health_error}"
    if deployment.incident_since is not None:
        text += f"; incident since {_when(deployment.incident_since, now, seconds=False)}"
        text += f" ({deployment.incident_reason})" if deployment.incident_reason else ""
    return text


def _when(instant: datetime | None, now: datetime, *, seconds: bool = True) -> str:
    """A time of today (UTC) as its time; of another day with its date."""
    if instant is None:
        return "never"
    instant, today = instant.astimezone(UTC), now.astimezone(UTC).date()
    if instant.date() != today:
        return f"{instant:%Y-%m-%d %H:%M} UTC"
    return f"{instant:%H:%M:%S} UTC" if seconds else f"{instant:%H:%M} UTC"


def _task_status(task: PeriodicTaskOps, now: datetime) -> str:
    """Its state and why: the failure's class (never its message), since when no run succeeded."""
    text = TASK_STATE_LABELS[task.state]
    if task.state == TaskState.FAILING:
        text += f": {task.error_class}"
        text += f", {task.failures_in_a_row} runs in a row" if task.failures_in_a_row > 1 else ""
    if task.overdue:
        since = f"no success since {_when(task.last_success_at, now)}" if task.last_success_at else "never succeeded"
        text += f"; {since}" if task.state == TaskState.FAILING else f": {since}"
    return text


def _task_finished(task: PeriodicTaskOps, now: datetime) -> str:
    if task.finished_at is None:
        return "never"
    outcome = "ok" if task.succeeded else f"failed: {task.error_class}"
    return f"{_when(task.finished_at, now)}, {outcome} ({task.duration_seconds:.1f} s)"


def ops_figures(snapshot: OpsSnapshot) -> dict[str, Any]:
    """The snapshot as the page's script and its tables read it: raw numbers for the charts, and the text
    of every cell, so that the script fills the tables with exactly what the server renders."""
    return {
        "now": _iso(snapshot.now),
        "refresh_seconds": REFRESH_SECONDS,
        "window_minutes": int(WINDOW.total_seconds() // 60),
        "failing_error_rate": FAILING_ERROR_RATE,
        "task_grace_minutes": int(OVERDUE_GRACE.total_seconds() // 60),
        "totals": {
            **snapshot.totals,
            "error_rate": _percent(snapshot.totals["errors"] / snapshot.totals["requests"])
            if snapshot.totals["requests"]
            else "—",
            "spend_24h": usd(sum((h.cost for h in snapshot.spend_per_hour), start=0)),
        },
        "deployments": [
            {
                "id": d.id,
                "label": f"{d.model} / {d.name}",
                "model": d.model,
                "name": d.name,
                "provider": d.provider,
                "enabled": d.enabled,
                "failing": d.failing,
                "problems": list(d.problems),
                "status": ("Failing: " + ", ".join(d.problems)) if d.failing else ("OK" if d.enabled else "Disabled"),
                "health": d.health,
                "health_text": _health_text(d, snapshot.now),
                "health_at": _iso(d.health_at),
                "incident_since": _iso(d.incident_since),
                "incident_reason": d.incident_reason,
                "breaker": d.breaker,
                "breaker_text": BREAKER_LABELS.get(d.breaker, d.breaker) + (" (forced)" if d.breaker_forced else ""),
                "requests": d.requests,
                "errors": d.errors,
                "error_rate": d.error_rate,
                "error_rate_text": _percent(d.error_rate),
                "p50_ms": d.p50_ms,
                "p95_ms": d.p95_ms,
                "p50_text": _ms(d.p50_ms),
                "p95_text": _ms(d.p95_ms),
                "rpm": round(d.rpm, 2),
                "rpm_text": f"{d.rpm:.2f}",
            }
            for d in snapshot.deployments
        ],
        "providers": [
            {
                "name": p.name,
                "kind": p.kind,
                "health": p.health,
                "health_text": HEALTH_LABELS.get(p.health, p.health),
                "health_at": _iso(p.health_at),
                "deployments": p.deployments,
                "failing": p.failing,
            }
            for p in snapshot.providers
        ],
        "spend_per_hour": [
            {
                "hour": _iso(h.hour),
                "label": f"{h.hour:%H}:00",
                "cost": float(h.cost),
                "cost_text": usd(h.cost),
                "requests": h.requests,
            }
            for h in snapshot.spend_per_hour
        ],
        "operations": [
            {
                "operation": o.operation,
                "label": o.label,
                "cost": float(o.cost),
                "cost_text": usd(o.cost),
                "requests": o.requests,
            }
            for o in snapshot.spend_per_operation
        ],
        "rejections": [{"code": r.code, "label": r.label, "count": r.count} for r in snapshot.rejections],
        "tasks": [
            {
                "name": t.name,
                "task": t.task,
                "schedule": t.schedule,
                "state": t.state,
                "attention": t.attention,
                "overdue": t.overdue,
                "status": _task_status(t, snapshot.now),
                "sent_at": _iso(t.sent_at),
                "sent_text": _when(t.sent_at, snapshot.now),
                "finished_at": _iso(t.finished_at),
                "finished_text": _task_finished(t, snapshot.now),
                "succeeded": t.succeeded,
                "error_class": t.error_class,
                "duration_seconds": t.duration_seconds,
                "last_success_at": _iso(t.last_success_at),
            }
            for t in snapshot.periodic_tasks
        ],
    }


def _allowed(request: HttpRequest) -> bool:
    return role_can(request.user, Capability.VIEW_ALL_USAGE)


@login_required
def ops_page(request: HttpRequest) -> HttpResponse:
    if not _allowed(request):
        raise PermissionDenied
    figures = ops_figures(ops_snapshot(now=timezone.now()))
    return render(request, "billing/ops.html", {"page": "ops", "figures": figures})


@never_cache
def ops_data(request: HttpRequest) -> JsonResponse:
    if not request.user.is_authenticated:
        return JsonResponse({"error": "Sign in to read the operations dashboard."}, status=401)
    if not _allowed(request):
        return JsonResponse({"error": "Your role may not read the operations dashboard."}, status=403)
    return JsonResponse(ops_figures(ops_snapshot(now=timezone.now())))
