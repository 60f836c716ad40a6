"""The usage pages' charts as data for Chart.js: labels, values, and the text of each bar's value label and
tooltip, worked out here (in Decimal, as the tables are) and embedded with ``json_script`` by
``templates/billing/_column_chart.html`` and ``_bar_list.html``; ``billing/static/billing/usage.js`` draws
them with the Chart.js the project serves itself (``vendor/chartjs``), nothing from a CDN."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from .selectors import DaySpend, SpendShare

BAR_ROW_PX = 34  # a horizontal bar's row: the chart's height follows its number of rows


def usd_short(value: Decimal) -> str:
    """A bar's label: cents for a dollar or more, three significant digits below ($0.40, $0.00152)."""
    if value == 0:
        return "$0"
    if abs(value) >= 1000:
        return f"${value:,.0f}"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    rounded = value.quantize(Decimal(1).scaleb(value.adjusted() - 2), rounding=ROUND_HALF_UP)
    whole, _, fraction = f"{rounded:f}".partition(".")
    return f"${whole}.{fraction.rstrip('0').ljust(2, '0')}"


def _requests(n: int) -> str:
    return f"{n:,} request{'' if n == 1 else 's'}"


def spend_per_day_chart(points: Sequence[DaySpend], *, title: str) -> dict[str, Any]:
    """One column per day, today last; an empty day has no value label."""
    return {
        "title": title,
        "labels": [f"{p.day:%b} {p.day.day}" for p in points],
        "values": [float(p.cost) for p in points],
        "value_labels": [usd_short(p.cost) if p.cost > 0 else "" for p in points],
        "tooltips": [f"{p.day:%a %d %b}: {usd_short(p.cost)}, {_requests(p.requests)}" for p in points],
        "empty": not any(p.cost > 0 for p in points),
    }


def spend_share_chart(shares: Sequence[SpendShare], *, title: str, limit: int = 8) -> dict[str, Any]:
    """Horizontal bars, largest first; what does not fit in ``limit`` rows is summed as "others"."""
    shown = list(shares[:limit])
    rest = shares[limit:]
    if rest:
        shown.append(
            SpendShare(
                f"{len(rest)} others",
                sum(s.requests for s in rest),
                sum(s.tokens for s in rest),
                sum((s.cost for s in rest), Decimal(0)),
            )
        )
    return {
        "title": title,
        "labels": [s.label for s in shown],
        "values": [float(s.cost) for s in shown],
        "value_labels": [usd_short(s.cost) for s in shown],
        "tooltips": [f"{s.label}: {usd_short(s.cost)} ({_requests(s.requests)}, {s.tokens:,} tokens)" for s in shown],
        "height": max(len(shown), 1) * BAR_ROW_PX + 16,
    }
