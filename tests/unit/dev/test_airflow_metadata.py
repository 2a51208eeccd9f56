"""make demo / make serve keep Airflow's metadata in a PostgreSQL database of their own."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from fine_tuning.dev.devstack import airflow_metadata_url

from support import PG_BASE_URL


def test_airflow_migrates_its_metadata_into_a_database_of_its_own(tmp_path: Path) -> None:
    purpose = f"t{uuid.uuid4().hex[:8]}"
    url = airflow_metadata_url(PG_BASE_URL, purpose)
    name = url.rsplit("/", 1)[1].split("?")[0]
    try:
        assert url.startswith("postgresql+psycopg2://") and name.startswith(f"fine_tuning_airflow_{purpose}_")
        assert airflow_metadata_url(PG_BASE_URL, purpose) == url  # found again, not made twice
        env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url,
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        with psycopg.connect(PG_BASE_URL.rsplit("/", 1)[0] + f"/{name}") as conn:
            tables = {t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"dag_run", "task_instance", "alembic_version"} <= tables
        assert not (tmp_path / "airflow.db").exists()  # no SQLite beside it
    finally:
        with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
