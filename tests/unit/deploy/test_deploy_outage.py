"""A deploy under outages, on real PostgreSQL and Redis (MLflow unreachable): a deploy whose
routing write failed is healed by its re-run and by the next health check, and a promoted
candidate whose baseline the pipeline's record has at 100% deploys while MLflow cannot answer."""

from __future__ import annotations

import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.deploy import rollout
from fine_tuning.dev import rollout_sim
from fine_tuning.dev.faulty_proxy import FaultyProxy
from fine_tuning.infra import db
from fine_tuning.routing import Routing, get_routing, set_routing

T0 = datetime(2026, 11, 22, 2, tzinfo=UTC)


@pytest.fixture
def config(pg_url: str, redis_db: str) -> PipelineConfig:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    return load_config(
        env={"DATABASE_URL": pg_url, "REDIS_URL": redis_db, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
             "FINE_TUNING_DATA_DIR": tempfile.mkdtemp(prefix="deploy-outage-")},
        params={"mlflow.request_max_retries": 0},
    )


@pytest.fixture
def client(redis_db: str) -> redis.Redis:
    return redis.Redis.from_url(redis_db)


@pytest.fixture
def redis_down(redis_db: str):
    """A client of the same Redis database through a proxy that is down (connection refused)."""
    parts = urlsplit(redis_db)
    proxy = FaultyProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    try:
        yield redis.Redis(host="127.0.0.1", port=proxy.port, db=int(parts.path.strip("/") or 0), socket_timeout=2)
    finally:
        proxy.close()


def promoted(config: PipelineConfig, client: redis.Redis, baseline: str, candidate: str) -> str:
    """A promoted A/B test of ``candidate`` against ``baseline``, its split still live."""
    test_id = f"ab-outage-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(config.services.database_url.get_secret_value(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ab_tests (id, model_type, baseline_model, candidate_model, traffic_split, started_at,"
            " planned_end_at, status, success_criteria, power_plan, last_analysis)"
            " VALUES (%s, 'body', %s, %s, 0.1, %s, %s, 'promote', '{}', '{}', '{\"srm_ok\": true}')",
            (test_id, baseline, candidate, T0, T0),
        )
    set_routing(client, "body", Routing(baseline, candidate, 0.1, test_id))
    return test_id


def test_a_deploy_that_failed_on_redis_writes_its_routing_when_run_again(
    config: PipelineConfig, client: redis.Redis, redis_down: redis.Redis
) -> None:
    test_id = promoted(config, client, rollout_sim.BASELINE, "ft:gpt-4o-mini-2024-07-18:org:outage:1")
    with pytest.raises(redis.ConnectionError):
        rollout.deploy(config, redis_down, test_id, T0)
    deployment_id = rollout.deployment_of_test(config, test_id)
    assert deployment_id is not None  # the row was committed; the routing is still the test's
    assert get_routing(client, "body").source == test_id
    record = rollout.deploy(config, client, test_id, T0 + timedelta(minutes=3))  # the task's retry
    assert record["id"] == deployment_id
    routing = get_routing(client, "body")
    assert (routing.source, routing.candidate_share) == (deployment_id, config.deployment.rollout_config.initial_traffic)


def test_the_health_check_writes_the_routing_a_failed_deploy_left_unwritten(
    config: PipelineConfig, client: redis.Redis, redis_down: redis.Redis
) -> None:
    test_id = promoted(config, client, rollout_sim.BASELINE, "ft:gpt-4o-mini-2024-07-18:org:outage:2")
    with pytest.raises(redis.ConnectionError):
        rollout.deploy(config, redis_down, test_id, T0)  # its retries too: the run fails
    deployment_id = rollout.deployment_of_test(config, test_id)
    rollout.watch(config, client, deployment_id, T0 + timedelta(minutes=30))  # the hourly monitor
    assert get_routing(client, "body").source == deployment_id


def test_mlflow_down_deploys_over_the_recorded_champion_and_refuses_any_other_baseline(
    config: PipelineConfig, client: redis.Redis
) -> None:
    champion = "ft:gpt-4o-mini-2024-07-18:org:outage:champion"
    # The champion's own rollout completed (an immediate one): the pipeline's record of 100%.
    first = rollout.deploy(config, client, promoted(config, client, rollout_sim.BASELINE, champion), T0,
                           strategy="immediate")
    assert first["status"] == "completed"
    # MLflow (127.0.0.1:9) cannot say whether the champion is registered: the record answers.
    record = rollout.deploy(
        config, client, promoted(config, client, champion, "ft:gpt-4o-mini-2024-07-18:org:outage:next"),
        T0 + timedelta(days=7),
    )
    assert record["status"] == "rolling_out" and record["previous_model"] == champion
    rollout.rollback(config, client, record["id"], "test over", T0 + timedelta(days=7, hours=1))
    # A fine-tuned baseline the record does not have at 100% is not taken on trust.
    stranger = promoted(config, client, "ft:gpt-4o-mini-2024-07-18:org:outage:stranger",
                        "ft:gpt-4o-mini-2024-07-18:org:outage:other")
    with pytest.raises(Exception) as refused:
        rollout.deploy(config, client, stranger, T0 + timedelta(days=8))
    assert rollout.deployment_of_test(config, stranger) is None, refused.value
