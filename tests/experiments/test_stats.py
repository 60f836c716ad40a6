"""The statistics, by simulation with fixed seeds: the anytime-valid comparison finds a real winner and
almost never a false one however often it is looked at, and every interval covers the truth at its
nominal rate.

The simulations look at 200 experiments after every 100 samples per arm up to 10,000 at once, through
``mixture_test`` (the arrays behind ``compare``), so the file runs in seconds on one core."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments.stats import (
    DESIGN_SAMPLES,
    Comparison,
    SequentialTest,
    Summary,
    compare,
    confidence_half_width,
    finite_or_none,
    mean_interval,
    mixture_scale,
    mixture_test,
    quantile_ranks,
    ratio_of_means_interval,
    summary_of,
    summary_of_rate,
    wilson_interval,
)

EXPERIMENTS = 200
STEP = 100  # samples per arm between looks
LOOKS = 100  # up to 10,000 per arm
N = STEP * np.arange(1, LOOKS + 1)  # samples per arm at each look


def binomial_paths(rng: np.random.Generator, rate: float, experiments: int = EXPERIMENTS) -> np.ndarray:
    """Cumulative successes per arm at every look, shape (experiments, LOOKS)."""
    return rng.binomial(STEP, rate, size=(experiments, LOOKS)).cumsum(axis=1)


def rate_looks(control_rate: float, treatment_rate: float, *, seed: int, comparisons: int = 1, experiments=EXPERIMENTS):
    """The mSPRT at every look of every simulated experiment."""
    rng = np.random.default_rng(seed)
    control, treatment = (
        binomial_paths(rng, control_rate, experiments),
        binomial_paths(rng, treatment_rate, experiments),
    )
    return mixture_test(*rate_summaries(control, N), *rate_summaries(treatment, N), alpha=0.05, comparisons=comparisons)


def rate_summaries(successes: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``summary_of_rate`` over arrays: n, the rate and its sample variance."""
    mean = successes / n
    return n, mean, mean * (1 - mean) * n / (n - 1)


def first_verdicts(test) -> np.ndarray:
    """Per experiment: +1 (treatment declared better), −1 (worse) or 0 (never decided), read at the first
    look where the boundary is crossed, as someone who stops the experiment there would read it."""
    decided = test.decided
    first = decided.argmax(axis=1)
    sign = np.sign(test.difference[np.arange(decided.shape[0]), first])
    return np.where(decided.any(axis=1), sign, 0).astype(int)


def naive_z_verdicts(control_rate: float, treatment_rate: float, *, seed: int) -> np.ndarray:
    """A fixed-horizon two-proportion z-test at 5 % applied at every look: what peeking does to a test that
    is not anytime-valid. Kept to show that the simulation can tell a valid test from one that is not."""
    rng = np.random.default_rng(seed)
    control, treatment = binomial_paths(rng, control_rate), binomial_paths(rng, treatment_rate)
    pc, pt = control / N, treatment / N
    with np.errstate(all="ignore"):
        z = (pt - pc) / np.sqrt(pc * (1 - pc) / N + pt * (1 - pt) / N)
    crossed = np.abs(np.nan_to_num(z)) >= scipy_stats.norm.ppf(0.975)
    return crossed.any(axis=1)


# --- acceptance: a real winner is found, a false one almost never --------------------------------------


@pytest.mark.parametrize("comparisons", [1, 3])
def test_a_true_060_vs_050_is_declared_the_winner_in_at_least_95_percent(comparisons):
    verdicts = first_verdicts(rate_looks(0.50, 0.60, seed=12, comparisons=comparisons))
    assert (verdicts == 1).mean() >= 0.95
    assert (verdicts == -1).sum() <= 2


def test_a_true_060_vs_050_is_found_as_worse_when_the_control_is_the_better_one():
    verdicts = first_verdicts(rate_looks(0.60, 0.50, seed=13))
    assert (verdicts == -1).mean() >= 0.95
    assert (verdicts == 1).sum() <= 2


@pytest.mark.parametrize(("rate", "seed"), [(0.5, 21), (0.1, 22)])
def test_equal_rates_checked_after_every_100_samples_declare_a_winner_in_at_most_5_percent(rate, seed):
    verdicts = first_verdicts(rate_looks(rate, rate, seed=seed))
    assert (verdicts != 0).mean() <= 0.05


