"""The ledger at scale: ``python -m bench.ledger_scale [--rows 10000000]`` (``make`` is not needed).

On a throw-away PostgreSQL (``llmhub.testing.postgres``; or ``DATABASE_URL`` if it names a PostgreSQL
database, which is then used and filled), it migrates, builds ``--rows`` ledger rows server-side with
``generate_series`` (90 days of traffic from 1,000 users and 2,000 keys, each user on 3 of 20 models, each key
mixing ``--operations`` of the four operations, in time order as the writer appends them; 5 % of the last 14
days in one experiment, a fifth of those rated), rolls up every day but today and folds the experiment's rows
into the experiments' daily rollup, then measures and prints, each with its target:

- insert throughput through the ledger writer's batched path (``usage_record_submit`` on an event loop,
  ``ledger_flush``: the same writer task, batches and transaction per batch as a server), into the full table;
- then rolls today up and folds, as the rollup task does every 10 minutes, and writes 10 minutes of traffic
  after it (one row in 20 in the experiment);
- the usage dashboards' queries (``billing.selectors.usage_daily``/``usage_breakdown``/``usage_meters``, as
  ``billing/views_dashboard.py`` calls them for one user and for staff), the usage API's list and summary,
  and ``experiments.results.experiment_results`` over the experiment: median and worst of several warm runs;
- the retention pass (``billing.services.retention``) over the oldest days: rows deleted per second.

Figures go to stdout; docs/ledger.md explains them. The machine is shared: say under what load you ran it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

DAYS = 90
USERS = 1000
KEYS_PER_USER = 2
MODELS = 20
PROVIDERS = 5
# How many of the operations (chat, responses, messages, embeddings) each key's traffic mixes (``--operations``):
# every (user, key, model) of a day then has a rollup row per operation, up to 4 times as many as with 1. The
# default, 1 (all chat), keeps the figures comparable with the runs before the rollup kept the operation.
OPERATIONS = 1
INSERT_TARGET = 5000  # rows/s
QUERY_TARGET_MS = 200
EXPERIMENT_DAYS = 14  # the experiment ran over the last two weeks, on 5 % of the traffic


def _setup(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.base")
    os.environ.setdefault("DJANGO_DEBUG", "false")
    os.environ.setdefault(
        "CONN_MAX_AGE", "60"
    )  # as production.py: the writer keeps its connection  # DEBUG keeps every query in memory: not what a server runs
    import django

    django.setup()


def _seed_people() -> tuple[list[int], list[int]]:
    from django.contrib.auth import get_user_model

    from billing.models import ApiKey

    users = get_user_model().objects.bulk_create(
        [get_user_model()(username=f"ledger-{n}", password="!") for n in range(USERS)]
    )
    keys = ApiKey.objects.bulk_create(
        [
            ApiKey(user=user, name=f"k{k}", prefix=f"llmhub-b{user.pk}-{k}", secret_hash=f"{user.pk:032d}{k:032d}")
            for user in users
            for k in range(KEYS_PER_USER)
        ]
    )
    return [user.pk for user in users], [key.pk for key in keys]


def _fill(*, rows: int, first_user: int, first_key: int, experiment: tuple[int, int, int], start: datetime) -> float:
    """``rows`` ledger rows, 1 million per statement, spread evenly over ``DAYS`` days from ``start``; returns
    seconds taken. User ``first_user + u`` uses keys ``first_key + 2u`` and ``first_key + 2u + 1``."""
    from django.db import connection

    experiment_id, control_id, treatment_id = experiment
    step_us = DAYS * 86_400 * 1_000_000 // rows
    began = time.perf_counter()
    chunk = 1_000_000
    with connection.cursor() as cursor:
        # The bench's server commits asynchronously (llmhub.testing.postgres). A VACUUM cannot mark a page
        # all-visible until the commit of its rows is flushed, and the build's VACUUM comes right after the
        # last insert: it marked none of the table, and the experiment's results then read the heap for
        # every row (610-660 ms at 10 million rows instead of 70-110) until autovacuum came by. The
        # build's commits wait for their flush, as on a server with the default ``synchronous_commit``.
        cursor.execute("SET synchronous_commit = on")
    for low in range(1, rows + 1, chunk):
        high = min(rows, low + chunk - 1)
        with connection.cursor() as cursor:
            cursor.execute(
                """
                INSERT INTO billing_usagerecord (
                    request_id, user_id, api_key_id, provider_name, model_name, deployment_name, requested_model,
                    attempts, resumed, endpoint, operation, stream, prompt_tokens, completion_tokens, cached_tokens,
                    cost, usage_estimated, upstream_latency_ms, ttft_ms, duration_ms, status, error_type,
                    billing_source, moderation, experiment_id, experiment_variant_id, created_at)
                SELECT 'bench-' || i, %(first_user)s + u, %(first_key)s + 2 * u + (i %% 2),
                    'provider-' || ((u * 7 + i %% 3) %% %(models)s %% %(providers)s),
                    'model-' || ((u * 7 + i %% 3) %% %(models)s), 'd1', '',
                    1, false, CASE WHEN i %% 4 = 0 THEN 'websocket' ELSE 'rest' END,
                    (ARRAY['chat', 'responses', 'messages', 'embeddings'])[1 + (i / 7 %% %(operations)s)::int],
                    i / 4 %% 2 = 0,
                    100 + i %% 900, 50 + i %% 400, 0,
                    (100 + i %% 900) * 0.00000015 + (50 + i %% 400) * 0.0000006, false,
                    200 + i %% 800, 100 + i %% 300, 300 + i %% 1500,
                    CASE WHEN i %% 50 = 0 THEN 'upstream_error' ELSE 'ok' END,
                    CASE WHEN i %% 50 = 0 THEN 'server_error' ELSE '' END, 'platform', '',
                    CASE WHEN i > %(experiment_from)s AND i %% 20 = 7 THEN %(experiment)s END,
                    CASE WHEN i > %(experiment_from)s AND i %% 20 = 7
                        THEN (CASE WHEN u %% 2 = 0 THEN %(control)s ELSE %(treatment)s END) END,
                    %(start)s + (i * %(step)s) * interval '1 microsecond'
                FROM (SELECT i, (hashint4(i::int) & 2147483647) %% %(users)s AS u
                      FROM generate_series(%(low)s::bigint, %(high)s::bigint) AS i) AS s
                """,
                {
                    "first_user": first_user,
                    "first_key": first_key,
                    "providers": PROVIDERS,
                    "models": MODELS,
                    "operations": OPERATIONS,
                    "users": USERS,
                    "experiment": experiment_id,
                    "control": control_id,
                    "treatment": treatment_id,
                    "start": start,
                    "step": step_us,
                    "experiment_from": rows * (DAYS - EXPERIMENT_DAYS) // DAYS,
                    "low": low,
                    "high": high,
                },
            )
        print(f"  {high:>11,} rows  {time.perf_counter() - began:7.1f} s", flush=True)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('billing_usagerecord', 'id'), max(id)) FROM billing_usagerecord"
        )
        cursor.execute("VACUUM ANALYZE billing_usagerecord")
        cursor.execute("RESET synchronous_commit")
    return time.perf_counter() - began


def _visible_pages() -> tuple[int, int] | None:
    """The ledger's heap pages the visibility map marks all-visible, and all its pages (``pg_visibility``;
    None where that extension is not installed). An index-only scan reads the heap page of every row on an
    unmarked page: the experiment's results took 610-660 ms at 10 million rows with none marked, 70-110 ms
    with all (docs/ledger.md)."""
    from django.db import DatabaseError, connection, transaction

    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_visibility")
            cursor.execute(
                "SELECT all_visible, pg_relation_size(%s) / current_setting('block_size')::int"
                " FROM pg_visibility_map_summary(%s)",
                ["billing_usagerecord", "billing_usagerecord"],
            )
            visible, pages = cursor.fetchone()
    except DatabaseError:
        return None
    return int(visible), int(pages)


def _experiment() -> Any:
    from experiments.models import Experiment, Variant
    from providers.models import CatalogModel

    model = CatalogModel.objects.create(name="model-7")
    experiment = Experiment.objects.create(name="bench-scale", model=model, status="running")
    Variant.objects.create(experiment=experiment, name="control", is_control=True, allocation=Decimal(50))
    Variant.objects.create(experiment=experiment, name="treatment", allocation=Decimal(50), position=1)
    return experiment


def _feedback(experiment_id: int) -> int:
    """Thumbs on a fifth of the experiment's requests, two up for one down, as ``POST /v1/feedback`` leaves
    them: the results join them to the ledger per variant and per day."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO experiments_feedback
                (request_id, user_id, metric, value, comment, source, created_at, updated_at)
            SELECT request_id, user_id, 'thumbs', CASE WHEN id / 20 %% 3 = 0 THEN -1 ELSE 1 END, '', 'api',
                created_at, created_at
            FROM billing_usagerecord WHERE experiment_id = %s AND id / 20 %% 5 = 0
            """,
            [experiment_id],
        )
        inserted = cursor.rowcount
        cursor.execute("ANALYZE experiments_feedback")
        return inserted


def _timed(fn: Callable[[], Any], runs: int = 7) -> tuple[float, float]:
    """Median and worst milliseconds over ``runs`` runs after one warm-up."""
    fn()
    found = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        found.append((time.perf_counter() - began) * 1000)
    return statistics.median(found), max(found)


def _server_cpu() -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend serving this database, from /proc (Linux; empty elsewhere)."""
    from django.db import connection

    name = connection.settings_dict["NAME"].encode()
    found = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                title = cmdline.read()
            if not title.startswith(b"postgres: ") or b" " + name + b" " not in title:
                continue
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            found[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return found


def _insert_throughput(
    *, rows: int, user_id: int, key_id: int, prefix: str = "insert", experiment: tuple[int, int] | None = None
) -> tuple[float, float, float]:
    """Rows per second, and the CPU milliseconds per row of this process (every thread: the loop and the
    writer's database thread) and of the database's backends: on a busy machine the first falls with the
    load, the others do not. With ``experiment`` (its id and a variant's), one row in 20 is in it."""
    from billing.services.ledger import ledger_flush, usage_record_submit
    from billing.services.ledger_rows import UsageData

    async def run() -> float:
        began = time.perf_counter()
        for n in range(rows):
            usage_record_submit(
                UsageData(
                    request_id=f"{prefix}-{n}",
                    endpoint="rest",
                    stream=False,
                    status="ok",
                    user_id=user_id,
                    api_key_id=key_id,
                    provider_name="provider-1",
                    model_name="model-1",
                    attempts=1,
                    prompt_tokens=120,
                    completion_tokens=80,
                    cost=Decimal("0.0000660"),
                    duration_ms=420,
                    experiment_id=experiment[0] if experiment and n % 20 == 0 else None,
                    experiment_variant_id=experiment[1] if experiment and n % 20 == 0 else None,
                )
            )
            if n % 1000 == 999:
                await asyncio.sleep(0)  # the writer runs between bursts, as between requests
        await ledger_flush(wait_seconds=3600)
        return time.perf_counter() - began

    cpu, server = time.process_time(), _server_cpu()
    seconds = asyncio.run(run())
    server_used = sum(used - server.get(pid, 0.0) for pid, used in _server_cpu().items())
    return rows / seconds, (time.process_time() - cpu) * 1000 / rows, server_used * 1000 / rows


# What ``--output`` writes: every figure this run printed, for ``bench/all.py``'s summary (``make bench``).
FIGURES: dict[str, Any] = {}


def _line(name: str, median: float, worst: float, target: float, unit: str = "ms") -> bool:
    FIGURES.setdefault("queries", []).append(
        {"name": name, "median_ms": round(median, 1), "worst_ms": round(worst, 1), "limit_ms": target}
    )
    ok = median < target  # the issue: "under 200 ms"
    verdict = "ok" if ok else "MISSED"
    print(
        f"  {name:<58} {median:8.1f} {unit} median  {worst:8.1f} {unit} worst   target < {target:g} {unit}  {verdict}"
    )
    return ok


def measure(rows: int, insert_rows: int, *, queries_only: bool = False) -> int:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from billing.models import DailyStaffUsage, DailyUsage, DailyUserUsage
    from billing.services.rollups import daily_usage_rebuild, daily_usage_rebuild_recent, experiment_usage_fold

    version = connection.cursor().connection.info.server_version
    FIGURES.update(rows=rows, days=DAYS, postgres=version, load_average_start=round(os.getloadavg()[0], 2))
    print(f"PostgreSQL {version}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    today = datetime.now(UTC).date()
    if queries_only:
        from experiments.models import Experiment

        user_ids = sorted(get_user_model().objects.filter(username__startswith="ledger-").values_list("pk", flat=True))
        return _queries(
            user_id=user_ids[3], experiment=Experiment.objects.get(name="bench-scale"), today=today, rows=rows
        )
    call_command("migrate", verbosity=0)
    user_ids, key_ids = _seed_people()
    experiment = _experiment()
    variants = {v.name: v.pk for v in experiment.variants.all()}
    start = datetime.combine(today - timedelta(days=DAYS - 1), datetime.min.time(), UTC)
    print(f"building {rows:,} ledger rows over {DAYS} days (generate_series, server-side)", flush=True)
    fill_seconds = _fill(
        rows=rows,
        first_user=user_ids[0],
        first_key=key_ids[0],
        experiment=(experiment.pk, variants["control"], variants["treatment"]),
        start=start,
    )
    print(f"  {_feedback(experiment.pk):,} thumbs on the experiment's requests")
    began = time.perf_counter()
    for offset in range(1, DAYS):
        daily_usage_rebuild(day=today - timedelta(days=offset))
    rollup_seconds = time.perf_counter() - began
    began = time.perf_counter()
    folded = experiment_usage_fold()  # the first fold: every experiment row there is
    print(f"  experiments' rollup: first fold of {folded:,} rows in {time.perf_counter() - began:.1f} s")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
        cursor.execute(
            "SELECT pg_size_pretty(pg_table_size('billing_usagerecord')), "
            "pg_size_pretty(pg_indexes_size('billing_usagerecord'))"
        )
        table_size, index_size = cursor.fetchone()
    print(
        f"built in {fill_seconds:.0f} s ({rows / fill_seconds:,.0f} rows/s); table {table_size}, indexes {index_size}"
    )
    per_day = rollup_seconds / (DAYS - 1) * 1000
    rollups, staff_rollups = DailyUsage.objects.count(), DailyStaffUsage.objects.count()
    print(
        f"rolled up {DAYS - 1} days in {rollup_seconds:.1f} s ({per_day:.0f} ms a day), {rollups:,} rollup rows, "
        f"{staff_rollups:,} in the staff rollup, {DailyUserUsage.objects.count():,} in the per-user rollup"
    )

    ok = True
    print("\ninsert throughput, through the ledger writer (usage_record_submit, batches of 500, one transaction each)")
    rate, cpu_ms, server_ms = _insert_throughput(rows=insert_rows, user_id=user_ids[1], key_id=key_ids[2])
    FIGURES["insert"] = {"rows": insert_rows, "rows_per_s": round(rate), "limit_rows_per_s": INSERT_TARGET}
    ok &= rate >= INSERT_TARGET
    verdict = "ok" if rate >= INSERT_TARGET else "MISSED"
    print(f"  {insert_rows:,} rows into {rows:,}: {rate:8,.0f} rows/s   target ≥ {INSERT_TARGET:,} rows/s  {verdict}")
    print(f"  CPU per row: {cpu_ms:.3f} ms in the writer's process, {server_ms:.3f} ms in PostgreSQL's backends")

    # The rollup task rebuilds today every 10 minutes; the pages read today's rollup and the raw rows since.
    began = time.perf_counter()
    daily_usage_rebuild_recent(days=1, today=today)  # as the task: today, and the experiments' fold
    print(f"\nrolled up today ({rows // DAYS + insert_rows:,} rows) in {time.perf_counter() - began:.1f} s", end="")
    since = rows // DAYS // 144  # 10 minutes of the day's traffic, written after the rollup
    _insert_throughput(
        rows=since,
        user_id=user_ids[5],
        key_id=key_ids[10],
        prefix="after-rollup",
        experiment=(experiment.pk, variants["treatment"]),
    )
    print(f"; then {since:,} rows written after it (10 minutes of traffic), which the pages read raw")

    visible = _visible_pages()
    if visible:
        FIGURES["visible_pages"] = {"all_visible": visible[0], "pages": visible[1]}
        print(
            f"\nthe visibility map marks {visible[0]:,} of the ledger's {visible[1]:,} heap pages all-visible "
            f"({visible[0] / visible[1]:.1%}; those written since the build's VACUUM wait for autovacuum's next pass)"
        )
    ok &= _queries(user_id=user_ids[3], experiment=experiment, today=today, rows=rows) == 0

    from billing.services.retention import usage_records_purge

    print("\nretention: the oldest 5 days deleted (rolled up), in batches")
    cutoff = start + timedelta(days=5)
    began = time.perf_counter()
    deleted = usage_records_purge(before=cutoff.date())
    seconds = time.perf_counter() - began
    print(f"  {deleted:,} rows in {seconds:.1f} s ({deleted / seconds:,.0f} rows/s)")
    FIGURES["retention"] = {"days": 5, "rows_deleted": deleted, "seconds": round(seconds, 1)}
    return 0 if ok else 1


def _queries(*, user_id: int, experiment: Any, today: Any, rows: int) -> int:
    """Time the dashboards', the usage API's and the experiment results' queries; 0 if all meet the target."""
    from django.contrib.auth import get_user_model

    from billing.models import Plan, UsageRecord
    from billing.selectors import (
        UsageFilters,
        usage_breakdown,
        usage_daily,
        usage_meters,
        usage_record_list,
        usage_summary,
    )
    from billing.selectors_ops import ops_spend
    from billing.services.plans import plan_assign
    from experiments.results import experiment_results

    ok = True
    user = get_user_model().objects.get(pk=user_id)
    plan, _ = Plan.objects.get_or_create(
        name="Bench metered", allow_all_models=True, monthly_budget_usd=Decimal(100), daily_token_quota=10**9
    )
    plan_assign(user=user, plan=plan)
    now = datetime.now(UTC)
    month = UsageFilters(start=today - timedelta(days=29), end=today)
    queries: list[tuple[str, Callable[[], Any]]] = [
        ("dashboard: a user's 30 days (usage_daily)", lambda: usage_daily(days=30, today=today, user_id=user.pk)),
        (
            "dashboard: a user's spend by model",
            lambda: usage_breakdown(by="model", days=30, today=today, user_id=user.pk),
        ),
        (
            "dashboard: a user's spend by operation",
            lambda: usage_breakdown(by="operation", days=30, today=today, user_id=user.pk),
        ),
        ("dashboard: a user's meters (budget, quota: raw ledger)", lambda: usage_meters(user=user, now=now)),
        ("staff dashboard: everyone's 30 days", lambda: usage_daily(days=30, today=today)),
        ("staff dashboard: by user", lambda: usage_breakdown(by="user", days=30, today=today)),
        ("staff dashboard: by provider", lambda: usage_breakdown(by="provider", days=30, today=today)),
        ("staff dashboard: by model", lambda: usage_breakdown(by="model", days=30, today=today)),
        ("staff dashboard: by operation", lambda: usage_breakdown(by="operation", days=30, today=today)),
        ("operations dashboard: spend per hour and operation, 24 hours", lambda: ops_spend(now=now)),
        (
            "usage API: a user's ledger, first page of 100",
            lambda: list(usage_record_list(user=user, filters=month)[:100]),
        ),
        (
            "usage API: a user's ledger, one model, first page",
            lambda: list(usage_record_list(user=user, filters=UsageFilters(model="model-3"))[:100]),
        ),
        ("usage API: a user's 30-day summary", lambda: usage_summary(user=user, filters=month)),
    ]
    experiment_rows = UsageRecord.objects.filter(experiment_id=experiment.pk).count()
    queries.append((f"experiment results ({experiment_rows:,} rows)", lambda: experiment_results(experiment)))
    print(f"\nqueries (median and worst of 7 warm runs; today has {rows // DAYS:,} raw rows)")
    for name, fn in queries:
        median, worst = _timed(fn)
        ok &= _line(name, median, worst, QUERY_TARGET_MS)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    global DAYS, OPERATIONS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--insert-rows", type=int, default=50_000)
    parser.add_argument(
        "--days",
        type=int,
        default=DAYS,
        help="days the rows span: fewer days with fewer rows keep a day (what the dashboards read raw) as full",
    )
    parser.add_argument(
        "--operations",
        type=int,
        choices=range(1, 5),
        default=OPERATIONS,
        help="operations each key's traffic mixes: 1 is all chat (the rollup as small as before it kept the operation)",
    )
    parser.add_argument("--output", help="also write the figures as JSON here (bench/all.py reads them)")
    parser.add_argument(
        "--queries-only",
        action="store_true",
        help="DATABASE_URL holds a ledger this script built: time the queries again, change nothing",
    )
    args = parser.parse_args(argv)
    DAYS, OPERATIONS = args.days, args.operations
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with ExitStack() as stack:
        url = os.environ.get("DATABASE_URL", "")
        if not url.startswith("postgres"):
            from llmhub.testing.postgres import createdb, throwaway_postgres

            url = stack.enter_context(throwaway_postgres(database="ledger_scale"))
            createdb(url)
        _setup(url)
        status = measure(args.rows, args.insert_rows, queries_only=args.queries_only)
    if args.output:
        FIGURES["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(args.output, "w") as output:
            json.dump(FIGURES, output, indent=2)
            output.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
