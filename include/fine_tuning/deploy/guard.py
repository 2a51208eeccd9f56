"""The continuous rollout guard: catch a regression minutes after it starts, not at the next hour.

The hourly health check (:func:`fine_tuning.deploy.rollout.watch`) judges the triggers on every
post since the last step, up to a day of them, so a candidate that goes bad late in a stage hides
in its own good hours. The guard looks every ``guard_interval_minutes`` (5) at a sliding window:
the most recent ``guard_window_minutes`` (60) of posts, widened back (never before the rollout
started) until each arm has ``guard_min_posts``, so that a quiet hour is still judged on enough posts.

A trigger fires only when both hold, on that window:

* its value is past the deployment's threshold (engagement down by ``engagement_drop`` or more,
  error rate above ``error_rate``, p95 latency above ``p95_response_time_ms``), and
* the candidate is significantly worse than the previous model by an always-valid (mSPRT) test,
  the statistics of the A/B test's guardrails: the engagement mean, the error rate, and the share
  of posts slower than the latency threshold, each at ``guard_alpha / 3``.

The first half keeps the configured meaning of each trigger; the second keeps noise on a short
window from rolling back an as-good candidate, and a provider outage that hurts both arms alike
(rolling back would not help) from firing. The mSPRT p at one look is never below the fixed
horizon's, so a look is conservative; how often an as-good candidate is still rolled back over a
whole rollout of overlapping windows is measured by ``bench/guard_bench.py``, not assumed.

:func:`judge` only reads (one SQL query for the window, one for its aggregates): the triggerer
runs it. :func:`check` judges again and rolls back in the worker, through the rollout's own
:func:`~fine_tuning.deploy.rollout.rollback` (one atomic routing switch, recorded with why).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from fine_tuning.config import PipelineConfig, RollbackTriggers
from fine_tuning.deploy import rollout
from fine_tuning.evaluate import stats
from fine_tuning.infra import db

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

GATES = ("engagement_rate_drop", "error_rate", "p95_response_time")

# The start of the window: the k-th most recent post of each arm (k = guard_min_posts), found through
# posts_model_ts_idx; NULL when an arm has fewer posts since the floor.
WINDOW_QUERY = """
    SELECT (SELECT ts FROM posts WHERE model_id = %(candidate)s AND ts >= %(floor)s AND ts < %(end)s
            ORDER BY ts DESC OFFSET %(skip)s LIMIT 1),
           (SELECT ts FROM posts WHERE model_id = %(baseline)s AND ts >= %(floor)s AND ts < %(end)s
            ORDER BY ts DESC OFFSET %(skip)s LIMIT 1)
"""

GUARD_QUERY = """
    SELECT CASE WHEN model_id = %(candidate)s THEN 'candidate' ELSE 'baseline' END AS arm,
           count(*),
           count(*) FILTER (WHERE engagement_rate BETWEEN 0 AND 1),
           coalesce(sum(engagement_rate) FILTER (WHERE engagement_rate BETWEEN 0 AND 1), 0),
           coalesce(sum(engagement_rate * engagement_rate) FILTER (WHERE engagement_rate BETWEEN 0 AND 1), 0),
           count(*) FILTER (WHERE is_error),
           count(response_time_ms),
           count(*) FILTER (WHERE response_time_ms > %(slow_ms)s),
           percentile_cont(0.95) WITHIN GROUP (ORDER BY response_time_ms)
    FROM posts
    WHERE model_id IN (%(baseline)s, %(candidate)s) AND ts >= %(start)s AND ts < %(end)s
    GROUP BY 1
"""

FIELDS = ("posts", "eng_n", "eng_sum", "eng_sumsq", "errors", "rt_n", "slow", "rt_p95")


@dataclass
class GuardVerdict:
    """One look of the guard at one rollout: the window, each gate, and what fired."""

    deployment_id: str
    window_start: datetime
    window_end: datetime
    arms: dict[str, dict[str, Any]]
    gates: list[dict[str, Any]] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window_start"] = self.window_start.isoformat()
        data["window_end"] = self.window_end.isoformat()
        return data


def _settings(record: dict[str, Any]) -> RollbackTriggers:
    # A deployment recorded before the guard existed gets the guard's defaults for its new fields.
    return RollbackTriggers.model_validate(record["rollback_triggers"])


def _window(conn: Any, record: dict[str, Any], triggers: RollbackTriggers, now: datetime) -> datetime:
    floor = record["started_at"]
    recent = now - timedelta(minutes=triggers.guard_window_minutes)
    row = conn.execute(
        WINDOW_QUERY,
        {
            "candidate": record["candidate_model"],
            "baseline": record["previous_model"],
            "floor": floor,
            "end": now,
            "skip": triggers.guard_min_posts - 1,
        },
    ).fetchone()
    start = recent
    for kth in row or ():
        # An arm without guard_min_posts since the floor widens the window to the floor itself.
        start = min(start, kth if kth is not None else floor)
    return max(start, floor)


def judge(config: PipelineConfig, record: dict[str, Any], now: datetime) -> GuardVerdict:
    """The guard's look at one rollout at ``now`` (reads only)."""
    triggers = _settings(record)
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        start = _window(conn, record, triggers, now)
        rows = conn.execute(
            GUARD_QUERY,
            {
                "candidate": record["candidate_model"],
                "baseline": record["previous_model"],
                "start": start,
                "end": now,
                "slow_ms": triggers.p95_response_time_ms,
            },
        ).fetchall()
    arms: dict[str, dict[str, Any]] = {arm: dict.fromkeys(FIELDS, 0) for arm in ("baseline", "candidate")}
    for row in rows:
        arms[row[0]] = {
            name: (float(v) if v is not None else None) for name, v in zip(FIELDS, row[1:], strict=True)
        }
    verdict = GuardVerdict(record["id"], start, now, arms)
    b, c = arms["baseline"], arms["candidate"]
    enough = c["posts"] >= triggers.guard_min_posts and b["posts"] >= triggers.guard_min_posts
    alpha = triggers.guard_alpha / len(GATES)
    with np.errstate(divide="ignore", invalid="ignore"):  # statsmodels' ratios of an arm without errors
        gates = _gates(triggers, b, c, enough)
    for gate, value, threshold, guardrail in gates:
        if not enough or value is None or guardrail is None:
            outcome, p_harm = "no_data", None
        else:
            guardrail.make_sequential()
            p_harm = guardrail.p_harm
            past = value >= threshold if gate == "engagement_rate_drop" else value > threshold
            outcome = "fired" if past and p_harm < alpha else "pass"
        verdict.gates.append(
            {
                "gate": gate,
                "value": value,
                "threshold": threshold,
                "p_harm": p_harm,
                "alpha": alpha,
                "verdict": outcome,
            }
        )
        if outcome == "fired":
            verdict.fired.append(
                f"{gate} {rollout.shown(gate, value)} past {rollout.shown(gate, threshold)}"
                f" (always-valid p {p_harm:.2g} < {alpha:.2g})"
            )
    return verdict


