"""The one analysis of an A/B look: what the evaluate step, the API's metrics report and
``python -m fine_tuning analyze`` all call, so the three can never disagree.

Input is per-arm aggregates (:class:`LookInputs`, made from the SQL sums or from JSON); output is
one :class:`Analysis` with a decision (promote / reject / continue) and a reason per criterion.
Rules it enforces on every caller:

* a look counts only once each arm has ``min_samples_per_arm`` scored posts; before that the
  decision is ``continue`` and says so (the first posts' estimated variances are too noisy);
* one statistic per method: ``fixed`` is the delta-method relative lift with Welch degrees of
  freedom for both p and CI; ``sequential`` the always-valid (mSPRT) p, kept as a running
  minimum, and a confidence sequence kept as a running intersection, so it never widens;
* engagement is regression-adjusted on a pre-period covariate (CUPED) when one exists;
* cost per post is a non-inferiority guardrail (or, as a setting, must fall by a share);
* a criterion whose data is missing is reported ``missing`` and blocks promotion unless it is
  configured optional.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fine_tuning.evaluate import stats

Decision = Literal["promote", "reject", "continue"]
Method = Literal["fixed", "sequential"]
OPTIONAL_CRITERIA = ("cost", "quality_score", "response_time_ms", "error_rate")


@dataclass
class Criteria:
    """What promotion needs; the A/B test's recorded success criteria (see :meth:`from_record`)."""

    min_engagement_lift: float = 0.15
    alpha: float = 0.05
    srm_alpha: float = 0.001
    min_samples_per_arm: int = 50
    cost_rule: Literal["non_inferiority", "min_gain"] = "non_inferiority"
    max_cost_increase: float = 0.10
    min_cost_efficiency_gain: float = 0.10
    optional: list[str] = field(default_factory=list)
    variance_reduction: Literal["auto", "off"] = "auto"
    response_time_relative_margin: float = 0.10
    quality_score_relative_margin: float = 0.05
    error_rate_absolute_margin: float = 0.01

    def __post_init__(self) -> None:
        unknown = sorted(set(self.optional) - set(OPTIONAL_CRITERIA))
        if unknown:
            raise stats.AnalysisInputError(
                f"criteria.optional: unknown criteria {unknown} (known: {list(OPTIONAL_CRITERIA)})"
            )
        if self.min_samples_per_arm < 2:
            raise stats.AnalysisInputError(
                f"criteria.min_samples_per_arm must be >= 2, got {self.min_samples_per_arm!r}"
            )

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> Criteria:
        """From an ``ab_tests.success_criteria`` row (tests made before a field existed get its default)."""
        margins = recorded.get("guardrails", {})
        defaults = cls()
        return cls(
            min_engagement_lift=recorded.get("min_engagement_lift", defaults.min_engagement_lift),
            alpha=recorded.get("significance_threshold", defaults.alpha),
            srm_alpha=recorded.get("srm_alpha", defaults.srm_alpha),
            min_samples_per_arm=recorded.get("min_samples_per_arm", defaults.min_samples_per_arm),
            cost_rule=recorded.get("cost_rule", defaults.cost_rule),
            max_cost_increase=recorded.get("max_cost_increase", defaults.max_cost_increase),
            min_cost_efficiency_gain=recorded.get(
                "min_cost_efficiency_gain", defaults.min_cost_efficiency_gain
            ),
            optional=list(recorded.get("optional", [])),
            variance_reduction=recorded.get("variance_reduction", defaults.variance_reduction),
            response_time_relative_margin=margins.get(
                "response_time_relative_margin", defaults.response_time_relative_margin
            ),
            quality_score_relative_margin=margins.get(
                "quality_score_relative_margin", defaults.quality_score_relative_margin
            ),
            error_rate_absolute_margin=margins.get(
                "error_rate_absolute_margin", defaults.error_rate_absolute_margin
            ),
        )


@dataclass(frozen=True)
class ArmInputs:
    """One arm's aggregates. ``None`` means "no data" (reported as missing, never as zero)."""

    engagement: stats.ArmSummary | None
    covariate: stats.CovariateSums | None = None
    cost_per_post: stats.ArmSummary | None = None
    cost_per_token: stats.RatioSums | None = None
    response_time_ms: stats.ArmSummary | None = None
    quality_score: stats.ArmSummary | None = None
    posts: int | None = None
    errors: int | None = None


