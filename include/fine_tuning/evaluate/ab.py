"""A/B tests of a candidate against the baseline: create, measure in SQL, analyse, decide.

The record is a row of ``ab_tests``; the live split is the Redis routing the agent reads
(:mod:`fine_tuning.routing`); per-arm aggregates come from one SQL query per test.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from fine_tuning import clock
from fine_tuning.config import PipelineConfig
from fine_tuning.evaluate import analysis, stats
from fine_tuning.evaluate.plots import log_evaluation_plot
from fine_tuning.infra import db
from fine_tuning.infra.metrics import get_metrics
from fine_tuning.retirement import served_routing, write_routing
from fine_tuning.routing import Routing, get_routing, set_routing
from fine_tuning.track import registry

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)


class ABTestError(RuntimeError):
    """An A/B test cannot be created or evaluated as asked; the message says why."""


class RoutingOwned(ABTestError):
    """Another A/B test or a rollout owns the routing of this model type: a new test waits.

    The policy: one owner of the routing per model type. An A/B test owns it from its creation
    until it is decided or aborted; a rollout from its start until it completes or is rolled
    back. A second writer would replace the owner's split (and break its sample ratio), so a
    new A/B test is refused until the owner is done: the weekly DAG's ``ab_create`` defers and
    tries again, the API answers 409 naming the owner.
    """

    def __init__(self, model_type: str, owner: str) -> None:
        super().__init__(f"the {model_type} routing is owned by {owner}: a new A/B test waits until it ends")
        self.model_type = model_type
        self.owner = owner


def routing_owner(conn: Any, model_type: str) -> str | None:
    """Who owns the routing of ``model_type`` now: a running A/B test or an active rollout."""
    row = conn.execute(
        """
        SELECT 'A/B test ' || id FROM ab_tests WHERE model_type = %(type)s AND status = 'running'
        UNION ALL
        SELECT 'rollout ' || id FROM deployments
        WHERE model_type = %(type)s AND status IN ('rolling_out', 'awaiting_approval')
        LIMIT 1
        """,
        {"type": model_type},
    ).fetchone()
    return None if row is None else str(row[0])


class CandidateSuperseded(ABTestError):
    """A candidate trained on newer data reached the routing's queue while this one waited: this
    one is never tested (the run skips the rest), and MLflow and ``candidate_queue`` say by whom."""

    def __init__(self, candidate_model: str, by: str) -> None:
        super().__init__(
            f"{candidate_model} waited for the routing and was superseded by {by}, trained on newer data:"
            " it will not be A/B tested"
        )
        self.candidate_model = candidate_model
        self.by = by


def _routing_lock(conn: Any, model_type: str) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('fine_tuning:routing:' || %s))", (model_type,))


def queue_candidate(
    config: PipelineConfig,
    *,
    candidate_model: str,
    candidate_version: str | None,
    dag_id: str,
    run_id: str,
    data_end: datetime,
    now: datetime,
) -> None:
    """A weekly run's candidate takes its place in the queue for the routing of its model type.

    The policy for overlapping weeks: only the newest candidate waits. While the routing is owned
    (a 7-day A/B test, a 9-day rollout) the next weeks keep training; when a candidate trained on
    newer data (a later ``data_end``) joins, the older ones still waiting are superseded — they
    would be tested against a champion they were not trained after, on traffic the newer one
    would use better. A candidate whose test already started is never superseded.

    Called before every attempt of ``ab_create``; idempotent (a candidate joins once).

    :raises CandidateSuperseded: a newer candidate is waiting or was started: this one stops
        here; its MLflow version is tagged ``superseded`` (through the outbox).
    """
    model_type = config.evaluation.model_type
    superseded: list[tuple[str, str | None, str]] = []  # (model, version, by)
    with db.connect(config.services.database_url.get_secret_value()) as conn, conn.transaction():
        _routing_lock(conn, model_type)
        # A run whose test was created before the queue existed joins as started.
        conn.execute(
            """
            INSERT INTO candidate_queue (candidate_model, model_type, candidate_version, dag_id, run_id,
                                         data_end, queued_at, status, ab_test_id)
            SELECT %(model)s, %(type)s, %(version)s, %(dag)s, %(run)s, %(end)s, %(now)s,
                   CASE WHEN t.id IS NULL THEN 'waiting' ELSE 'started' END, t.id
            FROM (SELECT 1) AS one LEFT JOIN ab_tests t ON t.dag_id = %(dag)s AND t.run_id = %(run)s
            ON CONFLICT DO NOTHING
            """,
            {
                "model": candidate_model,
                "type": model_type,
                "version": candidate_version,
                "dag": dag_id,
                "run": run_id,
                "end": data_end,
                "now": now,
            },
        )
        row = conn.execute(
            "SELECT status, superseded_by, data_end FROM candidate_queue WHERE candidate_model = %s",
            (candidate_model,),
        ).fetchone()
        if row is None:  # another candidate is queued under this (dag_id, run_id)
            raise ABTestError(f"run {dag_id}/{run_id} queued another candidate than {candidate_model}")
        status, by, mine = row
        if status == "waiting":
            newer = conn.execute(
                """
                SELECT candidate_model FROM candidate_queue
                WHERE model_type = %s AND status IN ('waiting', 'started') AND data_end > %s
                ORDER BY data_end DESC LIMIT 1
                """,
                (model_type, mine),
            ).fetchone()
            if newer is not None:  # this run was late: a newer candidate is already in the queue
                status, by = "superseded", str(newer[0])
                conn.execute(
                    "UPDATE candidate_queue SET status = 'superseded', superseded_by = %s, decided_at = %s"
                    " WHERE candidate_model = %s",
                    (by, now, candidate_model),
                )
            else:
                for model, version in conn.execute(
                    """
                    UPDATE candidate_queue SET status = 'superseded', superseded_by = %s, decided_at = %s
                    WHERE model_type = %s AND status = 'waiting' AND candidate_model <> %s AND data_end <= %s
                    RETURNING candidate_model, candidate_version
                    """,
                    (candidate_model, now, model_type, candidate_model, mine),
                ).fetchall():
                    superseded.append((model, version, candidate_model))
        if status == "superseded":
            superseded.append((candidate_model, candidate_version, str(by)))
    # After the commit: the queue is the record; MLflow's tags follow through the outbox (a
    # crash in between is repaired by the superseded run's next attempt, which asks again).
    for model, version, newer_model in superseded:
        log.warning("candidate %s is superseded by %s, trained on newer data", model, newer_model)
        registry.mark_superseded(config, version, model, newer_model)
    if status == "superseded":
        raise CandidateSuperseded(candidate_model, str(by))


class UnknownABTest(LookupError):
    """No A/B test with this id."""


# One query per test: every per-arm aggregate the analysis needs, computed by PostgreSQL.
# FILTER keeps each metric to the rows where it is valid (NaN and out-of-range engagement,
# posts not yet scored, missing cost or latency are left out of that metric only).
# The covariate x of a post (for CUPED) is its persona's mean engagement in
# [covariate_start, start), before the test, so the arm cannot have changed it; a persona
# without posts then gets the mean of all of them. No posts before the test: x is NULL, no sums.
AGGREGATE_QUERY = """
    WITH pre AS (
        SELECT persona_id, avg(engagement_rate) AS x, count(*) AS k
        FROM posts
        WHERE ts >= %(covariate_start)s AND ts < %(start)s AND engagement_rate BETWEEN 0 AND 1
        GROUP BY persona_id
    ), pre_all AS (
        SELECT sum(x * k) / sum(k) AS x FROM pre
    )
    SELECT CASE WHEN model_id = %(candidate)s THEN 'candidate' ELSE 'baseline' END AS arm,
           count(*) AS posts,
           count(*) FILTER (WHERE eng_ok) AS eng_n,
           coalesce(sum(engagement_rate) FILTER (WHERE eng_ok), 0) AS eng_sum,
           coalesce(sum(engagement_rate * engagement_rate) FILTER (WHERE eng_ok), 0) AS eng_sumsq,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY engagement_rate) FILTER (WHERE eng_ok) AS eng_p95,
           count(x) FILTER (WHERE eng_ok) AS x_n,
           coalesce(sum(x) FILTER (WHERE eng_ok), 0) AS x_sum,
           coalesce(sum(x * x) FILTER (WHERE eng_ok), 0) AS x_sumsq,
           coalesce(sum(x * engagement_rate) FILTER (WHERE eng_ok), 0) AS xy_sum,
           count(*) FILTER (WHERE cost_ok) AS cost_n,
           coalesce(sum(cost_usd) FILTER (WHERE cost_ok), 0) AS cost_sum,
           coalesce(sum(cost_usd * cost_usd) FILTER (WHERE cost_ok), 0) AS cost_sumsq,
           coalesce(sum(tokens_used::float8) FILTER (WHERE cost_ok), 0) AS tok_sum,
           coalesce(sum(tokens_used::float8 * tokens_used) FILTER (WHERE cost_ok), 0) AS tok_sumsq,
           coalesce(sum(cost_usd * tokens_used) FILTER (WHERE cost_ok), 0) AS cost_tok_sum,
           count(response_time_ms) AS rt_n,
           coalesce(sum(response_time_ms), 0) AS rt_sum,
           coalesce(sum(response_time_ms * response_time_ms), 0) AS rt_sumsq,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY response_time_ms) AS rt_p95,
           count(quality_score) AS q_n,
           coalesce(sum(quality_score), 0) AS q_sum,
           coalesce(sum(quality_score * quality_score), 0) AS q_sumsq,
           count(*) FILTER (WHERE is_error) AS errors
    FROM (
        SELECT p.model_id, p.engagement_rate, p.cost_usd, p.tokens_used, p.response_time_ms,
               p.quality_score, p.is_error,
               p.engagement_rate BETWEEN 0 AND 1 AS eng_ok,
               p.cost_usd IS NOT NULL AND p.tokens_used > 0 AS cost_ok,
               coalesce(pre.x, (SELECT x FROM pre_all)) AS x
        FROM posts AS p LEFT JOIN pre ON pre.persona_id = p.persona_id
        WHERE p.model_id IN (%(baseline)s, %(candidate)s) AND p.ts >= %(start)s AND p.ts < %(end)s
    ) AS window_posts
    GROUP BY 1