def _gates(
    triggers: RollbackTriggers, b: dict[str, Any], c: dict[str, Any], enough: bool
) -> list[tuple[str, float | None, float, stats.Guardrail | None]]:
    """Each gate's value on the window and the guardrail whose harm test confirms it."""
    if not enough:
        return [
            (gate, None, threshold, None)
            for gate, threshold in zip(GATES, _thresholds(triggers), strict=True)
        ]
    drop: float | None = None
    engagement: stats.Guardrail | None = None
    if b["eng_n"] > 1 and c["eng_n"] > 1:
        base = stats.ArmSummary.from_sums(int(b["eng_n"]), b["eng_sum"], b["eng_sumsq"])
        cand = stats.ArmSummary.from_sums(int(c["eng_n"]), c["eng_sum"], c["eng_sumsq"])
        if base.mean > 0:
            drop = 1 - cand.mean / base.mean
            engagement = stats.guardrail_mean(
                "engagement_rate", base, cand, triggers.engagement_drop, higher_is_worse=False
            )
    errors = stats.guardrail_proportion(
        "error_rate",
        int(b["errors"]),
        int(b["posts"]),
        int(c["errors"]),
        int(c["posts"]),
        triggers.error_rate,
    )
    slow: stats.Guardrail | None = None
    if b["rt_n"] and c["rt_n"]:
        # The p95 is past the threshold exactly when more than 5% of posts are slower than it:
        # that share is what the harm test compares.
        slow = stats.guardrail_proportion(
            "slow_share", int(b["slow"]), int(b["rt_n"]), int(c["slow"]), int(c["rt_n"]), 0.05
        )
    return [
        ("engagement_rate_drop", drop, triggers.engagement_drop, engagement),
        ("error_rate", c["errors"] / c["posts"], triggers.error_rate, errors),
        ("p95_response_time", c["rt_p95"], triggers.p95_response_time_ms, slow),
    ]


def _thresholds(triggers: RollbackTriggers) -> tuple[float, float, float]:
    return triggers.engagement_drop, triggers.error_rate, triggers.p95_response_time_ms


def judge_all(config: PipelineConfig, now: datetime) -> list[GuardVerdict]:
    """The guard's look at every active rollout (what the trigger runs)."""
    return [judge(config, rollout.get_deployment(config, d), now) for d in rollout.active_deployments(config)]


def check(
    config: PipelineConfig, redis_client: redis.Redis, deployment_id: str, now: datetime
) -> tuple[GuardVerdict | None, dict[str, Any]]:
    """Judge one rollout and roll it back on a confirmed regression; returns the look (None when
    the rollout is no longer active) and the deployment as it now is."""
    record = rollout.get_deployment(config, deployment_id)
    if record["status"] not in rollout.ACTIVE_STATUSES:
        return None, record
    verdict = judge(config, record, now)
    if not verdict.fired:
        return verdict, record
    detected = time.perf_counter()
    log.warning("guard: deployment %s regressed: %s", deployment_id, "; ".join(verdict.fired))
    summary = {"metrics": verdict.arms, "gates": verdict.gates, "guard": verdict.to_dict()}
    reason = "automatic (guard): " + "; ".join(verdict.fired)
    return verdict, rollout.rollback(config, redis_client, deployment_id, reason, now, summary, detected)


def check_all(config: PipelineConfig, redis_client: redis.Redis, now: datetime) -> list[GuardVerdict]:
    """One guard look at every active rollout, rolling back those that regressed."""
    looks = []
    for deployment_id in rollout.active_deployments(config):
        verdict, _ = check(config, redis_client, deployment_id, now)
        if verdict is not None:
            looks.append(verdict)
    return looks
