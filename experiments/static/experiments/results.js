/* The results page's charts, drawn by Chart.js (vendor/chartjs) from the figures the page embeds with
   json_script (#experiment-charts): the primary metric and the cost per positive answer per variant, each
   a floating bar for its interval and a point for its value, and requests per UTC day per variant.
   The page's tables carry every figure; the charts only draw them. Also: the "Promote" buttons ask first. */
(function () {
  "use strict";

  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }

  const source = document.getElementById("experiment-charts");
  if (!source || typeof window.Chart === "undefined") return;
  const data = JSON.parse(source.textContent);
  const Chart = window.Chart;

  const css = getComputedStyle(document.documentElement);
  const cssVar = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const PALETTE = [cssVar("--accent", "#4f46e5"), "#0ea5e9", "#f59e0b", "#10b981", "#ef4444", "#a855f7"];
  const translucent = (color) => color + (color.startsWith("#") && color.length === 7 ? "55" : "");

  Chart.defaults.color = cssVar("--text-muted", "#5f6b7a");
  Chart.defaults.borderColor = cssVar("--border", "#e3e6ea");
  Chart.defaults.font.family = cssVar("--font", "system-ui, sans-serif");
  Chart.defaults.animation = false; // drawn at once: nothing to wait for, nothing moving for a screenshot

  const confidence = Math.round((data.confidence || 0.95) * 100);

  function formatter(unit) {
    if (unit === "percent") return (v) => (v * 100).toFixed(1) + " %";
    if (unit === "ms") return (v) => Math.round(v).toLocaleString("en") + " ms";
    if (unit === "usd") return (v) => "$" + (Math.abs(v) >= 1 ? v.toFixed(2) : Number(v.toPrecision(3)).toString());
    return (v) => v.toFixed(2);
  }

  function drawn(canvas) {
    canvas.dataset.drawn = "true";
  }

  // A variant's value (a point) inside its interval (a floating bar), one column per variant.
  function intervalChart(canvas, spec) {
    if (!canvas) return;
    const format = formatter(spec.unit);
    const colors = spec.variants.map((_, i) => PALETTE[i % PALETTE.length]);
    const chart = new Chart(canvas, {
      type: "bar",
      data: {
        labels: spec.variants,
        datasets: [
          {
            type: "bar",
            label: confidence + " % interval",
            data: spec.low.map((low, i) => (low === null || spec.high[i] === null ? null : [low, spec.high[i]])),
            backgroundColor: colors.map(translucent),
            borderColor: colors,
            borderWidth: 1.5,
            borderSkipped: false,
            barPercentage: 0.45,
            order: 2,
          },
          {
            type: "line",
            label: spec.label,
            data: spec.values,
            showLine: false,
            pointRadius: 7,
            pointHoverRadius: 8,
            pointStyle: "rectRot",
            pointBackgroundColor: colors,
            pointBorderColor: cssVar("--text", "#1b1f24"),
            order: 1,
          },
        ],
      },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        scales: {
          y: { ticks: { callback: (value) => format(value) }, grace: "10%" },
          x: { grid: { display: false } },
        },
        plugins: {
          legend: { position: "bottom", labels: { usePointStyle: true } },
          tooltip: {
            callbacks: {
              label: (item) => {
                const raw = item.raw;
                if (Array.isArray(raw)) return `${item.dataset.label}: ${format(raw[0])} to ${format(raw[1])}`;
                return raw === null ? `${item.dataset.label}: no data` : `${item.dataset.label}: ${format(raw)}`;
              },
            },
          },
        },
      },
    });
    drawn(canvas);
    return chart;
  }

  function dailyChart(canvas, spec) {
    if (!canvas) return;
    new Chart(canvas, {
      type: "line",
      data: {
        labels: spec.days,
        datasets: spec.variants.map((series, i) => ({
          label: series.name,
          data: series.requests,
          borderColor: PALETTE[i % PALETTE.length],
          backgroundColor: translucent(PALETTE[i % PALETTE.length]),
          borderWidth: 2,
          pointRadius: spec.days.length > 40 ? 0 : 2.5,
          tension: 0.2,
        })),
      },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: { y: { beginAtZero: true, ticks: { precision: 0 } }, x: { ticks: { maxRotation: 0, autoSkip: true } } },
        plugins: { legend: { position: "bottom" } },
      },
    });
    drawn(canvas);
  }

  intervalChart(document.getElementById("chart-primary"), data.primary);
  intervalChart(document.getElementById("chart-cost-per-positive"), data.cost_per_positive);
  dailyChart(document.getElementById("chart-daily"), data.daily);
})();