"""

ARM_FIELDS = (
    "posts",
    "eng_n",
    "eng_sum",
    "eng_sumsq",
    "eng_p95",
    "x_n",
    "x_sum",
    "x_sumsq",
    "xy_sum",
    "cost_n",
    "cost_sum",
    "cost_sumsq",
    "tok_sum",
    "tok_sumsq",
    "cost_tok_sum",
    "rt_n",
    "rt_sum",
    "rt_sumsq",
    "rt_p95",
    "q_n",
    "q_sum",
    "q_sumsq",
    "errors",
)
# Fields that are NULL rather than 0 when an arm has no value to take a percentile of.
NULLABLE_FIELDS = ("eng_p95", "rt_p95")


def arm_aggregates(
    database_url: str,
    baseline: str,
    candidate: str,
    start: datetime,
    end: datetime,
    covariate_start: datetime | None = None,
) -> dict[str, dict[str, float]]:
    """Per-arm sums for posts made by either model in [start, end):
    ``{"baseline": {...}, "candidate": {...}}``; with ``covariate_start``, also the sums of each
    post's pre-period covariate (its persona's mean engagement in [covariate_start, start))."""
    empty: dict[str, Any] = dict.fromkeys(ARM_FIELDS, 0.0)
    empty.update(dict.fromkeys(NULLABLE_FIELDS))
    result = {"baseline": dict(empty), "candidate": dict(empty)}
    params = {
        "baseline": baseline,
        "candidate": candidate,
        "start": start,
        "end": end,
        "covariate_start": covariate_start or start,
    }
    with db.connect(database_url) as conn:
        rows = conn.execute(AGGREGATE_QUERY, params).fetchall()
    for row in rows:
        # The percentiles alone may be None (an arm without values); the summaries read them so.
        values = zip(ARM_FIELDS, row[1:], strict=True)
        result[row[0]] = {name: (float(v) if v is not None else None) for name, v in values}
    return result


def summaries(aggregates: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per-arm metrics as the API shows them (engagement, cost per token, latency, quality, n)."""
    out: dict[str, dict[str, Any]] = {}
    for arm, a in aggregates.items():
        out[arm] = {
            "sample_size": int(a["posts"]),
            "engagement_rate": a["eng_sum"] / a["eng_n"] if a["eng_n"] else None,
            "p95_engagement": a["eng_p95"],
            "cost_per_post": a["cost_sum"] / a["cost_n"] if a["cost_n"] else None,
            "cost_per_token": a["cost_sum"] / a["tok_sum"] if a["tok_sum"] else None,
            "response_time_ms": a["rt_sum"] / a["rt_n"] if a["rt_n"] else None,
            "p95_response_time_ms": a["rt_p95"],
            "quality_score": a["q_sum"] / a["q_n"] if a["q_n"] else None,
            "error_rate": a["errors"] / a["posts"] if a["posts"] else None,
        }
    return out