@dataclass(frozen=True)
class LookInputs:
    baseline: ArmInputs
    candidate: ArmInputs
    traffic_split: float

    @classmethod
    def from_aggregates(cls, aggregates: dict[str, dict[str, Any]], traffic_split: float) -> LookInputs:
        """From :func:`fine_tuning.evaluate.ab.arm_aggregates` (SQL count/sum/sum-of-squares)."""

        def summary(a: dict[str, Any], n: str, total: str, total_sq: str) -> stats.ArmSummary | None:
            return stats.ArmSummary.from_sums(int(a[n]), a[total], a[total_sq]) if a[n] >= 2 else None

        def arm(a: dict[str, Any]) -> ArmInputs:
            covariate = None
            if a.get("x_n", 0) >= 2 and a["x_n"] == a["eng_n"]:
                covariate = stats.CovariateSums(
                    int(a["eng_n"]), a["eng_sum"], a["eng_sumsq"], a["x_sum"], a["x_sumsq"], a["xy_sum"]
                )
            cost_token = None
            if a["cost_n"] >= 2 and a["tok_sum"] > 0:
                cost_token = stats.RatioSums(
                    int(a["cost_n"]),
                    a["cost_sum"],
                    a["tok_sum"],
                    a["cost_sumsq"],
                    a["tok_sumsq"],
                    a["cost_tok_sum"],
                )
            return ArmInputs(
                engagement=summary(a, "eng_n", "eng_sum", "eng_sumsq"),
                covariate=covariate,
                cost_per_post=summary(a, "cost_n", "cost_sum", "cost_sumsq"),
                cost_per_token=cost_token,
                response_time_ms=summary(a, "rt_n", "rt_sum", "rt_sumsq"),
                quality_score=summary(a, "q_n", "q_sum", "q_sumsq"),
                posts=int(a["posts"]) if a["posts"] >= 2 else None,
                errors=int(a["errors"]),
            )

        return cls(arm(aggregates["baseline"]), arm(aggregates["candidate"]), traffic_split)


@dataclass
class LookState:
    """What a sequential test carries from look to look: the running minimum of the always-valid
    p-value and the running intersection of the confidence sequence."""

    p_value: float = 1.0
    ci_lower: float = -math.inf
    ci_upper: float = math.inf

    @classmethod
    def from_record(cls, min_sequential_p: float | None, last_analysis: dict[str, Any] | None) -> LookState:
        ci = (last_analysis or {}).get("running_ci") or [None, None]
        return cls(
            1.0 if min_sequential_p is None else float(min_sequential_p),
            -math.inf if ci[0] is None else float(ci[0]),
            math.inf if ci[1] is None else float(ci[1]),
        )


@dataclass
class Analysis:
    method: Method
    statistic: str
    decision: Decision
    sample_size: dict[str, int]
    relative_lift: float | None = None
    ci_lower: float | None = None
    ci_upper: float | None = None
    p_value: float = 1.0
    df: float | None = None
    srm_p_value: float | None = None
    srm_ok: bool = True
    effect_size: dict[str, Any] | None = None
    variance_reduction: dict[str, Any] = field(default_factory=dict)
    cost_per_post_change: stats.Estimate | None = None
    cost_per_token_change: stats.Estimate | None = None
    guardrails: list[stats.Guardrail] = field(default_factory=list)
    reasons: list[dict[str, Any]] = field(default_factory=list)
    # The sequential state after this look (what the next look starts from).
    running_ci: list[float | None] = field(default_factory=lambda: [None, None])
    counted: bool = True

    @property
    def state(self) -> LookState:
        low, high = self.running_ci
        return LookState(self.p_value, -math.inf if low is None else low, math.inf if high is None else high)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STATISTIC = {
    "fixed": "relative lift (delta method), t-test with Welch degrees of freedom: p and CI of the same ratio",
    "sequential": "relative lift (delta method), mSPRT always-valid p (running minimum) and normal-mixture "
    "confidence sequence (running intersection)",
}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _engagement(
    inputs: LookInputs, criteria: Criteria
) -> tuple[stats.ArmSummary, stats.ArmSummary, dict[str, Any]]:
    """The arms' engagement summaries, CUPED-adjusted when a covariate exists and it is on."""
    baseline, candidate = inputs.baseline.engagement, inputs.candidate.engagement
    assert baseline is not None and candidate is not None
    if criteria.variance_reduction == "off":
        return baseline, candidate, {"applied": False, "note": "variance_reduction is off"}
    b_cov, c_cov = inputs.baseline.covariate, inputs.candidate.covariate
    adjusted = stats.cuped(b_cov, c_cov) if b_cov is not None and c_cov is not None else None
    if adjusted is None:
        return baseline, candidate, {"applied": False, "note": "no pre-period covariate for these posts"}
    raw = stats.relative_lift(baseline, candidate).std_error ** 2
    reduced = stats.relative_lift(adjusted.baseline, adjusted.candidate).std_error ** 2
    reduction = 1 - reduced / raw if raw > 0 else 0.0
    total = baseline.n + candidate.n
    return (
        adjusted.baseline,
        adjusted.candidate,
        {
            "applied": True,
            "covariate": "persona's mean engagement before the test",
            "theta": adjusted.theta,
            "rho2": adjusted.rho2,
            "variance_reduction": reduction,
            "sample_size": total,
            "effective_sample_size": total / (1 - reduction) if reduction < 1 else None,
        },
    )


