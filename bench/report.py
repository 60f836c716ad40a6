"""From the raw points to the figures the targets are stated in, and the markdown table."""

from __future__ import annotations

from typing import Any

# name: (what it is, how the figure is read, limit)
# Issue 14: within a millisecond of the fastest bare Django proxy (httpx or aiohttp, whichever served more).
TARGETS = {
    "added_p50_c1": ("added latency at concurrency 1, p50 (llmhub − upstream direct)", "≤ 1.0 ms", 1.0),
    "added_p99_c1": ("added latency at concurrency 1, p99", "≤ 5 ms", 5.0),
    "share_of_bare_c32": ("throughput at concurrency 32 against the fastest bare view", "≥ 90 %", 0.9),
    "workers_2_over_1_c64": ("two uvicorn workers against one, req/s at concurrency 64", "≥ 1.7×", 1.7),
    "added_ttft_p50": ("added time to first streamed line, p50 (fake provider)", "≤ 2 ms", 2.0),
}
# Targets read as "at least" (the others as "at most").
_AT_LEAST = ("share_of_bare_c32", "workers_2_over_1_c64")
BARE_TARGETS = ("bare", "bare-aiohttp")


def fastest_bare(points: list[dict[str, Any]], stream: bool, concurrency: int) -> dict[str, Any] | None:
    """The bare view (httpx or aiohttp) that served the most requests at this point: the ceiling."""
    found = [p for p in (find_point(points, t, stream, concurrency) for t in BARE_TARGETS) if p is not None]
    return max(found, key=lambda p: p["rps"], default=None)


def find_point(points: list[dict[str, Any]], target: str, stream: bool, concurrency: int) -> dict[str, Any] | None:
    return next(
        (p for p in points if p["target"] == target and p["stream"] == stream and p["concurrency"] == concurrency),
        None,
    )


def _difference(ours: dict[str, Any] | None, theirs: dict[str, Any] | None, key: str) -> float | None:
    if ours is None or theirs is None:
        return None
    return round(ours[key] - theirs[key], 3)


def derive(results: dict[str, Any]) -> None:
    """Adds ``derived`` (the figures) and ``targets`` (met or not) to each server's results, and
    ``routing_derived`` (the routing scenarios' figures)."""
    direct = results["direct"]
    for data in results["servers"].values():
        data["routing_derived"] = derive_routing(data)
        if results.get("routing_only"):
            continue
        points = data["wrk"]
        derived: dict[str, Any] = {}
        for stream, kind in ((False, "json"), (True, "sse")):
            base = find_point(direct["wrk"], "direct", stream, 1)
            for target in ("llmhub", "llmhub-budget", *BARE_TARGETS):
                ours = find_point(points, target, stream, 1)
                derived[f"{target}_added_p50_ms_c1_{kind}"] = _difference(ours, base, "p50_ms")
                derived[f"{target}_added_p99_ms_c1_{kind}"] = _difference(ours, base, "p99_ms")
            for concurrency in (1, 32, 128):
                ceiling = fastest_bare(points, stream, concurrency)
                if ceiling is not None:
                    derived[f"ceiling_c{concurrency}_{kind}"] = ceiling["target"]
                httpx_bare = find_point(points, "bare", stream, concurrency)
                aiohttp_bare = find_point(points, "bare-aiohttp", stream, concurrency)
                if httpx_bare and aiohttp_bare and httpx_bare["rps"]:
                    derived[f"aiohttp_over_httpx_bare_c{concurrency}_{kind}"] = round(
                        aiohttp_bare["rps"] / httpx_bare["rps"], 3
                    )
                for target in ("llmhub", "llmhub-budget"):
                    ours = find_point(points, target, stream, concurrency)
                    if ours and ceiling and ceiling["rps"]:
                        derived[f"{target}_share_of_bare_c{concurrency}_{kind}"] = round(
                            ours["rps"] / ceiling["rps"], 3
                        )
        for name in ("timed", "fast"):
            theirs = direct["first_token"].get(name)
            for target in ("llmhub", "bare"):
                ours = data["first_token"].get(f"{target}-{name}")
                derived[f"{target}_added_ttft_p50_ms_{name}"] = _difference(ours, theirs, "first_line_p50_ms")
                derived[f"{target}_added_first_content_p50_ms_{name}"] = _difference(ours, theirs, "first_token_p50_ms")
        workers = data.get("workers")
        if workers and workers["best"]["1"]["rps"]:
            derived["workers_2_over_1_c64"] = round(workers["best"]["2"]["rps"] / workers["best"]["1"]["rps"], 3)
        data["derived"] = {key: value for key, value in derived.items() if value is not None}
        figures = {
            "added_p50_c1": derived.get("llmhub_added_p50_ms_c1_json"),
            "added_p99_c1": derived.get("llmhub_added_p99_ms_c1_json"),
            "share_of_bare_c32": derived.get("llmhub_share_of_bare_c32_json"),
            "workers_2_over_1_c64": derived.get("workers_2_over_1_c64"),
            "added_ttft_p50": derived.get("llmhub_added_ttft_p50_ms_timed"),
        }
        data["targets"] = {
            name: {
                "figure": figure,
                "limit": TARGETS[name][2],
                "met": None
                if figure is None
                else (figure >= TARGETS[name][2] if name in _AT_LEAST else figure <= TARGETS[name][2]),
            }
            for name, figure in figures.items()
        }


