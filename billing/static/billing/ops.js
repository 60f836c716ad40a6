/* The operations dashboard: charts drawn by Chart.js (vendor/chartjs) from the figures the page embeds
   (#ops-figures), then every refresh_seconds fetched again from /ops/data.json (the <main>'s data-source)
   and redrawn in place, charts and tables alike: no page reload. A failing deployment is drawn in the
   danger colour and named with a warning sign on the charts' axis, and its table row says why; so is a
   background task that is overdue or failing, in its own table. */
(function () {
  "use strict";

  const source = document.getElementById("ops-figures");
  const main = document.getElementById("main");
  if (!source || !main || typeof window.Chart === "undefined") return;
  const Chart = window.Chart;

  const css = getComputedStyle(document.documentElement);
  const cssVar = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const ACCENT = cssVar("--accent", "#4f46e5");
  const DANGER = cssVar("--danger", "#c2352b");
  const MUTED = cssVar("--text-muted", "#5f6b7a");
  const SECOND = "#0ea5e9";

  Chart.defaults.color = MUTED;
  Chart.defaults.borderColor = cssVar("--border", "#e3e6ea");
  Chart.defaults.font.family = cssVar("--font", "system-ui, sans-serif");
  Chart.defaults.animation = false; // redrawn every refresh: nothing moving, nothing to wait for

  const WARNING = "⚠ ";
  const axisLabel = (d) => (d.failing ? WARNING : "") + d.label;
  const FADED_DANGER = DANGER.length === 7 && DANGER.startsWith("#") ? DANGER + "99" : DANGER;
  const barColours = (deployments, colour, danger = DANGER) => deployments.map((d) => (d.failing ? danger : colour));
  // A dataset's key in the legend is its own colour, not that of whichever bar comes first (a failing one).
  const legendKeys = (chart) =>
    chart.data.datasets.map((dataset, index) => ({
      text: dataset.label,
      fillStyle: dataset.keyColour,
      strokeStyle: dataset.keyColour,
      lineWidth: 0,
      datasetIndex: index,
      hidden: !chart.isDatasetVisible(index),
    }));

  const charts = {};

  function chart(id, config) {
    const canvas = document.getElementById(id);
    if (!canvas) return null;
    if (charts[id]) {
      charts[id].data = config.data;
      charts[id].options = config.options;
      charts[id].update();
    } else {
      charts[id] = new Chart(canvas, config);
    }
    canvas.dataset.drawn = String(Number(canvas.dataset.drawn || 0) + 1);
    return charts[id];
  }

  function horizontal(extra) {
    return {
      indexAxis: "y",
      responsive: true,
      maintainAspectRatio: false,
      scales: { x: { beginAtZero: true, ...(extra.x || {}) }, y: { grid: { display: false } } },
      plugins: { legend: { display: Boolean(extra.legend), ...(extra.legend || {}) }, tooltip: extra.tooltip || {} },
    };
  }

  function draw(figures) {
    const deployments = figures.deployments;
    const labels = deployments.map(axisLabel);

    chart("chart-errors", {
      type: "bar",
      data: {
        labels,
        datasets: [
          {
            label: "Error rate",
            data: deployments.map((d) => (d.error_rate === null ? 0 : d.error_rate * 100)),
            backgroundColor: barColours(deployments, ACCENT),
          },
        ],
      },
      options: horizontal({
        x: { max: 100, ticks: { callback: (v) => v + " %" } },
        tooltip: { callbacks: { label: (item) => deployments[item.dataIndex].error_rate_text + " errors, " + deployments[item.dataIndex].status } },
      }),
    });

    chart("chart-latency", {
      type: "bar",
      data: {
        labels,
        datasets: [
          { label: "p50", data: deployments.map((d) => d.p50_ms), backgroundColor: barColours(deployments, ACCENT), keyColour: ACCENT },
          { label: "p95", data: deployments.map((d) => d.p95_ms), backgroundColor: barColours(deployments, SECOND, FADED_DANGER), keyColour: SECOND },
        ],
      },
      options: horizontal({ legend: { labels: { generateLabels: legendKeys } }, x: { ticks: { callback: (v) => v.toLocaleString("en") + " ms" } } }),
    });

    chart("chart-rpm", {
      type: "bar",
      data: {
        labels,
        datasets: [{ label: "Requests per minute", data: deployments.map((d) => d.rpm), backgroundColor: barColours(deployments, ACCENT) }],
      },
      options: horizontal({}),
    });

    // No refusals, no chart: an empty axis says nothing the table's "No request refused" does not.
    const rejections = figures.rejections;
    document.getElementById("rejections-figure").hidden = rejections.length === 0;
    chart("chart-rejections", {
      type: "bar",
      data: {
        labels: rejections.map((r) => r.label),
        datasets: [{ label: "Requests refused", data: rejections.map((r) => r.count), backgroundColor: cssVar("--warn", "#b7791f") }],
      },
      options: horizontal({ x: { ticks: { precision: 0 } } }),
    });

    // Likewise the operations: no requests in 24 hours, no chart.
    const operations = figures.operations;
    document.getElementById("operations-figure").hidden = operations.length === 0;
    chart("chart-operations", {
      type: "bar",
      data: {
        labels: operations.map((o) => o.label),
        datasets: [{ label: "Spend (USD)", data: operations.map((o) => o.cost), backgroundColor: ACCENT }],
      },
      options: horizontal({
        x: { ticks: { callback: (v) => "$" + Number(v.toPrecision(3)) } },
        tooltip: { callbacks: { label: (item) => operations[item.dataIndex].cost_text + ", " + operations[item.dataIndex].requests + " requests" } },
      }),
    });

    const hours = figures.spend_per_hour;
    chart("chart-spend", {
      type: "bar",
      data: {
        labels: hours.map((h) => h.label),
        datasets: [{ label: "Spend (USD)", data: hours.map((h) => h.cost), backgroundColor: ACCENT }],
      },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        scales: { y: { beginAtZero: true, ticks: { callback: (v) => "$" + Number(v.toPrecision(3)) } }, x: { grid: { display: false } } },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { label: (item) => hours[item.dataIndex].cost_text + ", " + hours[item.dataIndex].requests + " requests" } },
        },
      },
    });
  }

  // Tables: the same cells as the server's template (billing/ops.html), built as DOM nodes (no HTML strings).
  function cell(tag, text, className) {
    const node = document.createElement(tag);
    if (tag === "th") node.scope = "row";
    if (className) node.className = className;
    node.textContent = text;
    return node;
  }

  function state(failing, enabled, text) {
    const span = document.createElement("span");
    span.className = "state " + (failing ? "state-failing" : enabled ? "state-ok" : "state-off");
    const icon = document.createElement("span");
    icon.className = "state-icon";
    icon.setAttribute("aria-hidden", "true");
    icon.textContent = failing ? "⚠" : enabled ? "✓" : "–";
    span.append(icon, " " + text);
    return span;
  }

  function fill(id, rows, empty, columns) {
    const body = document.getElementById(id);
    if (!body) return;
    const nodes = [...rows];
    if (!nodes.length) {
      const tr = document.createElement("tr");
      const td = cell("td", empty, "muted");
      td.colSpan = columns;
      tr.append(td);
      nodes.push(tr);
    }
    body.replaceChildren(...nodes);
  }

  function tables(figures) {
    fill(
      "deployments-body",
      figures.deployments.map((d) => {
        const tr = document.createElement("tr");
        tr.dataset.deployment = d.label;
        tr.className = d.failing ? "is-failing" : d.enabled ? "" : "is-disabled";
        const status = document.createElement("td");
        status.className = "state-cell";
        status.append(state(d.failing, d.enabled, d.status));
        tr.append(cell("th", d.label), status, cell("td", d.provider), cell("td", d.health_text, "wrap-cell"), cell("td", d.breaker_text));
        for (const value of [d.requests, d.errors, d.error_rate_text, d.p50_text, d.p95_text, d.rpm_text]) {
          tr.append(cell("td", String(value), "num"));
        }
        return tr;
      }),
      "No deployments in the catalog.",
      11,
    );
    fill(
      "tasks-body",
      figures.tasks.map((t) => {
        const tr = document.createElement("tr");
        tr.dataset.task = t.name;
        tr.className = t.attention ? "is-failing" : t.state === "never_run" ? "is-disabled" : "";
        const status = document.createElement("td");
        status.className = "state-cell";
        status.append(state(t.attention, t.state === "ok", t.status));
        const path = cell("td", "", "wrap-cell");
        const code = document.createElement("code");
        code.textContent = t.task;
        path.append(code);
        tr.append(cell("th", t.name), status, path, cell("td", t.schedule, "wrap-cell"), cell("td", t.sent_text), cell("td", t.finished_text, "wrap-cell"));
        return tr;
      }),
      "No periodic task is enabled: run manage.py setupschedules.",
      6,
    );
    fill(
      "rejections-body",
      figures.rejections.map((r) => {
        const tr = document.createElement("tr");
        tr.append(cell("th", r.label), cell("td", r.code), cell("td", String(r.count), "num"));
        return tr;
      }),
      "No request refused in the last hour.",
      3,
    );
    fill(
      "spend-body",
      figures.spend_per_hour.map((h) => {
        const tr = document.createElement("tr");
        const th = cell("th", "");
        const time = document.createElement("time");
        time.dateTime = h.hour;
        time.textContent = h.label;
        th.append(time);
        tr.append(th, cell("td", String(h.requests), "num"), cell("td", h.cost_text, "num"));
        return tr;
      }),
      "",
      3,
    );
    fill(
      "operations-body",
      figures.operations.map((o) => {
        const tr = document.createElement("tr");
        tr.dataset.operation = o.operation;
        tr.append(cell("th", o.label), cell("td", String(o.requests), "num"), cell("td", o.cost_text, "num"));
        return tr;
      }),
      "No request in the last 24 hours.",
      3,
    );
    fill(
      "providers-body",
      figures.providers.map((p) => {
        const tr = document.createElement("tr");
        tr.className = p.failing ? "is-failing" : "";
        const failing = document.createElement("td");
        failing.className = "num";
        if (p.failing) failing.append(state(true, true, String(p.failing)));
        else failing.textContent = "0";
        tr.append(cell("th", p.name), cell("td", p.kind), cell("td", p.health_text), cell("td", String(p.deployments), "num"), failing);
        return tr;
      }),
      "No providers.",
      5,
    );
    const totals = figures.totals;
    const set = (id, text) => {
      const node = document.getElementById(id);
      if (node) node.textContent = text;
    };
    set("total-requests", String(totals.requests));
    set("total-error-rate", totals.error_rate);
    set("total-failing", String(totals.failing));
    document.getElementById("total-failing")?.classList.toggle("stat-danger", totals.failing > 0);
    set("total-tasks-attention", String(totals.tasks_attention));
    document.getElementById("total-tasks-attention")?.classList.toggle("stat-danger", totals.tasks_attention > 0);
    set("total-rejected", String(totals.rejected));
    set("total-spend", totals.spend_24h);
  }

  function stamp(figures, note) {
    const updated = document.getElementById("ops-updated");
    if (!updated) return;
    const time = document.createElement("time");
    time.dateTime = figures ? figures.now : "";
    time.textContent = figures ? figures.now.slice(11, 19) + " UTC" : "";
    updated.replaceChildren(...(figures ? ["Updated ", time, "; refreshes every " + figures.refresh_seconds + " s."] : []), note || "");
  }

  let figures = JSON.parse(source.textContent);
  draw(figures);
  main.dataset.refreshes = "0";

  async function refresh() {
    try {
      const response = await fetch(main.dataset.source, { headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" });
      if (!response.ok) {
        stamp(figures, response.status === 401 ? " Signed out: sign in again to resume." : " Could not refresh (" + response.status + ").");
        return;
      }
      figures = await response.json();
      draw(figures);
      tables(figures);
      stamp(figures);
      main.dataset.refreshes = String(Number(main.dataset.refreshes) + 1);
    } catch (error) {
      stamp(figures, " Could not refresh: the server did not answer.");
    }
  }

  window.setInterval(refresh, figures.refresh_seconds * 1000);
})();
