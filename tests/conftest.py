"""Shared fixtures: real PostgreSQL (a fresh schema per test), real Redis, real services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from support import REPO, StatsdListener


# Airflow reads these when first imported: a throwaway home, the repo's DAGs and plugins.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("FINE_TUNING_MODE", "local")
# The emulator's retirement schedule is the suite's to choose: without this the tests that train
# on the emulated OpenAI would start failing on 2027-01-06, the day the real one closes. The
# retirement tests build their configs without the environment, on the shipped table.
os.environ["FINE_TUNING_RETIREMENT_TABLE"] = str(REPO / "include" / "fine_tuning" / "dev" / "emulated-retirements.json")


PG_BASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A DATABASE_URL whose search_path is a schema of this test's own, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_BASE_URL else "?"
    yield f"{PG_BASE_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(scope="session")
def emulator() -> Iterator[object]:
    """The OpenAI emulator on a loopback port, for the whole session (reset by ``openai_env``)."""
    from openai_emulator.launch import EmulatorProcess

    with EmulatorProcess(stage_seconds=0.2) as process:
        yield process


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, proxied artifacts) for the session."""
    from fine_tuning.dev.devstack import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def openai_env(emulator: object, monkeypatch: pytest.MonkeyPatch) -> object:
    """Point the product at a freshly reset emulator through the environment, as a user would."""
    emulator.reset()  # type: ignore[attr-defined]
    monkeypatch.setenv("OPENAI_BASE_URL", emulator.base_url)  # type: ignore[attr-defined]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
    return emulator


@pytest.fixture(autouse=True)
def isolated_breakers(monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test gets its own circuit-breaker keys in Redis: one test's injected faults must not
    open the breaker that the next test calls through."""
    prefix = f"test:{uuid.uuid4().hex[:10]}:breaker"
    monkeypatch.setenv("FINE_TUNING_BREAKER_KEY_PREFIX", prefix)
    return prefix


@pytest.fixture
def airflow(pg_url: str, mlflow_uri: str, openai_env, tmp_path: Path) -> dict[str, str]:
    """An Airflow home on SQLite, pointed at this repo's DAGs and plugins and at the real services."""
    from fine_tuning.dev.demo import airflow_env
    from fine_tuning.dev.devstack import Stack

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


@pytest.fixture
def statsd_server() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()
