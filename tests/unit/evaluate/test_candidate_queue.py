"""Overlapping weeks: while the routing is owned, next week's run trains; its newer candidate
supersedes the one still waiting (never tested, tagged in MLflow, recorded in the database),
and the newest starts its A/B test once the owner is done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from mlflow import MlflowClient

from fine_tuning import pipeline
from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.evaluate import ab
from fine_tuning.infra import db
from fine_tuning.manifests import RegistrationManifest, RunContext
from fine_tuning.routing import get_routing
from fine_tuning.step_graph import EXIT_SKIPPED, EXIT_WAITING
from support import registered_version as register

BASE = "gpt-3.5-turbo-0125"
T0 = datetime(2026, 11, 29, 2, tzinfo=UTC)
DAG_ID = "weekly_fine_tuning"


@pytest.fixture
def client(redis_db: str) -> redis.Redis:
    return redis.Redis.from_url(redis_db)


@pytest.fixture
def env(pg_url: str, redis_db: str, mlflow_uri: str, tmp_path: Path) -> dict[str, str]:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    config_file = tmp_path / "training_config.json"
    config_file.write_text(json.dumps({"mlflow": {"registered_model_name": f"queue-{uuid.uuid4().hex[:8]}"}}))
    return {
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_db,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "FINE_TUNING_DATA_DIR": str(tmp_path),
        # A registered model of this test's own (the CLI reads it from the config file).
        "FINE_TUNING_CONFIG_FILE": str(config_file),
    }


@pytest.fixture
def config(env: dict[str, str]) -> PipelineConfig:
    return load_config(env=env)


def week(n: int) -> RunContext:
    end = T0 + timedelta(weeks=n)
    return RunContext(dag_id=DAG_ID, run_id=f"scheduled__{end:%Y-%m-%d}", window_end=end)


def queue(config: PipelineConfig) -> dict[str, tuple[str, str | None]]:
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        rows = conn.execute("SELECT candidate_model, status, superseded_by FROM candidate_queue").fetchall()
    return {model: (status, by) for model, status, by in rows}


def version_tags(config: PipelineConfig, registered: RegistrationManifest) -> dict[str, str]:
    mlflow = MlflowClient(config.mlflow.tracking_uri)
    return mlflow.get_model_version(config.mlflow.registered_model_name, str(registered.model_version)).tags


def own_the_routing(config: PipelineConfig, client: redis.Redis) -> dict:
    return ab.create_ab_test(config, client, baseline_model=BASE, candidate_model="ft:owner", now=T0,
                             dag_id=DAG_ID, run_id="owner")


def end_test(config: PipelineConfig, test_id: str) -> None:
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        conn.execute("UPDATE ab_tests SET status = 'reject', ended_at = now() WHERE id = %s", (test_id,))


def test_the_newest_candidate_supersedes_the_waiting_one_and_gets_the_routing(
    config: PipelineConfig, client: redis.Redis
) -> None:
    owner = own_the_routing(config, client)
    b, c = register(config, "ft:b"), register(config, "ft:c")
    with pytest.raises(ab.RoutingOwned):
        pipeline.ab_create(config, week(1), b)
    assert queue(config)["ft:b"] == ("waiting", None)

    # Next week's run trained meanwhile: its candidate joins, and the waiting one is superseded.
    with pytest.raises(ab.RoutingOwned):
        pipeline.ab_create(config, week(2), c)
    assert queue(config)["ft:b"] == ("superseded", "ft:c")
    assert queue(config)["ft:c"] == ("waiting", None)
    tags = version_tags(config, b)
    assert (tags["deployment_status"], tags["superseded_by"]) == ("superseded", "ft:c")

    # The older run's next look stops it: never tested, even once the owner is done.
    end_test(config, owner["id"])
    superseded = "ft:b waited for the routing and was superseded by ft:c"
    with pytest.raises(ab.CandidateSuperseded, match=superseded):
        pipeline.ab_create(config, week(1), b)
    test = pipeline.ab_create(config, week(2), c)
    assert test.candidate_model == "ft:c"
    routing = get_routing(client, "body")
    assert routing is not None and (routing.candidate_model, routing.source) == ("ft:c", test.ab_test_id)
    with db.connect(config.services.database_url.get_secret_value()) as conn:
        tested = conn.execute("SELECT candidate_model FROM ab_tests ORDER BY started_at").fetchall()
    assert [m for (m,) in tested] == ["ft:owner", "ft:c"]
    assert queue(config)["ft:c"] == ("started", None)

    # A candidate whose test has started is never superseded: the next one waits for it.
    d = register(config, "ft:d")
    with pytest.raises(ab.RoutingOwned, match=f"owned by A/B test {test.ab_test_id}"):
        pipeline.ab_create(config, week(3), d)
    assert queue(config)["ft:c"] == ("started", None)
    # A retry of the started run still finds its own test.
    assert pipeline.ab_create(config, week(2), c).ab_test_id == test.ab_test_id


def test_a_late_run_with_older_data_is_superseded_on_arrival(
    config: PipelineConfig, client: redis.Redis
) -> None:
    own_the_routing(config, client)
    newer, older = register(config, "ft:new"), register(config, "ft:old")
    with pytest.raises(ab.RoutingOwned):
        pipeline.ab_create(config, week(2), newer)
    # Week 1's run was slow (its job took days) and reaches ab_create after week 2's.
    with pytest.raises(ab.CandidateSuperseded, match="superseded by ft:new"):
        pipeline.ab_create(config, week(1), older)
    assert queue(config) == {"ft:new": ("waiting", None), "ft:old": ("superseded", "ft:new")}
    assert version_tags(config, older)["deployment_status"] == "superseded"
    assert "deployment_status" not in version_tags(config, newer)


def test_the_operator_skips_a_superseded_candidate_and_says_why(
    config: PipelineConfig, client: redis.Redis, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    from fine_tuning_airflow.operators import FineTuningStepOperator

    own_the_routing(config, client)
    older, newer = register(config, "ft:b"), register(config, "ft:c")
    with pytest.raises(ab.RoutingOwned):
        pipeline.ab_create(config, week(1), older)
    with pytest.raises(ab.RoutingOwned):
        pipeline.ab_create(config, week(2), newer)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pushed: dict[str, str] = {}
    ctx = week(1)
    context = {
        "params": {},
        "dag_run": SimpleNamespace(dag_id=DAG_ID, run_id=ctx.run_id, run_after=ctx.window_end),
        "data_interval_end": ctx.window_end,
        "ti": SimpleNamespace(xcom_pull=lambda task_ids: older.model_dump(mode="json"),
                              xcom_push=lambda key, value: pushed.update({key: value})),
    }
    operator = FineTuningStepOperator(task_id="ab_create", step="ab-create")
    with pytest.raises(AirflowSkipException, match="superseded by ft:c"):
        operator.execute(context)  # type: ignore[arg-type]
    assert "superseded by ft:c" in pushed["skip_reason"]  # what the run's status page shows


def test_the_cli_exits_75_while_waiting_and_99_once_superseded(
    config: PipelineConfig, client: redis.Redis, env: dict[str, str], tmp_path: Path
) -> None:
    """The pod mode's contract: 75 makes the pod operator defer, 99 skips."""
    own_the_routing(config, client)
    older = register(config, "ft:b")
    manifest = tmp_path / "register.json"
    manifest.write_text(older.to_json())
    ctx = week(1)
    command = [sys.executable, "-m", "fine_tuning", "ab-create", "--dag-id", DAG_ID, "--run-id", ctx.run_id,
               "--window-end", ctx.window_end.isoformat(), "--input", f"register=@{manifest}"]
    run_env = {**os.environ, **env}
    run = {"check": False, "env": run_env, "capture_output": True, "text": True, "timeout": 120}
    waiting = subprocess.run(command, **run)  # noqa: S603 - our own CLI
    assert waiting.returncode == EXIT_WAITING, waiting.stderr[-2000:]
    assert "owned by A/B test" in waiting.stderr
    with pytest.raises(ab.RoutingOwned):
        pipeline.ab_create(config, week(2), register(config, "ft:c"))
    superseded = subprocess.run(command, **run)  # noqa: S603
    assert superseded.returncode == EXIT_SKIPPED, superseded.stderr[-2000:]
    assert "superseded by ft:c" in superseded.stderr
    assert queue(config)["ft:b"] == ("superseded", "ft:c")
