"""Usage pages: ``/usage/`` for each user (their spend, by day, by model and by operation, and what is left of
their quota and budgets) and ``/usage/admin/`` for operators and admins (spend by provider, model, operation
and user).

Every role may read its own usage page (a viewer too); the page of everyone's is for the roles that may
read everyone's usage (accounts.roles)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from accounts.roles import Capability, role_can

from .charts import spend_per_day_chart, spend_share_chart
from .models import BudgetMetric
from .selectors import DaySpend, Meter, SpendShare, usage_breakdown, usage_daily, usage_meters, user_limits_sync
from .services.budgets import usd

DAYS = 30


@dataclass(frozen=True, slots=True)
class Totals:
    spent: str
    today: str
    requests: str
    tokens: str


def _totals(days: list[DaySpend], shares: list[SpendShare]) -> Totals:
    return Totals(
        spent=usd(sum((d.cost for d in days), Decimal(0))),
        today=usd(days[-1].cost),
        requests=f"{sum(d.requests for d in days):,}",
        tokens=f"{sum(s.tokens for s in shares):,}",
    )


@dataclass(frozen=True, slots=True)
class ShareRow:
    label: str
    requests: str
    tokens: str
    cost: str


def _rows(shares: list[SpendShare]) -> list[ShareRow]:
    return [ShareRow(s.label, f"{s.requests:,}", f"{s.tokens:,}", usd(s.cost)) for s in shares]


@dataclass(frozen=True, slots=True)
class MeterView:
    title: str
    used: str
    limit: str
    left: str
    period: str
    percent: int
    level: str  # "ok", "warn" (80 % or more) or "over" (all used)


def _meter_view(meter: Meter) -> MeterView:
    def amount(value: Decimal) -> str:
        return usd(value) if meter.metric == BudgetMetric.COST else f"{int(value):,} tokens"

    level = "over" if meter.percent >= 100 else "warn" if meter.percent >= 80 else "ok"
    return MeterView(
        meter.title, amount(meter.used), amount(meter.limit), amount(meter.left), meter.period, meter.percent, level
    )


@login_required
def usage_page(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    today = now.astimezone(UTC).date()
    days = usage_daily(days=DAYS, today=today, user_id=request.user.pk)
    by_model = usage_breakdown(by="model", days=DAYS, today=today, user_id=request.user.pk)
    by_operation = usage_breakdown(by="operation", days=DAYS, today=today, user_id=request.user.pk)
    limits = user_limits_sync(request.user.pk)
    return render(
        request,
        "billing/usage.html",
        {
            "page": "usage",
            "plan_name": limits.plan_name,
            "limits": limits,
            "totals": _totals(days, by_model),
            "daily_chart": spend_per_day_chart(days, title=f"Spend per day, last {DAYS} days (UTC)"),
            "model_chart": spend_share_chart(by_model, title=f"Spend by model, last {DAYS} days"),
            "by_model": _rows(by_model),
            "operation_chart": spend_share_chart(by_operation, title=f"Spend by operation, last {DAYS} days"),
            "by_operation": _rows(by_operation),
            "meters": [_meter_view(m) for m in usage_meters(user=request.user, now=now)],
        },
    )


@login_required
def usage_admin_page(request: HttpRequest) -> HttpResponse:
    if not role_can(request.user, Capability.VIEW_ALL_USAGE):
        raise PermissionDenied
    today = timezone.now().astimezone(UTC).date()
    days = usage_daily(days=DAYS, today=today)
    by_user = usage_breakdown(by="user", days=DAYS, today=today)
    by_operation = usage_breakdown(by="operation", days=DAYS, today=today)
    return render(
        request,
        "billing/usage_admin.html",
        {
            "page": "usage-admin",
            "totals": _totals(days, by_user),
            "daily_chart": spend_per_day_chart(days, title=f"Spend per day, everyone, last {DAYS} days (UTC)"),
            "provider_chart": spend_share_chart(
                usage_breakdown(by="provider", days=DAYS, today=today), title="Spend by provider"
            ),
            "model_chart": spend_share_chart(
                usage_breakdown(by="model", days=DAYS, today=today), title="Spend by model"
            ),
            "operation_chart": spend_share_chart(by_operation, title="Spend by operation"),
            "by_operation": _rows(by_operation),
            "user_chart": spend_share_chart(by_user, title="Spend by user"),
            "top_users": _rows(by_user[:10]),
            "active_users": sum(1 for share in by_user if share.requests),
        },
    )
