"""Deploy a promoted candidate gradually, watch its health, advance it, or roll it back.

The deployment and each of its steps are rows (``deployments``, ``deployment_events``); the
live split is the Redis routing. A rollback switches the routing back in one MULTI/EXEC and
records why; MLflow's ``champion`` alias stays with the previous model until a rollout
completes, when the candidate becomes the champion and the next week's baseline.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from fine_tuning.config import PipelineConfig, RolloutConfig
from fine_tuning.evaluate import ab, analysis
from fine_tuning.infra import db
from fine_tuning.infra.breakers import CircuitOpenError, is_breaker_failure
from fine_tuning.infra.metrics import get_metrics
from fine_tuning.retirement import write_routing
from fine_tuning.routing import Routing, get_routing
from fine_tuning.step_graph import APPROVAL_DAG_ID
from fine_tuning.track.registry import (
    VersionNotRegistered,
    demote_candidate,
    find_version_of,
    promote_champion,
)

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

ROLLBACK_TRIGGER_NAMES = ("engagement_rate_drop", "error_rate", "p95_response_time")


class DeploymentRefused(RuntimeError):
    """A safety check failed: the deployment was not started. The message names the check."""


class UnknownDeployment(LookupError):
    """No deployment with this id."""


class DecisionNotApplicable(ValueError):
    """A person's answer to an approval that the deployment's state no longer allows (an approval
    of a rolled-back rollout, a rejection of a completed one). The message says why."""


# A rollout that owns its model type's routing: it serves a share and its health is watched.
ACTIVE_STATUSES = ("rolling_out", "awaiting_approval")


def _fetch(conn: Any, query: str, params: tuple) -> dict[str, Any] | None:
    cursor = conn.execute(query, params)
    row = cursor.fetchone()
    return None if row is None else dict(zip([c.name for c in cursor.description or ()], row, strict=True))


def is_fine_tuned(model_id: str) -> bool:
    """A model of ours (OpenAI fine-tune or self-hosted adapter), not a provider's base model."""
    return model_id.startswith(("ft:", "selfhosted:"))


def _with_events(conn: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with their ``events`` (every step, in order), read in one query."""
    events: dict[str, list[dict[str, Any]]] = {record["id"]: [] for record in records}
    rows = conn.execute(
        "SELECT deployment_id, at, kind, traffic, detail FROM deployment_events"
        " WHERE deployment_id = ANY(%s) ORDER BY id",
        (list(events),),
    ).fetchall()
    for deployment_id, at, kind, traffic, detail in rows:
        events[deployment_id].append({"at": at, "kind": kind, "traffic": traffic, "detail": detail})
    for record in records:
        record["events"] = events[record["id"]]
    return records


def get_deployment(config: PipelineConfig, deployment_id: str) -> dict[str, Any]:
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        record = _fetch(conn, "SELECT * FROM deployments WHERE id = %s", (deployment_id,))
        if record is None:
            raise UnknownDeployment(f"no deployment {deployment_id!r}")
        return _with_events(conn, [record])[0]


def list_deployments(config: PipelineConfig, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` deployments with their events, newest first (two queries)."""
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        cursor = conn.execute("SELECT * FROM deployments ORDER BY started_at DESC, id LIMIT %s", (limit,))
        names = [c.name for c in cursor.description or ()]
        records = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        return _with_events(conn, records)


def deployment_of_test(config: PipelineConfig, ab_test_id: str) -> str | None:
    """The id of the deployment that rolled out this A/B test's candidate (None: none did)."""
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        row = conn.execute("SELECT id FROM deployments WHERE ab_test_id = %s", (ab_test_id,)).fetchone()
    return None if row is None else str(row[0])


def active_deployments(config: PipelineConfig) -> list[str]:
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT id FROM deployments WHERE status = ANY(%s) ORDER BY started_at",
                (list(ACTIVE_STATUSES),),
            )
        ]


def serving_model(config: PipelineConfig, model_type: str) -> str | None:
    """The model the pipeline's own record says serves 100% of ``model_type``: the candidate of
    the last completed rollout (None when no rollout ever completed)."""
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        row = conn.execute(
            "SELECT candidate_model FROM deployments WHERE model_type = %s AND status = 'completed'"
            " ORDER BY finished_at DESC LIMIT 1",
            (model_type,),
        ).fetchone()
    return None if row is None else str(row[0])


