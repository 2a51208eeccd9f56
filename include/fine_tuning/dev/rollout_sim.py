"""A rollout under simulated traffic, watched as production watches it: the guard every few
minutes and the hourly health check, on real PostgreSQL and Redis, with a clock the simulation
moves. For ``bench/guard_bench.py`` (time from a regression's onset to the routing switched) and
the tests of the guard.

The candidate behaves as well as the baseline until ``onset``, then as its ``kind`` says:
``equal`` (no change: any rollback is a false one), ``worse`` (engagement 25% lower), ``broken``
(30% of posts fail), ``slow`` (3 s responses). The promoted A/B test the rollout starts from is
one row written here (what the evaluate step would have left), so that a rollout costs seconds.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from fine_tuning.config import PipelineConfig
from fine_tuning.deploy import guard, rollout
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
from fine_tuning.infra import db

if TYPE_CHECKING:
    import redis

BASELINE = "gpt-4o-mini-2024-07-18"
FINE_TUNED = {"prompt_tokens": 100.0, "completion_tokens": 320.0}
KINDS: dict[str, ModelBehaviour] = {
    "equal": ModelBehaviour(**FINE_TUNED),
    "worse": ModelBehaviour(engagement=0.068 * 0.75, **FINE_TUNED),
    "broken": ModelBehaviour(error_rate=0.30, **FINE_TUNED),
    "slow": ModelBehaviour(response_time_ms=3000.0, **FINE_TUNED),
}
TICK = timedelta(minutes=5)


@dataclass
class RolloutOutcome:
    kind: str
    deployment_id: str
    status: str
    # "guard", "hourly" (the health check's triggers or guardrails) or None (not rolled back)
    rolled_back_by: str | None
    reason: str | None
    onset: datetime
    onset_to_switch_minutes: float | None
    candidate_posts_exposed: int | None  # candidate posts from the onset to the switch
    traffic_at_end: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["onset"] = self.onset.isoformat()
        return data


def promoted_test(config: PipelineConfig, candidate: str, at: datetime) -> str:
    """The A/B test row a promoting evaluation leaves (decided, sample ratio clean)."""
    test_id = f"ab-sim-{uuid.uuid4().hex[:10]}"
    with psycopg.connect(config.services.database_url.get_secret_value(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ab_tests (id, model_type, baseline_model, candidate_model, traffic_split,"
            " started_at, planned_end_at, status, success_criteria, power_plan, last_analysis)"
            " VALUES (%s, %s, %s, %s, 0.1, %s, %s, 'promote', '{}', '{}', '{\"srm_ok\": true}')",
            (test_id, config.evaluation.model_type, BASELINE, candidate, at, at),
        )
    return test_id


def simulate_rollout(
    config: PipelineConfig,
    redis_client: redis.Redis,
    *,
    kind: str,
    start: datetime,
    onset: datetime,
    hours: float,
    posts_per_hour: int,
    use_guard: bool = True,
    seed: int = 1,
) -> RolloutOutcome:
    """Deploy a candidate at ``start`` and run ``hours`` of traffic in 5-minute ticks: after each
    tick the guard looks (``use_guard``), and on each hour the health check runs."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    url = config.services.database_url.get_secret_value()
    # Named by the seed and the start: the same arguments route the same posts the same way.
    candidate = f"ft:gpt-4o-mini-2024-07-18:org:sim:{seed:x}-{start:%Y%m%d%H%M}"
    deployment = rollout.deploy(config, redis_client, promoted_test(config, candidate, start), start)
    deployment_id = deployment["id"]
    per_tick = max(1, round(posts_per_hour * TICK.total_seconds() / 3600))
    now, tick = start, 0
    record = deployment
    while now < start + timedelta(hours=hours) and record["status"] in rollout.ACTIVE_STATUSES:
        behaviour = KINDS[kind] if now >= onset else KINDS["equal"]
        simulate_traffic(
            url,
            redis_client,
            model_type=config.evaluation.model_type,
            default_model=BASELINE,
            behaviours={BASELINE: ModelBehaviour(), candidate: behaviour},
            requests=per_tick,
            start=now,
            end=now + TICK,
            seed=seed * 100_000 + tick,
        )
        now, tick = now + TICK, tick + 1
        if use_guard:
            _, record = guard.check(config, redis_client, deployment_id, now)
        if record["status"] in rollout.ACTIVE_STATUSES and tick % 12 == 0:
            record = rollout.watch(config, redis_client, deployment_id, now)
    record = rollout.get_deployment(config, deployment_id)
    traffic_at_end = float(record["current_traffic"])
    by = minutes = exposed = None
    if record["status"] == "rolled_back":
        reason = record["rollback_reason"] or ""
        by = "guard" if reason.startswith("automatic (guard)") else "hourly"
        switched = record["finished_at"]
        if switched >= onset:
            minutes = (switched - onset).total_seconds() / 60
            with db.connect(url) as conn:
                exposed = int(
                    db.one_row(
                        conn.execute(
                            "SELECT count(*) FROM posts WHERE model_id = %s AND ts >= %s AND ts < %s",
                            (candidate, onset, switched),
                        )
                    )[0]
                )
    elif record["status"] in rollout.ACTIVE_STATUSES:
        # The simulation's end: hand the routing back so that the next rollout can start.
        record = rollout.rollback(config, redis_client, deployment_id, "simulation ended", now)
    return RolloutOutcome(
        kind=kind,
        deployment_id=deployment_id,
        status="rolled_back" if by else ("completed" if record["status"] == "completed" else "survived"),
        rolled_back_by=by,
        reason=record["rollback_reason"] if by else None,
        onset=onset,
        onset_to_switch_minutes=minutes,
        candidate_posts_exposed=exposed,
        traffic_at_end=traffic_at_end,
    )
