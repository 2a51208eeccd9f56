"""The approval of a rollout's last step on a real Airflow (``airflow standalone``): the monitor
starts the approval's run, the ApprovalOperator waits in ``awaiting_input`` with the evidence, and
a person's answer through REST API v2's HITL endpoint (or the timeout) drives the rollout.

Each test's deployment waits from the start (strategy ``immediate`` with approval required: its
one step is the last), so no traffic has to be simulated; the library tests cover the ramp.
"""

from __future__ import annotations

import os
import time
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis

from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.deploy import rollout
from fine_tuning.dev.demo import airflow_env, with_search_path
from fine_tuning.dev.devstack import Stack
from fine_tuning.infra import db
from fine_tuning.routing import get_routing
from fine_tuning.step_graph import APPROVAL_DAG_ID, approval_run_id
from support import airflow_standalone, lease_redis_db

pytestmark = pytest.mark.slow

PG_BASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
BASE, CAND = "gpt-4o-mini-2024-07-18", "ft:gpt-4o-mini-2024-07-18:org:weekly:approval"
# The module's own registered model: completing a rollout moves its champion alias.
MODEL_NAME = f"approval-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def services(mlflow_uri: str) -> Iterator[dict[str, Any]]:
    schema = f"approval_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    posts_url = with_search_path(PG_BASE_URL, schema)
    with db.connect(posts_url) as conn:
        db.migrate(conn)
    with lease_redis_db() as redis_url:
        yield {"posts_url": posts_url, "redis_url": redis_url, "mlflow_uri": mlflow_uri}
    with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(scope="module")
