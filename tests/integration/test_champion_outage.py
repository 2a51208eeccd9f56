"""The champion never changes by accident: "no champion registered" and "MLflow cannot answer"
are different outcomes, and only the first falls back to the configured model."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faulty_proxy import FaultyProxy
from mlflow import MlflowClient

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
