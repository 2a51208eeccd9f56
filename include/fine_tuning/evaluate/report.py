"""An A/B test's metrics report, as the REST API serves it: per-arm metrics from SQL, how the
candidate compares, and a read-only analysis (the decisions are the evaluation DAG's), cached in
Redis for ``evaluation.metrics_cache_ttl_seconds``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from fine_tuning import clock
from fine_tuning.config import PipelineConfig
from fine_tuning.evaluate import ab, stats
from fine_tuning.infra.cache import MetricsCache


class MetricsReport(BaseModel):
    """One read of a test's metrics (the API's response body); ``cached`` says whether it came
    from the cache."""

    ab_test_id: str
    status: str
    duration_hours: float
    metrics: dict[str, dict[str, Any]]
    performance_comparison: dict[str, float | None]
    statistical_analysis: dict[str, Any]
    recommendation: str
    cached: bool
    # Seconds since the metrics were computed (0 when computed for this read). Past the TTL a
    # cached answer is still served, at most ``cache.stale_seconds`` longer, while it is refreshed.
    age_seconds: float = 0.0


def relative_change(
    candidate: float | None, baseline: float | None, lower_is_better: bool = False
) -> float | None:
    """The candidate's change over the baseline as a share (positive: better); None without both."""
    if candidate is None or not baseline:
        return None
    change = candidate / baseline - 1
    return round(-change if lower_is_better else change, 6)


def compute_metrics(config: PipelineConfig, test: dict[str, Any], until: datetime) -> dict[str, Any]:
    """Per-arm metrics, their comparison and a read-only analysis of the test's posts up to ``until``
    (uncached: one aggregate query and the statistics)."""
    return metrics_body(test, ab.test_aggregates(config, test, until), until)


def metrics_body(
    test: dict[str, Any], aggregates: dict[str, dict[str, Any]], until: datetime
) -> dict[str, Any]:
    """The report's body from the test's per-arm aggregates up to ``until``."""
    arms = ab.summaries(aggregates)
    b, c = arms["baseline"], arms["candidate"]
    comparison = {
        "engagement_lift": relative_change(c["engagement_rate"], b["engagement_rate"]),
        # Cost per post is what the decision uses; cost per token is reported next to it.
        "cost_efficiency_gain": relative_change(c["cost_per_post"], b["cost_per_post"], lower_is_better=True),
        "cost_per_token_gain": relative_change(
            c["cost_per_token"], b["cost_per_token"], lower_is_better=True
        ),
        "quality_improvement": relative_change(c["quality_score"], b["quality_score"]),
        "latency_improvement": relative_change(
            c["response_time_ms"], b["response_time_ms"], lower_is_better=True
        ),
    }
    try:
        result = ab.analyze_test(test, aggregates, until)
    except stats.AnalysisInputError as exc:
        # Aggregates SQL made cannot be analysed (a zero baseline mean): say so, decide nothing.
        analysis: dict[str, Any] = {"is_significant": False, "decision": "continue", "note": str(exc)}
    else:
        alpha = test["success_criteria"].get("significance_threshold", 0.05)
        analysis = {
            "is_significant": result.counted and result.p_value < alpha,
            "confidence_level": 1 - alpha,
            "method": result.method,
            "statistic": result.statistic,
            "p_value": result.p_value,
            "relative_lift": result.relative_lift,
            "ci_lower": result.ci_lower,
            "ci_upper": result.ci_upper,
            "effect_size": result.effect_size["label"] if result.effect_size else None,
            "cohens_d": result.effect_size["cohens_d"] if result.effect_size else None,
            "variance_reduction": result.variance_reduction,
            "sample_size": result.sample_size,
            "srm_p_value": result.srm_p_value,
            "srm_ok": result.srm_ok,
            "decision": result.decision,
            "reasons": result.reasons,
        }
    return {"metrics": arms, "performance_comparison": comparison, "statistical_analysis": analysis}


def cache_key(test: dict[str, Any]) -> str:
    """The report's cache entry. It holds the test's status, so a decision made since the last
    read is never hidden; the look count is the entry's version, so the report of an earlier look
    may still be served (saying how old it is) while the new one is computed."""
    return f"ab_metrics:{test['id']}:{test['status']}"


def publish_look(
    config: PipelineConfig,
    cache: MetricsCache,
    test: dict[str, Any],
    aggregates: dict[str, dict[str, Any]],
    until: datetime,
) -> None:
    """Store the report of a look just made (``test`` as the look left it, ``aggregates`` the
    ones it decided on), so that readers find this look's numbers without a recompute."""
    ttl = config.evaluation.metrics_cache_ttl_seconds
    if ttl > 0:
        cache.store(cache_key(test), metrics_body(test, aggregates, until), ttl, version=test["looks"])


def metrics_report(config: PipelineConfig, ab_test_id: str, now: datetime | None = None) -> MetricsReport:
    """The test's metrics up to ``now`` (default: the pipeline's clock), or to its end once it ended.

    :raises ab.UnknownABTest: no test with this id.
    """
    test = ab.get_ab_test(config, ab_test_id)
    now = now or clock.now_utc()
    until = min(now, test["ended_at"]) if test["ended_at"] else now

    def compute() -> dict[str, Any]:
        return compute_metrics(config, test, until)

    ttl = config.evaluation.metrics_cache_ttl_seconds
    if ttl > 0:
        cache = MetricsCache.from_config(config)
        answer = cache.lookup(cache_key(test), compute, ttl, version=test["looks"])
        body, cached, age = answer.value, answer.cached, answer.age_seconds
    else:
        body, cached, age = compute(), False, 0.0
    running = test["status"] == "running"
    return MetricsReport(
        ab_test_id=ab_test_id,
        status=test["status"],
        duration_hours=round((until - test["started_at"]).total_seconds() / 3600, 3),
        metrics=body["metrics"],
        performance_comparison=body["performance_comparison"],
        statistical_analysis=body["statistical_analysis"],
        recommendation=body["statistical_analysis"].get("decision", "continue")
        if running
        else test["status"],
        cached=cached,
        age_seconds=round(age, 3),
    )
