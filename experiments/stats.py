"""The numerics of experiment results: summaries, intervals, and anytime-valid comparisons.

Pure functions over numbers and arrays (numpy and scipy, no Django), so that they can be tested by
simulation with fixed seeds and read without the models that feed them.

**Comparisons** use the mixture sequential probability ratio test (mSPRT) with a normal mixture, of
Johari, Koomen, Pekelis & Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests",
Operations Research 70(3), 2022 (arXiv:1512.04922), on the difference of two means with the plug-in
variance. With ``d`` the observed difference (treatment − control), ``v`` its estimated variance
(``s_c²/n_c + s_t²/n_t``) and a normal mixture ``N(0, tau²)`` over the true difference, the statistic
against the null difference ``d0`` is the likelihood ratio of ``d`` integrated over that mixture::

    Lambda(d0) = sqrt(v / (v + tau²)) * exp(tau² (d − d0)² / (2 v (v + tau²)))

Under the null it is a nonnegative martingale with mean 1 (exactly so for normal observations with a
known variance, asymptotically with the plug-in one), so Ville's inequality bounds the chance that it
*ever* reaches ``1/alpha`` by ``alpha``. That is why looking at the results every hour does not inflate
the error: the verdict at any look, however the look was chosen (including "stop when it says better"),
is a stopped value of a process whose whole path stays under the boundary with probability
``1 − alpha``. ``min(1, 1/Lambda(0))`` at the current look is therefore a valid p-value by itself, and its
running minimum over looks (``SequentialTest``) is too.

The set of ``d0`` with ``Lambda(d0) < 1/alpha`` is the **confidence sequence** for the difference: the
normal-mixture boundary of Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform, nonparametric,
nonasymptotic confidence sequences", Annals of Statistics 49(2), 2021 (arXiv:1810.08240), two-sided,
with intrinsic time ``V_n = n·sigma²`` and ``rho = sigma⁴/tau²`` (``sigma²`` the variance of one pair's
difference) in their notation, which is ``d ± sqrt(v (v + tau²)/tau² · (2 log(1/alpha) +
log((v + tau²)/v)))``. It covers the true difference at every look at once with probability
``1 − alpha``; the verdict is "better" or "worse" exactly when it excludes 0.

**Several variants** are judged against the control with a Bonferroni correction: each comparison is
held to ``alpha / comparisons``; the p-value returned is the adjusted one (``min(1, comparisons · p)``),
so a verdict is reached exactly when ``p_value <= alpha``.

**The mixture variance** ``tau²``, unless given (in the metric's units), is ``c · (s_c² + s_t²)`` with
``c = x/N0``: the boundary is then tightest at ``N0 = DESIGN_SAMPLES`` per arm, where ``x`` solves
``x = 2 log(1/alpha) + log(1 + x)`` (the ``rho`` that Howard et al. tune to a target intrinsic time).
Proportional to the variance, the test depends on the data only through the z-statistic and ``n``, so the
same default suits rates, scores, latencies and costs alike; beyond ``N0`` the boundary widens only like
``sqrt(log n)``, so a 0.60 vs 0.50 positive rate is found within about a thousand samples per arm and
smaller effects later. See docs/statistics.md for the choices and the simulations.

**Intervals** for single arms: Wilson for rates, Student t for means, binomial order statistics for
percentiles (``quantile_ranks``), and the delta method on the log scale for a ratio of two means (cost per
positive answer, ``ratio_of_means_interval``): all from what the database aggregates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _stats():
    """scipy.stats, imported at first use: importing it takes about a second, which every process that
    loads the URLconf (each server, worker and management command) paid at start-up for a results page."""
    from scipy import stats

    return stats


def _optimize():
    from scipy import optimize

    return optimize


DESIGN_SAMPLES = 1_000  # per arm: where the default mixture makes the boundary tightest
SAMPLES_NEEDED_CAP = 10_000_000  # per arm: beyond this, "not estimable" (the effect is ~0)

BETTER = "better"
WORSE = "worse"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Summary:
    """What a comparison needs of one arm: the count, the mean, and the sample variance (ddof=1)."""

    n: int
    mean: float
    variance: float  # sample variance (ddof=1); 0 for n < 2


def summary_of(values: Sequence[float] | np.ndarray) -> Summary:
    """The summary of observed values; an empty sample has mean 0 and variance 0 (never NaN)."""
    array = np.asarray(values, dtype=float)
    n = int(array.size)
    if n == 0:
        return Summary(n=0, mean=0.0, variance=0.0)
    variance = float(np.var(array, ddof=1)) if n > 1 else 0.0
    return Summary(n=n, mean=float(np.mean(array)), variance=variance)


def summary_of_rate(successes: int, n: int) -> Summary:
    """The summary of ``n`` 0/1 observations of which ``successes`` are 1, without the array."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"successes={successes} of n={n} is not a rate")
    if n == 0:
        return Summary(n=0, mean=0.0, variance=0.0)
    p = successes / n
    variance = p * (1 - p) * n / (n - 1) if n > 1 else 0.0
    return Summary(n=n, mean=p, variance=variance)