def _new_id(now: datetime) -> str:
    return f"ab-{now:%Y%m%d}-{uuid.uuid4().hex[:8]}"


def baseline_history(config: PipelineConfig, baseline: str, now: datetime) -> tuple[float, float, float]:
    """The baseline's recent engagement mean, standard deviation and posts per hour."""
    hours = config.evaluation.power_history_hours
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        n, mean, var = db.one_row(
            conn.execute(
                """
            SELECT count(*), avg(engagement_rate), var_samp(engagement_rate)
            FROM posts
            WHERE model_id = %(model)s AND ts >= %(start)s AND ts < %(end)s
              AND engagement_rate BETWEEN 0 AND 1
            """,
                {"model": baseline, "start": now - timedelta(hours=hours), "end": now},
            )
        )
    return float(mean or 0.0), math.sqrt(float(var or 0.0)), n / hours


def create_ab_test(
    config: PipelineConfig,
    redis_client: redis.Redis,
    *,
    baseline_model: str,
    candidate_model: str,
    now: datetime,
    candidate_version: str | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    migration: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Record the test, check its power, and route ``traffic_split`` of requests to the candidate.

    Idempotent per (dag_id, run_id): a retried task gets the test it created before.

    ``migration`` (a forced migration, see :func:`fine_tuning.pipeline.plan_migration`) makes the
    test a non-inferiority test (``retirement.non_inferiority_margin``) that ends by half the time
    left before the deadline, so that the rollout can finish before the old model stops serving.
    """
    entered = time.monotonic()
    evaluation = config.evaluation
    database_url = config.services.database_url.get_secret_value()
    if dag_id and run_id:
        with db.connect(database_url) as conn:
            row = conn.execute(
                "SELECT id FROM ab_tests WHERE dag_id = %s AND run_id = %s", (dag_id, run_id)
            ).fetchone()
        if row:
            return get_ab_test(config, row[0])
    if baseline_model == candidate_model:
        raise ABTestError(f"baseline_model and candidate_model are the same ({baseline_model!r})")

    mean, sd, per_hour = baseline_history(config, baseline_model, now)
    try:
        plan = stats.power_plan(
            mean,
            sd,
            per_hour,
            evaluation.traffic_split,
            evaluation.duration_hours,
            evaluation.success_criteria.min_engagement_lift,
            evaluation.significance_threshold,
            evaluation.power,
        )
        plan_dict: dict[str, Any] = asdict(plan)
    except stats.AnalysisInputError as exc:
        plan_dict = {
            "adequate": False,
            "message": f"no power calculation: {exc} (no baseline history for {baseline_model!r})",
        }
    if not plan_dict["adequate"]:
        if evaluation.strict_power:
            raise ABTestError(
                f"evaluation.strict_power: refusing to start the A/B test: {plan_dict['message']}"
            )
        log.warning("A/B TEST UNDERPOWERED — %s", plan_dict["message"])
    else:
        log.info("A/B test power: %s", plan_dict["message"])

    ab_test_id = _new_id(now)
    routing = served_routing(
        config,
        evaluation.model_type,
        Routing(baseline_model, candidate_model, evaluation.traffic_split, ab_test_id),
        now,
    )
    if (routing.baseline_model, routing.candidate_model) != (baseline_model, candidate_model):
        raise ABTestError(
            f"cannot A/B test {candidate_model!r} against {baseline_model!r}: a model past its inference "
            f"retirement cannot take traffic (the routing would serve {routing.baseline_model!r} and "
            f"{routing.candidate_model!r}); see fine_tuning.retirement"
        )
    criteria = {
        **evaluation.success_criteria.model_dump(),
        "significance_threshold": evaluation.significance_threshold,
        "method": evaluation.method,
        "srm_alpha": evaluation.srm_alpha,
        "guardrails": evaluation.guardrails.model_dump(),
        "min_samples_per_arm": evaluation.min_samples_per_arm,
        "variance_reduction": evaluation.variance_reduction,
        "covariate_days": evaluation.covariate_days,
    }
    duration = timedelta(hours=evaluation.duration_hours)
    if migration:
        deadline = datetime.fromisoformat(migration["deadline"])
        if deadline <= now:
            raise ABTestError(
                f"migration from {migration['from_model']}: its deadline {deadline.isoformat()} has passed; "
                "the routing serves retirement.serving_fallback once the model retires"
            )
        criteria.update(
            {
                "rule": "non_inferiority",
                "non_inferiority_margin": config.retirement.non_inferiority_margin,
                "migration": migration,
            }
        )
        duration = min(duration, (deadline - now) / 2)
        log.warning(
            "A/B test of %s is a forced migration (%s): non-inferiority within %.0f%%, ending by %s",
            candidate_model,
            migration["reason"],
            config.retirement.non_inferiority_margin * 100,
            (now + duration).isoformat(),
        )
    planned_end = now + duration
    with db.connect(database_url) as conn, conn.transaction():
        # One owner of the routing per model type, enforced here, where it is written: the lock
        # makes two concurrent creations take turns, and the second sees the first as owner.
        _routing_lock(conn, evaluation.model_type)
        queued = conn.execute(
            "SELECT status, superseded_by FROM candidate_queue WHERE candidate_model = %s", (candidate_model,)
        ).fetchone()
        if queued is not None and queued[0] == "superseded":  # overtaken since it joined the queue
            raise CandidateSuperseded(candidate_model, str(queued[1]))
        owner = routing_owner(conn, evaluation.model_type)
        if owner is not None:
            raise RoutingOwned(evaluation.model_type, owner)
        conn.execute(
            """
            INSERT INTO ab_tests (id, model_type, baseline_model, candidate_model, candidate_version,
                                  traffic_split, started_at, planned_end_at, status, success_criteria,
                                  power_plan, dag_id, run_id)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'running', %s, %s, %s, %s)
            """,
            (
                ab_test_id,
                evaluation.model_type,
                baseline_model,
                candidate_model,
                candidate_version,
                evaluation.traffic_split,
                now,
                planned_end,
                json.dumps(criteria),
                json.dumps(plan_dict),
                dag_id,
                run_id,
            ),
        )
        # The test starts when the routing switches, not when this function began: posts made
        # in between were all routed to the baseline and would skew the sample ratio.
        set_routing(redis_client, evaluation.model_type, routing)
        started = now + timedelta(seconds=time.monotonic() - entered)
        conn.execute(
            "UPDATE ab_tests SET started_at = %s, planned_end_at = %s WHERE id = %s",
            (started, started + duration, ab_test_id),
        )
        conn.execute(
            "UPDATE candidate_queue SET status = 'started', ab_test_id = %s, decided_at = %s"
            " WHERE candidate_model = %s AND status = 'waiting'",
            (ab_test_id, started, candidate_model),
        )
    return get_ab_test(config, ab_test_id)


def _ab_test_record(cursor: Any, row: tuple) -> dict[str, Any]:
    record = dict(zip([c.name for c in cursor.description or ()], row, strict=True))
    split = record["traffic_split"]
    record["traffic_allocation"] = {"baseline": round(1 - split, 6), "candidate": split}
    record["estimated_end_time"] = record["planned_end_at"]
    return record


def get_ab_test(config: PipelineConfig, ab_test_id: str) -> dict[str, Any]:
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        cursor = conn.execute("SELECT * FROM ab_tests WHERE id = %s", (ab_test_id,))
        row = cursor.fetchone()
        if row is None:
            raise UnknownABTest(f"no A/B test {ab_test_id!r}")
        return _ab_test_record(cursor, row)


def list_ab_tests(config: PipelineConfig, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` A/B tests, newest first, as :func:`get_ab_test` records them (one query)."""
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        cursor = conn.execute("SELECT * FROM ab_tests ORDER BY started_at DESC, id LIMIT %s", (limit,))
        return [_ab_test_record(cursor, row) for row in cursor.fetchall()]