def test_equal_rare_rates_looked_at_from_the_first_samples_declare_a_winner_in_at_most_5_percent():
    """The plug-in variance is weakest with few samples and rare events (0/10 has no variance): looks after
    every 10 samples per arm from the first, at a 2 % rate, still stay under 5 %."""
    rng = np.random.default_rng(24)
    n = 10 * np.arange(1, 1001)
    control, treatment = (rng.binomial(10, 0.02, size=(EXPERIMENTS, 1000)).cumsum(axis=1) for _ in range(2))
    test = mixture_test(*rate_summaries(control, n), *rate_summaries(treatment, n))
    assert (first_verdicts(test) != 0).mean() <= 0.05


def test_the_same_peeking_makes_a_fixed_horizon_z_test_declare_false_winners():
    """The null simulation is able to fail: a test that is not anytime-valid, looked at 100 times, declares
    a winner between equal arms far more often than its 5 %."""
    assert naive_z_verdicts(0.5, 0.5, seed=21).mean() > 0.15


def test_the_compare_api_agrees_with_the_simulation_arrays():
    """The simulations read ``mixture_test`` directly; ``compare`` must say the same thing look by look."""
    test = rate_looks(0.50, 0.56, seed=5, experiments=3)
    rng_summaries = np.random.default_rng(5)
    control, treatment = binomial_paths(rng_summaries, 0.50, 3), binomial_paths(rng_summaries, 0.56, 3)
    for row in range(3):
        for look in (0, 9, 49, 99):
            n = int(N[look])
            result = compare(summary_of_rate(int(control[row, look]), n), summary_of_rate(int(treatment[row, look]), n))
            assert result.difference == pytest.approx(test.difference[row, look])
            assert result.interval == pytest.approx((test.low[row, look], test.high[row, look]))
            assert result.p_value == pytest.approx(test.p_value[row, look])
            assert (result.verdict != "unknown") == bool(test.decided[row, look])


def test_the_mean_of_continuous_scores_is_compared_the_same_way():
    """Scores (normal, sd 1): a difference of 0.2 sd is found, none is found between equal arms."""
    rng = np.random.default_rng(31)
    experiments, step, looks = 200, 50, 40  # up to 2,000 per arm
    n = step * np.arange(1, looks + 1)

    def arm(mean):
        values = rng.normal(mean, 1.0, size=(experiments, step * looks))
        sums = values.cumsum(axis=1)[:, n - 1]
        squares = (values * values).cumsum(axis=1)[:, n - 1]
        means = sums / n
        return n, means, (squares - n * means * means) / (n - 1)

    control, equal, better = arm(3.0), arm(3.0), arm(3.2)
    assert (first_verdicts(mixture_test(*control, *better)) == 1).mean() >= 0.95
    assert (first_verdicts(mixture_test(*control, *equal)) != 0).mean() <= 0.05


def test_equal_skewed_latencies_looked_at_every_10_samples_declare_a_winner_in_at_most_5_percent():
    """Latencies are log-normal (a long right tail), where the plug-in normal approximation is at its worst."""
    rng = np.random.default_rng(33)
    step, looks = 10, 200  # up to 2,000 per arm
    n = step * np.arange(1, looks + 1)

    def arm():
        values = rng.lognormal(6.0, 1.0, size=(EXPERIMENTS, step * looks))
        means = values.cumsum(axis=1)[:, n - 1] / n
        squares = (values * values).cumsum(axis=1)[:, n - 1]
        return n, means, (squares - n * means * means) / (n - 1)

    assert (first_verdicts(mixture_test(*arm(), *arm())) != 0).mean() <= 0.05


# --- the confidence sequence ---------------------------------------------------------------------------


@pytest.mark.parametrize(("control_rate", "treatment_rate"), [(0.5, 0.6), (0.1, 0.1)])
def test_the_confidence_sequence_covers_the_true_difference_at_every_look_at_once(control_rate, treatment_rate):
    test = rate_looks(control_rate, treatment_rate, seed=41, experiments=1000)
    truth = treatment_rate - control_rate
    covered_throughout = ((test.low <= truth) & (truth <= test.high)).all(axis=1)
    assert covered_throughout.mean() >= 0.95


def test_the_confidence_sequence_is_wider_than_a_fixed_horizon_interval_and_grows_only_slowly():
    """The price of peeking: wider than the z interval at every n, but only by a slowly growing factor."""
    per_observation = 0.5
    tau2 = mixture_scale(0.05) * per_observation
    variance = per_observation / N
    ratio = confidence_half_width(variance, tau2, 0.05) / (scipy_stats.norm.ppf(0.975) * np.sqrt(variance))
    assert (ratio > 1).all()
    assert ratio[-1] < 2.2  # at 10,000 per arm


