"""Simulated A/B tests through the whole decision path, fast enough for thousands of them.

Each test is a stream of posts like the traffic simulator's (:mod:`fine_tuning.dev.simulator`):
a persona per post with its fixed engagement level, per-post engagement a Beta around 6.8%
times that level (skewed, bounded), a candidate share of the traffic with a true relative lift.
Before the test, each persona's own earlier posts give its pre-period mean (the CUPED
covariate). At every hourly look the per-arm sums are exactly the fields
:func:`fine_tuning.evaluate.ab.arm_aggregates` returns (count, sum, sum of squares, the
covariate's sums), cumulated from the first post, and they go through the same adapter and the
same analysis as the evaluate step (:meth:`LookInputs.from_aggregates`, :func:`analyze_look`):
variances estimated from the data, the minimum sample gate, the running sequential state.

Only engagement is simulated: cost, latency, quality and errors are marked optional, so the
figures measure the engagement statistic (the part compared with other engines).
``tests/unit/evaluate/test_ab.py`` checks that the SQL aggregates equal the rows' sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fine_tuning.dev.simulator import CONCENTRATION, PERSONA_SIGMA, PERSONAS
from fine_tuning.evaluate import analysis

BASE_ENGAGEMENT = 0.068


@dataclass(frozen=True)
class StreamDesign:
    posts_per_hour: float = 60.0
    candidate_share: float = 0.1
    hours: int = 168
    pre_period_posts_per_persona: float = 40.0
    personas: int = PERSONAS
    persona_sigma: float = PERSONA_SIGMA
    # The share the agent really sends to the candidate, when not the planned one (an SRM).
    assigned_share: float | None = None


@dataclass
class Outcome:
    decision: str
    hours: float
    ever_significant: bool
    looks: list[dict[str, Any]] = field(default_factory=list)
    srm_hour: int | None = None  # the first look that found a sample ratio mismatch


def hourly_sums(rng: np.random.Generator, design: StreamDesign, true_lift: float) -> dict[str, np.ndarray]:
    """One test's per-hour, per-arm sums: arrays of shape (2, hours) for baseline (0), candidate (1)."""
    levels = rng.lognormal(-(design.persona_sigma**2) / 2, design.persona_sigma, design.personas)
    means = np.clip(BASE_ENGAGEMENT * levels, 1e-4, 0.9)
    # The covariate: each persona's mean engagement over its own posts before the test.
    k = np.maximum(rng.poisson(design.pre_period_posts_per_persona, design.personas), 1)
    pre = np.repeat(np.arange(design.personas), k)
    pre_y = rng.beta(means[pre] * CONCENTRATION, (1 - means[pre]) * CONCENTRATION)
    x_persona = np.bincount(pre, pre_y, design.personas) / k

    n_posts = rng.poisson(design.posts_per_hour * design.hours)
    hour = np.sort(rng.integers(0, design.hours, n_posts))
    share = design.candidate_share if design.assigned_share is None else design.assigned_share
    arm = (rng.random(n_posts) < share).astype(np.int64)
    persona = rng.integers(0, design.personas, n_posts)
    mean = np.clip(means[persona] * np.where(arm == 1, 1 + true_lift, 1.0), 1e-4, 0.9)
    y = rng.beta(mean * CONCENTRATION, (1 - mean) * CONCENTRATION)
    x = x_persona[persona]
    cell = arm * design.hours + hour

    def per_cell(weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(cell, weights, 2 * design.hours).reshape(2, design.hours)

    return {
        "eng_n": per_cell(None),
        "eng_sum": per_cell(y),
        "eng_sumsq": per_cell(y * y),
        "x_sum": per_cell(x),
        "x_sumsq": per_cell(x * x),
        "xy_sum": per_cell(x * y),
    }


def aggregates_at(cumulative: dict[str, np.ndarray], look: int) -> dict[str, dict[str, Any]]:
    """The SQL aggregates' shape (:func:`fine_tuning.evaluate.ab.arm_aggregates`) after ``look`` hours."""
    out = {}
    for index, arm in enumerate(("baseline", "candidate")):
        n = float(cumulative["eng_n"][index, look])
        out[arm] = {
            "posts": 0.0,  # no error counts simulated: the error-rate guardrail is missing (optional)
            "eng_n": n,
            "eng_sum": float(cumulative["eng_sum"][index, look]),
            "eng_sumsq": float(cumulative["eng_sumsq"][index, look]),
            "eng_p95": None,
            "x_n": n,
            "x_sum": float(cumulative["x_sum"][index, look]),
            "x_sumsq": float(cumulative["x_sumsq"][index, look]),
            "xy_sum": float(cumulative["xy_sum"][index, look]),
            "cost_n": 0.0,
            "cost_sum": 0.0,
            "cost_sumsq": 0.0,
            "tok_sum": 0.0,
            "tok_sumsq": 0.0,
            "cost_tok_sum": 0.0,
            "rt_n": 0.0,
            "rt_sum": 0.0,
            "rt_sumsq": 0.0,
            "rt_p95": None,
            "q_n": 0.0,
            "q_sum": 0.0,
            "q_sumsq": 0.0,
            "errors": 0.0,
        }
    return out


def engagement_criteria(**overrides: Any) -> analysis.Criteria:
    """The default criteria with the non-engagement criteria optional (they are not simulated)."""
    return analysis.Criteria(
        optional=["cost", "quality_score", "response_time_ms", "error_rate"], **overrides
    )


def run_test(
    sums: dict[str, np.ndarray],
    design: StreamDesign,
    criteria: analysis.Criteria,
    method: analysis.Method = "sequential",
    stop_at_decision: bool = True,
    keep_looks: bool = False,
) -> Outcome:
    """Look every hour from the first post with the pipeline's analysis; stop at its decision."""
    cumulative = {name: np.cumsum(values, axis=1) for name, values in sums.items()}
    state = analysis.LookState()
    ever = False
    srm_hour: int | None = None
    looks: list[dict[str, Any]] = []
    for look in range(design.hours):
        finished = look == design.hours - 1
        result = analysis.analyze_look(
            analysis.LookInputs.from_aggregates(aggregates_at(cumulative, look), design.candidate_share),
            criteria,
            method=method,
            state=state,
            finished=finished,
        )
        if result.counted:
            ever |= result.p_value < criteria.alpha
            state = result.state
        if not result.srm_ok and srm_hour is None:
            srm_hour = look + 1
        if keep_looks:
            looks.append(
                {
                    "hour": look + 1,
                    "counted": result.counted,
                    "p_value": result.p_value,
                    "ci": [result.ci_lower, result.ci_upper],
                    "variance_reduction": result.variance_reduction.get("variance_reduction"),
                    "rho2": result.variance_reduction.get("rho2"),
                }
            )
        if result.decision != "continue" and (stop_at_decision or finished):
            return Outcome(result.decision, look + 1, ever, looks, srm_hour)
    return Outcome("reject", float(design.hours), ever, looks, srm_hour)


def standard_error(share: float, tests: int) -> float:
    """Binomial standard error of a share measured over ``tests`` simulated tests."""
    return math.sqrt(share * (1 - share) / tests) if tests else float("nan")


@dataclass(frozen=True)
class RampDesign:
    """A rollout of a candidate as good as its baseline (same engagement, latency, quality,
    errors), as the demo's models cost: gpt-4o-mini with a few-shot prompt against its fine-tune."""

    posts_per_hour: float = 60.0
    initial_traffic: float = 0.1
    increment: float = 0.1
    min_dwell_hours: int = 2
    engagement_margin: float = 0.10
    max_hours: int = 24 * 14
    baseline_cost: tuple[float, float] = (1500 * 0.15, 350 * 0.60)  # USD per 1M posts: prompt, completion
    candidate_cost: tuple[float, float] = (100 * 0.30, 320 * 1.20)


def _stage_sums(
    rng: np.random.Generator, design: RampDesign, share: float, hours: int, levels: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Per-arm sums of every guardrail's metric for ``hours`` of posts at ``share``."""
    n = rng.poisson(design.posts_per_hour * hours)
    arm = rng.random(n) < share
    persona = rng.integers(0, len(levels), n)
    mean = np.clip(BASE_ENGAGEMENT * levels[persona], 1e-4, 0.9)
    y = rng.beta(mean * CONCENTRATION, (1 - mean) * CONCENTRATION)
    latency = np.maximum(50.0, rng.normal(1200.0, 180.0, n))
    quality = np.clip(rng.normal(0.78, 0.08, n), 0, 1)
    errors = rng.random(n) < 0.01
    completion = rng.lognormal(-0.02, 0.2, n)
    out: dict[str, dict[str, Any]] = {}
    for name, mask, (prompt_cost, completion_cost) in (
        ("baseline", ~arm, design.baseline_cost),
        ("candidate", arm, design.candidate_cost),
    ):
        cost = (prompt_cost + completion_cost * completion[mask]) / 1e6
        k = float(mask.sum())
        out[name] = {
            "posts": k, "eng_n": k, "eng_sum": y[mask].sum(), "eng_sumsq": (y[mask] ** 2).sum(),
            "eng_p95": None, "x_n": 0.0, "x_sum": 0.0, "x_sumsq": 0.0, "xy_sum": 0.0,
            "cost_n": k, "cost_sum": cost.sum(), "cost_sumsq": (cost**2).sum(),
            "tok_sum": 0.0, "tok_sumsq": 0.0, "cost_tok_sum": 0.0,
            "rt_n": k, "rt_sum": latency[mask].sum(), "rt_sumsq": (latency[mask] ** 2).sum(), "rt_p95": None,
            "q_n": k, "q_sum": quality[mask].sum(), "q_sumsq": (quality[mask] ** 2).sum(),
            "errors": float(errors[mask].sum()),
        }  # fmt: skip
    return out


def _add(total: dict[str, dict[str, Any]], more: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        arm: {k: (None if v is None else v + more[arm][k]) for k, v in values.items()}
        for arm, values in total.items()
    }


def simulate_ramp(
    rng: np.random.Generator, design: RampDesign, criteria: analysis.Criteria
) -> tuple[str, int]:
    """Hours until an as-good candidate reaches 100% on the evidence ramp (an hourly look at the
    stage's posts once the dwell passed, :func:`analysis.ramp_verdict`), or its rollback."""
    levels = rng.lognormal(-(PERSONA_SIGMA**2) / 2, PERSONA_SIGMA, PERSONAS)
    share, stage_start, sums = design.initial_traffic, 0, None
    for hour in range(1, design.max_hours + 1):
        more = _stage_sums(rng, design, share, 1, levels)
        sums = more if sums is None else _add(sums, more)
        if hour - stage_start < design.min_dwell_hours:
            continue
        inputs = analysis.LookInputs.from_aggregates(sums, min(share, 1 - 1e-6))
        stages = math.ceil((1.0 - design.initial_traffic) / design.increment) + 1
        verdict = analysis.ramp_verdict(inputs, criteria, design.engagement_margin, stages).verdict
        if verdict == "rollback":
            return "rolled_back", hour
        if verdict == "advance":
            share = round(share + design.increment, 6)
            if share >= 1.0:
                return "completed", hour
            stage_start, sums = hour, None
    return "still_rolling", design.max_hours
