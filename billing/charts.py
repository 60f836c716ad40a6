"""Server-side SVG charts for the usage pages: geometry here, markup in ``templates/billing/_*.html``.

No JavaScript and no chart library: the numbers are laid out once on the server, so the page reads the
same in any browser, prints, and needs nothing from a CDN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from .selectors import DaySpend, SpendShare


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


def nice_ticks(maximum: Decimal, intervals: int = 4) -> list[Decimal]:
    """Round gridline values from 0 to at least ``maximum``: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if maximum <= 0:
        return [Decimal(0)]
    raw = maximum / intervals
    magnitude = Decimal(10) ** math.floor(math.log10(raw))
    step = next(
        m * magnitude for m in (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5), Decimal(10)) if m * magnitude >= raw
    )
    count = math.ceil(maximum / step)
    return [(step * i).normalize() for i in range(count + 1)]


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    center: float
    value_label: str  # shown above the bar ("" for an empty day)
    label_y: float
    tooltip: str


@dataclass(frozen=True, slots=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True, slots=True)
class AxisLabel:
    x: float
    label: str


@dataclass(frozen=True, slots=True)
class ColumnChart:
    title: str
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    bars: list[Bar]
    ticks: list[Tick]
    days: list[AxisLabel]
    empty: bool

    @property
    def day_label_y(self) -> int:
        return self.bottom + 20

    @property
    def tick_x(self) -> int:
        return self.left - 10

    @property
    def middle(self) -> tuple[float, float]:
        return (self.left + self.right) / 2, (self.top + self.bottom) / 2


def spend_per_day_chart(points: Sequence[DaySpend], *, title: str) -> ColumnChart:
    width, height, left, right, top, bottom = 960, 300, 70, 944, 40, 256
    peak = max((p.cost for p in points), default=Decimal(0))
    ticks = nice_ticks(peak)
    ceiling = ticks[-1] if peak > 0 else Decimal(1)
    plot = bottom - top
    step = (right - left) / max(len(points), 1)
    bars = []
    for index, point in enumerate(points):
        bar_height = float(point.cost / ceiling) * plot if point.cost > 0 else 0.0
        if 0 < bar_height < 2:
            bar_height = 2.0  # a small but real spend stays visible
        x = left + index * step + step * 0.17
        # Neighbouring labels would overlap: every other one goes a line higher.
        lift = 14 if index % 2 and point.cost > 0 and index and points[index - 1].cost > 0 else 0
        bars.append(
            Bar(
                x=round(x, 2),
                y=round(bottom - bar_height, 2),
                width=round(step * 0.66, 2),
                height=round(bar_height, 2),
                center=round(x + step * 0.33, 2),
                value_label=usd_short(point.cost) if point.cost > 0 else "",
                label_y=round(bottom - bar_height - 6 - lift, 2),
                tooltip=f"{point.day:%a %d %b}: {usd_short(point.cost)}, {point.requests} request"
                + ("" if point.requests == 1 else "s"),
            )
        )
    every = max(1, math.ceil(len(points) / 10))
    days = [
        AxisLabel(round(left + (i + 0.5) * step, 2), f"{p.day:%b} {p.day.day}")
        for i, p in enumerate(points)
        if (len(points) - 1 - i) % every == 0
    ]
    tick_rows = [Tick(round(bottom - float(t / ceiling) * plot, 2), usd_short(t)) for t in ticks] if peak > 0 else []
    return ColumnChart(title, width, height, left, right, top, bottom, bars, tick_rows, days, empty=peak <= 0)


@dataclass(frozen=True, slots=True)
class Row:
    y: float
    label: str
    full_label: str
    bar_width: float
    value_label: str
    value_x: float
    detail: str


@dataclass(frozen=True, slots=True)
class BarList:
    title: str
    width: int
    height: int
    bar_left: int
    track_width: int
    rows: list[Row]


def spend_share_chart(shares: Sequence[SpendShare], *, title: str, width: int, limit: int = 8) -> BarList:
    """Horizontal bars, largest first; what does not fit in ``limit`` rows is summed as "others".
    ``width`` is the width the chart is shown at, so that its text is drawn at its real size."""
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
    bar_left, value_room, row_height = max(140, int(width * 0.24)), 100, 34
    span = width - bar_left - value_room
    longest = bar_left // 8  # characters that fit before the bars at 13 px
    peak = max((s.cost for s in shown), default=Decimal(0))
    rows = []
    for index, share in enumerate(shown):
        bar = float(share.cost / peak) * span if peak > 0 else 0.0
        bar = max(bar, 2.0) if share.cost > 0 else bar
        label = share.label if len(share.label) <= longest else share.label[: longest - 1] + "…"
        rows.append(
            Row(
                y=index * row_height,
                label=label,
                full_label=share.label,
                bar_width=round(bar, 2),
                value_label=usd_short(share.cost),
                value_x=bar_left + span + 12,
                detail=f"{share.requests:,} request{'' if share.requests == 1 else 's'}, {share.tokens:,} tokens",
            )
        )
    return BarList(title, width, max(len(rows), 1) * row_height, bar_left, span, rows)
