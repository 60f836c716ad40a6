"""The demo's experiment (``experiments.demo``): what ``make run`` shows on the results page of a fresh machine.

The demo catalog is loaded as ``demo_setup`` loads it; the clock is pinned, since the history is laid out
over the three weeks before it."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.db.models import Count, Sum

from audit.models import AuditEvent
from billing.models import DailyUsage, UsageRecord, UsageStatus
from billing.pricing import cost_for
from chat.management.commands.demo_setup import demo_catalog_load
from experiments.assignment import assignment_cache, assignment_unit, experiment_assign
from experiments.demo import (
    EXPERIMENT_NAME,
    experiments_demo_ensure,
    experiments_demo_install,
    experiments_demo_remove,
)
from experiments.models import AllocationStep, Experiment, ExperimentStatus, Feedback, Variant
from experiments.results import experiment_results
from prompts.models import BrandProfile, PromptLabel, PromptTemplate, PromptVersion
from providers.models import CatalogModel, Deployment

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 24, 15, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _demo_catalog():
    demo_catalog_load(east_url="http://127.0.0.1:28080", west_url="http://127.0.0.1:28082", environ={})
    assignment_cache.invalidate()
    with time_machine.travel(NOW, tick=False):
        yield
    assignment_cache.invalidate()


def counts() -> dict[str, int]:
    return {
        "experiments": Experiment.objects.count(),
        "variants": Variant.objects.count(),
        "steps": AllocationStep.objects.count(),
        "ledger": UsageRecord.objects.count(),
        "feedback": Feedback.objects.count(),
        "users": get_user_model().objects.count(),
        "brands": BrandProfile.objects.count(),
        "templates": PromptTemplate.objects.count(),
        "versions": PromptVersion.objects.count(),
        "labels": PromptLabel.objects.count(),
        "rollups": DailyUsage.objects.count(),
        "audit": AuditEvent.objects.count(),
    }


def test_install_on_an_empty_database_then_again_changes_nothing():
    first = experiments_demo_install()
    after_first = counts()
    ledger = dict(UsageRecord.objects.values_list("request_id", "cost"))

    again = experiments_demo_ensure()

    assert not again.seeded
    assert again.experiment.pk == first.pk
    assert counts() == after_first
    assert dict(UsageRecord.objects.values_list("request_id", "cost")) == ledger
    assert after_first["ledger"] >= 3_000 and after_first["feedback"] >= 1_000
    assert first.status == ExperimentStatus.RUNNING
    assert first.starts_at < NOW - timedelta(days=14)


def test_the_results_declare_west_the_winner_on_the_primary_metric():
    experiment = experiments_demo_install()

    results = experiment_results(experiment)

    assert results["experiment"]["primary_metric"] == "positive_rate"
    assert results["control"] == "east"
    assert results["winner"] == "west", results["winner_reason"]
    west = next(v for v in results["variants"] if v["name"] == "west")
    assert west["comparisons"]["positive_rate"]["verdict"] == "better"
    # A finished comparison on every figure the page draws: both arms served, rated and timed.
    for variant in results["variants"]:
        assert variant["requests"] > 1_000 and variant["users"] > 100
        assert variant["metrics"]["positive_rate"]["n"] > 500
        for metric in ("mean_score", "error_rate", "latency_ms", "ttft_ms", "cost", "cost_per_positive"):
            assert variant["metrics"][metric]["value"] is not None, metric
    rates = {v["name"]: v["metrics"]["positive_rate"] for v in results["variants"]}
    # The history was drawn at 0.50 and 0.62: each interval holds its true rate.
    assert rates["east"]["interval"][0] <= 0.50 <= rates["east"]["interval"][1]
    assert rates["west"]["interval"][0] <= 0.62 <= rates["west"]["interval"][1]


def test_every_seeded_row_is_in_the_variant_assignment_gives_its_user():
    """Honest history: each demo user is one unit, in one variant, the one the live pipeline would assign
    them today (the rollout only ever added users, so rows before it reached a user are outside it)."""
    experiment = experiments_demo_install()
    variants = {v.pk: v.name for v in experiment.variants.all()}
    rows = UsageRecord.objects.filter(user__username__startswith="ab-demo-")
    seen: dict[int, set[str | None]] = defaultdict(set)
    for user_id, variant_id in rows.values_list("user_id", "experiment_variant_id"):
        seen[user_id].add(variants.get(variant_id))
    assert len(seen) >= 300, "a few hundred distinct users"

    for user_id, arms in seen.items():
        assigned = async_to_sync(experiment_assign)(
            model_id=experiment.model_id, unit=assignment_unit(user_id=user_id, api_key_id=None)
        )
        assert assigned is not None, "at 50/50 everyone is in the experiment"
        assert arms - {None} <= {assigned.variant.name}, (user_id, arms)
    last_step = experiment.steps.order_by("-position").first()
    assert last_step.allocations == {"east": "50.00", "west": "50.00"}
    assert not rows.filter(created_at__gte=last_step.at, experiment_id__isnull=True).exists()
    assert rows.filter(created_at__lt=last_step.at, experiment_id__isnull=True).exists(), "the rollout shows"


def test_seeded_rows_are_priced_at_their_deployments_prices_and_rolled_up():
    experiments_demo_install()
    prices = {d.pk: d for d in Deployment.objects.filter(model__name="demo-gpt-4o-mini")}
    rows = list(UsageRecord.objects.all())

    for row in rows:
        assert row.cost == cost_for(
            model=prices[row.deployment_id],
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cached_tokens=row.cached_tokens,
        )
    assert {row.deployment.name for row in rows} == {"east", "west"}
    statuses = {row.status for row in rows}
    assert statuses == {UsageStatus.OK, UsageStatus.UPSTREAM_ERROR}
    assert all(row.ttft_ms is not None for row in rows if row.stream and row.status == UsageStatus.OK)
    assert all(row.created_at <= NOW for row in rows)
    ledger = UsageRecord.objects.aggregate(requests=Count("pk"), cost=Sum("cost"))
    rollup = DailyUsage.objects.aggregate(requests=Sum("requests"), cost=Sum("cost"))
    assert rollup["requests"] == ledger["requests"]
    assert abs(rollup["cost"] - ledger["cost"]) < Decimal("1e-9"), "SQLite sums decimals in floating point"


def test_feedback_is_by_the_requests_own_user_after_the_request():
    experiments_demo_install()
    requests = {row.request_id: row for row in UsageRecord.objects.all()}
    feedback = list(Feedback.objects.all())

    assert {row.metric for row in feedback} == {"thumbs", "score"}
    for row in feedback:
        request = requests[row.request_id]
        assert request.status == UsageStatus.OK
        assert row.user_id == request.user_id
        assert request.created_at <= row.created_at <= NOW
        assert row.value in ((1.0, -1.0) if row.metric == "thumbs" else (1.0, 2.0, 3.0, 4.0, 5.0))


def test_no_one_but_the_demo_users_spends_and_they_cannot_sign_in():
    experiments_demo_install()
    spenders = get_user_model().objects.filter(pk__in=UsageRecord.objects.values("user_id"))

    assert spenders.exists()
    assert all(user.username.startswith("ab-demo-") and not user.has_usable_password() for user in spenders)
    assert not spenders.filter(is_staff=True).exists()


def test_the_brand_and_templates_are_there_with_a_staging_version_of_the_ad_copy():
    experiments_demo_install()

    brand = BrandProfile.objects.get()
    assert brand.voice and brand.tone and brand.audience and brand.style_rules and brand.example_copy
    assert brand.words_to_avoid
    kinds = set(PromptTemplate.objects.values_list("kind", flat=True))
    assert {"social_post", "email", "ad_copy", "landing_page", "campaign_plan"} <= kinds
    ad = PromptTemplate.objects.filter(kind="ad_copy").order_by("slug").first()
    labels = {label.name: label.version for label in PromptLabel.objects.filter(template=ad)}
    assert labels["staging"].number > labels["production"].number
    system = {label: next(m["content"] for m in v.messages if m["role"] == "system") for label, v in labels.items()}
    assert system["staging"] != system["production"]


def test_reset_removes_the_history_and_seeds_the_same_amount_again():
    experiments_demo_install()
    before = counts()

    removed = experiments_demo_remove()
    assert removed == before["ledger"]
    assert not Experiment.objects.filter(name=EXPERIMENT_NAME).exists()
    assert not UsageRecord.objects.exists() and not Feedback.objects.exists() and not DailyUsage.objects.exists()
    experiments_demo_install()

    # New users, new buckets: as much history, though not row for row (errors, and so ratings, differ per arm).
    after = counts()
    same = ("experiments", "variants", "steps", "ledger", "users", "brands", "templates", "versions")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}
    assert abs(after["feedback"] - before["feedback"]) < 100


def test_a_model_with_another_running_experiment_gets_the_demo_as_an_unseeded_draft():
    """One running experiment per model: the demo does not fail, nor stop someone else's, when the model is
    taken; it never ran, so it has no history."""
    model = CatalogModel.objects.get(name="demo-gpt-4o-mini")
    other = Experiment.objects.create(name="theirs", model=model, status=ExperimentStatus.RUNNING)

    result = experiments_demo_ensure()

    assert result.experiment.status == ExperimentStatus.DRAFT
    assert not result.seeded and "theirs already runs on demo-gpt-4o-mini" in result.problem
    other.refresh_from_db()
    assert other.status == ExperimentStatus.RUNNING
    assert not UsageRecord.objects.exists() and not Feedback.objects.exists()