def _guardrails(inputs: LookInputs, criteria: Criteria) -> tuple[list[stats.Guardrail], list[str]]:
    """The guardrails that have data, and the names of those that do not."""
    b, c = inputs.baseline, inputs.candidate
    guardrails: list[stats.Guardrail] = []
    missing: list[str] = []
    if criteria.cost_rule == "non_inferiority":
        if b.cost_per_post is not None and c.cost_per_post is not None and b.cost_per_post.mean > 0:
            guardrails.append(
                stats.guardrail_mean(
                    "cost_per_post", b.cost_per_post, c.cost_per_post, criteria.max_cost_increase, True
                )
            )
        else:
            missing.append("cost")
    if b.response_time_ms is not None and c.response_time_ms is not None:
        guardrails.append(
            stats.guardrail_mean(
                "response_time_ms",
                b.response_time_ms,
                c.response_time_ms,
                criteria.response_time_relative_margin,
                higher_is_worse=True,
            )
        )
    else:
        missing.append("response_time_ms")
    if b.quality_score is not None and c.quality_score is not None:
        guardrails.append(
            stats.guardrail_mean(
                "quality_score",
                b.quality_score,
                c.quality_score,
                criteria.quality_score_relative_margin,
                higher_is_worse=False,
            )
        )
    else:
        missing.append("quality_score")
    if b.posts is not None and c.posts is not None and b.errors is not None and c.errors is not None:
        guardrails.append(
            stats.guardrail_proportion(
                "error_rate", b.errors, b.posts, c.errors, c.posts, criteria.error_rate_absolute_margin
            )
        )
    else:
        missing.append("error_rate")
    return guardrails, missing


