#!/usr/bin/env python
"""The lost-request sweep and budget reconciliation over a big ledger spool (docs/reliability.md, "The ledger
spool").

After a long database outage the spool holds every row served meanwhile, and a server killed then leaves
requests in flight for the sweep. This builds that state on a throw-away SQLite database (counters in the
database, no Redis): ``--rows`` spooled rows over ``--keys`` keys with a monthly budget each, and ``--lost``
requests of a dead process, half of them with their row in the spool. It then times one lost-request sweep
(``inflight_lost_settle``) and one reconciliation of every counter (``DatabaseCounterStore.reconcile``), and
prints what they produced (lost rows, their cost, the counters' total), which must not depend on how the
spool is read. ``ru_maxrss`` is the process's peak resident memory.

    python bench/spool_sweep.py --rows 50000 --lost 500 --keys 50
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _setup(directory: Path) -> None:
    from cryptography.fernet import Fernet

    os.environ.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.base",
        DATABASE_URL=f"sqlite:///{directory / 'db.sqlite3'}",
        REDIS_URL="",
        LLMHUB_LEDGER_SPOOL=str(directory / "ledger-spool.jsonl"),
        FIELD_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        DJANGO_DEBUG="false",
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _seed(rows: int, lost: int, keys: int) -> None:
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from billing.models import ApiKey, BudgetCounter, BudgetMetric, BudgetPeriod, RequestReservation, ScopeKind
    from billing.services.budgets import CounterRef, period_bounds
    from billing.services.spool import spool_append
    from tests.factories import spooled_line

    now = timezone.now()
    start, _ = period_bounds(BudgetPeriod.MONTHLY, now)
    users = get_user_model().objects.bulk_create(
        [get_user_model()(username=f"spool-{n}", password="!") for n in range(keys)]
    )
    api_keys = ApiKey.objects.bulk_create(
        [
            ApiKey(user=user, name="k", prefix=f"llmhub-s{user.pk}", secret_hash=f"{user.pk:064d}", budget_usd=1000)
            for user in users
        ]
    )
    refs = [CounterRef(ScopeKind.KEY, key.pk, BudgetMetric.COST, BudgetPeriod.MONTHLY, start) for key in api_keys]
    BudgetCounter.objects.bulk_create([ref.row() for ref in refs])
    created = now - timedelta(minutes=10)

    def line(request_id: str, n: int) -> str:
        key = api_keys[n % keys]
        return spooled_line(
            request_id=request_id,
            user_id=key.user_id,
            api_key_id=key.pk,
            provider_name="openai",
            model_name="gpt-4o-mini",
            prompt_tokens=120 + n % 50,
            completion_tokens=300 + n % 70,
            cost=Decimal("0.000123") * (1 + n % 7),
            duration_ms=800,
            created_at=created,
        )

    spooled_lost = lost // 2
    spool_append(line(f"req-lost-{n}", n) for n in range(spooled_lost))
    spool_append(line(f"req-{n}", n) for n in range(rows - spooled_lost))
    RequestReservation.objects.bulk_create(
        [
            RequestReservation(
                request_id=f"req-lost-{n}",
                instance="dead-process",
                user_id=api_keys[n % keys].user_id,
                api_key_id=api_keys[n % keys].pk,
                model_name="gpt-4o-mini",
                provider_name="openai",
                endpoint="rest",
                counters=[refs[n % keys].key],
                reserved_cost=Decimal("0.01"),
                prompt_tokens=100,
                reserved_tokens=1100,
                admitted_at=created,
            )
            for n in range(lost)
        ]
    )
    RequestReservation.objects.update(recorded_at=now - timedelta(hours=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--lost", type=int, default=500)
    parser.add_argument("--keys", type=int, default=50)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        _setup(Path(directory))
        _seed(options.rows, options.lost, options.keys)
        from django.db.models import Sum
        from django.utils import timezone

        from billing.models import BudgetCounter, UsageRecord, UsageStatus
        from billing.services.counters import database_store, inflight_lost_settle

        spool_bytes = Path(os.environ["LLMHUB_LEDGER_SPOOL"]).stat().st_size
        started = time.perf_counter()
        settled = inflight_lost_settle(now=timezone.now())
        sweep_s = time.perf_counter() - started
        started = time.perf_counter()
        adjusted = database_store.reconcile(timezone.now())
        reconcile_s = time.perf_counter() - started
        lost_rows = UsageRecord.objects.filter(status=UsageStatus.LOST)
        print(
            json.dumps(
                {
                    "spooled_rows": options.rows,
                    "spool_mb": round(spool_bytes / 2**20, 1),
                    "lost_requests": options.lost,
                    "counters": options.keys,
                    "sweep_seconds": round(sweep_s, 2),
                    "reconcile_seconds": round(reconcile_s, 2),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                    "settled": settled,
                    "lost_rows": lost_rows.count(),
                    "lost_cost": str(lost_rows.aggregate(total=Sum("cost"))["total"]),
                    "counters_adjusted": adjusted,
                    "counters_spent": str(BudgetCounter.objects.aggregate(total=Sum("spent"))["total"]),
                }
            )
        )


if __name__ == "__main__":
    main()