def airflow(services: dict[str, Any], emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("airflow-approval")
    meta_db = f"airflow_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{meta_db}"')
    stack = Stack(
        database_url=services["posts_url"], redis_url=services["redis_url"], mlflow_uri=services["mlflow_uri"],
        openai_base_url=emulator.base_url, emulator_admin_url=emulator.admin_url, workdir=home,
    )
    env = airflow_env(stack, services["posts_url"], home / "airflow", home / "data")
    meta = urlunsplit(urlsplit(PG_BASE_URL)._replace(path=f"/{meta_db}", query=""))
    env.update({
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta.replace("postgresql://", "postgresql+psycopg2://"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # the scheduler's sweep of timed-out approvals runs this often
        "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "3",
        "REDIS_URL": services["redis_url"],
    })
    config_file = home / "training_config.json"
    # The monitor's guard watches for 18 s, looking every 3 s, in the real triggerer.
    config_file.write_text(json.dumps({
        "mlflow": {"registered_model_name": MODEL_NAME},
        "deployment": {"guard_watch_minutes": 0.3, "rollback_triggers": {"guard_interval_minutes": 0.05}},
    }))
    env["FINE_TUNING_CONFIG_FILE"] = str(config_file)
    env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
    try:
        with airflow_standalone(env, home) as running:
            yield running
    finally:
        with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{meta_db}" WITH (FORCE)')


@pytest.fixture(scope="module")
def api(airflow: dict[str, Any]) -> httpx.Client:
    token = httpx.post(f"{airflow['base']}/auth/token", timeout=30,
                       json={"username": "admin", "password": airflow["users"]["admin"]}).json()["access_token"]
    client = httpx.Client(base_url=airflow["base"], headers={"Authorization": f"Bearer {token}"}, timeout=30)
    deadline = time.monotonic() + 120
    for dag_id in (APPROVAL_DAG_ID, "rollout_monitor"):
        while client.get(f"/api/v2/dags/{dag_id}").status_code != 200:
            assert time.monotonic() < deadline, f"the dag processor did not parse {dag_id}"
            time.sleep(1)
    assert client.patch(f"/api/v2/dags/{APPROVAL_DAG_ID}", json={"is_paused": False}).status_code == 200
    return client


def config_for(services: dict[str, Any], timeout_hours: float = 24.0) -> PipelineConfig:
    return load_config(
        env={"DATABASE_URL": services["posts_url"], "REDIS_URL": services["redis_url"],
             "MLFLOW_TRACKING_URI": services["mlflow_uri"]},
        params={"deployment": {"strategy": "immediate", "require_approval": True,
                               "approval_timeout_hours": timeout_hours},
                "mlflow": {"registered_model_name": MODEL_NAME}},
    )


def register_candidate(config: PipelineConfig) -> str:
    """CAND as a version of the module's registered model (a completion moves champion to it)."""
    from mlflow import MlflowClient

    client = MlflowClient(config.mlflow.tracking_uri, config.mlflow.tracking_uri)
    if not client.search_registered_models(f"name = '{MODEL_NAME}'"):
        client.create_registered_model(MODEL_NAME)
    for version in client.search_model_versions(f"name = '{MODEL_NAME}'"):
        if version.tags.get("fine_tuned_model") == CAND:
            return version.version
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    return client.create_model_version(
        MODEL_NAME, source=f"runs:/{run.info.run_id}/m", run_id=run.info.run_id, tags={"fine_tuned_model": CAND}
    ).version


def awaiting_deployment(config: PipelineConfig) -> str:
    """A promoted A/B test's candidate, deployed: it waits for approval before its one step."""
    ab_test_id = f"ab-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    with psycopg.connect(config.services.database_url.get_secret_value(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ab_tests (id, model_type, baseline_model, candidate_model, traffic_split, started_at,"
            " planned_end_at, ended_at, status, success_criteria, power_plan, last_analysis)"
            " VALUES (%s, 'body', %s, %s, 0.1, %s, %s, %s, 'promote', '{}', '{}', %s)",
            (ab_test_id, BASE, CAND, now, now, now,
             '{"srm_ok": true, "srm_p_value": 0.61, "relative_lift": 0.123, "ci_lower": 0.041,'
             ' "ci_upper": 0.205, "confidence_level": 0.95, "p_value": 0.003, "method": "sequential"}'),
        )
    register_candidate(config)
    record = rollout.deploy(config, redis.Redis.from_url(config.services.redis_url.get_secret_value()), ab_test_id, now)
    assert record["status"] == "awaiting_approval", record
    return record["id"]


def trigger(api: httpx.Client, deployment_id: str) -> str:
    run_id = approval_run_id(deployment_id)
    response = api.post(f"/api/v2/dags/{APPROVAL_DAG_ID}/dagRuns",
                        json={"dag_run_id": run_id, "logical_date": None, "conf": {"deployment_id": deployment_id}})
    assert response.status_code == 200, response.text
    return run_id


def hitl_path(run_id: str) -> str:
    return f"/api/v2/dags/{APPROVAL_DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/approval/-1/hitlDetails"


def ti_state(api: httpx.Client, run_id: str, task_id: str) -> str | None:
    ti = api.get(f"/api/v2/dags/{APPROVAL_DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}")
    return ti.json().get("state") if ti.status_code == 200 else None


def wait_until(check, what: str, timeout: float = 180.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return result


def wait_for_input(api: httpx.Client, run_id: str) -> None:
    """Until the approval waits in ``awaiting_input``, and a little more: an answer within about a
    second of the park races the LocalExecutor's report that the parked workload ended, and the
    scheduler then marks the task up_for_retry (seen here; a person takes longer than that)."""
    wait_until(lambda: ti_state(api, run_id, "approval") == "awaiting_input", "the approval to wait for input")
    time.sleep(6)


def run_state(api: httpx.Client, dag_id: str, run_id: str) -> str | None:
    response = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
    return response.json()["state"] if response.status_code == 200 else None


def finished(api: httpx.Client, dag_id: str, run_id: str, timeout: float = 180.0) -> str:
    return wait_until(lambda: (s := run_state(api, dag_id, run_id)) in ("success", "failed") and s,
                      f"{dag_id} run {run_id} to finish", timeout)


def test_the_monitor_asks_and_a_persons_approval_completes_the_rollout(
    services: dict[str, Any], api: httpx.Client
) -> None:
    config = config_for(services)
    deployment_id = awaiting_deployment(config)
    # The hourly monitor, triggered now: it watches the rollout (still awaiting) and starts its approval.
    monitor = api.post("/api/v2/dags/rollout_monitor/dagRuns", json={"logical_date": None})
    assert monitor.status_code == 200, monitor.text
    assert api.patch("/api/v2/dags/rollout_monitor", json={"is_paused": False}).status_code == 200
    assert finished(api, "rollout_monitor", monitor.json()["dag_run_id"]) == "success"
    run_id = approval_run_id(deployment_id)
    assert run_state(api, APPROVAL_DAG_ID, run_id) is not None, "the monitor did not start the approval run"

    wait_for_input(api, run_id)
    detail = api.get(hitl_path(run_id)).json()
    assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]
    assert CAND in detail["subject"] and "100%" in detail["subject"]
    for evidence in ("relative lift of engagement: **12.3%**", "CI [4.1%, 20.5%]", "sample ratio (SRM): ok",
                     "no answer within 24 h"):
        assert evidence in detail["body"], (evidence, detail["body"])
    assert rollout.get_deployment(config, deployment_id)["status"] == "awaiting_approval"

    answer = api.patch(hitl_path(run_id), json={"chosen_options": ["Approve"]})
    assert answer.status_code == 200, answer.text
    assert finished(api, APPROVAL_DAG_ID, run_id) == "success"
    record = rollout.get_deployment(config, deployment_id)
    assert record["status"] == "completed" and record["current_traffic"] == 1.0
    approved = next(e for e in record["events"] if e["kind"] == "approved")
    assert approved["detail"]["decided_by"] == "admin" and approved["detail"]["applied"] is True
    assert get_routing(redis.Redis.from_url(services["redis_url"]), "body").baseline_model == CAND
    from mlflow import MlflowClient

    aliases = MlflowClient(services["mlflow_uri"], services["mlflow_uri"]).get_registered_model(MODEL_NAME).aliases
    assert aliases.get("champion") == register_candidate(config)
    # The next monitor run asks nothing: the run exists, and the rollout is no longer waiting.
    assert api.patch(hitl_path(run_id), json={"chosen_options": ["Reject"]}).status_code == 409


def test_a_persons_reject_rolls_back_and_a_late_approval_is_refused(
    services: dict[str, Any], api: httpx.Client
) -> None:
    config = config_for(services)
    deployment_id = awaiting_deployment(config)
    run_id = trigger(api, deployment_id)
    wait_for_input(api, run_id)
    assert api.patch(hitl_path(run_id), json={"chosen_options": ["Reject"]}).status_code == 200
    assert finished(api, APPROVAL_DAG_ID, run_id) == "success"
    assert ti_state(api, run_id, "approved") == "skipped"  # what ApprovalOperator does on Reject
    assert ti_state(api, run_id, "apply_decision") == "success"
    record = rollout.get_deployment(config, deployment_id)
    assert record["status"] == "rolled_back" and record["rollback_reason"] == "rejected by admin"
    routing = get_routing(redis.Redis.from_url(services["redis_url"]), "body")
    assert routing.baseline_model == BASE and routing.candidate_share == 0.0

    # An approval asked for a rollout that was rolled back meanwhile: the run fails, saying why.
    other = awaiting_deployment(config)
    late = trigger(api, other)
    wait_for_input(api, late)
    rollout.rollback(config, redis.Redis.from_url(services["redis_url"]), other, "on-call: tone", datetime.now(UTC))
    assert api.patch(hitl_path(late), json={"chosen_options": ["Approve"]}).status_code == 200
    assert finished(api, APPROVAL_DAG_ID, late) == "failed"
    assert ti_state(api, late, "apply_decision") == "failed"
    record = rollout.get_deployment(config, other)
    assert record["status"] == "rolled_back" and record["rollback_reason"] == "on-call: tone"
    refused = [e for e in record["events"] if e["kind"] == "approved"]
    assert refused and refused[-1]["detail"]["applied"] is False


def test_no_answer_within_the_timeout_is_a_reject(services: dict[str, Any], api: httpx.Client) -> None:
    config = config_for(services, timeout_hours=0.005)  # 18 s
    deployment_id = awaiting_deployment(config)
    run_id = trigger(api, deployment_id)
    assert finished(api, APPROVAL_DAG_ID, run_id, timeout=240) == "success"
    record = rollout.get_deployment(config, deployment_id)
    assert record["status"] == "rolled_back"
    assert record["rollback_reason"] == "approval timed out after 0.005 h"
    rejected = next(e for e in record["events"] if e["kind"] == "rejected")
    assert rejected["detail"]["timed_out"] is True and rejected["detail"]["decided_by"] is None
