"""The A/B test's statistics, from per-arm aggregates (n, mean, variance) computed in SQL.

SciPy and statsmodels do the tests (Welch, chi-square, proportions, Holm, power). Two pieces
have no maintained library and are written here from their published formulas:

* the delta-method variance of a relative lift and of a ratio metric (a two-line formula);
* the sequential test: a normal-mixture sequential probability ratio test (mSPRT, Johari et al.
  2017; Robbins 1970) and its confidence sequence (Howard et al. 2021). ``confseq`` implements
  it but ships only as a C++ source package last released in 2023, and statsmodels has none.
  The mixture likelihood ratio is a test martingale under H0, so by Ville's inequality its
  running maximum exceeds 1/alpha with probability at most alpha: looking every hour does not
  inflate false positives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


class AnalysisInputError(ValueError):
    """An aggregate cannot be analysed; the message names the field."""


@dataclass(frozen=True)
class ArmSummary:
    """One arm's sample: size, mean and sample variance (ddof=1) of a per-post metric."""

    n: int
    mean: float
    variance: float

    def check(self, name: str) -> ArmSummary:
        if not isinstance(self.n, int | float) or self.n <= 1:
            raise AnalysisInputError(f"{name}.n must be > 1, got {self.n!r}")
        if not math.isfinite(self.mean):
            raise AnalysisInputError(f"{name}.mean must be a finite number, got {self.mean!r}")
        if not math.isfinite(self.variance) or self.variance < 0:
            raise AnalysisInputError(f"{name}.variance must be >= 0, got {self.variance!r}")
        return self

    @classmethod
    def from_sums(cls, n: int, total: float, total_sq: float) -> ArmSummary:
        """From SQL's count, sum and sum of squares (clamped: rounding can go a hair below 0)."""
        mean = total / n if n else 0.0
        variance = max(total_sq - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        return cls(int(n), mean, variance)


@dataclass(frozen=True)
class RatioSums:
    """Per-arm sums for a ratio metric (total cost / total tokens), per post as the unit."""

    n: int
    num: float
    den: float
    num_sq: float
    den_sq: float
    num_den: float


@dataclass
class Estimate:
    value: float
    ci_lower: float
    ci_upper: float
    std_error: float


@dataclass
class Guardrail:
    name: str
    baseline: float
    candidate: float
    margin: float
    p_non_inferior: float
    p_harm: float
    # How much worse the candidate is (positive = worse) and its standard error: what the
    # sequential versions of both tests are computed from.
    worse_by: float = 0.0
    std_error: float = 0.0
    p_non_inferior_holm: float = 1.0
    p_harm_holm: float = 1.0
    status: Literal["pass", "violated", "inconclusive"] = "inconclusive"

    def make_sequential(self) -> None:
        """Replace both p-values with always-valid ones (mSPRT), so that looking every hour at
        the guardrails does not inflate false alarms any more than it does for the lift."""
        variance, tau2 = self.std_error**2, max(self.margin, 1e-12) ** 2
        self.p_harm = msprt_p_value(self.worse_by, variance, tau2) if self.worse_by > 0 else 1.0
        self.p_non_inferior = (
            msprt_p_value(self.worse_by - self.margin, variance, tau2) if self.worse_by < self.margin else 1.0
        )


def welch(baseline: ArmSummary, candidate: ArmSummary, alternative: str = "two-sided") -> tuple[float, float]:
    """Welch's t-test (unequal variances) from summaries: ``(t, p)``."""
    from scipy import stats

    result = stats.ttest_ind_from_stats(
        candidate.mean,
        math.sqrt(candidate.variance),
        candidate.n,
        baseline.mean,
        math.sqrt(baseline.variance),
        baseline.n,
        equal_var=False,
        alternative=alternative,
    )
    return float(result.statistic), float(result.pvalue)


def relative_lift(baseline: ArmSummary, candidate: ArmSummary, alpha: float = 0.05) -> Estimate:
    """``mean_c / mean_b - 1`` with its delta-method standard error and (1 - alpha) CI."""
    from scipy.stats import norm

    if baseline.mean == 0:
        raise AnalysisInputError("baseline.mean must not be 0: a relative lift is undefined")
    lift = candidate.mean / baseline.mean - 1
    variance = candidate.variance / (candidate.n * baseline.mean**2) + (
        candidate.mean**2 * baseline.variance
    ) / (baseline.n * baseline.mean**4)
    se = math.sqrt(variance)
    z = float(norm.ppf(1 - alpha / 2))
    return Estimate(lift, lift - z * se, lift + z * se, se)


def welch_df(baseline: ArmSummary, candidate: ArmSummary) -> float:
    """Welch-Satterthwaite degrees of freedom of the difference of two means."""
    v_b, v_c = baseline.variance / baseline.n, candidate.variance / candidate.n
    denominator = v_b**2 / (baseline.n - 1) + v_c**2 / (candidate.n - 1)
    return (v_b + v_c) ** 2 / denominator if denominator > 0 else float(baseline.n + candidate.n - 2)


@dataclass
class LiftTest:
    """One statistic for both answers: the relative lift, its delta-method standard error, and
    the p-value and CI of that same ratio (t distribution, Welch degrees of freedom)."""

    estimate: Estimate
    p_value: float
    df: float


def relative_lift_test(baseline: ArmSummary, candidate: ArmSummary, alpha: float = 0.05) -> LiftTest:
    """The fixed-horizon test of the relative lift, as GrowthBook's frequentist engine does it.

    Welch's p on the absolute difference next to a delta-method CI of the ratio can contradict
    each other (p < 0.05 with a CI holding 0); here p and CI come from ``lift / se(lift)``.
    """
    from scipy.stats import t as student_t

    lift = relative_lift(baseline, candidate, alpha)
    df = welch_df(baseline, candidate)
    if lift.std_error == 0:
        p = 1.0 if lift.value == 0 else 0.0
        return LiftTest(Estimate(lift.value, lift.value, lift.value, 0.0), p, df)
    p = float(2 * student_t.sf(abs(lift.value / lift.std_error), df))
    half = float(student_t.ppf(1 - alpha / 2, df)) * lift.std_error
    return LiftTest(Estimate(lift.value, lift.value - half, lift.value + half, lift.std_error), p, df)


def cohens_d(baseline: ArmSummary, candidate: ArmSummary) -> tuple[float, str]:
    """Standardised difference (pooled standard deviation) and Cohen's label for its size."""
    pooled = ((baseline.n - 1) * baseline.variance + (candidate.n - 1) * candidate.variance) / (
        baseline.n + candidate.n - 2
    )
    d = (candidate.mean - baseline.mean) / math.sqrt(pooled) if pooled > 0 else 0.0
    size = abs(d)
    label = "large" if size >= 0.8 else "medium" if size >= 0.5 else "small" if size >= 0.2 else "negligible"
    return d, label


@dataclass(frozen=True)
class CovariateSums:
    """One arm's sums of the metric y and a pre-period covariate x over the same posts."""

    n: int
    y_sum: float
    y_sumsq: float
    x_sum: float
    x_sumsq: float
    xy_sum: float

    def moments(self) -> tuple[float, float, float, float, float]:
        """Means of y and x, sample variances of y and x, and their covariance (ddof=1)."""
        n = self.n
        mean_y, mean_x = self.y_sum / n, self.x_sum / n
        var_y = max(self.y_sumsq - n * mean_y**2, 0.0) / (n - 1)
        var_x = max(self.x_sumsq - n * mean_x**2, 0.0) / (n - 1)
        cov = (self.xy_sum - n * mean_x * mean_y) / (n - 1)
        return mean_y, mean_x, var_y, var_x, cov


@dataclass
class Adjusted:
    """Both arms after regression adjustment, and what it bought."""

    baseline: ArmSummary
    candidate: ArmSummary
    theta: float
    rho2: float


def cuped(baseline: CovariateSums, candidate: CovariateSums) -> Adjusted | None:
    """CUPED (Deng et al. 2013): ``y - theta (x - mean x)`` per arm, theta pooled within arms.

    The covariate is measured before the test, so it cannot depend on the arm and the adjusted
    difference stays unbiased; each arm's variance shrinks to ``var_y - 2 theta cov + theta^2
    var_x`` (``var_y (1 - rho^2)`` at the pooled optimum). Written here: statsmodels has OLS but
    not the per-arm aggregate form, and the aggregates come from SQL. ``None`` when the
    covariate does not vary (nothing to adjust on).
    """
    if baseline.n < 3 or candidate.n < 3:
        return None
    (my_b, mx_b, vy_b, vx_b, c_b), (my_c, mx_c, vy_c, vx_c, c_c) = baseline.moments(), candidate.moments()
    sxx = (baseline.n - 1) * vx_b + (candidate.n - 1) * vx_c
    syy = (baseline.n - 1) * vy_b + (candidate.n - 1) * vy_c
    sxy = (baseline.n - 1) * c_b + (candidate.n - 1) * c_c
    if sxx <= 0 or syy <= 0:
        return None
    theta = sxy / sxx
    mean_x = (baseline.x_sum + candidate.x_sum) / (baseline.n + candidate.n)

    def arm(n: int, my: float, mx: float, vy: float, vx: float, cov: float) -> ArmSummary:
        return ArmSummary(n, my - theta * (mx - mean_x), max(vy - 2 * theta * cov + theta**2 * vx, 0.0))

    return Adjusted(
        arm(baseline.n, my_b, mx_b, vy_b, vx_b, c_b),
        arm(candidate.n, my_c, mx_c, vy_c, vx_c, c_c),
        theta,
        sxy**2 / (sxx * syy),
    )


# The prior's concentration for the sequential SRM test: a Beta(k p, k (1 - p)) around the
# planned share p has a standard deviation of sqrt(p (1 - p) / (k + 1)), about one point of share
# at 10-20% with k = 1000 — centred on the mismatches that break a test (a share off by 5-20% of
# itself), not on gross ones only. Measured on hourly looks (bench/srm_bench.py): a 20% loss of
# a 10% arm at 60 posts/h is found within the week in 97% of tests (the rest were rejected first).
SRM_PRIOR_CONCENTRATION = 1000.0


def srm_p_value(
    n_baseline: int, n_candidate: int, candidate_share: float, concentration: float = SRM_PRIOR_CONCENTRATION
) -> float:
    """Sample ratio mismatch, always valid: the arm sizes against the planned split at any look.

    The chi-square test is valid at one planned look; checked at every hourly look of a week it
    flags a sound split in 1-2% of tests instead of ``srm_alpha`` (0.1%), rejecting a good
    candidate as "invalid". This is the sequential SRM test of Lindon & Malek (2022, "Anytime-valid
    inference for multinomial count data") for two arms: the Bayes factor of a beta-binomial
    mixture around the planned share against the planned share itself is a test martingale, so by
    Ville's inequality ``P(p <= alpha at any look) <= alpha`` under a sound split. Written here
    because no maintained package offers it (SciPy has the distributions, not the test); the
    closed form needs only ``betaln``.

    :returns: ``min(1, 1 / BF)``, where BF = Beta-binomial(n_candidate; n, k p, k (1 - p)) over
        Binomial(n_candidate; n, p) — the binomial coefficients cancel.
    """
    from scipy.special import betaln

    if not 0.0 < candidate_share < 1.0:
        raise AnalysisInputError(f"candidate_share must be in (0, 1), got {candidate_share!r}")
    if n_baseline < 0 or n_candidate < 0:
        raise AnalysisInputError(f"arm sizes must not be negative, got {n_baseline} and {n_candidate}")
    p = candidate_share
    a, b = concentration * p, concentration * (1 - p)
    log_bf = (
        betaln(a + n_candidate, b + n_baseline)
        - betaln(a, b)
        - (n_candidate * math.log(p) + n_baseline * math.log1p(-p))
    )
    return 1.0 if log_bf <= 0 else math.exp(-log_bf)


def ratio_change(baseline: RatioSums, candidate: RatioSums, alpha: float = 0.05) -> Estimate:
    """Relative change of a ratio of sums (candidate over baseline, minus 1), delta method.

    Each arm's ratio R = sum(num)/sum(den) has Var(R) ~ (s_num^2 - 2 R s_num,den + R^2 s_den^2)
    / (n mean_den^2); the two arms are independent.
    """
    from scipy.stats import norm

    def ratio_and_var(arm: RatioSums, name: str) -> tuple[float, float]:
        if arm.n <= 1 or arm.den <= 0:
            raise AnalysisInputError(f"{name}: a ratio needs n > 1 and a positive denominator sum")
        n = arm.n
        mean_num, mean_den = arm.num / n, arm.den / n
        var_num = (arm.num_sq - n * mean_num**2) / (n - 1)
        var_den = (arm.den_sq - n * mean_den**2) / (n - 1)
        cov = (arm.num_den - n * mean_num * mean_den) / (n - 1)
        ratio = arm.num / arm.den
        var = max(var_num - 2 * ratio * cov + ratio**2 * var_den, 0.0) / (n * mean_den**2)
        return ratio, var

    r_b, v_b = ratio_and_var(baseline, "baseline cost")
    r_c, v_c = ratio_and_var(candidate, "candidate cost")
    if r_b == 0:
        raise AnalysisInputError("baseline cost per token must not be 0")
    change = r_c / r_b - 1
    se = math.sqrt(v_c / r_b**2 + r_c**2 * v_b / r_b**4)
    z = float(norm.ppf(1 - alpha / 2))
    return Estimate(change, change - z * se, change + z * se, se)


def msprt_p_value(estimate: float, variance: float, tau2: float) -> float:
    """Always-valid p-value of H0: effect = 0 at one look (normal mixture, mixing variance tau2).

    The pipeline keeps the running minimum across looks; that minimum is the always-valid
    p-value of the whole test.
    """
    if variance <= 0:
        return 1.0 if estimate == 0 else 0.0
    log_lr = 0.5 * math.log(variance / (variance + tau2)) + estimate**2 * tau2 / (
        2 * variance * (variance + tau2)
    )
    return min(1.0, math.exp(-log_lr)) if log_lr < 700 else 0.0


def confidence_sequence(estimate: float, variance: float, tau2: float, alpha: float) -> tuple[float, float]:
    """The normal-mixture (1 - alpha) confidence sequence around ``estimate`` at this look."""
    if variance <= 0:
        return estimate, estimate
    radius = math.sqrt(
        variance
        * (variance + tau2)
        / tau2
        * (2 * math.log(1 / alpha) + math.log((variance + tau2) / variance))
    )
    return estimate - radius, estimate + radius


def guardrail_mean(
    name: str, baseline: ArmSummary, candidate: ArmSummary, relative_margin: float, higher_is_worse: bool
) -> Guardrail:
    """Non-inferiority of a mean metric (Welch, one-sided) within ``relative_margin`` of baseline."""
    margin = abs(baseline.mean) * relative_margin
    sign = 1 if higher_is_worse else -1
    # Non-inferior: candidate - baseline < margin in the "worse" direction (shift by the margin).
    shifted = ArmSummary(candidate.n, candidate.mean - sign * margin, candidate.variance)
    _, p_non_inferior = welch(baseline, shifted, alternative="less" if higher_is_worse else "greater")
    _, p_harm = welch(baseline, candidate, alternative="greater" if higher_is_worse else "less")
    return Guardrail(
        name,
        baseline.mean,
        candidate.mean,
        margin,
        p_non_inferior,
        p_harm,
        worse_by=sign * (candidate.mean - baseline.mean),
        std_error=math.sqrt(candidate.variance / candidate.n + baseline.variance / baseline.n),
    )


def guardrail_proportion(
    name: str, errors_b: int, n_b: int, errors_c: int, n_c: int, absolute_margin: float
) -> Guardrail:
    """Non-inferiority of a rate (e.g. errors) within ``absolute_margin``, statsmodels' 2-sample test."""
    from statsmodels.stats.proportion import test_proportions_2indep

    def p(value: float, alternative: str) -> float:
        if errors_b + errors_c == 0 and value == 0:
            return 1.0  # no errors anywhere: no evidence of harm
        return float(
            test_proportions_2indep(
                errors_c, n_c, errors_b, n_b, value=value, compare="diff", alternative=alternative
            ).pvalue
        )

    rate_b, rate_c = errors_b / n_b, errors_c / n_c
    # The sequential tests' standard error uses the pooled rate (one error and one success added):
    # each arm's own rate makes it ~0 when an arm has no errors yet, and then one error in the
    # other arm looked significant (an as-good candidate's ramp was rolled back one time in four).
    pooled = (errors_b + errors_c + 1) / (n_b + n_c + 2)
    return Guardrail(
        name,
        rate_b,
        rate_c,
        absolute_margin,
        p(absolute_margin, "smaller"),
        p(0.0, "larger"),
        worse_by=rate_c - rate_b,
        std_error=math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_b)),
    )


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (reject where adjusted <= alpha).

    Written out instead of ``statsmodels.stats.multitest.multipletests(method="holm")``, which
    gives the same values (tests/unit/evaluate/test_stats.py checks) but runs a full ``gc.collect()`` on every
    call: 123 ms with Airflow imported (0.03 ms here), holding the GIL of the API server while a
    status read computes; bench/cache_bench.py found it in the p99.
    """
    import numpy as np

    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    m = len(p)
    stepped = np.maximum.accumulate(p[order] * np.arange(m, 0, -1))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def apply_holm(guardrails: list[Guardrail], alpha: float) -> None:
    """Holm across guardrails, for both the non-inferiority and the harm p-values."""
    if not guardrails:
        return
    non_inferior = holm_adjusted([g.p_non_inferior for g in guardrails])
    harm = holm_adjusted([g.p_harm for g in guardrails])
    for guardrail, p_ni, p_h in zip(guardrails, non_inferior, harm, strict=True):
        guardrail.p_non_inferior_holm = float(p_ni)
        guardrail.p_harm_holm = float(p_h)
        guardrail.status = "violated" if p_h < alpha else "pass" if p_ni < alpha else "inconclusive"


@dataclass
class PowerPlan:
    """What the configured split and duration can detect, and what would be needed."""

    baseline_mean: float
    baseline_sd: float
    posts_per_hour: float
    candidate_share: float
    duration_hours: float
    min_lift: float
    required_per_arm: dict[str, int]
    expected_per_arm: dict[str, int]
    detectable_lift: float
    hours_needed: float
    share_needed_for_duration: float | None
    adequate: bool
    message: str


def power_plan(
    baseline_mean: float,
    baseline_sd: float,
    posts_per_hour: float,
    candidate_share: float,
    duration_hours: float,
    min_lift: float,
    alpha: float = 0.05,
    power: float = 0.8,
) -> PowerPlan:
    """Fixed-horizon power for the engagement lift (statsmodels ``NormalIndPower``).

    The sequential test needs somewhat more data than this for the same power; the plan is the
    lower bound that says whether the test can work at all.
    """
    from statsmodels.stats.power import NormalIndPower

    if baseline_mean <= 0 or baseline_sd <= 0 or posts_per_hour <= 0:
        raise AnalysisInputError(
            "power needs a positive baseline mean, standard deviation and post volume, got "
            f"mean={baseline_mean!r}, sd={baseline_sd!r}, posts_per_hour={posts_per_hour!r}"
        )
    solver = NormalIndPower()
    ratio = (1 - candidate_share) / candidate_share  # baseline posts per candidate post
    effect = min_lift * baseline_mean / baseline_sd
    n_candidate = float(solver.solve_power(effect_size=effect, alpha=alpha, power=power, ratio=ratio))
    required = {"candidate": math.ceil(n_candidate), "baseline": math.ceil(n_candidate * ratio)}
    expected_c = posts_per_hour * duration_hours * candidate_share
    expected = {
        "candidate": int(expected_c),
        "baseline": int(posts_per_hour * duration_hours * (1 - candidate_share)),
    }
    detectable_effect = float(
        solver.solve_power(nobs1=max(expected_c, 2.0), alpha=alpha, power=power, ratio=ratio)
    )
    detectable_lift = detectable_effect * baseline_sd / baseline_mean
    hours_needed = n_candidate / (posts_per_hour * candidate_share)

    share_needed = None
    for step in range(1, 51):  # the smallest split (in 1% steps up to 50%) that works in time
        share = step / 100
        n_c = float(
            solver.solve_power(effect_size=effect, alpha=alpha, power=power, ratio=(1 - share) / share)
        )
        if n_c <= posts_per_hour * duration_hours * share:
            share_needed = share
            break
    adequate = expected_c >= n_candidate
    if adequate:
        message = (
            f"a {candidate_share:.0%} split for {duration_hours:g} h (~{expected_c:.0f} candidate posts) "
            f"can detect a {min_lift:+.0%} lift (needs {required['candidate']} candidate posts)"
        )
    else:
        options = [f"run {hours_needed:.0f} h at {candidate_share:.0%}"]
        if share_needed is not None:
            options.append(f"raise traffic_split to {share_needed:.0%} for {duration_hours:g} h")
        message = (
            f"UNDERPOWERED: a {candidate_share:.0%} split for {duration_hours:g} h "
            f"(~{expected_c:.0f} candidate posts) can only detect a lift of {detectable_lift:+.0%}, "
            f"not the {min_lift:+.0%} the criteria ask for (needs {required['candidate']} candidate "
            f"posts); to detect it: {' or '.join(options)}"
        )
    return PowerPlan(
        baseline_mean=baseline_mean,
        baseline_sd=baseline_sd,
        posts_per_hour=posts_per_hour,
        candidate_share=candidate_share,
        duration_hours=duration_hours,
        min_lift=min_lift,
        required_per_arm=required,
        expected_per_arm=expected,
        detectable_lift=detectable_lift,
        hours_needed=hours_needed,
        share_needed_for_duration=share_needed,
        adequate=adequate,
        message=message,
    )