def ab_test_of_run(config: PipelineConfig, dag_id: str, run_id: str) -> str | None:
    """The id of the A/B test a pipeline run created (None: it created none)."""
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        row = conn.execute(
            "SELECT id FROM ab_tests WHERE dag_id = %s AND run_id = %s", (dag_id, run_id)
        ).fetchone()
    return None if row is None else str(row[0])


def test_aggregates(
    config: PipelineConfig, test: dict[str, Any], until: datetime
) -> dict[str, dict[str, Any]]:
    """The test's per-arm aggregates up to ``until``, with the pre-period covariate when the
    test's criteria turn variance reduction on."""
    criteria = test["success_criteria"]
    covariate_start = None
    if criteria.get("variance_reduction", "auto") != "off":
        covariate_start = test["started_at"] - timedelta(days=criteria.get("covariate_days", 28))
    return arm_aggregates(
        config.services.database_url.get_secret_value(),
        test["baseline_model"],
        test["candidate_model"],
        test["started_at"],
        until,
        covariate_start,
    )


def analyze_test(
    test: dict[str, Any], aggregates: dict[str, dict[str, Any]], until: datetime
) -> analysis.Analysis:
    """The one analysis (:func:`fine_tuning.evaluate.analysis.analyze_look`) of a recorded test."""
    criteria = test["success_criteria"]
    finished = until >= test["planned_end_at"]
    result = analysis.analyze_look(
        analysis.LookInputs.from_aggregates(aggregates, test["traffic_split"]),
        analysis.Criteria.from_record(criteria),
        method=criteria.get("method", "sequential"),
        state=analysis.LookState.from_record(test["min_sequential_p"], test["last_analysis"]),
        finished=finished,
    )
    if criteria.get("rule") == "non_inferiority" and result.counted:
        return non_inferiority_decision(result, float(criteria["non_inferiority_margin"]), finished)
    return result


