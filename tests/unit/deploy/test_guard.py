"""The continuous rollout guard on real PostgreSQL and Redis: a regression late in a stage is
rolled back within minutes (the hourly check alone takes longer), an outage that hurts both arms
alike is not a reason to roll back, and the window widens on quiet traffic. The triggerer's side:
tests/unit/airflow/test_guard_trigger.py."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta

import pytest
import redis

from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.deploy import guard, rollout
from fine_tuning.dev import rollout_sim
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
from fine_tuning.infra import db
from fine_tuning.routing import get_routing

T0 = datetime(2026, 11, 22, 2, tzinfo=UTC)


@pytest.fixture
def config(pg_url: str, redis_db: str) -> PipelineConfig:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    return load_config(
        env={"DATABASE_URL": pg_url, "REDIS_URL": redis_db, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
             "FINE_TUNING_DATA_DIR": tempfile.mkdtemp(prefix="guard-")},
        params={},
    )


@pytest.fixture
def client(redis_db: str) -> redis.Redis:
    return redis.Redis.from_url(redis_db)


def test_a_regression_late_in_a_stage_is_rolled_back_by_the_guard_within_minutes(
    config: PipelineConfig, client: redis.Redis
) -> None:
    # Five healthy hours in the first stage, then 30% of the candidate's posts fail.
    onset = T0 + timedelta(hours=5, minutes=10)
    outcome = rollout_sim.simulate_rollout(
        config, client, kind="broken", start=T0, onset=onset, hours=12, posts_per_hour=1500, seed=3
    )
    assert outcome.rolled_back_by == "guard", outcome
    assert outcome.onset_to_switch_minutes is not None and outcome.onset_to_switch_minutes <= 30
    record = rollout.get_deployment(config, outcome.deployment_id)
    assert record["rollback_reason"].startswith("automatic (guard): error_rate")
    event = record["events"][-1]
    assert event["kind"] == "rolled_back"
    fired = [g for g in event["detail"]["gates"] if g["verdict"] == "fired"]
    assert [g["gate"] for g in fired] == ["error_rate"] and fired[0]["p_harm"] < fired[0]["alpha"]
    window = event["detail"]["guard"]
    assert datetime.fromisoformat(window["window_end"]) - datetime.fromisoformat(window["window_start"]) <= timedelta(hours=1)
    # The agent is served the previous model alone from the switch on.
    routing = get_routing(client, "body")
    assert (routing.baseline_model, routing.candidate_share) == (rollout_sim.BASELINE, 0.0)


def test_without_the_guard_the_hourly_check_is_later_on_the_same_regression(
    config: PipelineConfig, client: redis.Redis
) -> None:
    onset = T0 + timedelta(hours=5, minutes=10)
    outcome = rollout_sim.simulate_rollout(
        config, client, kind="broken", start=T0, onset=onset, hours=12, posts_per_hour=1500, seed=3,
        use_guard=False,
    )
    # The health check at 06:00 judges the stage's six hours, mostly healthy: it waits for more.
    assert outcome.rolled_back_by == "hourly", outcome
    assert outcome.onset_to_switch_minutes is not None and outcome.onset_to_switch_minutes > 30


def test_an_outage_of_both_arms_is_past_the_threshold_but_not_a_reason_to_roll_back(
    config: PipelineConfig, client: redis.Redis
) -> None:
    candidate = "ft:gpt-4o-mini-2024-07-18:org:outage:1"
    deployment = rollout.deploy(config, client, rollout_sim.promoted_test(config, candidate, T0), T0)
    failing = ModelBehaviour(error_rate=0.3)
    simulate_traffic(config.services.database_url.get_secret_value(), client, model_type="body",
                     default_model=rollout_sim.BASELINE, behaviours={rollout_sim.BASELINE: failing, candidate: failing},
                     requests=3000, start=T0, end=T0 + timedelta(hours=1), seed=7)
    look = guard.judge(config, rollout.get_deployment(config, deployment["id"]), T0 + timedelta(hours=1))
    errors = next(g for g in look.gates if g["gate"] == "error_rate")
    assert errors["value"] > 0.2 and errors["verdict"] == "pass"  # the provider, not the candidate
    assert look.fired == []
    verdict, record = guard.check(config, client, deployment["id"], T0 + timedelta(hours=1))
    assert record["status"] == "rolling_out" and get_routing(client, "body").candidate_share == 0.1


def test_the_window_widens_back_on_quiet_traffic_but_not_before_the_rollout(
    config: PipelineConfig, client: redis.Redis
) -> None:
    candidate = "ft:gpt-4o-mini-2024-07-18:org:quiet:1"
    deployment = rollout.deploy(config, client, rollout_sim.promoted_test(config, candidate, T0), T0)
    url = config.services.database_url.get_secret_value()
    behaviours = {rollout_sim.BASELINE: ModelBehaviour(), candidate: ModelBehaviour()}
    # 500 posts/h: the last hour has ~50 candidate posts, fewer than guard_min_posts (200).
    simulate_traffic(url, client, model_type="body", default_model=rollout_sim.BASELINE, behaviours=behaviours,
                     requests=3000, start=T0, end=T0 + timedelta(hours=6), seed=8)
    record = rollout.get_deployment(config, deployment["id"])
    look = guard.judge(config, record, T0 + timedelta(hours=6))
    assert look.window_start < T0 + timedelta(hours=5)
    assert look.arms["candidate"]["posts"] >= 200 and look.arms["baseline"]["posts"] >= 200
    # Two hours after the start there are not 200 candidate posts at all: the window is the rollout.
    early = guard.judge(config, record, T0 + timedelta(hours=2))
    assert early.window_start == T0 and {g["verdict"] for g in early.gates} == {"no_data"}
