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
from support import PG_BASE_URL, REPO, TEST_REDIS_URL, StatsdListener, lease_redis_db


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
def no_pools_left_open() -> Iterator[None]:
    """A test that switched on connection pooling (the API server does at its first request)
    leaves no pool behind: each test's schema URL would otherwise keep its connections open
    until PostgreSQL runs out of clients."""
    yield
    from fine_tuning.infra import db

    db.stop_pooling()


@pytest.fixture(autouse=True)
def isolated_breakers(monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test gets its own circuit-breaker keys in Redis: one test's injected faults must not
    open the breaker that the next test calls through. The product's Redis is the tests' one."""
    prefix = f"test:{uuid.uuid4().hex[:10]}:breaker"
    monkeypatch.setenv("FINE_TUNING_BREAKER_KEY_PREFIX", prefix)
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    return prefix


@pytest.fixture
def redis_url() -> str:
    """The tests' Redis (TEST_REDIS_URL), for keys under a prefix of the test's own."""
    return TEST_REDIS_URL


@pytest.fixture
def redis_db() -> Iterator[str]:
    """A Redis database of this test's own (see ``support.lease_redis_db``), for keys whose names
    are fixed: the routing hashes."""
    with lease_redis_db() as url:
        yield url


@pytest.fixture
def airflow(pg_url: str, mlflow_uri: str, openai_env, redis_db: str, tmp_path: Path) -> dict[str, str]:
    """An Airflow home on SQLite, pointed at this repo's DAGs and plugins and at the real services."""
    from fine_tuning.dev.demo import airflow_env
    from fine_tuning.dev.devstack import Stack

    stack = Stack(
        database_url=pg_url, redis_url=TEST_REDIS_URL, mlflow_uri=mlflow_uri,
        openai_base_url=openai_env.base_url, emulator_admin_url=openai_env.admin_url, workdir=tmp_path,
    )
    env = airflow_env(stack, pg_url, tmp_path / "airflow", tmp_path / "data")
    env["MLFLOW_EXPERIMENT_NAME"] = f"e2e_{tmp_path.name}"
    # An A/B test of seconds: with no traffic it cannot promote, so it ends in "reject".
    config_file = tmp_path / "training_config.json"
    # The registered model is this test's own (the session's MLflow is shared by every test).
    model_name = f"content_agent_{uuid.uuid4().hex[:10]}"
    config_file.write_text(json.dumps({
        "evaluation": {"duration_hours": 0.003, "evaluation_interval_minutes": 0.05},
        "mlflow": {"registered_model_name": model_name},
    }))
    env["FINE_TUNING_CONFIG_FILE"] = str(config_file)
    env["FINE_TUNING_TEST_MODEL_NAME"] = model_name  # for the test to find it; the product ignores it
    env["REDIS_URL"] = redis_db  # the run writes routing (fixed key names): a database of its own
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    return env


@pytest.fixture
def statsd_server() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


# ------------------------------------------------------------------ no silent skips, no hangs

# `make test` (and so CI, through .ci/run) sets FINE_TUNING_TESTS_STRICT=1. There every install
# step has run, so a missing extra (torch, transformers) or tool (promtool, hadolint) is a broken
# install, and a skip would look green: under the flag a skip is a failure that says why.
STRICT = os.environ.get("FINE_TUNING_TESTS_STRICT") == "1"
STRICT_MESSAGE = "skipped under FINE_TUNING_TESTS_STRICT=1 (make test, CI), where nothing may be missing: "
# Per-test limits (pytest-timeout; the default is pyproject's `timeout`): an end-to-end test runs
# real Airflow (`airflow dags test`, `airflow standalone`) for minutes; a unit test has no reason
# to take more than the default, and a hang fails there instead of eating CI's 90 minutes.
SLOW_TEST_TIMEOUT_SECONDS = 1200


def _skip_reason(longrepr: object) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = STRICT_MESSAGE + _skip_reason(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if STRICT and report.skipped:  # a module-level importorskip or skip
        report.outcome = "failed"
        report.longrepr = STRICT_MESSAGE + _skip_reason(report.longrepr)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_SECONDS))