def non_inferiority_decision(result: analysis.Analysis, margin: float, finished: bool) -> analysis.Analysis:
    """A forced migration's verdict: the replacement need not be better, only not worse.

    Promote when the (always-valid, for the sequential method) confidence interval of the
    relative engagement lift lies above ``-margin``, every guardrail passed its non-inferiority
    test, no required criterion is missing and the sample ratio is clean; reject when the
    interval lies below ``-margin``, a guardrail is violated, the ratio is off, or the test ends
    without showing non-inferiority. Cost is reported but does not decide: the model it is
    compared with retires.
    """
    assert result.ci_lower is not None and result.ci_upper is not None
    deciding = [g for g in result.guardrails if g.name != "cost_per_post"]
    guardrails_pass = all(g.status == "pass" for g in deciding)
    violated = any(g.status == "violated" for g in deciding)
    shown = result.ci_lower > -margin
    worse = result.ci_upper < -margin

    def is_cost(reason: dict[str, Any]) -> bool:
        return reason.get("criterion") in ("cost_efficiency_gain", "guardrail:cost_per_post", "cost")

    reasons = [
        {**r, "ok": None, "note": "reported; does not decide a forced migration"} if is_cost(r) else r
        for r in result.reasons
        if r.get("criterion") not in ("engagement_lift", "significance", "verdict")
    ]
    missing = any(r.get("status") == "missing" and r["ok"] is False for r in reasons)
    reasons.insert(
        0,
        {
            "criterion": "engagement_non_inferiority",
            "value": result.relative_lift,
            "ci": [result.ci_lower, result.ci_upper],
            "threshold": -margin,
            "ok": shown,
            "note": f"lower bound of the lift must be above -{margin:.0%} (forced migration)",
        },
    )
    decision: analysis.Decision
    if result.srm_ok and shown and guardrails_pass and not missing:
        decision = "promote"
        note = "not worse than the retiring model: promoted for the migration"
    elif not result.srm_ok:
        decision, note = "reject", "SRM: the test is invalid and cannot promote"
    elif worse:
        decision, note = "reject", f"the replacement is worse by more than {margin:.0%}"
    elif violated:
        decision, note = "reject", "a guardrail is significantly worse"
    elif finished:
        decision, note = "reject", "the test ended without showing non-inferiority"
    else:
        decision, note = "continue", "non-inferiority not shown yet"
    reasons.append({"criterion": "verdict", "note": note})
    return replace(result, decision=decision, reasons=reasons)