def test_the_default_mixture_makes_the_boundary_tightest_at_the_design_size():
    n = np.arange(100, 20_001, 100)
    variance = 0.5 / n
    z_boundary = confidence_half_width(variance, mixture_scale(0.05) * 0.5, 0.05) / np.sqrt(variance)
    assert abs(int(n[z_boundary.argmin()]) - DESIGN_SAMPLES) <= 100


# --- Bonferroni ----------------------------------------------------------------------------------------


def test_with_three_variants_each_comparison_is_held_to_alpha_over_three():
    control, treatment = summary_of_rate(500, 1000), summary_of_rate(560, 1000)
    three = compare(control, treatment, alpha=0.05, comparisons=3)
    alone_at_a_third = compare(control, treatment, alpha=0.05 / 3)
    assert three.interval == pytest.approx(alone_at_a_third.interval)
    assert three.verdict == alone_at_a_third.verdict
    assert three.p_value == pytest.approx(min(1.0, 3 * alone_at_a_third.p_value))
    assert compare(control, treatment, alpha=0.05).interval[0] > three.interval[0]


def test_a_difference_decided_alone_is_not_yet_decided_among_three():
    control, treatment = summary_of_rate(500, 1000), summary_of_rate(572, 1000)
    alone = compare(control, treatment)
    among_three = compare(control, treatment, comparisons=3)
    assert alone.verdict == "better" and alone.p_value <= 0.05
    assert among_three.verdict == "unknown" and 0.05 < among_three.p_value
    assert among_three.samples_needed is not None


# --- verdicts, p-values, samples needed -----------------------------------------------------------------


def test_for_a_lower_is_better_metric_a_lower_treatment_is_better():
    rng = np.random.default_rng(51)
    control, faster = summary_of(rng.normal(800, 100, 2000)), summary_of(rng.normal(760, 100, 2000))
    assert compare(control, faster, higher_is_better=False).verdict == "better"
    assert compare(faster, control, higher_is_better=False).verdict == "worse"
    assert compare(control, faster, higher_is_better=True).verdict == "worse"


def test_samples_needed_is_where_the_boundary_would_be_crossed_if_the_effect_held():
    control, treatment = summary_of_rate(50, 100), summary_of_rate(57, 100)
    now = compare(control, treatment)
    assert now.verdict == "unknown"
    assert now.samples_needed is not None and now.samples_needed > 0
    at = 100 + now.samples_needed

    def at_size(summary: Summary, n: int) -> Summary:
        return Summary(n=n, mean=summary.mean, variance=summary.variance)

    assert compare(at_size(control, at), at_size(treatment, at)).verdict == "better"
    assert compare(at_size(control, at - 2), at_size(treatment, at - 2)).verdict == "unknown"


def test_samples_needed_is_none_once_decided_and_when_there_is_no_effect():
    assert compare(summary_of_rate(500, 1000), summary_of_rate(620, 1000)).samples_needed is None
    no_effect = compare(summary_of_rate(500, 1000), summary_of_rate(500, 1000))
    assert no_effect.verdict == "unknown" and no_effect.samples_needed is None
    tiny = compare(summary_of_rate(500_000, 1_000_000), summary_of_rate(500_001, 1_000_000))
    assert tiny.samples_needed is None  # beyond the cap: the effect is ~0


def test_an_explicit_tau_is_in_the_metrics_units():
    control, treatment = summary_of_rate(500, 1000), summary_of_rate(600, 1000)
    assert compare(control, treatment, tau=0.05).verdict == "better"
    # a mixture far too wide for the effect spends its power on effects that do not occur
    assert compare(control, treatment, tau=1000.0).verdict == "unknown"


def test_a_sequential_test_keeps_the_running_minimum_p_value_and_its_verdict():
    rng = np.random.default_rng(61)
    control, treatment = binomial_paths(rng, 0.5, 1)[0], binomial_paths(rng, 0.6, 1)[0]
    sequential = SequentialTest()
    p_values, verdicts = [], []
    for look in range(LOOKS):
        n = int(N[look])
        result = sequential.look(summary_of_rate(int(control[look]), n), summary_of_rate(int(treatment[look]), n))
        p_values.append(result.p_value)
        verdicts.append(result.verdict)
        assert result.interval[0] <= result.interval[1]
    assert all(later <= earlier for earlier, later in itertools.pairwise(p_values))
    first = verdicts.index("better")
    assert set(verdicts[first:]) == {"better"}
    assert p_values[first] <= 0.05