def _z(confidence: float) -> float:
    return float(_stats().norm.ppf(0.5 + confidence / 2))


def _wilson(successes: np.ndarray, n: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score bounds, vectorised; n == 0 gives (0, 1)."""
    z = _z(confidence)
    successes = np.asarray(successes, dtype=float)
    n = np.asarray(n, dtype=float)
    safe_n = np.where(n > 0, n, 1.0)
    p = successes / safe_n
    denominator = 1 + z * z / safe_n
    centre = (p + z * z / (2 * safe_n)) / denominator
    half = z * np.sqrt(p * (1 - p) / safe_n + z * z / (4 * safe_n * safe_n)) / denominator
    low = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), 0.0)
    high = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), 1.0)
    return low, high


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a rate (Wilson 1927): good coverage even near 0 and 1 and for small n,
    where the normal ("Wald") interval collapses; (0, 1) when there is no observation."""
    low, high = _wilson(np.asarray(successes), np.asarray(n), confidence)
    return float(low), float(high)


def mean_interval(s: Summary, confidence: float = 0.95) -> tuple[float, float]:
    """The Student t interval for a mean; (nan, nan) when ``n < 2`` (no variance to go on)."""
    if s.n < 2:
        return (math.nan, math.nan)
    half = float(_stats().t.ppf(0.5 + confidence / 2, df=s.n - 1)) * math.sqrt(s.variance / s.n)
    return (s.mean - half, s.mean + half)


def quantile_ranks(n: int, q: float, confidence: float = 0.95) -> tuple[int, int, int]:
    """The nearest-rank ``q`` quantile of ``n`` sorted values and its distribution-free interval, as 1-based
    ranks ``(rank, low, high)``: the order statistics ``low = F⁻¹(α/2)`` and ``high = F⁻¹(1 − α/2) + 1``
    of ``F`` = Binomial(n, q) (the textbook interval for a quantile, e.g. Hahn & Meeker, *Statistical
    Intervals*, 1991, §5.2), clipped to ``[1, n]``. Ranks, not values, so that the caller reads only the
    slice of sorted values between them (the ledger is ordered by the database, never loaded whole)."""
    if n < 1:
        raise ValueError("quantile_ranks needs at least one value")
    alpha = 1 - confidence
    rank = max(1, math.ceil(q * n))
    low = int(max(1, _stats().binom.ppf(alpha / 2, n, q)))
    high = int(min(n, _stats().binom.ppf(1 - alpha / 2, n, q) + 1))
    return rank, low, high


def ratio_of_means_interval(
    numerator: Summary, denominator: Summary, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(ratio, low, high)`` for ``mean(numerator) / mean(denominator)``, e.g. cost per positive answer
    (mean price over positive rate), by the delta method on the log scale with the two means taken as
    independent: ``log R ± z · sqrt(cv_x² + cv_y²)``, ``cv`` a mean's standard error over the mean. From
    the summaries alone (what a database aggregates), so no per-row value is read. Where price and a
    positive answer go together (longer answers cost more and please more), leaving out their covariance
    widens the interval: conservative, never too narrow. NaNs when either mean is not positive."""
    if numerator.n < 1 or denominator.n < 1 or numerator.mean <= 0 or denominator.mean <= 0:
        return (math.nan, math.nan, math.nan)
    ratio = numerator.mean / denominator.mean
    relative_variance = numerator.variance / (numerator.n * numerator.mean**2) + denominator.variance / (
        denominator.n * denominator.mean**2
    )
    spread = _z(confidence) * math.sqrt(relative_variance)
    return (ratio, ratio * math.exp(-spread), ratio * math.exp(spread))


# --- the anytime-valid comparison -------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def mixture_scale(alpha: float, design_samples: int = DESIGN_SAMPLES) -> float:
    """``c`` in ``tau² = c · (s_c² + s_t²)``: makes the two-sided normal-mixture boundary at level ``alpha``
    tightest after ``design_samples`` per arm. The boundary in z units is ``(1 + nc)/(nc) · (2 log(1/alpha)
    + log(1 + nc))``; its minimum over ``x = nc`` is where ``x = 2 log(1/alpha) + log(1 + x)``."""
    a = 2 * math.log(1 / alpha)
    x = _optimize().brentq(lambda x: x - a - math.log1p(x), a, 10 * a + 10)
    return x / design_samples


def log_mixture_ratio(difference, variance, tau2, null: float = 0.0):
    """``log Lambda``: the log of the normal-mixture likelihood ratio of an observed ``difference`` with
    sampling ``variance`` against the ``null`` difference, vectorised over arrays."""
    difference = np.asarray(difference, dtype=float)
    variance = np.asarray(variance, dtype=float)
    tau2 = np.asarray(tau2, dtype=float)
    total = variance + tau2
    return 0.5 * np.log(variance / total) + tau2 * (difference - null) ** 2 / (2 * variance * total)


def confidence_half_width(variance, tau2, alpha: float):
    """Half the width of the normal-mixture confidence sequence (Howard et al. 2021), vectorised:
    the difference lies within ``observed ± this`` at every look with probability ``1 − alpha``."""
    variance = np.asarray(variance, dtype=float)
    tau2 = np.asarray(tau2, dtype=float)
    total = variance + tau2
    return np.sqrt(variance * total / tau2 * (2 * math.log(1 / alpha) + np.log(total / variance)))


@dataclass(frozen=True)
class Comparison:
    """A treatment judged against the control on one metric, every number finite (JSON carries it as is).

    ``verdict`` is "better", "worse" or "unknown", direction-aware (for a lower-is-better metric "better"
    means lower); ``difference`` is treatment mean − control mean; ``interval`` the anytime-valid confidence
    sequence for the difference at the corrected level; ``p_value`` the always-valid p-value,
    Bonferroni-adjusted, so the verdict is reached exactly when ``p_value <= alpha``; ``samples_needed`` the
    per-arm samples still needed to reach a verdict if the observed difference is real, None when decided
    or not estimable (no difference, or one too small to find within ``SAMPLES_NEEDED_CAP``)."""

    verdict: str
    difference: float
    interval: tuple[float, float]
    p_value: float
    samples_needed: int | None


@dataclass(frozen=True)
class MixtureTest:
    """The mSPRT at one look for many comparisons at once (arrays of one shape), as ``mixture_test`` gives
    it: ``compare`` reads one of these, and simulations read thousands without a Python loop."""

    difference: np.ndarray  # treatment mean − control mean (0 where an arm is empty)
    low: np.ndarray  # the confidence sequence at the corrected level
    high: np.ndarray
    p_value: np.ndarray  # always valid, Bonferroni-adjusted
    decided: np.ndarray  # the boundary is crossed: p_value <= alpha, and the interval excludes 0
    per_observation: np.ndarray  # the variance of one pair's difference, which scales tau² and samples_needed
    tau2: np.ndarray


def mixture_test(
    control_n,
    control_mean,
    control_variance,
    treatment_n,
    treatment_mean,
    treatment_variance,
    *,
    alpha: float = 0.05,
    comparisons: int = 1,
    tau: float | None = None,
) -> MixtureTest:
    """The mSPRT of the treatment's mean against the control's, vectorised over arrays of summaries.

    The plug-in variance of the difference is the unpooled (Welch) one; where it is 0 (every value in
    each arm the same) the variance pooled over both arms, the one that holds under the null of no
    difference, stands in, so that 0/20 against 20/20 is evidence and not a division by zero. With an empty
    arm, or no variance at all, nothing is decided: p-value 1, the interval the observed difference alone."""
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    if comparisons < 1:
        raise ValueError("comparisons must be at least 1")
    if tau is not None and not tau > 0:
        raise ValueError("tau must be positive")
    level = alpha / comparisons
    nc, mc, vc, nt, mt, vt = np.broadcast_arrays(
        *(
            np.asarray(a, dtype=float)
            for a in (control_n, control_mean, control_variance, treatment_n, treatment_mean, treatment_variance)
        )
    )
    vc, vt = np.maximum(vc, 0.0), np.maximum(vt, 0.0)  # a variance from running sums can round below 0
    with np.errstate(all="ignore"):
        both = (nc > 0) & (nt > 0)
        difference = np.where(both, mt - mc, 0.0)
        welch = vc / nc + vt / nt
        total = nc + nt
        grand_mean = (nc * mc + nt * mt) / total
        squares = (nc - 1) * vc + (nt - 1) * vt + nc * (mc - grand_mean) ** 2 + nt * (mt - grand_mean) ** 2
        pooled = squares / (total - 1)
        use_welch = welch > 0
        variance = np.where(use_welch, welch, pooled * (1 / nc + 1 / nt))
        per_observation = np.where(use_welch, vc + vt, 2 * pooled)
        informative = both & (variance > 0) & np.isfinite(variance)
        variance = np.where(informative, variance, 1.0)
        per_observation = np.where(informative, per_observation, 0.0)
        tau2 = np.full_like(variance, tau * tau) if tau is not None else mixture_scale(level) * per_observation
        tau2 = np.where(informative, tau2, 1.0)
        log_ratio = np.where(informative, log_mixture_ratio(difference, variance, tau2), 0.0)
        half = np.where(informative, confidence_half_width(variance, tau2, level), 0.0)
    raw_p = np.exp(-np.maximum(log_ratio, 0.0))
    return MixtureTest(
        difference=difference,
        low=difference - half,
        high=difference + half,
        p_value=np.minimum(1.0, raw_p * comparisons),
        decided=informative & (log_ratio >= math.log(1 / level)),
        per_observation=per_observation,
        tau2=tau2,
    )


def samples_needed(difference: float, per_observation: float, tau2: float, level: float, n_now: int) -> int | None:
    """The per-arm samples still needed for the boundary at ``level`` to be crossed if the observed
    ``difference`` and per-observation variance held (arms of equal size from here on); None when that
    lies beyond ``SAMPLES_NEEDED_CAP`` (the effect is ~0) or cannot be estimated."""
    if per_observation <= 0 or not math.isfinite(difference) or difference == 0:
        return None
    threshold = math.log(1 / level)

    def excess(n: float) -> float:
        return float(log_mixture_ratio(difference, per_observation / n, tau2)) - threshold

    start = max(float(n_now), 1.0)
    if excess(SAMPLES_NEEDED_CAP) < 0:
        return None
    if excess(start) >= 0:
        return 1
    target = _optimize().brentq(excess, start, SAMPLES_NEEDED_CAP, xtol=0.5)
    return max(1, math.ceil(target) - n_now)


def compare(
    control: Summary,
    treatment: Summary,
    *,
    alpha: float = 0.05,
    comparisons: int = 1,
    higher_is_better: bool = True,
    tau: float | None = None,
) -> Comparison:
    """Judge a treatment against the control by the mSPRT at the current look (valid at any look; see the
    module docstring). ``comparisons`` is the size of the Bonferroni family (the treatments judged against
    the control, times the metrics judged); ``tau``, in the metric's units, overrides the default mixture.

    Every output is finite: with an empty arm, or no variance to estimate (every value in both arms the
    same), the verdict is unknown, the p-value 1 and the interval the observed difference alone."""
    test = mixture_test(
        control.n,
        control.mean,
        control.variance,
        treatment.n,
        treatment.mean,
        treatment.variance,
        alpha=alpha,
        comparisons=comparisons,
        tau=tau,
    )
    difference = float(test.difference)
    interval = (float(test.low), float(test.high))
    if bool(test.decided):
        verdict = BETTER if (difference > 0) == higher_is_better else WORSE
        return Comparison(verdict, difference, interval, float(test.p_value), None)
    needed = samples_needed(
        difference, float(test.per_observation), float(test.tau2), alpha / comparisons, min(control.n, treatment.n)
    )
    return Comparison(UNKNOWN, difference, interval, float(test.p_value), needed)


class SequentialTest:
    """A comparison followed over looks: the always-valid p-value is the running minimum of the p-values
    seen, and the interval the running intersection of the confidence sequences, both still valid because
    the sequence's guarantee holds over all looks at once. Once decided, the verdict stays."""

    def __init__(
        self, *, alpha: float = 0.05, comparisons: int = 1, higher_is_better: bool = True, tau: float | None = None
    ) -> None:
        self.alpha = alpha
        self.comparisons = comparisons
        self.higher_is_better = higher_is_better
        self.tau = tau
        self.p_value = 1.0
        self.interval: tuple[float, float] | None = None
        self.verdict = UNKNOWN

    def look(self, control: Summary, treatment: Summary) -> Comparison:
        now = compare(
            control,
            treatment,
            alpha=self.alpha,
            comparisons=self.comparisons,
            higher_is_better=self.higher_is_better,
            tau=self.tau,
        )
        self.p_value = min(self.p_value, now.p_value)
        if now.interval[0] < now.interval[1]:  # a degenerate interval has nothing to go on
            if self.interval is None:
                self.interval = now.interval
            else:
                low, high = max(self.interval[0], now.interval[0]), min(self.interval[1], now.interval[1])
                self.interval = (low, high) if low <= high else now.interval
        if self.verdict == UNKNOWN and now.verdict != UNKNOWN:
            self.verdict = now.verdict
        interval = self.interval if self.interval is not None else now.interval
        needed = None if self.verdict != UNKNOWN else now.samples_needed
        return Comparison(self.verdict, now.difference, interval, self.p_value, needed)


def finite_or_none(value: float | None) -> float | None:
    """A number JSON can carry: NaN and infinities (an interval with nothing to go on) become None."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)