def _ms(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f} ms" if signed else f"{value:.2f} ms"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f} %"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def markdown(results: dict[str, Any]) -> str:
    if results.get("routing_only"):
        return (
            f"llmhub routing benchmark of {results['code']}, {results['finished_at']}: {results['mode']} run, "
            f"database {results.get('database', 'sqlite')}, admission store {results['admission_store']}; load "
            f"average at start {results['load_at_start']}.\n\n" + routing_markdown(results)
        )
    servers = results["servers"]
    names = list(servers)
    plan = results["plan"]
    lines = [
        f"llmhub benchmark of {results['code']}, {results['finished_at']}: {results['mode']} run, "
        f"{plan['duration']} s per wrk point, "
        f"one server process, settings {results['settings']}, database {results.get('database', 'sqlite')}, "
        f"admission store {results['admission_store']}; load average at start {results['load_at_start']}.",
        "",
        "| server | target | body | conc | req/s | p50 ms | p99 ms | server CPU ms/req | other load (cores) | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("—", p) for p in results["direct"]["wrk"]]
    rows += [(server, p) for server, data in servers.items() for p in data["wrk"]]
    for server, p in rows:
        label = "upstream direct" if p["target"] == "direct" else p["target"]
        cpu = p.get("server_cpu_ms_per_request")
        lines.append(
            f"| {server} | {label} | {'stream' if p['stream'] else 'json'} | {p['concurrency']} | {p['rps']:.0f} | "
            f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {'—' if p['target'] == 'direct' or cpu is None else cpu} | "
            f"{p['other_cores']:.2f} | {p['errors']} |"
        )

    lines += [
        "",
        "| first streamed line, p50 / p99 (ms) | upstream direct | "
        + " | ".join(f"{s} llmhub | {s} bare" for s in names)
        + " |",
        "|---|---:|" + "---:|---:|" * len(names),
    ]
    for name, label in (("timed", "fake provider, 50 tokens/s"), ("fast", "nginx, canned stream")):

        def cell(series: dict[str, Any]) -> str:
            return f"{series['first_line_p50_ms']:.2f} / {series['first_line_p99_ms']:.2f}"

        cells = [cell(results["direct"]["first_token"][name])]
        for data in servers.values():
            cells += [cell(data["first_token"][f"{target}-{name}"]) for target in ("llmhub", "bare")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += ["", "| figure | target | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]

    def row(label: str, target: str, key: str, kind: str = "ms") -> None:
        values = [servers[s]["derived"].get(key) for s in names]
        cells = [_pct(v) if kind == "pct" else _ms(v) for v in values]
        lines.append(f"| {label} | {target} | " + " | ".join(cells) + " |")

    def verdict(name: str) -> str:
        cells = []
        for s in names:
            met = servers[s]["targets"][name]["met"]
            cells.append("met" if met else "n/a" if met is None else "**MISSED**")
        return ", ".join(cells)

    def target_row(label: str, name: str, key: str, kind: str = "ms") -> None:
        row(label, f"{TARGETS[name][1]} ({verdict(name)})", key, kind)

    target_row("added latency, c=1, p50, json", "added_p50_c1", "llmhub_added_p50_ms_c1_json")
    target_row("added latency, c=1, p99, json", "added_p99_c1", "llmhub_added_p99_ms_c1_json")
    row("… of which the bare view (httpx), p50", "", "bare_added_p50_ms_c1_json")
    row("… of which the bare view (httpx), p99", "", "bare_added_p99_ms_c1_json")
    row("… of which the bare view (aiohttp), p50", "", "bare-aiohttp_added_p50_ms_c1_json")
    row("… of which the bare view (aiohttp), p99", "", "bare-aiohttp_added_p99_ms_c1_json")
    row("added latency, c=1, p50, stream", "", "llmhub_added_p50_ms_c1_sse")
    row("added latency, c=1, p50, json, budgeted key", "", "llmhub-budget_added_p50_ms_c1_json")
    target_row(
        "req/s against the fastest bare view, c=32, json",
        "share_of_bare_c32",
        "llmhub_share_of_bare_c32_json",
        "pct",
    )
    for kind, concurrency in (("json", 32), ("json", 128), ("sse", 32)):
        label = f"… the ceiling at c={concurrency}, {kind}: " + ", ".join(
            str(servers[s]["derived"].get(f"ceiling_c{concurrency}_{kind}", "n/a")) for s in names
        )
        row(label + "; aiohttp's req/s against httpx's", "", f"aiohttp_over_httpx_bare_c{concurrency}_{kind}", "pct")
    row("req/s against the fastest bare view, c=128, json", "", "llmhub_share_of_bare_c128_json", "pct")
    row("req/s against the fastest bare view, c=32, stream", "", "llmhub_share_of_bare_c32_sse", "pct")
    row(
        "req/s against the fastest bare view, c=32, json, budgeted key",
        "",
        "llmhub-budget_share_of_bare_c32_json",
        "pct",
    )
    lines.append(
        f"| two uvicorn workers against one, req/s, c=64, json | {TARGETS['workers_2_over_1_c64'][1]} "
        f"({verdict('workers_2_over_1_c64')}) | "
        + " | ".join(_times(servers[s]["derived"].get("workers_2_over_1_c64")) for s in names)
        + " |"
    )
    target_row("added time to first line, p50, fake provider", "added_ttft_p50", "llmhub_added_ttft_p50_ms_timed")
    row("… of which the bare view", "", "bare_added_ttft_p50_ms_timed")
    row("added time to first line, p50, nginx", "", "llmhub_added_ttft_p50_ms_fast")
    lines.append(
        "| peak RSS of the server process | | "
        + " | ".join(f"{servers[s]['peak_rss_mib']:.0f} MiB" for s in names)
        + " |"
    )
    lines.append(
        "| ledger rows written / requests completed via llmhub | | "
        + " | ".join(f"{sum(servers[s]['ledger'].values())} / {servers[s]['completed_via_llmhub']}" for s in names)
        + " |"
    )
    lines.append(
        "| ASGI lifespan (ledger drain at shutdown) | | "
        + " | ".join("yes" if servers[s]["lifespan_supported"] else "**no**" for s in names)
        + " |"
    )
    lines.append(
        "| SIGTERM with 16 streams in flight: ledger rows + spooled / lost | no loss | "
        + " | ".join("<br>".join(_shutdown_cell(probe) for probe in servers[s].get("shutdown", [])) for s in names)
        + " |"
    )
    lines += ["", "Targets: " + "; ".join(_target_line(name, servers) for name in TARGETS)]
    routing = routing_markdown(results)
    if routing:
        lines += ["", routing]
    busiest = max((p["other_cores"] for _, p in rows), default=0.0)
    if busiest > 0.25:
        lines.append(
            f"\nWarning: other processes used up to {busiest:.2f} cores during a point (see 'other load'): "
            "latencies are inflated; the server CPU per request is the steadier comparison."
        )
    return "\n".join(lines)


def _target_line(name: str, servers: dict[str, Any]) -> str:
    verdicts = []
    for server, data in servers.items():
        met = data["targets"][name]["met"]
        verdicts.append(f"{server} {'met' if met else 'n/a' if met is None else 'MISSED'}")
    return f"{TARGETS[name][0]} {TARGETS[name][1]}: " + ", ".join(verdicts)


def _shutdown_cell(probe: dict[str, Any]) -> str:
    lost = f"**{probe['lost']} lost**" if probe["lost"] else "0 lost"
    how = f" ({probe['server_args']})" if probe["server_args"] else ""
    return f"{probe['ledger_rows']} + {probe['spooled']} / {lost}{how}"


# --- routing (issue 10) ------------------------------------------------------------------------------------

ROUTING_LABELS = {
    "one": "(a) one deployment",
    "three": "(b) three deployments, all healthy",
    "three-one-down": "(c) three, one refusing connections, its breaker open",
}
ROUTING_ADDED_LIMIT_MS = 0.1


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _paired(points: list[dict[str, Any]], ours: str, theirs: str, key: str) -> float | None:
    """The median over rounds of (ours − theirs) within the same round: drift between rounds cancels out."""
    by_round: dict[int, dict[str, float]] = {}
    for point in points:
        by_round.setdefault(point["round"], {})[point["scenario"]] = point[key]
    differences = [r[ours] - r[theirs] for r in by_round.values() if ours in r and theirs in r]
    return round(_median(differences), 3) if differences else None


def derive_routing(data: dict[str, Any]) -> dict[str, Any]:
    """Per scenario the medians over rounds, and the figures the acceptance is stated in."""
    points = data.get("routing") or []
    scenarios: dict[str, Any] = {}
    for name in ROUTING_LABELS:
        mine = [p for p in points if p["scenario"] == name]
        if not mine:
            continue
        p50s, p99s = [p["p50_ms"] for p in mine], [p["p99_ms"] for p in mine]
        scenarios[name] = {
            "rounds": len(mine),
            "p50_ms": round(_median(p50s), 3),
            "p99_ms": round(_median(p99s), 3),
            "p50_range_ms": [min(p50s), max(p50s)],
            "p99_range_ms": [min(p99s), max(p99s)],
            "rps": round(_median([p["rps"] for p in mine]), 1),
            "server_cpu_ms_per_request": round(_median([p["server_cpu_ms_per_request"] or 0 for p in mine]), 3),
            "errors": sum(p["errors"] for p in mine),
            "other_cores_max": max(p["other_cores"] for p in mine),
        }
    added = _paired(points, "three", "one", "p50_ms")
    added_cpu = _paired(points, "three", "one", "server_cpu_ms_per_request")
    moved_p50 = _paired(points, "three-one-down", "three", "p50_ms")
    moved_p99 = _paired(points, "three-one-down", "three", "p99_ms")
    three = scenarios.get("three")
    # "Not moved" means: no further from (b) than (b)'s own rounds are from one another.
    p50_noise = three["p50_range_ms"][1] - three["p50_range_ms"][0] if three else None
    p99_noise = three["p99_range_ms"][1] - three["p99_range_ms"][0] if three else None
    down = scenarios.get("three-one-down")
    return {
        "scenarios": scenarios,
        "added_p50_ms": added,
        "added_p50_met": None if added is None else added <= ROUTING_ADDED_LIMIT_MS,
        "added_server_cpu_ms": added_cpu,
        "down_moved_p50_ms": moved_p50,
        "down_moved_p99_ms": moved_p99,
        "p50_noise_ms": None if p50_noise is None else round(p50_noise, 3),
        "p99_noise_ms": None if p99_noise is None else round(p99_noise, 3),
        "down_unmoved": None
        if moved_p50 is None or moved_p99 is None or p50_noise is None or p99_noise is None
        else (
            abs(moved_p50) <= max(p50_noise, ROUTING_ADDED_LIMIT_MS)
            and abs(moved_p99) <= p99_noise
            and bool(down)
            and down["errors"] == 0
        ),
    }


def routing_markdown(results: dict[str, Any]) -> str:
    servers = {name: data for name, data in results["servers"].items() if data.get("routing_derived")}
    if not servers:
        return ""
    names = list(servers)
    plan = results["plan"]
    lines = [
        f"Routing, concurrency 1, non-streamed, nginx's canned answer behind every deployment: "
        f"{plan['route_rounds']} rounds of {plan['route_duration']} s a point, the scenarios in turns within each "
        "round; medians over the rounds (ranges in brackets).",
        "",
        "| server | scenario | p50 ms | p99 ms | req/s | server CPU ms/req | errors | other load (max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for server, data in servers.items():
        for name, figures in data["routing_derived"]["scenarios"].items():
            low50, high50 = figures["p50_range_ms"]
            low99, high99 = figures["p99_range_ms"]
            lines.append(
                f"| {server} | {ROUTING_LABELS[name]} | {figures['p50_ms']:.2f} ({low50:.2f}–{high50:.2f}) | "
                f"{figures['p99_ms']:.2f} ({low99:.2f}–{high99:.2f}) | {figures['rps']:.0f} | "
                f"{figures['server_cpu_ms_per_request']} | {figures['errors']} | {figures['other_cores_max']:.2f} |"
            )
    lines += ["", "| figure | target | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]

    def row(label: str, target: str, cell: Any) -> None:
        lines.append(f"| {label} | {target} | " + " | ".join(cell(servers[s]["routing_derived"]) for s in names) + " |")

    def verdict(value: bool | None) -> str:
        return "n/a" if value is None else "met" if value else "**MISSED**"

    row(
        "routing added to the p50, (b) − (a), median of the rounds' differences",
        f"≤ {ROUTING_ADDED_LIMIT_MS} ms",
        lambda d: f"{_ms(d['added_p50_ms'])} ({verdict(d['added_p50_met'])})",
    )
    row(
        "… server CPU per request, (b) − (a), median of the rounds' differences",
        "",
        lambda d: _ms(d["added_server_cpu_ms"]),
    )
    row("one deployment down: p50 moved, (c) − (b)", "within noise", lambda d: _ms(d["down_moved_p50_ms"]))
    row("one deployment down: p99 moved, (c) − (b)", "within noise", lambda d: _ms(d["down_moved_p99_ms"]))
    row(
        "noise: spread of (b)'s own rounds, p50 / p99",
        "",
        lambda d: f"{_ms(d['p50_noise_ms'], False)} / {_ms(d['p99_noise_ms'], False)}",
    )
    row("(c) did not move (p50 and p99 within the noise, no errors)", "yes", lambda d: verdict(d["down_unmoved"]))

    whole = results.get("routing_whole_in_process") or []
    if whole:
        lines += [
            "",
            "Whole requests in-process (`bench.profile_request`: llmhub's ASGI application driven without a server, "
            "against the same nginx ports; medians over the rounds, the scenarios in turns):",
            "",
            "| scenario | CPU ms/request | wall p50 ms | CPU, paired difference | wall p50, paired difference |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, label in ROUTING_LABELS.items():
            mine = [p for p in whole if p["scenario"] == name]
            if not mine:
                continue
            against = {"three": "one", "three-one-down": "three"}.get(name)
            cpu = _paired(whole, name, against, "cpu_ms_per_request") if against else None
            wall = _paired(whole, name, against, "wall_p50_ms") if against else None
            versus = f" vs {ROUTING_LABELS[against][:3]}" if against else ""
            lines.append(
                f"| {label} | {_median([p['cpu_ms_per_request'] for p in mine]):.3f} | "
                f"{_median([p['wall_p50_ms'] for p in mine]):.3f} | "
                f"{_ms(cpu) + versus if cpu is not None else '—'} | {_ms(wall) + versus if wall is not None else '—'} |"
            )
    in_process = results.get("routing_in_process") or {}
    if in_process:
        lines += [
            "",
            "In-process (`bench/routing.py`: route_candidates, breaker_allows, model.on, call_started and "
            "call_finished, the models taking turns request by request):",
            "",
            "| model | deployments | p50 µs | p99 µs | mean µs | first choice | breaker refused |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]
        for model, figures in in_process.items():
            choices = ", ".join(f"{name} {count}" for name, count in figures["first_choice"].items())
            lines.append(
                f"| {model} | {figures['deployments']} | {figures['p50_us']:.2f} | {figures['p99_us']:.2f} | "
                f"{figures['mean_us']:.2f} | {choices} | {figures['breaker_refused']} |"
            )
    return "\n".join(lines)