def _emit_metrics(
    config: PipelineConfig, ab_test_id: str, metrics: dict[str, dict[str, Any]], decision: str
) -> None:
    """Per-arm model metrics and the decision over StatsD (names defined in fine_tuning.metrics)."""
    emitter = get_metrics(config)
    for variant, arm in metrics.items():
        if arm["engagement_rate"] is not None:
            emitter.model_engagement_rate(arm["engagement_rate"], variant=variant)
        if arm["cost_per_token"] is not None:
            emitter.model_cost_per_token(arm["cost_per_token"], variant=variant)
        if arm["quality_score"] is not None:
            emitter.model_quality_score(arm["quality_score"], variant=variant)
    if metrics["candidate"]["error_rate"] is not None:
        # The candidate arm's success rate: the share of its requests that made a post.
        emitter.ab_test_success_rate(1 - metrics["candidate"]["error_rate"], test_id=ab_test_id)
    emitter.ab_test_decision(decision)


def evaluate_ab_test(
    config: PipelineConfig,
    redis_client: redis.Redis | None,
    ab_test_id: str,
    now: datetime,
    on_look: Callable[[dict[str, Any], dict[str, dict[str, Any]], datetime], None] | None = None,
) -> dict[str, Any]:
    """One look at the test: analyse, keep the running sequential p-value, and decide.

    ``reject`` also takes the candidate out of the routing; ``promote`` leaves it for the deploy.
    ``on_look(test, aggregates, now)`` is called once the look is recorded, with the test as the
    look left it and the aggregates it decided on (the evaluate step caches the look's report).
    """
    test = get_ab_test(config, ab_test_id)
    if test["status"] != "running":
        if test["status"] == "reject" and redis_client is not None:
            # Decided before, its routing write maybe lost (a kill, Redis down): the candidate
            # still has its split unless that is written now.
            _end_split(config, redis_client, test, "rejected", now)
        return {
            "ab_test_id": ab_test_id,
            "decision": test["status"],
            "analysis": test["last_analysis"],
            "final": True,
        }
    aggregates = test_aggregates(config, test, now)
    metrics = summaries(aggregates)
    result = analyze_test(test, aggregates, now)
    decision = result.decision
    body = result.to_dict()
    p_running = result.p_value if result.method == "sequential" else test["min_sequential_p"]
    body["metrics"] = metrics
    body["evaluated_at"] = now.isoformat()
    history = list((test["last_analysis"] or {}).get("history", []))
    if result.counted:
        history.append(
            {
                "at": now.isoformat(),
                "lift": result.relative_lift,
                "ci_lower": result.ci_lower,
                "ci_upper": result.ci_upper,
                "p_value": result.p_value,
                "variance_reduction": result.variance_reduction.get("variance_reduction"),
            }
        )
    body["history"] = history
    body["plot"] = log_evaluation_plot(config, test, aggregates, history)
    status = "running" if decision == "continue" else decision
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        recorded = conn.execute(
            """
            UPDATE ab_tests SET looks = looks + 1, min_sequential_p = %s, last_analysis = %s,
                   status = %s, ended_at = CASE WHEN %s <> 'running' THEN %s ELSE ended_at END
            WHERE id = %s AND status = 'running'
            """,
            (p_running, json.dumps(body, default=str), status, status, now, ab_test_id),
        ).rowcount
    _emit_metrics(config, ab_test_id, metrics, decision)
    if recorded and on_look is not None:
        looked = {**test, "looks": test["looks"] + 1, "status": status}
        looked["ended_at"] = now if status != "running" else test["ended_at"]
        try:
            on_look(looked, aggregates, now)
        except Exception:  # any: the look is recorded, and a reader computes the report itself
            log.exception("A/B test %s: caching look %d's report failed", ab_test_id, looked["looks"])
    if decision == "reject" and redis_client is not None:
        write_routing(
            config,
            redis_client,
            test["model_type"],
            Routing(test["baseline_model"], None, 0.0, f"{ab_test_id}:rejected"),
            now,
        )
    log.info("A/B test %s look %d: %s", ab_test_id, test["looks"] + 1, decision)
    return {"ab_test_id": ab_test_id, "decision": decision, "analysis": body, "final": decision != "continue"}