def analyze_look(
    inputs: LookInputs,
    criteria: Criteria | None = None,
    method: Method = "sequential",
    state: LookState | None = None,
    finished: bool = False,
    extra_guardrails: list[stats.Guardrail] | None = None,
) -> Analysis:
    """Analyse one look at an engagement A/B test and decide, with a reason per criterion.

    :param state: the sequential test's running p and CI from the earlier looks.
    :param finished: the planned duration has passed (no more data will come).
    :param extra_guardrails: more non-inferiority guardrails (mean metrics the caller measured).
    """
    criteria = criteria or Criteria()
    state = state or LookState()
    alpha = criteria.alpha
    if not 0 < inputs.traffic_split < 1:
        raise stats.AnalysisInputError(f"traffic_split must be between 0 and 1, got {inputs.traffic_split!r}")
    b_eng, c_eng = inputs.baseline.engagement, inputs.candidate.engagement
    sizes = {"baseline": b_eng.n if b_eng else 0, "candidate": c_eng.n if c_eng else 0}
    if min(sizes.values()) < criteria.min_samples_per_arm:
        decision: Decision = "reject" if finished else "continue"
        note = (
            f"a look counts from {criteria.min_samples_per_arm} scored posts per arm; "
            f"baseline has {sizes['baseline']}, candidate {sizes['candidate']}"
        )
        reasons = [
            {
                "criterion": "sample_size",
                "value": sizes,
                "threshold": criteria.min_samples_per_arm,
                "ok": False,
                "note": note,
            }
        ]
        if finished:
            reasons.append({"criterion": "verdict", "note": "the test ended before it had enough posts"})
        return Analysis(
            method=method,
            statistic=STATISTIC[method],
            decision=decision,
            sample_size=sizes,
            p_value=state.p_value,
            running_ci=[_finite(state.ci_lower), _finite(state.ci_upper)],
            reasons=reasons,
            counted=False,
        )
    assert b_eng is not None and c_eng is not None
    b_eng.check("baseline")
    c_eng.check("candidate")
    baseline, candidate, reduction = _engagement(inputs, criteria)

    df: float | None = None
    if method == "sequential":
        lift = stats.relative_lift(baseline, candidate, alpha)
        tau2 = criteria.min_engagement_lift**2  # mixture centred on effects of the size we care about
        variance = lift.std_error**2
        p_value = min(state.p_value, stats.msprt_p_value(lift.value, variance, tau2))
        low, high = stats.confidence_sequence(lift.value, variance, tau2, alpha)
        ci_lower, ci_upper = max(low, state.ci_lower), min(high, state.ci_upper)
        if ci_lower > ci_upper:  # the sequence's (alpha-probability) miss: keep the latest look's
            ci_lower, ci_upper = low, high
        running_ci: list[float | None] = [ci_lower, ci_upper]
    elif method == "fixed":
        test = stats.relative_lift_test(baseline, candidate, alpha)
        lift, p_value, df = test.estimate, test.p_value, test.df
        ci_lower, ci_upper = lift.ci_lower, lift.ci_upper
        running_ci = [_finite(state.ci_lower), _finite(state.ci_upper)]
    else:
        raise stats.AnalysisInputError(f"method must be 'fixed' or 'sequential', got {method!r}")
    d, size_label = stats.cohens_d(b_eng, c_eng)
    srm_p = stats.srm_p_value(b_eng.n, c_eng.n, inputs.traffic_split)
    srm_ok = srm_p >= criteria.srm_alpha

    guardrails, missing = _guardrails(inputs, criteria)
    guardrails += extra_guardrails or []
    if method == "sequential":
        for guardrail in guardrails:
            guardrail.make_sequential()
    stats.apply_holm(guardrails, alpha)

    b, c = inputs.baseline, inputs.candidate
    cost_per_token = None
    if b.cost_per_token is not None and c.cost_per_token is not None:
        cost_per_token = stats.ratio_change(b.cost_per_token, c.cost_per_token, alpha)
    cost_per_post = None
    if b.cost_per_post is not None and c.cost_per_post is not None and b.cost_per_post.mean > 0:
        cost_per_post = stats.relative_lift(b.cost_per_post, c.cost_per_post, alpha)

    significant = p_value < alpha
    reasons = [
        {
            "criterion": "srm",
            "value": srm_p,
            "threshold": criteria.srm_alpha,
            "ok": srm_ok,
            "note": "arm sizes match the split" if srm_ok else "sample ratio mismatch invalidates the test",
        },
        {
            "criterion": "significance",
            "value": p_value,
            "threshold": alpha,
            "ok": significant,
            "method": method,
        },
        {
            "criterion": "engagement_lift",
            "value": lift.value,
            "threshold": criteria.min_engagement_lift,
            "ok": lift.value >= criteria.min_engagement_lift,
            "ci": [ci_lower, ci_upper],
            "variance_reduction": reduction.get("variance_reduction") if reduction["applied"] else None,
        },
    ]
    if criteria.cost_rule == "min_gain":
        if cost_per_post is not None:
            gain = -cost_per_post.value  # lower cost per post is better
            reasons.append(
                {
                    "criterion": "cost_efficiency_gain",
                    "metric": "cost_per_post",
                    "value": gain,
                    "threshold": criteria.min_cost_efficiency_gain,
                    "ok": gain >= criteria.min_cost_efficiency_gain,
                    "ci": [-cost_per_post.ci_upper, -cost_per_post.ci_lower],
                }
            )
        else:
            missing.insert(0, "cost")
    for g in guardrails:
        reasons.append(
            {
                "criterion": f"guardrail:{g.name}",
                "value": g.candidate,
                "baseline": g.baseline,
                "threshold": g.margin,
                "ok": g.status == "pass",
                "status": g.status,
                "p_non_inferior_holm": g.p_non_inferior_holm,
                "p_harm_holm": g.p_harm_holm,
            }
        )
    for name in missing:
        optional = name in criteria.optional
        reasons.append(
            {
                "criterion": name,
                "status": "missing",
                "ok": optional,
                "note": f"no {name} data in one or both arms"
                + (" (configured optional)" if optional else ": blocks promotion unless configured optional"),
            }
        )

    worse = significant and ci_upper < 0
    violated = any(g.status == "violated" for g in guardrails)
    promote = srm_ok and significant and all(r["ok"] for r in reasons)
    if promote:
        decision = "promote"
    elif not srm_ok or worse or violated or finished:
        decision = "reject"
    else:
        decision = "continue"
    if not srm_ok:
        reasons.append({"criterion": "verdict", "note": "SRM: the test is invalid and cannot promote"})
    elif worse:
        reasons.append({"criterion": "verdict", "note": "the candidate is significantly worse"})
    elif violated:
        reasons.append({"criterion": "verdict", "note": "a guardrail is significantly worse"})
    elif decision == "reject":
        reasons.append(
            {"criterion": "verdict", "note": "the test ran its course without meeting the criteria"}
        )
    return Analysis(
        method=method,
        statistic=STATISTIC[method],
        decision=decision,
        sample_size=sizes,
        relative_lift=lift.value,
        ci_lower=ci_lower,
        ci_upper=ci_upper,
        p_value=p_value,
        df=df,
        srm_p_value=srm_p,
        srm_ok=srm_ok,
        effect_size={"cohens_d": d, "label": size_label},
        variance_reduction=reduction,
        cost_per_post_change=cost_per_post,
        cost_per_token_change=cost_per_token,
        guardrails=guardrails,
        reasons=reasons,
        running_ci=running_ci,
    )


