"""Results agree with the ledger and feedback rows they are computed from, figure by figure; verdicts on
clear and on null data; what the JSON says about an experiment without data.

The expected figures are computed here from the rows the test wrote, the plain way (Python's
``statistics``, sorting for percentiles), and the intervals from the same summaries through
``experiments.stats``: what is checked is that every figure is read off the right rows."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from scipy import stats as scipy_stats

from billing.models import ApiKey, DailyExperimentUsage, UsageRecord, UsageStatus
from billing.services.rollups import experiment_usage_fold
from experiments import stats
from experiments.models import Experiment, ExperimentStatus, Feedback, Metric, Variant
from experiments.results import experiment_results
from tests.factories import ModelFactory, UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DAY1 = datetime(2026, 11, 18, 9, 0, tzinfo=UTC)
DAY2 = datetime(2026, 11, 19, 23, 30, tzinfo=UTC)


def make_experiment(*, name: str = "tone", primary: str = Metric.POSITIVE_RATE, guardrails=(), variants=2):
    experiment = Experiment.objects.create(
        name=name,
        model=ModelFactory(name=f"{name}-model"),
        status=ExperimentStatus.RUNNING,
        primary_metric=primary,
        guardrail_metrics=list(guardrails),
    )
    made = [
        Variant.objects.create(
            experiment=experiment,
            name="control" if i == 0 else f"v{i}",
            is_control=i == 0,
            allocation=Decimal("50") if variants == 2 else Decimal("20"),
            position=i,
        )
        for i in range(variants)
    ]
    return experiment, made


_sequence = iter(range(10**9))


def row(experiment, variant, *, user=None, api_key=None, status=UsageStatus.OK, duration=100, ttft=None, **extra):
    fields = {
        "request_id": f"req-{next(_sequence):09d}",
        "user": user,
        "api_key": api_key,
        "endpoint": "rest",
        "status": status,
        "duration_ms": duration,
        "ttft_ms": ttft,
        "stream": ttft is not None,
        "cost": Decimal("0.0010000000"),
        "experiment_id": experiment.pk,
        "experiment_variant_id": variant.pk,
        "created_at": DAY1,
    }
    fields.update(extra)
    return UsageRecord(**fields)


def nearest_rank(values, q):
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def order_statistic_interval(values, q, confidence):
    ordered, n = sorted(values), len(values)
    low = int(max(1, scipy_stats.binom.ppf((1 - confidence) / 2, n, q)))
    high = int(min(n, scipy_stats.binom.ppf(1 - (1 - confidence) / 2, n, q) + 1))
    return [ordered[low - 1], ordered[high - 1]]


def money(value) -> str:
    return f"{Decimal(str(value)).quantize(Decimal('1E-10')):f}"


def fold_as(how: str) -> None:
    """Put the ledger's experiment rows in the daily rollup as the fold task would: none of them (before the
    first fold), all of them, or the first half (the rest written after the last fold, read raw)."""
    ids = sorted(UsageRecord.objects.values_list("pk", flat=True))
    if how == "all":
        experiment_usage_fold()
    elif how == "part":
        experiment_usage_fold(through_id=ids[len(ids) // 2])


@pytest.mark.parametrize("folded", ["none", "part", "all"])
def test_every_figure_agrees_with_the_ledger_and_feedback_rows(folded):
    """Whether the rows are read raw, from the experiments' daily rollup, or partly from each."""
    experiment, (control, treatment) = make_experiment(guardrails=[Metric.ERROR_RATE])
    alice, bob, carol = UserFactory(username="alice"), UserFactory(username="bob"), UserFactory(username="carol")
    key_only = ApiKey.objects.create(user=carol, name="app", prefix="llmhub_t1", secret_hash="h1")
    rows = []
    # control: 10 ok rows of known durations, 4 of them streamed with a ttft; 2 upstream errors; 1 rejected,
    # 1 client_disconnected (neither counts in the error rate; the disconnect costs); a key-only caller.
    durations = [100, 200, 300, 400, 500, 600, 700, 800, 900, 5000]
    ttfts = {0: 50, 1: 70, 2: 90, 3: 400}
    for i, duration in enumerate(durations):
        rows.append(
            row(
                experiment,
                control,
                user=alice if i % 2 else bob,
                duration=duration,
                ttft=ttfts.get(i),
                cost=Decimal("0.001") * (i + 1),
                created_at=DAY1 if i < 6 else DAY2,
            )
        )
    rows.append(row(experiment, control, user=alice, status=UsageStatus.UPSTREAM_ERROR, duration=30000))
    # Refused as invalid (a 400, moderation): not the provider's fault, still an error of the variant.
    rows.append(row(experiment, control, api_key=key_only, status=UsageStatus.INVALID, duration=10))
    rows.append(row(experiment, control, user=bob, status=UsageStatus.REJECTED, cost=Decimal("0")))
    rows.append(row(experiment, control, user=bob, status=UsageStatus.CLIENT_DISCONNECTED, cost=Decimal("0.0005")))
    # a user's own key: cost counts nothing against the platform, user_key_cost is the price
    rows.append(row(experiment, control, user=carol, cost=Decimal("0"), user_key_cost=Decimal("0.02"), duration=150))
    # treatment: 6 ok rows, one error
    for i in range(6):
        rows.append(row(experiment, treatment, user=carol, duration=50 * (i + 1), cost=Decimal("0.002")))
    rows.append(row(experiment, treatment, user=carol, status=UsageStatus.UPSTREAM_ERROR))
    # another experiment's row and a row outside any experiment: not counted
    other, (other_control, _) = make_experiment(name="other")
    rows.append(row(other, other_control, user=alice))
    rows.append(UsageRecord(request_id="req-plain", user=alice, endpoint="rest", status="ok", created_at=DAY1))
    UsageRecord.objects.bulk_create(rows)

    control_ok = [r for r in rows if r.experiment_variant_id == control.pk and r.status == "ok"]
    # feedback on control: thumbs on 8 requests (5 up), scores on 3; one thumbs on a rejected row counts
    thumbs = [1, 1, -1, 1, -1, 1, 1, -1]
    for r, value in zip(control_ok, thumbs, strict=False):
        Feedback.objects.create(request_id=r.request_id, user=r.user, metric="thumbs", value=value)
    for r, value in zip(control_ok[:3], [4.0, 5.0, 2.5], strict=True):
        Feedback.objects.create(request_id=r.request_id, user=r.user, metric="score", value=value)
    treatment_ok = [r for r in rows if r.experiment_variant_id == treatment.pk and r.status == "ok"]
    for r in treatment_ok[:4]:
        Feedback.objects.create(request_id=r.request_id, user=r.user, metric="thumbs", value=1)
    # a named score, reported apart from the unnamed "score"
    for r, value in zip(control_ok[:2], [3.0, 4.0], strict=True):
        Feedback.objects.create(request_id=r.request_id, user=r.user, metric="helpfulness", value=value)
    # feedback on a request outside the experiment is not counted
    Feedback.objects.create(request_id="req-plain", user=alice, metric="thumbs", value=-1)
    fold_as(folded)
    assert DailyExperimentUsage.objects.exists() is (folded != "none")

    with time_machine.travel(NOW, tick=False):
        results = experiment_results(experiment)

    confidence = 0.95
    assert results["generated_at"] == "2026-11-20T12:00:00Z"
    assert results["confidence"] == pytest.approx(confidence)
    assert results["control"] == "control"
    assert [v["name"] for v in results["variants"]] == ["control", "v1"]
    c, t = results["variants"]

    assert c["requests"] == 15
    assert c["statuses"] == {"ok": 11, "upstream_error": 1, "invalid": 1, "rejected": 1, "client_disconnected": 1}
    assert c["users"] == 4  # alice, bob, carol, and the key of a row without a user
    assert t["requests"] == 7 and t["users"] == 1

    m = c["metrics"]
    assert m["positive_rate"]["n"] == 8 and m["positive_rate"]["successes"] == 5
    assert m["positive_rate"]["value"] == pytest.approx(5 / 8)
    assert m["positive_rate"]["interval"] == pytest.approx(list(stats.wilson_interval(5, 8, confidence)))

    scores = [4.0, 5.0, 2.5]
    assert m["mean_score"]["n"] == 3
    assert m["mean_score"]["value"] == pytest.approx(statistics.mean(scores))
    expected = stats.mean_interval(stats.summary_of(scores), confidence)
    assert m["mean_score"]["interval"] == pytest.approx(list(expected))

    assert m["error_rate"]["n"] == 13 and m["error_rate"]["successes"] == 2  # 11 ok + 2 errors
    assert m["error_rate"]["value"] == pytest.approx(2 / 13)
    assert m["error_rate"]["interval"] == pytest.approx(list(stats.wilson_interval(2, 13, confidence)))

    latencies = [*durations, 150]
    assert m["latency_ms"]["n"] == 11
    assert m["latency_ms"]["value"] == pytest.approx(statistics.mean(latencies))
    expected = stats.mean_interval(stats.summary_of(latencies), confidence)
    assert m["latency_ms"]["interval"] == pytest.approx(list(expected))
    assert m["latency_ms"]["p50"] == nearest_rank(latencies, 0.5) == 500
    assert m["latency_ms"]["p95"] == nearest_rank(latencies, 0.95) == 5000
    assert m["latency_ms"]["p50_interval"] == order_statistic_interval(latencies, 0.5, confidence)
    assert m["latency_ms"]["p95_interval"] == order_statistic_interval(latencies, 0.95, confidence)

    first_tokens = [50, 70, 90, 400]
    assert m["ttft_ms"]["n"] == 4
    assert m["ttft_ms"]["value"] == pytest.approx(statistics.mean(first_tokens))
    assert m["ttft_ms"]["p50"] == 70
    assert m["ttft_ms"]["p50_interval"] == order_statistic_interval(first_tokens, 0.5, confidence)

    # every row but the rejected one; the own-key row at its price
    prices = [0.001 * (i + 1) for i in range(10)] + [0.001, 0.001, 0.0005, 0.02]
    assert m["cost"]["n"] == 14
    assert m["cost"]["total"] == money(sum(Decimal(str(p)) for p in prices))
    assert Decimal(m["cost"]["value"]) == pytest.approx(Decimal(str(statistics.mean(prices))), abs=Decimal("1E-10"))
    low, high = stats.mean_interval(stats.summary_of(prices), confidence)
    assert [float(x) for x in m["cost"]["interval"]] == pytest.approx([low, high], abs=1e-9)

    ratio = statistics.mean(prices) / (5 / 8)
    assert float(m["cost_per_positive"]["value"]) == pytest.approx(ratio, abs=1e-9)
    assert m["cost_per_positive"]["n"] == 5
    low, high = (float(x) for x in m["cost_per_positive"]["interval"])
    assert low < ratio < high

    assert c["scores"]["helpfulness"]["value"] == pytest.approx(3.5)
    assert c["scores"]["helpfulness"]["n"] == 2
    expected = stats.mean_interval(stats.summary_of([3.0, 4.0]), confidence)
    assert c["scores"]["helpfulness"]["interval"] == pytest.approx(list(expected))
    assert t["scores"] == {}

    tm = t["metrics"]
    assert tm["positive_rate"]["value"] == 1.0 and tm["positive_rate"]["n"] == 4
    assert tm["mean_score"]["value"] is None and tm["mean_score"]["n"] == 0
    assert tm["error_rate"]["value"] == pytest.approx(1 / 7)
    assert tm["ttft_ms"]["value"] is None and tm["ttft_ms"]["p50"] is None
    assert tm["latency_ms"]["p50"] == 150

    # comparisons: the treatment against the control, none for the control; no score on one side: none
    assert c["comparisons"] == {}
    assert "mean_score" not in t["comparisons"]
    family = 2  # one treatment x (the primary + one guardrail)
    for metric, (ctrl, treat) in {
        "positive_rate": (stats.summary_of_rate(5, 8), stats.summary_of_rate(4, 4)),
        "error_rate": (stats.summary_of_rate(2, 13), stats.summary_of_rate(1, 7)),
        "latency_ms": (stats.summary_of(latencies), stats.summary_of([50, 100, 150, 200, 250, 300])),
    }.items():
        expected = stats.compare(
            ctrl, treat, alpha=0.05, comparisons=family, higher_is_better=metric == "positive_rate"
        )
        found = t["comparisons"][metric]
        assert found["verdict"] == expected.verdict
        assert found["difference"] == pytest.approx(expected.difference)
        assert found["interval"] == pytest.approx(list(expected.interval))
        assert found["p_value"] == pytest.approx(expected.p_value)
        assert found["samples_needed"] == expected.samples_needed
    assert results["winner"] is None  # too few samples for a verdict

    # per UTC day of the request: control's rows on day 1 (6 ok + 4 others) and day 2 (4 ok)
    assert results["series"]["days"] == ["2026-11-18", "2026-11-19"]
    series = {s["name"]: s for s in results["series"]["variants"]}
    assert series["control"]["requests"] == [11, 4]
    assert series["v1"]["requests"] == [7, 0]
    # thumbs of control on day 1: rows 0-5 (+,+,-,+,-,+), day 2: rows 6-7 (+,-)
    assert series["control"]["rated"] == [6, 2]
    assert series["control"]["positive_rate"] == [pytest.approx(4 / 6), pytest.approx(1 / 2)]
    assert series["v1"]["positive_rate"] == [1.0, None]


