"""Fixtures of the tests that drive the plugin inside Airflow's own API app (``create_app("core")``,
which mounts the plugin under ``/pipeline`` and sets up the simple auth manager): the REST API's
and the Experiments pages'. Tokens are the auth manager's own JWTs (``support.token``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fine_tuning.infra import db
from support import token

USERS = "admin:admin,viewer:viewer,reader:viewer,runner:user"


@pytest.fixture(scope="module")
def airflow_app() -> Iterator[Any]:
    """Airflow's API app on this session's (migrated) Airflow home, with the DAGs serialized."""
    before = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS")
    os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = USERS
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    for command in (["db", "migrate"], ["dags", "reserialize"]):
        result = subprocess.run([sys.executable, "-m", "airflow", *command], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    from airflow.api_fastapi.app import create_app, purge_cached_app

    app = create_app("core")
    yield app
    purge_cached_app()
    # The environment as the module found it: a later test must not see these users.
    if before is None:
        os.environ.pop("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", None)
    else:
        os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = before


@pytest.fixture(scope="module")
def client(airflow_app: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(airflow_app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def admin(airflow_app: Any) -> dict[str, str]:
    return token("admin", "admin")


@pytest.fixture(scope="module")
def viewer(airflow_app: Any) -> dict[str, str]:
    return token("viewer", "viewer")


@pytest.fixture
def services(
    pg_url: str, mlflow_uri: str, openai_env: Any, redis_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict:
    """The API server's environment: this test's schema, Redis database (routing keys have fixed
    names), MLflow, emulator, a data dir."""
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("REDIS_URL", redis_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("FINE_TUNING_DATA_DIR", str(tmp_path / "data"))
    return {"pg_url": pg_url, "data_dir": tmp_path / "data", "emulator": openai_env, "redis_url": redis_db}


