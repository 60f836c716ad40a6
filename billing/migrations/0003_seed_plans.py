"""Seed the three standard plans. Free allows "the cheapest models" by price (output at most
$1.00 per million tokens), so the rule keeps holding as the catalog changes."""

from decimal import Decimal

from django.db import migrations

PLANS = [
    {
        "name": "Free",
        "description": "1,000 tokens a day on the cheapest models (output at most $1.00 per million tokens).",
        "allow_all_models": False,
        "max_output_price_per_mtok": Decimal("1.00"),
        "daily_token_quota": 1_000,
        "monthly_budget_usd": None,
        "rpm": 20,
        "tpm": None,
    },
    {
        "name": "Pro",
        "description": "100,000 tokens a day on every model.",
        "allow_all_models": True,
        "max_output_price_per_mtok": None,
        "daily_token_quota": 100_000,
        "monthly_budget_usd": None,
        "rpm": 600,
        "tpm": None,
    },
    {
        "name": "Enterprise",
        "description": "Every model, no quota, no budget, no rate limit.",
        "allow_all_models": True,
        "max_output_price_per_mtok": None,
        "daily_token_quota": None,
        "monthly_budget_usd": None,
        "rpm": None,
        "tpm": None,
    },
]


def seed(apps, schema_editor):
    Plan = apps.get_model("billing", "Plan")
    for fields in PLANS:
        Plan.objects.get_or_create(name=fields["name"], defaults=fields)


def unseed(apps, schema_editor):
    Plan = apps.get_model("billing", "Plan")
    Plan.objects.filter(name__in=[p["name"] for p in PLANS], subscriptions__isnull=True).delete()


class Migration(migrations.Migration):
    dependencies = [("billing", "0002_plans_budgets_usage")]

    operations = [migrations.RunPython(seed, unseed)]
