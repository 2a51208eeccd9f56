"""Airflow connections name the services the tasks use: postgres_default, redis_default, mlflow_default."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import airflow.sdk  # noqa: F401 - importing Airflow puts plugins/ on sys.path
import psycopg
import pytest

from fine_tuning.infra import db
from fine_tuning.config import load_config
from fine_tuning.dev.seed import seed_posts
from fine_tuning_airflow.hooks import ServiceConnectionsHook
from fine_tuning_airflow.operators import FineTuningStepOperator

WINDOW_END = datetime(2026, 11, 22, 2, tzinfo=UTC)
NOWHERE = "postgresql://postgres@127.0.0.1:5432/no_such_database_here"


def test_collect_reads_the_posts_database_of_the_connection(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATABASE_URL names a database that does not exist; the connection names the real one
    (with libpq options from its extras): the task collects from the connection's."""
    with db.connect(pg_url) as conn:
        db.migrate(conn)
        seed_posts(conn, 400, end=WINDOW_END, days=7)
    monkeypatch.setenv("DATABASE_URL", NOWHERE)
    monkeypatch.setenv("AIRFLOW_CONN_POSTGRES_DEFAULT", pg_url)
    monkeypatch.setenv("FINE_TUNING_DATA_DIR", str(tmp_path / "data"))
    context = {
        "params": {"training_data_threshold": 10, "engagement_threshold": 0.0},
        "dag_run": SimpleNamespace(dag_id="weekly_fine_tuning", run_id="manual__conn", run_after=WINDOW_END),
        "data_interval_end": WINDOW_END,
    }
    manifest = FineTuningStepOperator(task_id="collect", step="collect").execute(context)
    # Threshold 0: every post of the collected window at or above it is scanned (a missing rate
    # counts as 0; the seeder's few negative rates are below it), no more, no fewer.
    window = (datetime.fromisoformat(manifest["window_start"]), datetime.fromisoformat(manifest["window_end"]))
    with psycopg.connect(pg_url) as conn:
        in_window = conn.execute(
            "SELECT count(*) FROM posts WHERE ts >= %s AND ts < %s AND NOT coalesce(engagement_rate, 0) < 0", window
        ).fetchone()[0]
    assert 300 < manifest["posts_scanned"] == in_window

    # The same collect straight from the library with the real database URL: the same dataset.
    from fine_tuning.collect.dataset import collect_training_data
    from fine_tuning.manifests import RunContext

    direct = collect_training_data(
        load_config(params={**context["params"], "services": {"database_url": pg_url}}),
        RunContext(dag_id="weekly_fine_tuning", run_id="direct", window_end=WINDOW_END),
        str(tmp_path / "direct"),
    )
    assert (direct.posts_scanned, direct.sha256) == (manifest["posts_scanned"], manifest["sha256"])


def test_connections_replace_the_environment_and_missing_ones_leave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://env@127.0.0.1:5432/env")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-mlflow:5000")
    for name in ("POSTGRES_DEFAULT", "REDIS_DEFAULT", "MLFLOW_DEFAULT"):
        monkeypatch.delenv(f"AIRFLOW_CONN_{name}", raising=False)
    config = load_config()
    assert ServiceConnectionsHook().apply_to(config) == config  # none defined: the environment stays

    monkeypatch.setenv("AIRFLOW_CONN_POSTGRES_DEFAULT", json.dumps({
        "conn_type": "postgres", "host": "db.internal", "port": 5432, "schema": "posts", "login": "svc",
        "password": "p@ss/word", "extra": {"sslmode": "require"}}))
    monkeypatch.setenv("AIRFLOW_CONN_REDIS_DEFAULT", json.dumps({
        "conn_type": "redis", "host": "cache.internal", "port": 6380, "password": "s3cret", "extra": {"db": 2}}))
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "http", "host": "http://mlflow.monitoring:5000"}))
    applied = ServiceConnectionsHook().apply_to(config)
    assert applied.services.database_url.get_secret_value() == "postgresql://svc:p%40ss%2Fword@db.internal:5432/posts?sslmode=require"
    assert applied.services.redis_url.get_secret_value() == "redis://:s3cret@cache.internal:6380/2"
    assert applied.mlflow.tracking_uri == "http://mlflow.monitoring:5000"
    assert "s3cret" not in json.dumps(applied.loggable())