def rollback_target(config: PipelineConfig, model_type: str) -> str | None:
    """The model an active rollout of ``model_type`` would roll back to (None: no rollout)."""
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        row = conn.execute(
            "SELECT previous_model FROM deployments WHERE model_type = %s AND status = ANY(%s)",
            (model_type, list(ACTIVE_STATUSES)),
        ).fetchone()
    return None if row is None else str(row[0])


def _event(
    conn: Any, deployment_id: str, kind: str, traffic: float, detail: dict[str, Any], at: datetime
) -> None:
    conn.execute(
        "INSERT INTO deployment_events (deployment_id, at, kind, traffic, detail)"
        " VALUES (%s, %s, %s, %s, %s)",
        (deployment_id, at, kind, traffic, json.dumps(detail, default=str)),
    )


def deploy(
    config: PipelineConfig,
    redis_client: redis.Redis,
    ab_test_id: str,
    now: datetime,
    strategy: str | None = None,
) -> dict[str, Any]:
    """Start rolling out the A/B test's candidate, after the safety checks.

    Checks: the evaluation said promote; its sample ratio was clean; the baseline is known (so it
    can be restored); no other rollout of the model type is active (one live rollout per type, the
    ``deployments_one_active_idx``). Idempotent: a second call for the same test returns the same
    deployment, also when the two ran at once.
    """
    test = ab.get_ab_test(config, ab_test_id)
    database_url = config.services.database_url.get_secret_value()
    with db.connect(database_url) as conn:
        existing = _fetch(conn, "SELECT id FROM deployments WHERE ab_test_id = %s", (ab_test_id,))
    if existing:
        record = get_deployment(config, existing["id"])
        _reapply_routing(config, redis_client, record, now)
        return record
    analysis = test["last_analysis"] or {}
    if test["status"] != "promote":
        raise DeploymentRefused(f"A/B test {ab_test_id} says {test['status']!r}, not 'promote'")
    if not analysis.get("srm_ok", False):
        raise DeploymentRefused(f"A/B test {ab_test_id}: sample ratio mismatch, the evaluation is not valid")
    if not test["baseline_model"]:
        raise DeploymentRefused(f"A/B test {ab_test_id} has no baseline model to restore")
    # A fine-tuned baseline can only be rolled back to if it is still in the registry.
    if is_fine_tuned(test["baseline_model"]) and not _restorable(
        config, test["model_type"], test["baseline_model"]
    ):
        raise DeploymentRefused(
            f"baseline {test['baseline_model']!r} of A/B test {ab_test_id} is not registered in MLflow "
            f"model {config.mlflow.registered_model_name!r}: a rollback could not restore it"
        )

    deployment = config.deployment
    strategy = strategy or deployment.strategy
    rollout = deployment.rollout_config
    migration = (test["success_criteria"] or {}).get("migration")
    if migration and strategy == "gradual_rollout":
        rollout = _ramp_before(rollout, datetime.fromisoformat(migration["deadline"]), now)
    traffic = (
        rollout.max_traffic if strategy == "immediate" else min(rollout.initial_traffic, rollout.max_traffic)
    )
    # With approval required, the step to max_traffic waits for a person: an immediate rollout
    # (its only step is that one) starts awaiting approval with the candidate serving nothing.
    awaiting = deployment.require_approval and traffic >= rollout.max_traffic
    if awaiting:
        traffic = 0.0
    # The approval's contract is the deployment's own, recorded with its ramp: a later change
    # of the monitor's configuration does not change a running rollout.
    ramp = {
        **rollout.model_dump(mode="json"),
        "require_approval": deployment.require_approval,
        "approval_timeout_hours": deployment.approval_timeout_hours,
    }
    deployment_id = f"deploy-{now:%Y%m%d}-{uuid.uuid4().hex[:8]}"
    try:
        with db.connect(database_url) as conn, conn.transaction():
            conn.execute(
                """
                INSERT INTO deployments (id, ab_test_id, model_type, candidate_model, previous_model,
                                         candidate_version, strategy, rollout_config, rollback_triggers,
                                         current_traffic, status, started_at, last_step_at)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                """,
                (
                    deployment_id,
                    ab_test_id,
                    test["model_type"],
                    test["candidate_model"],
                    test["baseline_model"],
                    test["candidate_version"],
                    strategy,
                    json.dumps(ramp),
                    deployment.rollback_triggers.model_dump_json(),
                    traffic,
                    "awaiting_approval" if awaiting else "rolling_out",
                    now,
                    now,
                ),
            )
            _event(conn, deployment_id, "started", traffic, {"strategy": strategy}, now)
            if awaiting:
                _event(conn, deployment_id, "awaiting_approval", traffic, _approval_detail(ramp), now)
    except psycopg.errors.UniqueViolation:
        # A rollout of this model type is live: this test's own, made by a concurrent call, or another's.
        with db.connect(database_url) as conn:
            concurrent = _fetch(conn, "SELECT id FROM deployments WHERE ab_test_id = %s", (ab_test_id,))
        if concurrent:
            return get_deployment(config, concurrent["id"])
        raise DeploymentRefused(f"another rollout of {test['model_type']} models is active") from None
    write_routing(
        config,
        redis_client,
        test["model_type"],
        Routing(test["baseline_model"], test["candidate_model"], traffic, deployment_id),
        now,
    )
    get_metrics(config).rollout_traffic_share(traffic)
    if traffic >= rollout.max_traffic and not awaiting:
        _complete(config, redis_client, get_deployment(config, deployment_id), now)
    return get_deployment(config, deployment_id)


