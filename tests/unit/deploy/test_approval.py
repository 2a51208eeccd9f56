"""A rollout that waits for a person before its last step (deployment.require_approval), on real
PostgreSQL, Redis and MLflow: it holds its traffic, keeps being watched, and the answer applies."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis

from fine_tuning.config import ConfigError, PipelineConfig, load_config
from fine_tuning.deploy import rollout
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
from fine_tuning.evaluate import ab
from fine_tuning.infra import db
from fine_tuning.routing import get_routing
from fine_tuning.track import registry

BASE, CAND = "gpt-4o-mini-2024-07-18", "ft:gpt-4o-mini-2024-07-18:org:weekly:abc"
FINE_TUNED = {"prompt_tokens": 100.0, "completion_tokens": 320.0}
T0 = datetime(2026, 11, 22, 2, tzinfo=UTC)


@pytest.fixture
def redis_client(redis_db: str) -> redis.Redis:
    return redis.Redis.from_url(redis_db)


def make_config(pg_url: str, redis_db: str, mlflow_uri: str = "http://127.0.0.1:1", **deployment) -> PipelineConfig:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    return load_config(
        env={"DATABASE_URL": pg_url, "REDIS_URL": redis_db, "MLFLOW_TRACKING_URI": mlflow_uri},
        params={
            "mlflow": {"registered_model_name": f"content_agent_{uuid.uuid4().hex[:10]}"},
            "deployment": {
                "require_approval": True,
                "rollout_config": {"initial_traffic": 0.1, "increment_percentage": 0.45,
                                   "increment_interval_hours": 1, "advance_on": "clock"},
                **deployment,
            },
        },
    )


@pytest.fixture
def config(pg_url: str, redis_db: str) -> PipelineConfig:
    return make_config(pg_url, redis_db)


def promoted_test(config: PipelineConfig, ab_test_id: str, candidate_version: str | None = None) -> None:
    with psycopg.connect(config.services.database_url.get_secret_value(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ab_tests (id, model_type, baseline_model, candidate_model, candidate_version,"
            " traffic_split, started_at, planned_end_at, status, success_criteria, power_plan, last_analysis)"
            " VALUES (%s, 'body', %s, %s, %s, 0.1, %s, %s, 'promote', '{}', '{}', '{\"srm_ok\": true}')",
            (ab_test_id, BASE, CAND, candidate_version, T0, T0),
        )


def traffic(config: PipelineConfig, client: redis.Redis, candidate: ModelBehaviour, start: datetime, seed: int) -> None:
    simulate_traffic(config.services.database_url.get_secret_value(), client, model_type="body",
                     default_model=BASE, behaviours={BASE: ModelBehaviour(), CAND: candidate}, requests=800,
                     start=start, end=start + timedelta(hours=1), seed=seed)


def ramp_to_approval(config: PipelineConfig, client: redis.Redis, ab_test_id: str) -> dict:
    """10% -> 55% -> (the step to 100%) awaiting approval at 55%."""
    deployment = rollout.deploy(config, client, ab_test_id, T0)
    good = ModelBehaviour(**FINE_TUNED)
    for hour in (0, 1):
        traffic(config, client, good, T0 + timedelta(hours=hour), seed=hour)
        state = rollout.watch(config, client, deployment["id"], T0 + timedelta(hours=hour + 1))
    return state


def test_the_last_step_waits_with_its_traffic_and_a_trigger_still_rolls_back(
    config: PipelineConfig, redis_client: redis.Redis
) -> None:
    promoted_test(config, "ab-wait")
    state = ramp_to_approval(config, redis_client, "ab-wait")
    assert state["status"] == "awaiting_approval" and state["current_traffic"] == 0.55
    assert [e["kind"] for e in state["events"]] == ["started", "advanced", "awaiting_approval"]
    asked = state["events"][-1]
    assert asked["traffic"] == 0.55 and asked["detail"]["timeout_hours"] == 24
    assert {g["gate"] for g in asked["detail"]["gates"]} == set(rollout.ROLLBACK_TRIGGER_NAMES)
    routing = get_routing(redis_client, "body")
    assert (routing.baseline_model, routing.candidate_model, routing.candidate_share) == (BASE, CAND, 0.55)
    assert routing.source == state["id"]
    # Still the routing's one owner, and still watched: a healthy hour changes nothing ...
    assert rollout.active_deployments(config) == [state["id"]]
    assert rollout.rollback_target(config, "body") == BASE
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        assert ab.routing_owner(conn, "body") == f"rollout {state['id']}"
    traffic(config, redis_client, ModelBehaviour(**FINE_TUNED), T0 + timedelta(hours=2), seed=2)
    held = rollout.watch(config, redis_client, state["id"], T0 + timedelta(hours=3))
    assert held["status"] == "awaiting_approval" and len(held["events"]) == 3
    assert get_routing(redis_client, "body").candidate_share == 0.55
    # ... and a firing trigger rolls it back while the person has not answered.
    traffic(config, redis_client, ModelBehaviour(error_rate=0.3, **FINE_TUNED), T0 + timedelta(hours=3), seed=3)
    back = rollout.watch(config, redis_client, state["id"], T0 + timedelta(hours=4))
    assert back["status"] == "rolled_back" and "error_rate" in back["rollback_reason"]
    routing = get_routing(redis_client, "body")
    assert routing.baseline_model == BASE and routing.candidate_share == 0.0

    # The person's later answer: an approval cannot complete a rolled-back rollout (refused,
    # recorded); a rejection finds it back already (recorded, nothing changes).
    with pytest.raises(rollout.DecisionNotApplicable, match=r"is 'rolled_back'.*error_rate.*approved by alice"):
        rollout.decide(config, redis_client, state["id"], approved=True, decided_by="alice", now=T0 + timedelta(hours=5))
    after = rollout.decide(config, redis_client, state["id"], approved=False, decided_by="bob",
                           now=T0 + timedelta(hours=5))
    assert after["status"] == "rolled_back" and "error_rate" in after["rollback_reason"]
    answers = [(e["kind"], e["detail"]["decided_by"], e["detail"]["applied"]) for e in after["events"][-2:]]
    assert answers == [("approved", "alice", False), ("rejected", "bob", False)]
    assert get_routing(redis_client, "body").candidate_share == 0.0


def test_approve_completes_and_moves_the_champion_in_mlflow(
    pg_url: str, redis_db: str, redis_client: redis.Redis, mlflow_uri: str
) -> None:
    from mlflow import MlflowClient

    config = make_config(pg_url, redis_db, mlflow_uri)
    client = MlflowClient(mlflow_uri, mlflow_uri)
    name = config.mlflow.registered_model_name
    client.create_registered_model(name)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    for model in (BASE, CAND):
        client.create_model_version(name, source=f"runs:/{run.info.run_id}/m", run_id=run.info.run_id,
                                    tags={"fine_tuned_model": model})
    client.set_registered_model_alias(name, "champion", "1")
    promoted_test(config, "ab-approve", candidate_version="2")

    state = ramp_to_approval(config, redis_client, "ab-approve")
    assert state["status"] == "awaiting_approval"
    assert registry.champion_model(config) == BASE  # no champion move before the answer
    with pytest.raises(ValueError, match="decided_by"):
        rollout.decide(config, redis_client, state["id"], approved=True, decided_by=" ", now=T0)
    done = rollout.decide(config, redis_client, state["id"], approved=True, decided_by="alice",
                          now=T0 + timedelta(hours=2, minutes=30))
    assert done["status"] == "completed" and done["current_traffic"] == 1.0
    assert [e["kind"] for e in done["events"]][-4:] == ["awaiting_approval", "approved", "advanced", "completed"]
    assert done["events"][-3]["detail"] == {"decided_by": "alice", "timed_out": False,
                                            "status_before": "awaiting_approval", "applied": True}
    routing = get_routing(redis_client, "body")
    assert routing.baseline_model == CAND and routing.candidate_share == 0.0
    assert registry.champion_model(config) == CAND
    # The same answer again (a retried task) changes nothing; a rejection now is refused.
    again = rollout.decide(config, redis_client, state["id"], approved=True, decided_by="alice", now=T0)
    assert again["status"] == "completed" and len(again["events"]) == len(done["events"])
    with pytest.raises(rollout.DecisionNotApplicable, match="is 'completed'"):
        rollout.decide(config, redis_client, state["id"], approved=False, decided_by="bob", now=T0)
    assert get_routing(redis_client, "body").baseline_model == CAND


@pytest.mark.parametrize(
    ("decided_by", "timed_out", "reason"),
    [("bob", False, "rejected by bob"), (None, True, "approval timed out after 24 h")],
)
def test_reject_or_timeout_rolls_back_to_the_baseline(
    config: PipelineConfig, redis_client: redis.Redis, decided_by: str | None, timed_out: bool, reason: str
) -> None:
    promoted_test(config, "ab-reject")
    state = ramp_to_approval(config, redis_client, "ab-reject")
    assert state["status"] == "awaiting_approval"
    back = rollout.decide(config, redis_client, state["id"], approved=False, decided_by=decided_by,
                          timed_out=timed_out, now=T0 + timedelta(hours=3))
    assert back["status"] == "rolled_back" and back["rollback_reason"] == reason
    assert [e["kind"] for e in back["events"]][-2:] == ["rejected", "rolled_back"]
    assert back["events"][-2]["detail"]["decided_by"] == decided_by
    assert back["events"][-2]["detail"]["timed_out"] is timed_out
    routing = get_routing(redis_client, "body")
    assert routing.baseline_model == BASE and routing.candidate_share == 0.0
    assert routing.source == f"{state['id']}:rolled_back"
    with pytest.raises(ValueError, match="timed-out approval cannot be an approval"):
        rollout.decide(config, redis_client, state["id"], approved=True, decided_by=None, timed_out=True, now=T0)
    with pytest.raises(rollout.UnknownDeployment, match="deploy-missing"):
        rollout.decide(config, redis_client, "deploy-missing", approved=True, decided_by="alice", now=T0)


def test_an_immediate_rollout_waits_at_zero_and_owns_the_routing(
    pg_url: str, redis_db: str, redis_client: redis.Redis
) -> None:
    config = make_config(pg_url, redis_db, strategy="immediate")
    promoted_test(config, "ab-now")
    state = rollout.deploy(config, redis_client, "ab-now", T0)
    assert state["status"] == "awaiting_approval" and state["current_traffic"] == 0.0
    assert get_routing(redis_client, "body").candidate_share == 0.0
    promoted_test(config, "ab-other")
    with pytest.raises(rollout.DeploymentRefused, match="another rollout of body models is active"):
        rollout.deploy(config, redis_client, "ab-other", T0)


def test_without_the_option_the_last_step_completes_as_before(pg_url: str, redis_db: str,
                                                              redis_client: redis.Redis) -> None:
    config = make_config(pg_url, redis_db, require_approval=False)
    promoted_test(config, "ab-plain")
    state = ramp_to_approval(config, redis_client, "ab-plain")
    assert state["status"] == "completed" and state["current_traffic"] == 1.0


@pytest.mark.parametrize("hours", [0, -1, 24 * 31])
def test_a_bad_approval_timeout_is_named(pg_url: str, redis_db: str, hours: float) -> None:
    with pytest.raises(ConfigError, match="deployment.approval_timeout_hours"):
        make_config(pg_url, redis_db, approval_timeout_hours=hours)


def test_the_history_says_when_a_due_step_held_for_lack_of_posts_and_lists_newest_first(
    pg_url: str, redis_db: str, redis_client: redis.Redis
) -> None:
    """A clock rollout due for its step with no candidate posts yet holds, and records why, at
    the check's time and traffic; the deployments list shows every deployment with its events."""
    config = make_config(pg_url, redis_db, require_approval=False)
    first_test, second_test = f"ab-{uuid.uuid4().hex[:8]}", f"ab-{uuid.uuid4().hex[:8]}"
    promoted_test(config, first_test)
    first = rollout.deploy(config, redis_client, first_test, T0)
    not_due = rollout.watch(config, redis_client, first["id"], T0 + timedelta(minutes=30))
    assert [e["kind"] for e in not_due["events"]] == ["started"]  # not due: nothing to record
    held = rollout.watch(config, redis_client, first["id"], T0 + timedelta(hours=2))  # due, no posts
    assert held["current_traffic"] == 0.1 and held["status"] == first["status"]
    last = held["events"][-1]
    assert (last["kind"], last["traffic"], last["at"]) == ("held", 0.1, T0 + timedelta(hours=2))
    assert last["detail"]["reason"] == "not enough candidate posts yet"

    rollout.rollback(config, redis_client, first["id"], "making way", T0 + timedelta(hours=3))
    promoted_test(config, second_test)
    second = rollout.deploy(config, redis_client, second_test, T0 + timedelta(hours=4))
    listed = [d for d in rollout.list_deployments(config) if d["id"] in (first["id"], second["id"])]
    assert [d["id"] for d in listed] == [second["id"], first["id"]]
    assert [e["kind"] for e in listed[1]["events"]] == ["started", "held", "rolled_back"]
    assert [e["at"] for e in listed[0]["events"]] == [T0 + timedelta(hours=4)]