def test_results_of_an_experiment_without_rows_are_empty_not_errors():
    experiment, _ = make_experiment()
    results = experiment_results(experiment)
    assert results["winner"] is None
    assert results["series"] == {
        "days": [],
        "variants": [
            {"name": "control", "requests": [], "rated": [], "positive_rate": []},
            {"name": "v1", "requests": [], "rated": [], "positive_rate": []},
        ],
    }
    for variant in results["variants"]:
        assert variant["requests"] == 0 and variant["users"] == 0
        assert all(figure["value"] is None for figure in variant["metrics"].values())
        assert variant["comparisons"] == {}


def rated_rows(experiment, variant, *, n: int, positives: int, cost=Decimal("0.001")):
    """``n`` ok rows of ``variant``, each rated, the first ``positives`` up."""
    rows = [row(experiment, variant, duration=100 + i % 50, cost=cost) for i in range(n)]
    UsageRecord.objects.bulk_create(rows)
    Feedback.objects.bulk_create(
        Feedback(request_id=r.request_id, metric="thumbs", value=1 if i < positives else -1) for i, r in enumerate(rows)
    )


def test_a_clear_difference_is_declared_and_names_the_winner():
    experiment, (control, treatment) = make_experiment(guardrails=[Metric.ERROR_RATE])
    rated_rows(experiment, control, n=600, positives=240)  # 0.40
    rated_rows(experiment, treatment, n=600, positives=420)  # 0.70
    results = experiment_results(experiment, now=NOW)
    comparison = results["variants"][1]["comparisons"]["positive_rate"]
    assert comparison["verdict"] == "better"
    assert comparison["samples_needed"] is None
    assert comparison["interval"][0] > 0
    assert comparison["difference"] == pytest.approx(0.30)
    assert results["winner"] == "v1"
    assert "mSPRT" in results["method"] and "Johari" in results["method"]