# --- intervals cover at their nominal rate -------------------------------------------------------------

DRAWS = 2000


def coverage_floor(draws: int, confidence: float = 0.95) -> float:
    """The least coverage a correct 95 % interval shows over ``draws`` draws, but for one time in ~1,000."""
    return confidence - 3.1 * math.sqrt(confidence * (1 - confidence) / draws)


def coverage_ceiling(draws: int, confidence: float = 0.95) -> float:
    return confidence + 3.1 * math.sqrt(confidence * (1 - confidence) / draws)


@pytest.mark.parametrize("rate", [0.1, 0.5])
@pytest.mark.parametrize("n", [50, 500])
def test_wilson_covers_the_true_rate_at_its_nominal_rate(rate, n):
    """Within the binomial tolerance of 2,000 draws, plus the lattice's: a count is an integer, so a rate
    interval's exact coverage swings around its nominal level with p and n (Wilson's, computed exactly:
    97.0 % at p = 0.1, n = 50; 93.5 % at p = 0.5, n = 50; 95.6 % and 94.6 % at n = 500). The Wald interval
    fails this (88 % at p = 0.1, n = 50)."""
    lattice = 0.025 if n < 100 else 0.01
    rng = np.random.default_rng(int(rate * 10) * 1000 + n)
    covered = 0
    for successes in rng.binomial(n, rate, DRAWS):
        low, high = wilson_interval(int(successes), n)
        covered += low <= rate <= high
    assert coverage_floor(DRAWS) - lattice <= covered / DRAWS <= coverage_ceiling(DRAWS) + lattice