def _end_split(
    config: PipelineConfig, redis_client: redis.Redis, test: dict[str, Any], why: str, now: datetime
) -> None:
    """A decided or stopped test whose split is still live (the step that recorded it died, or
    Redis failed, before its routing write): all traffic back to the baseline. A routing that is
    no longer the test's (a later owner's) is left alone."""
    live = get_routing(redis_client, test["model_type"])
    if live is None or live.source != test["id"]:
        return
    log.warning(
        "A/B test %s is %s but its split is still live: routing back to the baseline", test["id"], why
    )
    write_routing(
        config,
        redis_client,
        test["model_type"],
        Routing(test["baseline_model"], None, 0.0, f"{test['id']}:{why}"),
        now,
    )


def stop_ab_test(config: PipelineConfig, redis_client: redis.Redis, ab_test_id: str) -> bool:
    """Mark a running A/B test aborted and send all of its traffic back to the baseline.

    :returns: whether the test was running (False for a test already decided, stopped or unknown).
    """
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        row = conn.execute(
            "UPDATE ab_tests SET status = 'aborted', ended_at = now() WHERE id = %s AND status = 'running'"
            " RETURNING model_type, baseline_model",
            (ab_test_id,),
        ).fetchone()
    if row is None:
        with suppress(UnknownABTest):  # aborted before, its routing write maybe lost: write it
            test = get_ab_test(config, ab_test_id)
            if test["status"] == "aborted":
                _end_split(config, redis_client, test, "aborted", clock.now_utc())
        return False
    write_routing(
        config, redis_client, row[0], Routing(row[1], None, 0.0, f"{ab_test_id}:aborted"), clock.now_utc()
    )
    return True
