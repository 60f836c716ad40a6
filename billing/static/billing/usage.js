/* The usage pages' charts (/usage/, /usage/admin/), drawn by Chart.js (vendor/chartjs) from the figures each
   chart's template embeds with json_script (canvas[data-chart] names it; billing/charts.py builds it): spend
   per day as columns, today's darker, and spend per model, provider or user as horizontal bars. Each bar
   carries its amount as text (the valueLabels plugin below), as the server-drawn charts did. */
(function () {
  "use strict";

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

  // Each bar's amount as text: above a column (every other one a line higher when both neighbours have
  // one, so that they do not overlap), after a horizontal bar.
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
      chart.getDatasetMeta(0).data.forEach((bar, index) => {
        const text = labels[index];
        if (!text) return;
        if (horizontal) {
          ctx.textAlign = "left";
          ctx.textBaseline = "middle";
          ctx.fillText(text, bar.x + 8, bar.y);
        } else {
          const lift = index % 2 && labels[index - 1] ? 14 : 0;
          ctx.textAlign = "center";
          ctx.textBaseline = "bottom";
          ctx.fillText(text, bar.x, bar.y - 4 - lift);
        }
      });
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
            barPercentage: 0.85,
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