def test_wilson_is_scipys_wilson():
    for successes, n in [(0, 10), (3, 10), (10, 10), (37, 500)]:
        expected = scipy_stats.binomtest(successes, n).proportion_ci(method="wilson")
        assert wilson_interval(successes, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


@pytest.mark.parametrize(
    ("draw", "truth", "n"),
    [
        (lambda rng, size: rng.normal(4.0, 2.0, size), 4.0, 10),
        (lambda rng, size: rng.normal(4.0, 2.0, size), 4.0, 200),
        (lambda rng, size: rng.exponential(300.0, size), 300.0, 400),  # latencies: skewed
    ],
)
def test_the_t_interval_covers_the_true_mean_at_its_nominal_rate(draw, truth, n):
    samples = draw(np.random.default_rng(n), (DRAWS, n))
    covered = sum(low <= truth <= high for low, high in (mean_interval(summary_of(row)) for row in samples))
    assert coverage_floor(DRAWS) <= covered / DRAWS <= coverage_ceiling(DRAWS)


@pytest.mark.parametrize(("q", "n"), [(0.5, 150), (0.95, 400)])
def test_the_quantile_interval_covers_the_true_percentile_at_its_nominal_rate(q, n):
    """Latency percentiles: the order statistics at ``quantile_ranks``' ranks cover the exponential's true
    quantile at least at the nominal rate (the binomial interval is exact or a little conservative)."""
    truth = -300.0 * math.log(1 - q)  # the q quantile of an exponential with mean 300
    samples = np.sort(np.random.default_rng(71).exponential(300.0, (DRAWS, n)), axis=1)
    rank, low, high = quantile_ranks(n, q)
    assert low <= rank <= high
    covered = np.mean((samples[:, low - 1] <= truth) & (truth <= samples[:, high - 1]))
    assert coverage_floor(DRAWS) <= covered <= 0.99


def test_the_ratio_interval_covers_the_true_cost_per_positive_answer():
    """Independent price and rating: the log-scale delta method covers at its nominal rate."""
    rng = np.random.default_rng(81)
    n = 400
    cost = rng.gamma(2.0, 0.003, (DRAWS, n))
    positive = (rng.random((DRAWS, n)) < 0.45).astype(float)
    truth = 0.006 / 0.45
    intervals = [ratio_of_means_interval(summary_of(c), summary_of(p)) for c, p in zip(cost, positive, strict=True)]
    covered = sum(low <= truth <= high for _, low, high in intervals)
    assert coverage_floor(DRAWS) <= covered / DRAWS <= coverage_ceiling(DRAWS)


def test_the_ratio_interval_is_conservative_when_price_and_praise_go_together():
    """Longer answers cost more and are liked more often, as in the ledger: leaving out the covariance makes
    the interval wider, never too narrow."""
    rng = np.random.default_rng(82)
    n = 400
    long_answer = rng.random((DRAWS, n)) < 0.5
    cost = rng.gamma(2.0, np.where(long_answer, 0.004, 0.002))
    positive = (rng.random((DRAWS, n)) < np.where(long_answer, 0.6, 0.3)).astype(float)
    truth = (0.5 * 0.008 + 0.5 * 0.004) / (0.5 * 0.6 + 0.5 * 0.3)
    intervals = [ratio_of_means_interval(summary_of(c), summary_of(p)) for c, p in zip(cost, positive, strict=True)]
    assert sum(low <= truth <= high for _, low, high in intervals) / DRAWS >= coverage_floor(DRAWS)


# --- edge cases: nothing a JSON response cannot carry ----------------------------------------------------


def as_json(comparison: Comparison) -> str:
    return json.dumps(
        {
            "verdict": comparison.verdict,
            "difference": comparison.difference,
            "interval": comparison.interval,
            "p_value": comparison.p_value,
            "samples_needed": comparison.samples_needed,
        },
        allow_nan=False,
    )


@pytest.mark.parametrize(
    ("control", "treatment"),
    [
        (summary_of_rate(0, 0), summary_of_rate(0, 0)),  # no data yet
        (summary_of_rate(0, 0), summary_of_rate(7, 20)),  # one arm empty
        (summary_of_rate(1, 1), summary_of_rate(0, 1)),  # one each
        (summary_of_rate(20, 20), summary_of_rate(20, 20)),  # all successes
        (summary_of_rate(0, 50), summary_of_rate(0, 50)),  # no success
        (summary_of([2.5] * 30), summary_of([2.5] * 30)),  # zero variance, equal
        (summary_of([]), summary_of([1.0])),
    ],
)
def test_edge_cases_answer_unknown_with_numbers_json_can_carry(control, treatment):
    result = compare(control, treatment)
    assert result.verdict == "unknown"
    assert result.p_value == 1.0 or result.p_value > 0.05
    as_json(result)


def test_all_successes_against_none_is_evidence_not_a_division_by_zero():
    """Both arms have zero variance: the variance pooled under the null stands in."""
    result = compare(summary_of_rate(0, 60), summary_of_rate(60, 60))
    assert result.verdict == "better"
    as_json(result)
    assert compare(summary_of([1.0] * 60), summary_of([3.0] * 60), higher_is_better=False).verdict == "worse"


def test_summaries_of_nothing_and_of_one_value():
    assert summary_of([]) == Summary(n=0, mean=0.0, variance=0.0)
    assert summary_of([4.0]) == Summary(n=1, mean=4.0, variance=0.0)
    assert summary_of_rate(0, 0) == Summary(n=0, mean=0.0, variance=0.0)
    assert summary_of_rate(10, 10) == Summary(n=10, mean=1.0, variance=0.0)
    assert summary_of_rate(3, 10).variance == pytest.approx(np.var([1] * 3 + [0] * 7, ddof=1))
    with pytest.raises(ValueError):
        summary_of_rate(11, 10)


def test_single_arm_intervals_at_the_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(20, 20)
    assert 0.8 < low < 1.0 and high == pytest.approx(1.0)
    assert wilson_interval(0, 20)[0] == 0.0
    assert all(math.isnan(x) for x in mean_interval(summary_of([5.0])))
    assert mean_interval(summary_of([5.0, 5.0, 5.0])) == (5.0, 5.0)
    assert quantile_ranks(1, 0.95) == (1, 1, 1)
    assert all(math.isnan(x) for x in ratio_of_means_interval(summary_of([0.01, 0.02]), summary_of([0, 0])))
    assert [finite_or_none(x) for x in (*mean_interval(summary_of([5.0])), 0.5, math.inf)] == [None, None, 0.5, None]


def test_invalid_arguments_are_refused():
    control, treatment = summary_of_rate(5, 10), summary_of_rate(6, 10)
    for kwargs in ({"alpha": 0.0}, {"alpha": 1.0}, {"comparisons": 0}, {"tau": 0.0}):
        with pytest.raises(ValueError):
            compare(control, treatment, **kwargs)
