"""The Django side of `make bench`: seed the throw-away database, and read the ledger back afterwards.

Run by ``bench/run.py`` as ``python -m bench.db seed|ledger`` with the benchmark's environment; prints JSON.
"""

from __future__ import annotations

import json
import os
import sys
from decimal import Decimal


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()


def seed(upstreams: dict[str, str], routed: dict[str, list[dict[str, str]]]) -> dict[str, str]:
    """One provider + catalog model (with one deployment) per upstream (``model name -> base URL``), a model
    with several deployments per entry of ``routed`` (``model name -> [{base_url, breaker_override}]``, one
    provider each, equal weights), and two users with a key each: ``key`` on a plan that enforces nothing
    (admission does no I/O), ``budgeted_key`` on a plan with a monthly budget and a rate limit too large to
    be reached, so that every request reserves and settles."""
    from django.contrib.auth import get_user_model

    from billing.models import Plan
    from billing.services.keys import api_key_create
    from billing.services.plans import plan_assign, plan_get
    from providers.models import CatalogModel, Deployment, Provider, ProviderKind

    def provider_create(name: str, base_url: str) -> Provider:
        provider = Provider(
            name=name,
            kind=ProviderKind.OPENAI_COMPATIBLE,
            base_url=base_url,
            api_key="sk-bench-upstream",
            timeout_seconds=Decimal("30"),
        )
        provider.full_clean()
        provider.save()
        return provider

    prices = {"upstream_id": "fake-gpt-4o-mini", "input_per_mtok": Decimal("0.15"), "output_per_mtok": Decimal("0.60")}
    for name, base_url in upstreams.items():
        model = CatalogModel.objects.create(name=name)
        Deployment.objects.create(model=model, provider=provider_create(f"{name}-upstream", base_url), **prices)
    for name, deployments in routed.items():
        model = CatalogModel.objects.create(name=name)
        for index, spec in enumerate(deployments, start=1):
            Deployment.objects.create(
                model=model,
                name=f"d{index}",
                provider=provider_create(f"{name}-{index}", spec["base_url"]),
                breaker_override=spec.get("breaker_override", ""),
                **prices,
            )
    users = get_user_model().objects
    unlimited = users.create_user(username="bench", password=None)
    plan_assign(user=unlimited, plan=plan_get(name="Enterprise"))
    budgeted = users.create_user(username="bench-budgeted", password=None)
    budget_plan = Plan.objects.create(
        name="Bench budgeted",
        allow_all_models=True,
        monthly_budget_usd=Decimal("1000000"),
        daily_token_quota=10**12,
        rpm=10**8,
    )
    plan_assign(user=budgeted, plan=budget_plan)
    return {
        "key": api_key_create(user=unlimited, name="bench").secret,
        "budgeted_key": api_key_create(user=budgeted, name="bench").secret,
    }


def ledger() -> dict[str, int]:
    """Ledger rows by status: the proof that every benchmarked request was accounted for."""
    from django.db.models import Count

    from billing.models import UsageRecord

    return {row["status"]: row["n"] for row in UsageRecord.objects.values("status").annotate(n=Count("id"))}


def main() -> None:
    _setup()
    command = sys.argv[1]
    if command == "seed":
        upstreams = json.loads(os.environ["BENCH_BARE_UPSTREAMS"])
        print(json.dumps(seed(upstreams, json.loads(os.environ.get("BENCH_ROUTED_MODELS", "{}")))))
    elif command == "ledger":
        print(json.dumps(ledger()))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
