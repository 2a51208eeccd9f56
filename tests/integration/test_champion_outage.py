"""The champion never changes by accident: "no champion registered" and "MLflow cannot answer"
are different outcomes, and only the first falls back to the configured model."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faulty_proxy import FaultyProxy
from mlflow import MlflowClient
from pydantic import SecretStr

from fine_tuning import pipeline
from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.infra import db
from fine_tuning.track.registry import ChampionUnknown

CHAMPION = "ft:gpt-3.5-turbo-0125:acme:weekly:champ42"


@pytest.fixture
def proxy(mlflow_uri: str):
    target = urlsplit(mlflow_uri)
    with FaultyProxy(target.hostname or "127.0.0.1", target.port or 80) as running:
        yield running


@pytest.fixture
def config(proxy: FaultyProxy, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PipelineConfig:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in milliseconds while down
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    return load_config(
        env={"DATABASE_URL": pg_url, "MLFLOW_TRACKING_URI": proxy.url, "FINE_TUNING_DATA_DIR": str(tmp_path)},
        params={"mlflow": {"registered_model_name": f"champ-{uuid.uuid4().hex[:8]}"}},
    )


def register_champion(config: PipelineConfig, model: str) -> None:
    client = MlflowClient(config.mlflow.tracking_uri, config.mlflow.tracking_uri)
    name = config.mlflow.registered_model_name
    client.create_registered_model(name)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    version = client.create_model_version(
        name, source=f"runs:/{run.info.run_id}/m", run_id=run.info.run_id, tags={"fine_tuned_model": model}
    )
    client.set_registered_model_alias(name, "champion", version.version)


def record_completed_rollout(config: PipelineConfig, model: str) -> None:
    now = datetime(2026, 11, 29, tzinfo=UTC)
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        conn.execute(
            "INSERT INTO deployments (id, model_type, candidate_model, previous_model, strategy, rollout_config,"
            " rollback_triggers, current_traffic, status, started_at, last_step_at, finished_at)"
            " VALUES ('deploy-old', 'body', %s, 'gpt-3.5-turbo-0125', 'gradual_rollout', '{}', '{}', 1.0,"
            " 'completed', %s, %s, %s)",
            (model, now, now, now),
        )


def test_no_champion_registered_is_the_configured_model(config: PipelineConfig) -> None:
    assert pipeline.baseline_model(config) == config.body_model


def test_mlflow_down_is_not_no_champion(config: PipelineConfig, proxy: FaultyProxy) -> None:
    register_champion(config, CHAMPION)
    assert pipeline.baseline_model(config) == CHAMPION
    proxy.down()
    # Before: the configured gpt-3.5-turbo-0125 took 90% of traffic. Now the step fails
    # (Airflow retries it) instead of routing to a model that is not the champion.
    with pytest.raises(ChampionUnknown, match="champion"):
        pipeline.baseline_model(config)


def test_mlflow_down_uses_the_record_of_the_model_at_100_percent(
    config: PipelineConfig, proxy: FaultyProxy, caplog: pytest.LogCaptureFixture
) -> None:
    register_champion(config, CHAMPION)
    record_completed_rollout(config, CHAMPION)
    proxy.down()
    assert pipeline.baseline_model(config) == CHAMPION
    assert any("record of the model at 100%" in r.message for r in caplog.records)
    # Health says it cannot read the champion, rather than report none.
    assert "MLflow could not say" in pipeline.model_retirements(config)["champion"]["error"]


# -- the champion move of a completed rollout: through the outbox, never split from the completion --
CANDIDATE = "ft:gpt-3.5-turbo-0125:acme:weekly:cand43"


@pytest.fixture
def rollout_config(config: PipelineConfig, redis_db: str) -> PipelineConfig:
    """The routing and the breakers in this test's own Redis; the MLflow breaker closes again 1 s
    after opening, so a replay right after the outage reaches MLflow."""
    config.services.redis_url = SecretStr(redis_db)
    config.breakers.mlflow.recovery_timeout_seconds = 1.0
    config.breakers.mlflow.failure_threshold = 1
    return config


def register_version(config: PipelineConfig, model: str, alias: str | None = None) -> str:
    client = MlflowClient(config.mlflow.tracking_uri, config.mlflow.tracking_uri)
    name = config.mlflow.registered_model_name
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    version = client.create_model_version(
        name, source=f"runs:/{run.info.run_id}/m", run_id=run.info.run_id, tags={"fine_tuned_model": model}
    ).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def rollout_at_full_traffic(config: PipelineConfig, candidate_version: str | None) -> str:
    """A rollout whose last step reached 100% (its completion is what the tests do)."""
    now = datetime(2026, 11, 29, tzinfo=UTC)
    deployment_id = f"deploy-{uuid.uuid4().hex[:8]}"
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        conn.execute(
            "INSERT INTO deployments (id, model_type, candidate_model, previous_model, candidate_version, strategy,"
            " rollout_config, rollback_triggers, current_traffic, status, started_at, last_step_at)"
            " VALUES (%s, 'body', %s, %s, %s, 'gradual_rollout', '{\"max_traffic\": 1.0}', '{}', 1.0,"
            " 'rolling_out', %s, %s)",
            (deployment_id, CANDIDATE, CHAMPION, candidate_version, now, now),
        )
    return deployment_id


def aliases(config: PipelineConfig, proxy_free_uri: str) -> dict[str, str]:
    client = MlflowClient(proxy_free_uri, proxy_free_uri)
    return client.get_registered_model(config.mlflow.registered_model_name).aliases


def test_a_completion_while_mlflow_is_down_queues_the_champion_move_and_replays_it_once(
    rollout_config: PipelineConfig, proxy: FaultyProxy, mlflow_uri: str
) -> None:
    import redis

    from fine_tuning.deploy import rollout
    from fine_tuning.routing import get_routing
    from fine_tuning.track import outbox

    config = rollout_config
    old = register_version(config, CHAMPION, "champion")
    # A buffered registration: the deployment never learnt its candidate's version.
    new = register_version(config, CANDIDATE, "challenger")
    deployment_id = rollout_at_full_traffic(config, candidate_version=None)
    client = redis.Redis.from_url(config.services.redis_url.get_secret_value())
    proxy.down()
    record = rollout.watch(config, client, deployment_id, datetime(2026, 11, 29, 1, tzinfo=UTC))

    assert record["status"] == "completed"
    assert [e["detail"].get("champion_move") for e in record["events"] if e["kind"] == "completed"] == ["queued"]
    routing = get_routing(client, "body")
    assert routing is not None and (routing.baseline_model, routing.candidate_model) == (CANDIDATE, None)
    assert aliases(config, mlflow_uri)["champion"] == old  # MLflow never heard of it yet
    assert len(outbox.pending_operations(config)) == 1

    proxy.up()
    time.sleep(1.1)  # the breaker's recovery time
    report = outbox.replay(config)
    assert len(report.replayed) == 1 and not report.dead and not report.pending
    assert aliases(config, mlflow_uri) == {"champion": new}  # the challenger alias went with it
    assert outbox.replay(config).replayed == []  # exactly once: nothing left to replay


def test_a_completion_cut_short_after_the_champion_move_is_finished_by_the_next_health_check(
    rollout_config: PipelineConfig, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from fine_tuning.deploy import rollout
    from fine_tuning.routing import get_routing

    config = rollout_config
    register_version(config, CHAMPION, "champion")
    new = register_version(config, CANDIDATE, "challenger")
    deployment_id = rollout_at_full_traffic(config, candidate_version=new)
    client = redis.Redis.from_url(config.services.redis_url.get_secret_value())

    def killed(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed between the champion move and the routing write")

    with monkeypatch.context() as patch:
        patch.setattr(rollout, "write_routing", killed)
        with pytest.raises(SystemExit):
            rollout.watch(config, client, deployment_id, datetime(2026, 11, 29, 1, tzinfo=UTC))
    # The champion moved, the rollout is not recorded completed: still rolling out at 100%.
    assert aliases(config, mlflow_uri)["champion"] == new
    assert rollout.get_deployment(config, deployment_id)["status"] == "rolling_out"

    record = rollout.watch(config, client, deployment_id, datetime(2026, 11, 29, 2, tzinfo=UTC))
    assert record["status"] == "completed"
    assert [e["kind"] for e in record["events"]].count("completed") == 1
    assert aliases(config, mlflow_uri) == {"champion": new}
    routing = get_routing(client, "body")
    assert routing is not None and (routing.baseline_model, routing.candidate_model) == (CANDIDATE, None)


def test_a_completion_of_a_model_mlflow_does_not_know_refuses_and_stays_at_full_traffic(
    rollout_config: PipelineConfig, mlflow_uri: str
) -> None:
    import redis

    from fine_tuning.deploy import rollout

    config = rollout_config
    register_version(config, CHAMPION, "champion")
    deployment_id = rollout_at_full_traffic(config, candidate_version=None)  # CANDIDATE never registered
    client = redis.Redis.from_url(config.services.redis_url.get_secret_value())
    with pytest.raises(rollout.DeploymentRefused, match="cannot complete: no version of"):
        rollout.watch(config, client, deployment_id, datetime(2026, 11, 29, 1, tzinfo=UTC))
    assert rollout.get_deployment(config, deployment_id)["status"] == "rolling_out"
    assert aliases(config, mlflow_uri) == {"champion": "1"}  # unchanged