@dataclass
class RampVerdict:
    """Whether a rollout stage may advance: ``advance`` (every guardrail non-inferior),
    ``hold`` (inconclusive or data missing), or ``rollback`` (a guardrail significantly worse)."""

    verdict: Literal["advance", "hold", "rollback"]
    guardrails: list[stats.Guardrail]
    missing: list[str]
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ramp_verdict(
    inputs: LookInputs, criteria: Criteria, engagement_margin: float, stages: int = 1
) -> RampVerdict:
    """The evidence for one rollout stage, on the posts since the stage began (both arms).

    The A/B test's guardrails (cost per post, latency, quality, errors) plus engagement within
    ``engagement_margin`` of the previous model, each with its always-valid (mSPRT) tests, Holm
    across them: a stage can be looked at every hour without inflating false alarms. Harm is
    judged at ``alpha / stages``: each stage starts a new sequential test, and an as-good
    candidate must not be rolled back by one of the rollout's ``stages`` tests by chance
    (in simulation, alpha per stage rolled back one in five).
    """
    guardrails, missing = _guardrails(inputs, criteria)
    b, c = inputs.baseline.engagement, inputs.candidate.engagement
    if b is not None and c is not None and b.mean > 0:
        guardrails.insert(
            0, stats.guardrail_mean("engagement_rate", b, c, engagement_margin, higher_is_worse=False)
        )
    else:
        missing.insert(0, "engagement_rate")
    for guardrail in guardrails:
        guardrail.make_sequential()
    stats.apply_holm(guardrails, criteria.alpha)
    harm_alpha = criteria.alpha / max(stages, 1)
    for g in guardrails:
        g.status = (
            "violated"
            if g.p_harm_holm < harm_alpha
            else "pass"
            if g.p_non_inferior_holm < criteria.alpha
            else "inconclusive"
        )
    required_missing = [name for name in missing if name not in criteria.optional]
    violated = [g.name for g in guardrails if g.status == "violated"]
    pending = [g.name for g in guardrails if g.status == "inconclusive"]
    if violated:
        return RampVerdict(
            "rollback",
            guardrails,
            missing,
            [f"{name} is significantly worse than the previous model" for name in violated],
        )
    reasons = [f"{name}: not yet shown non-inferior" for name in pending]
    reasons += [f"{name}: no data (not optional)" for name in required_missing]
    return RampVerdict(
        "hold" if reasons else "advance", guardrails, missing, reasons or ["all guardrails non-inferior"]
    )