def _reapply_routing(
    config: PipelineConfig, redis_client: redis.Redis, record: dict[str, Any], now: datetime
) -> None:
    """A deploy or a step run again (a retry, a cleared task, the next health check) after its
    row was committed but before its routing was written (Redis down, a kill): write the
    rollout's split now, or the deployment would own a routing that still serves the A/B test's,
    or the stage before the one recorded."""
    if record["status"] != "rolling_out":
        return
    live = get_routing(redis_client, record["model_type"])
    if (
        live is not None
        and live.source == record["id"]
        and live.candidate_model == record["candidate_model"]
        and abs(live.candidate_share - record["current_traffic"]) < 1e-9
    ):
        return
    log.warning("deployment %s: its routing was never written; writing it now", record["id"])
    write_routing(
        config,
        redis_client,
        record["model_type"],
        Routing(record["previous_model"], record["candidate_model"], record["current_traffic"], record["id"]),
        now,
    )


def _restorable(config: PipelineConfig, model_type: str, baseline: str) -> bool:
    """Whether a rollback could restore ``baseline``: it has a version in MLflow's registry.

    While MLflow cannot answer (down, a 5xx, its breaker open), the pipeline's own record stands
    in: a baseline that a completed rollout put at 100% was registered by this pipeline (in MLflow,
    or queued in the outbox that replays it), so a promoted candidate is not held back a whole
    outage. Any other baseline is refused, as it would be with MLflow up and the version gone.
    """
    try:
        return find_version_of(config, baseline) is not None
    except Exception as exc:
        if not (isinstance(exc, CircuitOpenError) or is_breaker_failure(exc)):
            raise
        if serving_model(config, model_type) != baseline:
            raise
        log.error(
            "MLflow cannot say whether baseline %s is registered (%s: %s); the pipeline's record has it"
            " at 100%% (a completed rollout), so a rollback can restore it",
            baseline,
            type(exc).__name__,
            exc,
        )
        return True


def _ramp_before(rollout: RolloutConfig, deadline: datetime, now: datetime) -> RolloutConfig:
    """A forced migration's ramp: the configured steps, each shortened so that the last one
    lands by 80% of the time left before the deadline (the old model stops serving then)."""
    steps = max(
        math.ceil((rollout.max_traffic - rollout.initial_traffic) / rollout.increment_percentage - 1e-9), 1
    )
    hours_left = (deadline - now).total_seconds() / 3600
    if hours_left <= 0:
        raise DeploymentRefused(f"the migration's deadline {deadline.isoformat()} has passed")
    interval = min(rollout.increment_interval_hours, 0.8 * hours_left / steps)
    if interval < rollout.increment_interval_hours:
        log.warning(
            "forced migration: ramp steps every %.2f h instead of %.2f h, to reach %.0f%% before %s",
            interval,
            rollout.increment_interval_hours,
            rollout.max_traffic * 100,
            deadline.isoformat(),
        )
    # A deadline, not evidence, sets this ramp's pace: it runs on the (shortened) clock.
    return rollout.model_copy(update={"increment_interval_hours": interval, "advance_on": "clock"})


def shown(gate: str, value: Any) -> str:
    return f"{value:.0f} ms" if gate == "p95_response_time" else f"{value:.1%}"