def test_a_clear_loss_makes_the_control_the_winner():
    experiment, (control, treatment) = make_experiment()
    rated_rows(experiment, control, n=600, positives=420)
    rated_rows(experiment, treatment, n=600, positives=240)
    results = experiment_results(experiment, now=NOW)
    assert results["variants"][1]["comparisons"]["positive_rate"]["verdict"] == "worse"
    assert results["winner"] == "control"


def test_a_guardrail_that_gets_worse_withholds_the_win():
    experiment, (control, treatment) = make_experiment(guardrails=[Metric.COST])
    rated_rows(experiment, control, n=600, positives=240, cost=Decimal("0.001"))
    rated_rows(experiment, treatment, n=300, positives=210, cost=Decimal("0.001"))
    rated_rows(experiment, treatment, n=300, positives=210, cost=Decimal("0.003"))
    results = experiment_results(experiment, now=NOW)
    comparisons = results["variants"][1]["comparisons"]
    assert comparisons["positive_rate"]["verdict"] == "better"
    assert comparisons["cost"]["verdict"] == "worse"
    assert comparisons["cost"]["difference"] == "0.0010000000"
    assert results["winner"] is None


def test_equal_variants_get_no_verdict_and_a_number_of_samples_still_needed():
    experiment, (control, treatment) = make_experiment()
    rated_rows(experiment, control, n=400, positives=200)
    rated_rows(experiment, treatment, n=400, positives=206)
    results = experiment_results(experiment, now=NOW)
    comparison = results["variants"][1]["comparisons"]["positive_rate"]
    assert comparison["verdict"] == "unknown"
    assert comparison["samples_needed"] > 0
    assert comparison["interval"][0] < 0 < comparison["interval"][1]
    assert results["winner"] is None


