/* The usage pages' charts (/usage/, /usage/admin/), drawn by Chart.js (vendor/chartjs) from the figures each
   chart's template embeds with json_script (canvas[data-chart] names it; billing/charts.py builds it): spend
   per day as columns, today's darker, and spend per model, provider or user as horizontal bars. Each bar
   carries its amount as text (the valueLabels plugin below), as the server-drawn charts did: a column's where
   it fits beside its neighbours', the others in the tooltip. */
(function () {
  "use strict";

  // Sizes the server computed, set here: the Content-Security-Policy allows no style attribute (core/csp.py).
  for (const fill of document.querySelectorAll(".meter-fill[data-percent]")) {
    fill.style.width = `${Math.min(Number(fill.dataset.percent) || 0, 100)}%`;
  }
  for (const canvas of document.querySelectorAll("canvas.chart-bars[data-chart]")) {
    const source = document.getElementById(canvas.dataset.chart);
    const height = source && JSON.parse(source.textContent).height;
    if (height) canvas.parentElement.style.height = `${height}px`;
  }

  if (typeof window.Chart === "undefined") return;
  const Chart = window.Chart;

  const css = getComputedStyle(document.documentElement);
  const cssVar = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const ACCENT = cssVar("--accent", "#4f46e5");
  const TODAY = cssVar("--accent-hover", "#4338ca");
  const TEXT = cssVar("--text", "#1b1f24");
  const FONT = cssVar("--font", "system-ui, sans-serif");

  Chart.defaults.color = cssVar("--text-muted", "#5f6b7a");
  Chart.defaults.borderColor = cssVar("--border", "#e3e6ea");
  Chart.defaults.font.family = FONT;
  Chart.defaults.animation = false; // drawn at once: nothing moving, nothing to wait for

  // Dollars as the server writes them (billing.charts.usd_short): cents from a dollar, 3 digits below.
  function usd(value) {
    if (value === 0) return "$0";
    if (Math.abs(value) >= 1000) return "$" + Math.round(value).toLocaleString("en");
    if (Math.abs(value) >= 1) return "$" + value.toLocaleString("en", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    const text = Number(value.toPrecision(3)).toString();
    const [whole, fraction = ""] = text.split(".");
    return "$" + whole + "." + fraction.padEnd(2, "0");
  }

  // A real but tiny spend stays visible (minBarLength); nothing spent draws no bar at all.
  const spent = (value) => (value > 0 ? value : null);

  function shortened(label, length) {
    return label.length <= length ? label : label.slice(0, length - 1) + "…";
  }

  const overlap = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;

  // The columns' amounts, each centred above its column where it fits: just above it, or else one line
  // higher; a label that would touch another label or a neighbouring column in both places is left out (the
  // column's tooltip, and the canvas's list for screen readers, still give its amount). Placed from today
  // backwards: the days the chart first shows (it starts scrolled to its right end) come first.
  const LINE = 14; // one line higher: the labels' size (11.5 px) and a little space
  const GAP = 3; // at least this much room between two labels

  function columnLabels(chart, ctx, labels) {
    const bars = chart.getDatasetMeta(0).data;
    const obstacles = bars
      .filter((bar) => Number.isFinite(bar.y) && Number.isFinite(bar.base))
      .map((bar) => ({
        bar,
        left: bar.x - bar.width / 2,
        right: bar.x + bar.width / 2,
        top: Math.min(bar.y, bar.base),
        bottom: Math.max(bar.y, bar.base),
      }));
    ctx.textAlign = "center";
    ctx.textBaseline = "bottom";
    for (let index = bars.length - 1; index >= 0; index--) {
      const text = labels[index], bar = bars[index];
      if (!text || !bar || !Number.isFinite(bar.y)) continue;
      const metrics = ctx.measureText(text);
      const half = metrics.width / 2 + GAP, height = metrics.actualBoundingBoxAscent + GAP;
      for (const lift of [0, LINE]) {
        const baseline = bar.y - 4 - lift;
        // Around another label, room to tell them apart; over a neighbouring column, the text itself.
        const box = { left: bar.x - half, right: bar.x + half, top: baseline - height, bottom: baseline + GAP };
        const ink = {
          left: bar.x - metrics.actualBoundingBoxLeft,
          right: bar.x + metrics.actualBoundingBoxRight,
          top: box.top + GAP,
          bottom: baseline + 1,
        };
        if (box.top < 0) break;
        const free = obstacles.every((other) =>
          other.bar ? other.bar === bar || !overlap(ink, other) : !overlap(box, other)
        );
        if (!free) continue;
        ctx.fillText(text, bar.x, baseline);
        obstacles.push(box);
        break;
      }
    }
  }

  // Each bar's amount as text: above a column (columnLabels), after a horizontal bar.
  const valueLabels = {
    id: "valueLabels",
    afterDatasetsDraw(chart) {
      const dataset = chart.data.datasets[0];
      const labels = dataset && dataset.valueLabels;
      if (!labels) return;
      const { ctx } = chart;
      const horizontal = chart.options.indexAxis === "y";
      ctx.save();
      ctx.fillStyle = TEXT;
      ctx.font = `650 ${horizontal ? 13 : 11.5}px ${FONT}`;
      if (horizontal) {
        ctx.textAlign = "left";
        ctx.textBaseline = "middle";
        chart.getDatasetMeta(0).data.forEach((bar, index) => {
          if (labels[index]) ctx.fillText(labels[index], bar.x + 8, bar.y);
        });
      } else {
        columnLabels(chart, ctx, labels);
      }
      ctx.restore();
    },
  };

  function columns(canvas, spec) {
    const last = spec.values.length - 1;
    return new Chart(canvas, {
      type: "bar",
      plugins: [valueLabels],
      data: {
        labels: spec.labels,
        datasets: [
          {
            label: "Spend",
            data: spec.values.map(spent),
            valueLabels: spec.value_labels,
            backgroundColor: spec.values.map((_, index) => (index === last ? TODAY : ACCENT)),
            borderRadius: 3,
            minBarLength: 2,
            categoryPercentage: 0.8,
            barPercentage: 0.8, // room between the columns for their labels (columnLabels)
          },
        ],
      },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        layout: { padding: { top: 34, right: 24 } },
        scales: {
          y: { beginAtZero: true, title: { display: true, text: "USD" }, ticks: { callback: (v) => usd(v), maxTicksLimit: 6 } },
          x: { grid: { display: false }, ticks: { autoSkip: true, maxTicksLimit: 10, maxRotation: 0 } },
        },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { title: () => "", label: (item) => spec.tooltips[item.dataIndex] } },
        },
      },
    });
  }

  function bars(canvas, spec) {
    return new Chart(canvas, {
      type: "bar",
      plugins: [valueLabels],
      data: {
        labels: spec.labels,
        datasets: [
          {
            label: "Spend",
            data: spec.values.map(spent),
            valueLabels: spec.value_labels,
            backgroundColor: ACCENT,
            borderRadius: 5,
            minBarLength: 2,
            barThickness: 18,
          },
        ],
      },
      options: {
        indexAxis: "y",
        responsive: true,
        maintainAspectRatio: false,
        layout: { padding: { right: 90 } },
        scales: {
          x: { display: false, beginAtZero: true },
          y: {
            grid: { display: false },
            ticks: {
              color: TEXT,
              font: { size: 13 },
              // Chart.js gives the labels at most about a third of the width: a longer one is cut, with "…".
              callback(_, index) {
                return shortened(spec.labels[index], Math.max(8, Math.min(32, Math.floor((this.chart.width * 0.3) / 7.5))));
              },
            },
          },
        },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { title: () => "", label: (item) => spec.tooltips[item.dataIndex] } },
        },
      },
    });
  }

  for (const canvas of document.querySelectorAll("canvas[data-chart]")) {
    const source = document.getElementById(canvas.dataset.chart);
    if (!source) continue;
    const spec = JSON.parse(source.textContent);
    (canvas.classList.contains("chart-columns") ? columns : bars)(canvas, spec);
    canvas.dataset.drawn = "true";
  }
})();
