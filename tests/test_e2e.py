"""End to end: `airflow dags test` of the real DAG file against PostgreSQL, MLflow and the emulator."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient

from fine_tuning.infra import db
from fine_tuning.dev.demo import DAG_ID, airflow_env
from fine_tuning.dev.devstack import Stack
from fine_tuning.dev.seed import seed_posts

pytestmark = pytest.mark.slow

LAST_WEEK_END = datetime(2026, 11, 22, 2, tzinfo=UTC)  # a Sunday 02:00 tick of the schedule


@pytest.fixture
def airflow(pg_url: str, mlflow_uri: str, openai_env, tmp_path: Path) -> dict[str, str]:
    """An Airflow home on SQLite, pointed at this repo's DAGs and plugins and at the real services."""
    stack = Stack(
        database_url=pg_url, redis_url="redis://127.0.0.1:6379/0", mlflow_uri=mlflow_uri,
        openai_base_url=openai_env.base_url, emulator_admin_url=openai_env.admin_url, workdir=tmp_path,
    )
    env = airflow_env(stack, pg_url, tmp_path / "airflow", tmp_path / "data")
    env["MLFLOW_EXPERIMENT_NAME"] = f"e2e_{tmp_path.name}"
    # An A/B test of seconds: with no traffic it cannot promote, so it ends in "reject".
    config_file = tmp_path / "training_config.json"
    config_file.write_text(json.dumps({"evaluation": {"duration_hours": 0.003, "evaluation_interval_minutes": 0.05}}))
    env["FINE_TUNING_CONFIG_FILE"] = str(config_file)
    env["REDIS_URL"] = "redis://127.0.0.1:6379/8"
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    return env


def airflow_json(env: dict[str, str], *args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "airflow", *args, "-o", "json"], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # log lines may come before the JSON


def dags_test(env: dict[str, str], logical_date: datetime) -> tuple[str, dict[str, str]]:
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", DAG_ID, logical_date.isoformat()],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    runs = airflow_json(env, "dags", "list-runs", DAG_ID)
    run = next(r for r in runs if r["logical_date"].startswith(logical_date.strftime("%Y-%m-%dT%H:%M")))
    states = airflow_json(env, "tasks", "states-for-dag-run", DAG_ID, run["run_id"])
    return run["state"], {s["task_id"]: s["state"] for s in states}


def test_weekly_dag_end_to_end(airflow: dict[str, str], pg_url: str, openai_env, mlflow_uri: str) -> None:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
        seed_posts(conn, 3000, end=LAST_WEEK_END, days=7)

    state, tasks = dags_test(airflow, LAST_WEEK_END)
    assert state == "success", tasks
    assert tasks == {
        **dict.fromkeys(["collect", "upload", "train", "wait", "register", "ab_create", "evaluate"], "success"),
        "deploy": "skipped",  # no traffic reached the candidate: the test rejects it, nothing to deploy
    }

    emulator = openai_env.state()
    assert len(emulator["files"]) == 1 and len(emulator["jobs"]) == 1
    job = emulator["jobs"][0]
    assert job["status"] == "succeeded"

    client = MlflowClient(mlflow_uri, mlflow_uri)
    version = client.get_model_version_by_alias("content-agent", "challenger")
    assert version.tags["fine_tuning_job_id"] == job["id"]
    assert version.tags["fine_tuned_model"] == job["fine_tuned_model"]


def test_backfilled_week_collects_its_own_posts_and_too_few_skips(airflow: dict[str, str], pg_url: str) -> None:
    """A past logical date collects that week; a week without enough posts skips, not fails."""
    two_weeks_ago = LAST_WEEK_END - timedelta(days=14)
    with db.connect(pg_url) as conn:
        db.migrate(conn)
        seed_posts(conn, 40, end=two_weeks_ago, days=7, bad_fraction=0.0)

    state, tasks = dags_test(airflow, two_weeks_ago)
    assert state == "success"
    assert tasks["collect"] == "skipped" and tasks["register"] == "skipped"
    collect = json.loads(
        next(Path(airflow["FINE_TUNING_DATA_DIR"]).glob(f"{DAG_ID}/*/collect.json")).read_text()
    )
    assert datetime.fromisoformat(collect["window_end"]) == two_weeks_ago
    assert collect["status"] == "insufficient" and collect["posts_scanned"] > 0
    with psycopg.connect(pg_url) as conn:
        in_window = conn.execute(
            "SELECT count(*) FROM posts WHERE ts >= %s AND ts < %s",
            (two_weeks_ago - timedelta(days=7), two_weeks_ago),
        ).fetchone()[0]
    assert collect["posts_scanned"] <= in_window