@pytest.mark.parametrize("folded", ["none", "all"])
def test_the_number_of_queries_does_not_grow_with_the_ledger(folded):
    """Everything is aggregated in the database: 2,000 rows per variant take the queries 10 do."""

    def queries_for(n: int) -> int:
        experiment, (control, treatment) = make_experiment(name=f"size-{n}")
        for variant in (control, treatment):
            rated_rows(experiment, variant, n=n, positives=n // 2)
        UsageRecord.objects.filter(experiment_id=experiment.pk).update(stream=True, ttft_ms=40)
        fold_as(folded)
        with CaptureQueriesContext(connection) as captured:
            results = experiment_results(experiment, now=NOW)
        assert results["variants"][0]["requests"] == n
        assert results["variants"][0]["metrics"]["ttft_ms"]["p50"] == 40
        return len(captured.captured_queries)

    assert queries_for(10) == queries_for(2000)


def test_money_is_a_plain_decimal_string_even_when_tiny_or_free():
    experiment, (control, treatment) = make_experiment()
    rated_rows(experiment, control, n=20, positives=10, cost=Decimal("0.0000001"))
    rated_rows(experiment, treatment, n=20, positives=10, cost=Decimal("0"))
    c, t = experiment_results(experiment, now=NOW)["variants"]
    assert c["metrics"]["cost"]["value"] == "0.0000001000"
    assert c["metrics"]["cost"]["total"] == "0.0000020000"
    assert c["metrics"]["cost_per_positive"]["value"] == "0.0000002000"
    assert t["metrics"]["cost"]["value"] == "0.0000000000"
    assert t["metrics"]["cost_per_positive"]["value"] == "0.0000000000"
    assert t["metrics"]["cost_per_positive"]["interval"] == ["0.0000000000", "0.0000000000"]
    assert t["comparisons"]["cost"]["difference"] == "-0.0000001000"


def test_a_status_the_code_no_longer_knows_is_still_counted():
    """A row whose status the code no longer knows (written by an older version) is counted under its own,
    from the raw rows as from the rollup."""
    experiment, (control, _) = make_experiment()
    UsageRecord.objects.bulk_create(
        [row(experiment, control), row(experiment, control, status=UsageStatus.REJECTED), row(experiment, control)]
    )
    UsageRecord.objects.filter(status=UsageStatus.REJECTED).update(status="retired_status")
    experiment_usage_fold(through_id=min(UsageRecord.objects.values_list("pk", flat=True)))  # one from the rollup
    UsageRecord.objects.bulk_create([row(experiment, control, status="retired_status")])

    results = experiment_results(experiment, now=NOW)

    assert results["variants"][0]["requests"] == 4
    assert results["variants"][0]["statuses"] == {"ok": 2, "retired_status": 2}


def test_feedback_on_another_experiments_request_or_on_no_row_counts_nowhere():
    experiment, (control, treatment) = make_experiment()
    other, (other_control, _) = make_experiment(name="other")
    mine = row(experiment, control)
    theirs = row(other, other_control)
    UsageRecord.objects.bulk_create([mine, theirs, row(experiment, treatment)])
    Feedback.objects.bulk_create(
        [
            Feedback(request_id=mine.request_id, metric="thumbs", value=1),
            Feedback(request_id=theirs.request_id, metric="thumbs", value=-1),
            Feedback(request_id="req-never-written", metric="thumbs", value=-1),
        ]
    )

    results = experiment_results(experiment, now=NOW)

    positive = {v["name"]: v["metrics"]["positive_rate"] for v in results["variants"]}
    assert (positive["control"]["n"], positive["control"]["successes"]) == (1, 1)
    assert positive["v1"]["n"] == 0
    assert results["series"]["variants"][0]["rated"] == [1]
    assert results["series"]["variants"][1]["rated"] == [0]


def test_ratings_of_rejected_requests_are_no_verdict_on_the_variant():
    # A request the gateway refused (budget, rate limit, moderation) got no answer from the variant: like the
    # error rate, the feedback figures leave it out.
    experiment, (control, treatment) = make_experiment()
    rated_rows(experiment, control, n=10, positives=5)
    rated_rows(experiment, treatment, n=10, positives=5)
    rejected = [row(experiment, treatment, status=UsageStatus.REJECTED, cost=Decimal(0)) for _ in range(10)]
    UsageRecord.objects.bulk_create(rejected)
    Feedback.objects.bulk_create(Feedback(request_id=r.request_id, metric="thumbs", value=-1) for r in rejected)
    Feedback.objects.bulk_create(Feedback(request_id=r.request_id, metric="score", value=0) for r in rejected)

    results = experiment_results(experiment, now=NOW)

    figures = results["variants"][1]["metrics"]
    assert figures["positive_rate"]["n"] == 10 and figures["positive_rate"]["value"] == pytest.approx(0.5)
    assert figures["mean_score"]["n"] == 0
    assert results["variants"][1]["requests"] == 20
