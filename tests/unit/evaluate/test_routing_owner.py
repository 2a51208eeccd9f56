"""One owner of the routing per model type: a new A/B test waits while another test or a
rollout owns it (the library refuses, the DAG's ab_create defers, the API answers 409)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import redis

from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.evaluate import ab
from fine_tuning.infra import db
from fine_tuning.manifests import RegistrationManifest
from fine_tuning.routing import get_routing

BASE = "gpt-3.5-turbo-0125"
T0 = datetime(2026, 11, 29, 2, tzinfo=UTC)


@pytest.fixture
def client(redis_db: str) -> redis.Redis:
    """A Redis database of this test's own: the routing keys are per model type."""
    return redis.Redis.from_url(redis_db)


@pytest.fixture
def config(pg_url: str, redis_db: str) -> PipelineConfig:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    return load_config(env={"DATABASE_URL": pg_url, "REDIS_URL": redis_db})


def test_a_second_ab_test_waits_for_the_first_and_for_a_rollout(config: PipelineConfig, client: redis.Redis) -> None:
    first = ab.create_ab_test(config, client, baseline_model=BASE, candidate_model="ft:a", now=T0,
                              dag_id="weekly_fine_tuning", run_id="w1")
    with pytest.raises(ab.RoutingOwned, match=f"owned by A/B test {first['id']}") as refused:
        ab.create_ab_test(config, client, baseline_model=BASE, candidate_model="ft:b", now=T0 + timedelta(days=7),
                          dag_id="weekly_fine_tuning", run_id="w2")
    assert refused.value.owner == f"A/B test {first['id']}"
    # The owner's split is untouched; a retry of the owner's own creation still finds its test.
    routing = get_routing(client, "body")
    assert routing is not None and routing.candidate_model == "ft:a" and routing.source == first["id"]
    assert ab.create_ab_test(config, client, baseline_model=BASE, candidate_model="ft:a", now=T0,
                             dag_id="weekly_fine_tuning", run_id="w1")["id"] == first["id"]
    # The first is promoted and rolled out: the rollout owns the routing now.
    url = config.services.database_url.get_secret_value()
    with db.connect(url) as conn:
        conn.execute("UPDATE ab_tests SET status = 'promote' WHERE id = %s", (first["id"],))
        conn.execute(
            "INSERT INTO deployments (id, ab_test_id, model_type, candidate_model, previous_model, strategy,"
            " rollout_config, rollback_triggers, current_traffic, status, started_at, last_step_at)"
            " VALUES ('deploy-1', %s, 'body', 'ft:a', %s, 'gradual_rollout', '{}', '{}', 0.3, 'rolling_out', %s, %s)",
            (first["id"], BASE, T0, T0),
        )
    with pytest.raises(ab.RoutingOwned, match="owned by rollout deploy-1"):
        ab.create_ab_test(config, client, baseline_model=BASE, candidate_model="ft:b", now=T0 + timedelta(days=7),
                          dag_id="weekly_fine_tuning", run_id="w2")
    with db.connect(url) as conn:
        conn.execute("UPDATE deployments SET status = 'completed' WHERE id = 'deploy-1'")
    second = ab.create_ab_test(config, client, baseline_model="ft:a", candidate_model="ft:b",
                               now=T0 + timedelta(days=7), dag_id="weekly_fine_tuning", run_id="w2")
    assert get_routing(client, "body").source == second["id"]  # type: ignore[union-attr]


def test_ab_create_defers_in_the_triggerer_while_the_routing_is_owned(
    config: PipelineConfig, client: redis.Redis, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    from fine_tuning_airflow.operators import FineTuningStepOperator

    owner = ab.create_ab_test(config, client, baseline_model=BASE, candidate_model="ft:a", now=T0,
                              dag_id="weekly_fine_tuning", run_id="w1")
    monkeypatch.setenv("DATABASE_URL", config.services.database_url.get_secret_value())
    monkeypatch.setenv("REDIS_URL", config.services.redis_url.get_secret_value())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    registered = RegistrationManifest(mlflow_run_id=None, experiment_id=None, model_name="content-agent",
                                      model_version=None, alias="challenger", fine_tuned_model="ft:b")
    context = {
        "params": {},
        "dag_run": SimpleNamespace(dag_id="weekly_fine_tuning", run_id="w2", run_after=T0 + timedelta(days=7)),
        "data_interval_end": None,
        "ti": SimpleNamespace(xcom_pull=lambda task_ids: registered.model_dump(mode="json")),
    }
    operator = FineTuningStepOperator(task_id="ab_create", step="ab-create")
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context)  # type: ignore[arg-type]
    assert type(deferred.value.trigger).__name__ == "DateTimeTrigger"
    assert deferred.value.method_name == "execute_complete"
    assert get_routing(client, "body").source == owner["id"]  # type: ignore[union-attr]
