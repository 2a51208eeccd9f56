"""Shared fixtures: real PostgreSQL (a fresh schema per test), real Redis, real services."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[1]

# Airflow reads these when first imported: a throwaway home, the repo's DAGs and plugins.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("FINE_TUNING_MODE", "local")

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