def health(config: PipelineConfig, record: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The rollback triggers, judged on the posts since the last step (one SQL query)."""
    triggers = record["rollback_triggers"]
    aggregates = ab.arm_aggregates(
        config.services.database_url.get_secret_value(),
        record["previous_model"],
        record["candidate_model"],
        record["last_step_at"],
        now,
    )
    metrics = ab.summaries(aggregates)
    candidate, baseline = metrics["candidate"], metrics["baseline"]
    fired: list[str] = []
    enough = candidate["sample_size"] >= triggers["min_posts"]
    # Each trigger's value, threshold and verdict ("no_data" below min_posts or without a value),
    # recorded with the step so that a person can see why the rollout moved, held or rolled back.
    drop = None
    if candidate["engagement_rate"] is not None and baseline["engagement_rate"]:
        drop = 1 - candidate["engagement_rate"] / baseline["engagement_rate"]
    # name, value, threshold, and whether reaching the threshold fires it (>=) or only passing it (>)
    checks = (
        ("engagement_rate_drop", drop, triggers["engagement_drop"], True),
        ("error_rate", candidate["error_rate"], triggers["error_rate"], False),
        ("p95_response_time", candidate["p95_response_time_ms"], triggers["p95_response_time_ms"], False),
    )
    gates = []
    for name, value, threshold, inclusive in checks:
        if not enough or value is None:
            verdict = "no_data"
        else:
            verdict = "fired" if (value >= threshold if inclusive else value > threshold) else "pass"
        gates.append({"gate": name, "value": value, "threshold": threshold, "verdict": verdict})
        if verdict == "fired":
            fired.append(f"{name} {shown(name, value)} {'>=' if inclusive else '>'} {shown(name, threshold)}")
    return {
        "enough_data": enough,
        "fired": fired,
        "gates": gates,
        "metrics": metrics,
        "aggregates": aggregates,
    }


def stage_evidence(
    config: PipelineConfig, record: dict[str, Any], aggregates: dict[str, dict[str, Any]]
) -> analysis.RampVerdict:
    """The always-valid non-inferiority of every guardrail on this stage's posts, with the
    margins (and optional criteria) the A/B test was decided with."""
    test = ab.get_ab_test(config, record["ab_test_id"])
    criteria = analysis.Criteria.from_record(test["success_criteria"])
    # The stage's split is the rollout's traffic; the SRM check is the A/B test's business.
    share = min(max(record["current_traffic"], 1e-6), 1 - 1e-6)
    inputs = analysis.LookInputs.from_aggregates(aggregates, share)
    ramp = record["rollout_config"]
    stages = math.ceil((ramp["max_traffic"] - ramp["initial_traffic"]) / ramp["increment_percentage"]) + 1
    return analysis.ramp_verdict(inputs, criteria, ramp["engagement_margin"], stages)


def watch(
    config: PipelineConfig, redis_client: redis.Redis, deployment_id: str, now: datetime
) -> dict[str, Any]:
    """One health check of a rollout: roll back if a trigger fires, else advance when it is time."""
    record = get_deployment(config, deployment_id)
    if record["status"] not in ACTIVE_STATUSES:
        return record
    awaiting = record["status"] == "awaiting_approval"
    if not awaiting and record["current_traffic"] >= record["rollout_config"]["max_traffic"]:
        # Full traffic already, not recorded completed: a completion was interrupted; finish it.
        _complete(config, redis_client, record, now)
        return get_deployment(config, deployment_id)
    # The routing this rollout owns may never have been written (its deploy failed on Redis):
    # each health check writes it again if it is not the rollout's.
    _reapply_routing(config, redis_client, record, now)
    verdict = health(config, record, now)
    detected = time.perf_counter()
    if verdict["fired"]:
        return rollback(
            config,
            redis_client,
            deployment_id,
            "automatic: " + "; ".join(verdict["fired"]),
            now,
            verdict,
            detected,
        )
    rollout = record["rollout_config"]
    # Deployments recorded before the evidence ramp existed keep the clock they started with.
    if rollout.get("advance_on", "clock") == "evidence":
        dwelt = now - record["last_step_at"] >= timedelta(hours=rollout["min_dwell_hours"])
        if not dwelt:
            return get_deployment(config, deployment_id)
        evidence = stage_evidence(config, record, verdict["aggregates"])
        if evidence.verdict == "rollback":
            return rollback(
                config,
                redis_client,
                deployment_id,
                "automatic: guardrail " + "; ".join(evidence.reasons),
                now,
                verdict,
                time.perf_counter(),
            )
        if awaiting:  # the triggers and guardrails are judged; the traffic waits for the person
            return get_deployment(config, deployment_id)
        if evidence.verdict == "hold":
            detail = {
                "reason": "; ".join(evidence.reasons),
                "metrics": verdict["metrics"],
                "gates": verdict["gates"],
                "evidence": evidence.to_dict(),
            }
            with db.connect(config.services.database_url.get_secret_value()) as conn:
                _event(conn, deployment_id, "held", record["current_traffic"], detail, now)
            return get_deployment(config, deployment_id)
        verdict["evidence"] = evidence.to_dict()
    elif awaiting:
        return get_deployment(config, deployment_id)
    else:
        due = now - record["last_step_at"] >= timedelta(hours=rollout["increment_interval_hours"])
        if not due or not verdict["enough_data"]:
            detail = {
                "reason": "not due" if not due else "not enough candidate posts yet",
                "metrics": verdict["metrics"],
                "gates": verdict["gates"],
            }
            if due:
                with db.connect(config.services.database_url.get_secret_value()) as conn:
                    _event(conn, deployment_id, "held", record["current_traffic"], detail, now)
            return get_deployment(config, deployment_id)
    traffic = min(
        round(record["current_traffic"] + rollout["increment_percentage"], 6), rollout["max_traffic"]
    )
    if traffic >= rollout["max_traffic"] and rollout.get("require_approval", False):
        detail = {k: verdict.get(k) for k in ("metrics", "gates", "evidence")}
        return _await_approval(config, record, detail, now)
    return _advance(config, redis_client, record, traffic, verdict, now)


def _advance(
    config: PipelineConfig,
    redis_client: redis.Redis,
    record: dict[str, Any],
    traffic: float,
    verdict: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """One step up the ramp to ``traffic``; at ``max_traffic`` the rollout completes."""
    deployment_id = record["id"]
    rollout = record["rollout_config"]
    detail = {"metrics": verdict["metrics"], "gates": verdict["gates"], "evidence": verdict.get("evidence")}
    if "approval" in verdict:
        detail["approval"] = verdict["approval"]
    with db.connect(config.services.database_url.get_secret_value()) as conn, conn.transaction():
        # The status stays: an approved rollout is 'awaiting_approval' until it is 'completed', so
        # a health check in between does not ask for the approval again.
        changed = conn.execute(
            "UPDATE deployments SET current_traffic = %s, last_step_at = %s"
            " WHERE id = %s AND status = ANY(%s)",
            (traffic, now, deployment_id, list(ACTIVE_STATUSES)),
        ).rowcount
        if changed:
            _event(conn, deployment_id, "advanced", traffic, detail, now)
    if not changed:  # rolled back meanwhile: its routing is the previous model's, leave it
        log.warning("deployment %s is no longer active: not advancing it", deployment_id)
        return get_deployment(config, deployment_id)
    write_routing(
        config,
        redis_client,
        record["model_type"],
        Routing(record["previous_model"], record["candidate_model"], traffic, deployment_id),
        now,
    )
    get_metrics(config).rollout_traffic_share(traffic)
    log.info("deployment %s advanced to %.0f%%", deployment_id, traffic * 100)
    if traffic >= rollout["max_traffic"]:
        _complete(config, redis_client, get_deployment(config, deployment_id), now)
    return get_deployment(config, deployment_id)


def _approval_detail(ramp: dict[str, Any]) -> dict[str, Any]:
    return {"approval_dag_id": APPROVAL_DAG_ID, "timeout_hours": ramp.get("approval_timeout_hours")}


def _await_approval(
    config: PipelineConfig, record: dict[str, Any], detail: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """The last step waits for a person: the traffic stays where it is (the health checks and
    rollback triggers keep running on it); ``rollout_monitor`` starts the approval's DAG run."""
    with db.connect(config.services.database_url.get_secret_value()) as conn, conn.transaction():
        changed = conn.execute(
            "UPDATE deployments SET status = 'awaiting_approval' WHERE id = %s AND status = 'rolling_out'",
            (record["id"],),
        ).rowcount
        if changed:
            _event(
                conn,
                record["id"],
                "awaiting_approval",
                record["current_traffic"],
                {**detail, **_approval_detail(record["rollout_config"])},
                now,
            )
    if changed:
        log.warning(
            "deployment %s awaits approval at %.0f%% before its last step",
            record["id"],
            record["current_traffic"] * 100,
        )
    return get_deployment(config, record["id"])


def decide(
    config: PipelineConfig,
    redis_client: redis.Redis,
    deployment_id: str,
    *,
    approved: bool,
    decided_by: str | None,
    now: datetime,
    timed_out: bool = False,
) -> dict[str, Any]:
    """Apply a person's answer to a rollout awaiting approval: Approve completes it (100%, the
    candidate the champion: what the last step does without approval); Reject, or no answer
    before the timeout, rolls it back with a reason naming who or the timeout.

    An answer the deployment's state no longer allows is recorded and then either ignored (a
    rejection of a rolled-back rollout: it is back already) or refused with
    :class:`DecisionNotApplicable` (an approval of a rolled-back rollout, a rejection of a
    completed one). The same answer twice (a retried task) changes nothing the second time.
    """
    if timed_out and approved:
        raise ValueError(f"deployment {deployment_id}: a timed-out approval cannot be an approval")
    if not timed_out and not (decided_by and decided_by.strip()):
        raise ValueError(f"deployment {deployment_id}: an answer needs the person who gave it (decided_by)")
    record = get_deployment(config, deployment_id)
    kind = "approved" if approved else "rejected"
    timeout_hours = record["rollout_config"].get("approval_timeout_hours")
    who = f"approval timed out after {timeout_hours:g} h" if timed_out else f"{kind} by {decided_by}"
    status = record["status"]
    detail: dict[str, Any] = {"decided_by": decided_by, "timed_out": timed_out, "status_before": status}
    if status != "awaiting_approval":
        if (approved and status == "completed") or (not approved and status == "rolled_back"):
            log.warning(
                "deployment %s is %s already: the answer (%s) changes nothing", deployment_id, status, who
            )
            if not any(e["kind"] == kind for e in record["events"]):
                _record_decision(config, record, kind, {**detail, "applied": False}, now)
            return get_deployment(config, deployment_id)
        _record_decision(config, record, kind, {**detail, "applied": False}, now)
        when = f" at {record['finished_at'].isoformat()}" if record["finished_at"] else ""
        why = f" ({record['rollback_reason']})" if record["rollback_reason"] else ""
        raise DecisionNotApplicable(
            f"deployment {deployment_id} is {status!r}{when}{why}, not awaiting approval: "
            f"the answer ({who}) cannot be applied"
        )
    _record_decision(config, record, kind, {**detail, "applied": True}, now)
    if not approved:
        return rollback(config, redis_client, deployment_id, who, now)
    # The health check of this moment comes with the last step: a trigger firing now rolls back.
    verdict = health(config, record, now)
    if verdict["fired"]:
        reason = f"automatic: {'; '.join(verdict['fired'])} (when {who})"
        return rollback(config, redis_client, deployment_id, reason, now, verdict)
    log.info("deployment %s %s: completing it", deployment_id, who)
    verdict["approval"] = {"decided_by": decided_by}
    return _advance(config, redis_client, record, record["rollout_config"]["max_traffic"], verdict, now)


def _record_decision(
    config: PipelineConfig, record: dict[str, Any], kind: str, detail: dict[str, Any], now: datetime
) -> None:
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        _event(conn, record["id"], kind, record["current_traffic"], detail, now)


def _complete(
    config: PipelineConfig, redis_client: redis.Redis, record: dict[str, Any], now: datetime
) -> None:
    """Full rollout: the candidate serves everything and becomes the champion and next baseline.

    In this order, so that no crash or MLflow error can split them: the ``champion`` move is
    handed to the outbox (applied, or queued durably and replayed exactly once; a buffered
    registration's version is resolved then), the routing serves the candidate alone, and only
    then is the rollout recorded ``completed``. Interrupted anywhere before that, the rollout is
    still ``rolling_out`` at full traffic and the next health check completes it again (each
    part is idempotent). A rollout rolled back meanwhile (an approval answered late) is left
    alone: its routing is the previous model's.
    """
    if get_deployment(config, record["id"])["status"] not in ACTIVE_STATUSES:
        log.warning("deployment %s is no longer active: not completing it", record["id"])
        return
    champion_move = "none: a provider's base model is not in the registry"
    if record["candidate_version"] or is_fine_tuned(record["candidate_model"]):
        try:
            moved = promote_champion(
                config, record["candidate_version"], record["candidate_model"], key=record["id"]
            )
        except VersionNotRegistered as exc:  # MLflow answered: this model has no version
            raise DeploymentRefused(
                f"deployment {record['id']} cannot complete: {exc}. It stays at full traffic,"
                " rolling_out, until the model is registered or the rollout is rolled back"
            ) from exc
        champion_move = "queued" if moved.buffered else "applied"
        if moved.buffered:
            log.warning(
                "deployment %s: MLflow unavailable, the champion move is queued (%s)",
                record["id"],
                moved.reason,
            )
    write_routing(
        config,
        redis_client,
        record["model_type"],
        Routing(record["candidate_model"], None, 0.0, f"{record['id']}:completed"),
        now,
    )
    with db.connect(config.services.database_url.get_secret_value()) as conn, conn.transaction():
        done = conn.execute(
            "UPDATE deployments SET status = 'completed', finished_at = %s"
            " WHERE id = %s AND status = ANY(%s)",
            (now, record["id"], list(ACTIVE_STATUSES)),
        ).rowcount
        if done:
            detail = {"champion_move": champion_move}
            _event(conn, record["id"], "completed", record["current_traffic"], detail, now)
    log.info("deployment %s completed: %s is the champion", record["id"], record["candidate_model"])


def _demote(config: PipelineConfig, record: dict[str, Any], reason: str) -> None:
    if not (record["candidate_version"] or is_fine_tuned(record["candidate_model"])):
        return
    # The routing is already back and recorded: an MLflow outage must not turn a done rollback
    # into an error. The alias move goes through the outbox (queued while MLflow is down,
    # replayed by the next MLflow-bound step); MLflow refusing it is logged.
    try:
        demote_candidate(config, record["candidate_version"], record["candidate_model"], reason, record["id"])
    except Exception as exc:  # noqa: BLE001
        log.error("rollback %s done, but MLflow refused the alias move: %s", record["id"], exc)


def rollback(
    config: PipelineConfig,
    redis_client: redis.Redis,
    deployment_id: str,
    reason: str,
    now: datetime,
    verdict: dict[str, Any] | None = None,
    detected_at: float | None = None,
) -> dict[str, Any]:
    """Send all traffic back to the previous model (one atomic switch), record why, fix aliases."""
    if not reason.strip():
        raise ValueError("a rollback needs a reason")
    record = get_deployment(config, deployment_id)
    if record["status"] == "rolled_back":
        # Recorded before, its alias move maybe lost (the process died, MLflow refused): the
        # move is idempotent and keyed by the deployment, so asking again does it once.
        _demote(config, record, record["rollback_reason"] or reason)
        return record
    started = detected_at or time.perf_counter()
    # A rollback target past its inference retirement is replaced by the serving fallback.
    switch_started = time.perf_counter()
    served = write_routing(
        config,
        redis_client,
        record["model_type"],
        Routing(record["previous_model"], None, 0.0, f"{deployment_id}:rolled_back"),
        now,
    )
    switch_seconds = time.perf_counter() - switch_started
    trigger_to_switch = time.perf_counter() - started
    detail = {
        "reason": reason,
        "restored_model": served.baseline_model,
        "routing_switch_seconds": switch_seconds,
        "trigger_to_switch_seconds": trigger_to_switch,
    }
    if verdict:
        detail["metrics"] = verdict["metrics"]
        detail["gates"] = verdict["gates"]
        if "guard" in verdict:  # the guard's look: its window
            detail["guard"] = verdict["guard"]
    with db.connect(config.services.database_url.get_secret_value()) as conn, conn.transaction():
        conn.execute(
            "UPDATE deployments SET status = 'rolled_back', finished_at = %s, rollback_reason = %s,"
            " current_traffic = 0"
            " WHERE id = %s",
            (now, reason, deployment_id),
        )
        _event(conn, deployment_id, "rolled_back", 0.0, detail, now)
    _demote(config, record, reason)
    fired = [name for name in ROLLBACK_TRIGGER_NAMES if name in reason]
    automatic = "guardrail" if reason.startswith("automatic: guardrail") else "manual"
    get_metrics(config).rollback(fired[0] if fired else automatic)
    get_metrics(config).rollout_traffic_share(0.0)
    log.warning("deployment %s rolled back in %.3f s: %s", deployment_id, trigger_to_switch, reason)
    return get_deployment(config, deployment_id)
