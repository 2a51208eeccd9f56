"""End to end: `airflow dags test` of the real DAG file against PostgreSQL, MLflow and the emulator."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from support import LAST_WEEK_END, dags_test
from mlflow import MlflowClient

from fine_tuning.infra import db
from fine_tuning.dev.demo import DAG_ID
from fine_tuning.dev.seed import seed_posts

pytestmark = pytest.mark.slow



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
    # The training file and the validation split, uploaded once each; one job.
    assert len(emulator["files"]) == 2 and len(emulator["jobs"]) == 1
    job = emulator["jobs"][0]
    assert job["status"] == "succeeded"

    client = MlflowClient(mlflow_uri, mlflow_uri)
    version = client.get_model_version_by_alias(airflow["FINE_TUNING_TEST_MODEL_NAME"], "challenger")
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
