"""The plugin's REST API inside Airflow's own API app, against real PostgreSQL, Redis, MLflow and
the OpenAI emulator: every endpoint's happy path, 401/403/404/422, health 200/503, metrics, and
a schemathesis run over the served OpenAPI document.

The app is Airflow's (``create_app("core")``, which mounts the plugin under ``/pipeline`` and sets
up the simple auth manager) on this session's Airflow home, migrated and with the repo's DAGs
serialized; tokens are the auth manager's own JWTs. The real-server path (``POST /auth/token``,
``airflow api-server``) is ``test_airflow_rest.py``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from support import token

DAG_ID = "weekly_fine_tuning"


def _clear_runs() -> None:
    """No queued run of the DAG left from an earlier test (start refuses while one is active)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        session.execute(delete(DagRun).where(DagRun.dag_id == DAG_ID))


def _start(client: Any, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    _clear_runs()
    response = client.post("/pipeline/fine-tuning/start", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


# -- auth ----------------------------------------------------------------------------------------
PROTECTED = [
    ("post", "/pipeline/fine-tuning/start", {}),
    ("get", "/pipeline/fine-tuning/status/some-run", None),
    ("post", "/pipeline/fine-tuning/abort/some-run", {}),
    ("post", "/pipeline/evaluation/create-ab-test", {}),
    ("get", "/pipeline/evaluation/metrics/ab-1", None),
    ("post", "/pipeline/deployment/deploy", {}),
    ("post", "/pipeline/deployment/rollback/deploy-1", {}),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_every_domain_endpoint_needs_a_token(client: Any, method: str, path: str, body: Any) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == 401, response.text
    bad = client.request(method, path, json=body, headers={"Authorization": "Bearer not-a-jwt"})
    assert bad.status_code in (401, 403)


@pytest.mark.parametrize(("method", "path", "body"), [p for p in PROTECTED if p[0] == "post"])
def test_writes_need_edit_access(client: Any, viewer: dict[str, str], method: str, path: str, body: Any) -> None:
    assert client.request(method, path, json=body, headers=viewer).status_code == 403


def test_a_user_without_role_is_forbidden_to_read(client: Any, airflow_app: Any) -> None:
    nobody = token("nobody", None)  # type: ignore[arg-type]
    assert client.get("/pipeline/fine-tuning/status/x", headers=nobody).status_code == 403


def test_health_and_metrics_are_public_and_reveal_no_secrets(client: Any, services: dict) -> None:
    password_url = services["pg_url"]
    response = client.get("/pipeline/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] in ("healthy", "degraded") and body["components"]["database"] == "healthy"
    assert body["components"]["redis"] == "healthy" and body["components"]["mlflow"] == "healthy"
    metrics = client.get("/pipeline/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    assert families["fine_tuning_healthy"].samples[0].value == 1.0
    assert "fine_tuning_component_up" in families
    for text in (response.text, metrics.text):
        assert "sk-test-key" not in text and password_url not in text and "search_path" not in text


def test_health_is_503_when_the_database_is_down(client: Any, services: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from fine_tuning.dev.devstack import free_port

    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres:s3cret-pw@127.0.0.1:{free_port()}/test")
    response = client.get("/pipeline/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy" and body["components"]["database"] == "unhealthy"
    assert "s3cret-pw" not in response.text
    families = {f.name: f for f in text_string_to_metric_families(client.get("/pipeline/metrics").text)}
    assert families["fine_tuning_healthy"].samples[0].value == 0.0


# -- pipelines -----------------------------------------------------------------------------------
def test_start_triggers_a_run_with_the_config_as_conf(client: Any, admin: dict, viewer: dict, services: dict) -> None:
    body = _start(
        client, admin,
        config={"training_data_threshold": 100, "engagement_threshold": 0.07, "weekly_schedule": "0 2 * * 0",
                "a_b_test_duration_hours": 168},
        force_run=False,
    )
    assert body["status"] == "success" and body["state"] == "queued"
    assert body["conf"] == {"training_data_threshold": 100, "engagement_threshold": 0.07, "a_b_test_duration_hours": 168}
    assert body["ignored_config"] == ["weekly_schedule"]
    run_id = body["pipeline_id"]

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id))
        assert run is not None and run.conf["engagement_threshold"] == 0.07 and run.run_type == "manual"
        assert run.triggering_user_name == "admin"

    # One active run: a second start is refused unless forced.
    again = client.post("/pipeline/fine-tuning/start", json={}, headers=admin)
    assert again.status_code == 409 and "force_run" in again.json()["detail"]
    forced = client.post("/pipeline/fine-tuning/start", json={"force_run": True}, headers=admin)
    assert forced.status_code == 201

    status = client.get(f"/pipeline/fine-tuning/status/{run_id}", headers=viewer)
    assert status.status_code == 200
    assert status.json()["status"] in ("collecting", "queued") and status.json()["current_stage"] == "data_collection"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"config": {"engagement_threshold": 1.7}}, "engagement_threshold"),
        ({"config": {"training_data_threshold": 3}}, "training_data_threshold"),
        ({"config": {"enagement_threshold": 0.1}}, "enagement_threshold"),
        ({"config": {"n_epochs": 99}}, "n_epochs"),
        ({"force_run": "maybe"}, "force_run"),
    ],
)
def test_start_rejects_a_bad_body_naming_the_field(client: Any, admin: dict, body: dict, field: str) -> None:
    response = client.post("/pipeline/fine-tuning/start", json=body, headers=admin)
    assert response.status_code == 422
    assert field in response.text


def test_the_start_body_is_the_run_params_with_the_configs_bounds(client: Any, admin: dict) -> None:
    """The start body's config is made from the config schema: one field per run param, typed and
    bounded as the config's field, plus the design's ``weekly_schedule``; unknown keys refused."""
    from fine_tuning.config import RUN_PARAMS

    schemas = client.get("/pipeline/openapi.json").json()["components"]["schemas"]
    start_config = schemas[schemas["StartRequest"]["properties"]["config"]["$ref"].rsplit("/", 1)[-1]]
    assert set(start_config["properties"]) == {*RUN_PARAMS, "weekly_schedule"}
    assert start_config["additionalProperties"] is False
    for field, value in (("engagement_threshold", 1.5), ("n_epochs", 60), ("days_back", 0)):
        response = client.post("/pipeline/fine-tuning/start", json={"config": {field: value}}, headers=admin)
        assert response.status_code == 422, response.text
        errors = response.json()["detail"]
        assert errors and all(error["loc"][:3] == ["body", "config", field] for error in errors), errors


def test_status_reads_stages_and_metrics_from_task_states_and_xcoms(client: Any, admin: dict, services: dict) -> None:
    run_id = _start(client, admin)["pipeline_id"]
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import update

    collect = {"status": "ready", "examples_written": 300, "posts_scanned": 180, "rejected": {"empty_hook": 2},
               "tokens": 52000, "window_start": "2026-11-15T02:00:00+00:00",
               "window_end": "2026-11-22T02:00:00+00:00", "seconds": 0.4}
    train = {"job_id": "ftjob-abc123", "file_id": "file-1", "base_model": "gpt-3.5-turbo-0125",
             "estimated_cost_usd": 1.2}
    with create_session() as session:
        for task_id, state in (("collect", "success"), ("upload", "success"), ("train", "success"), ("wait", "deferred")):
            session.execute(
                update(TaskInstance)
                .where(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id)
                .values(state=state)
            )
        XComModel.set("return_value", collect, dag_id=DAG_ID, task_id="collect", run_id=run_id, session=session)
        XComModel.set("return_value", train, dag_id=DAG_ID, task_id="train", run_id=run_id, session=session)

    body = client.get(f"/pipeline/fine-tuning/status/{run_id}", headers=admin).json()
    assert body["progress"] == {
        "data_collection": "completed", "model_training": "in_progress",
        "evaluation": "pending", "deployment": "pending",
    }
    assert body["current_stage"] == "model_training" and body["tasks"]["wait"] == "deferred"
    assert body["metrics"]["training_examples"] == 300 and body["metrics"]["training_job_id"] == "ftjob-abc123"
    assert body["metrics"]["data_window_end"] == "2026-11-22T02:00:00+00:00"


def test_status_of_a_run_that_is_skipping_says_so_and_why(client: Any, admin: dict, services: dict) -> None:
    """Collect skipped for too little data and Airflow has marked the chain up to ab_create, not
    yet evaluate and deploy: the run is skipping, not evaluating."""
    run_id = _start(client, admin)["pipeline_id"]
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import update

    reason = "not enough training data: 12 examples, need 50"
    with create_session() as session:
        for task_id in ("collect", "upload", "train", "wait", "register", "ab_create"):
            session.execute(
                update(TaskInstance)
                .where(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id)
                .values(state="skipped")
            )
        XComModel.set("skip_reason", reason, dag_id=DAG_ID, task_id="collect", run_id=run_id, session=session)

    body = client.get(f"/pipeline/fine-tuning/status/{run_id}", headers=admin).json()
    assert body["status"] == "skipping" and body["current_stage"] is None
    assert set(body["progress"].values()) == {"skipped"}
    assert body["skipped"] == {"task": "collect", "reason": reason}
    assert body["tasks"]["evaluate"] in (None, "none", "scheduled")  # Airflow's own states are kept


def test_status_and_abort_of_an_unknown_pipeline_are_404(client: Any, admin: dict, services: dict) -> None:
    assert client.get("/pipeline/fine-tuning/status/no-such-run", headers=admin).status_code == 404
    assert client.post("/pipeline/fine-tuning/abort/no-such-run", json={}, headers=admin).status_code == 404


@pytest.fixture
def slow_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An emulator whose jobs stay in each stage for a minute: there is a running job to cancel."""
    from openai_emulator.launch import EmulatorProcess

    with EmulatorProcess(stage_seconds=60) as process:
        monkeypatch.setenv("OPENAI_BASE_URL", process.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
        yield process


def test_abort_fails_the_run_cancels_the_job_and_deletes_its_files(
    client: Any, admin: dict, services: dict, slow_emulator: Any
) -> None:
    from openai import OpenAI

    openai = OpenAI(base_url=slow_emulator.base_url, api_key="sk-test-key")
    lines = "\n".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(10)
    )
    uploaded = openai.files.create(file=("train.jsonl", lines.encode()), purpose="fine-tune")
    job = openai.fine_tuning.jobs.create(model="gpt-3.5-turbo-0125", training_file=uploaded.id)

    run_id = _start(client, admin)["pipeline_id"]
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        XComModel.set("return_value", {"job_id": job.id}, dag_id=DAG_ID, task_id="train", run_id=run_id, session=session)
    run_dir = services["data_dir"] / DAG_ID / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "dataset.jsonl").write_text(lines)
    (run_dir / "collect.json").write_text("{}")

    response = client.post(f"/pipeline/fine-tuning/abort/{run_id}", json={"reason": "wrong data"}, headers=admin)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "aborted" and body["cleanup_status"] == "completed"
    assert {"dag_run_failed", "openai_job_cancelled", "temporary_files"} <= set(body["resources_cleaned"])
    assert body["details"]["temporary_files"]["files"] == 2
    assert not run_dir.exists()
    assert openai.fine_tuning.jobs.retrieve(job.id).status == "cancelled"

    status = client.get(f"/pipeline/fine-tuning/status/{run_id}", headers=admin).json()
    assert status["state"] == "failed" and status["status"] == "aborted"
    # Aborting again is harmless: the cleanup is repeated, nothing is left to clean.
    again = client.post(f"/pipeline/fine-tuning/abort/{run_id}", json={}, headers=admin)
    assert again.status_code == 200 and "dag_run_failed" not in again.json()["resources_cleaned"]


# -- A/B tests and deployments ---------------------------------------------------------------------
BASELINE, CANDIDATE = "gpt-3.5-turbo-0125", "ft:gpt-3.5-turbo:threads:api"
AB_BODY = {
    "baseline_model": {"model_id": BASELINE, "version": "baseline"},
    # No registry version: the rollback would move MLflow aliases of a model this test never registered.
    "candidate_model": {"model_id": CANDIDATE},
    "traffic_split": 0.2,
    "duration_hours": 1,
    "success_criteria": {"min_engagement_lift": 0.15, "min_cost_efficiency_gain": 0.1, "significance_threshold": 0.05},
}


def _seed_arm_posts(pg_url: str, since: datetime) -> None:
    """Scored posts by both models after ``since``: the candidate clearly better."""
    with psycopg.connect(pg_url) as conn:
        for i in range(400):
            model, rate = (CANDIDATE, 0.09) if i % 5 == 0 else (BASELINE, 0.06)
            conn.execute(
                "INSERT INTO posts (persona_id, hook, body, engagement_rate, ts, tokens_used, model_id,"
                " response_time_ms, quality_score, cost_usd) VALUES ('p', 'h', 'b', %s, %s, 100, %s, 900, 0.8, 0.0002)",
                (rate + (i % 7) * 0.001, since + timedelta(seconds=1 + i), model),
            )


def test_ab_test_create_metrics_deploy_and_rollback(client: Any, admin: dict, viewer: dict, services: dict) -> None:
    created = client.post("/pipeline/evaluation/create-ab-test", json=AB_BODY, headers=admin)
    assert created.status_code == 201, created.text
    test = created.json()
    ab_test_id = test["ab_test_id"]
    assert test["status"] == "running" and test["traffic_allocation"] == {"baseline": 0.8, "candidate": 0.2}
    assert test["monitoring_endpoints"]["metrics"] == f"/pipeline/evaluation/metrics/{ab_test_id}"
    routing = redis.Redis.from_url(services["redis_url"]).hgetall("fine_tuning:routing:body")
    assert routing[b"candidate_model"].decode() == CANDIDATE

    # The test started an hour ago (posts need timestamps in its past window).
    started = datetime.now(UTC) - timedelta(hours=1)
    with psycopg.connect(services["pg_url"]) as conn:
        conn.execute("UPDATE ab_tests SET started_at = %s WHERE id = %s", (started, ab_test_id))
    _seed_arm_posts(services["pg_url"], started)
    first = client.get(f"/pipeline/evaluation/metrics/{ab_test_id}", headers=viewer)
    assert first.status_code == 200, first.text
    metrics = first.json()
    assert metrics["metrics"]["candidate"]["sample_size"] == 80 and metrics["metrics"]["baseline"]["sample_size"] == 320
    assert metrics["performance_comparison"]["engagement_lift"] > 0.4
    assert metrics["statistical_analysis"]["is_significant"] is True and metrics["cached"] is False
    # The seed's report names: Cohen's d with its label, and each arm's 95th percentile.
    assert metrics["statistical_analysis"]["effect_size"] == "large"
    assert metrics["statistical_analysis"]["cohens_d"] > 0.8
    assert metrics["metrics"]["candidate"]["p95_engagement"] > metrics["metrics"]["baseline"]["p95_engagement"]
    second = client.get(f"/pipeline/evaluation/metrics/{ab_test_id}", headers=viewer).json()
    assert second["cached"] is True and second["metrics"] == metrics["metrics"]

    deploy_body = {
        "model_version": {"model_id": CANDIDATE, "version": "1"},
        "evaluation_result": {"ab_test_id": ab_test_id, "recommendation": "promote", "safety_checks_passed": True},
        "deployment_strategy": "gradual_rollout",
        "rollout_config": {"initial_traffic": 0.1, "increment_interval_hours": 24, "increment_percentage": 0.1},
    }
    # The test is still running: the library's own safety check refuses, whatever the body claims.
    refused = client.post("/pipeline/deployment/deploy", json=deploy_body, headers=admin)
    assert refused.status_code == 409 and "not 'promote'" in refused.json()["detail"]
    with psycopg.connect(services["pg_url"]) as conn:
        conn.execute(
            "UPDATE ab_tests SET status = 'promote', last_analysis = %s WHERE id = %s",
            (json.dumps({"srm_ok": True, "decision": "promote"}), ab_test_id),
        )
    deployed = client.post("/pipeline/deployment/deploy", json=deploy_body, headers=admin)
    assert deployed.status_code == 201, deployed.text
    deployment = deployed.json()
    assert deployment["status"] == "rolling_out" and deployment["current_traffic"] == 0.1
    assert deployment["rollback_plan"]["previous_model"] == BASELINE
    assert "engagement_rate_drop_15_percent" in deployment["monitoring"]["rollback_triggers"]

    rolled = client.post(
        f"/pipeline/deployment/rollback/{deployment['deployment_id']}", json={"reason": "smoke"}, headers=admin
    )
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["status"] == "rolled_back" and "smoke" in rolled.json()["rollback_reason"]
    routing = redis.Redis.from_url(services["redis_url"]).hgetall("fine_tuning:routing:body")
    assert routing[b"baseline_model"].decode() == BASELINE and float(routing[b"candidate"]) == 0.0


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/pipeline/evaluation/create-ab-test", {**AB_BODY, "traffic_split": 1.5}, "traffic_split"),
        ("/pipeline/evaluation/create-ab-test", {k: v for k, v in AB_BODY.items() if k != "candidate_model"},
         "candidate_model"),
        ("/pipeline/evaluation/create-ab-test", {**AB_BODY, "candidate_model": AB_BODY["baseline_model"]},
         "candidate_model"),
        ("/pipeline/deployment/deploy", {"model_version": {"model_id": "m"}}, "evaluation_result"),
        ("/pipeline/deployment/deploy",
         {"model_version": {"model_id": "m"}, "evaluation_result": {"ab_test_id": "x", "recommendation": "maybe",
                                                                     "safety_checks_passed": True}},
         "recommendation"),
        ("/pipeline/deployment/rollback/deploy-1", {"reason": ""}, "reason"),
    ],
)
def test_evaluation_and_deployment_bodies_are_validated(client: Any, admin: dict, path: str, body: dict, field: str) -> None:
    response = client.post(path, json=body, headers=admin)
    assert response.status_code == 422, response.text
    assert field in response.text


def test_a_selfhosted_candidate_that_vllm_cannot_load_starts_no_ab_test(
    client: Any, admin: dict, services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint loads the adapter into vLLM first, as the DAG's step does: vLLM unreachable
    is a 502 naming the server and the adapter, and no test row or routing is left behind."""
    from fine_tuning.dev.devstack import free_port

    vllm = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("FINE_TUNING_SERVING_BASE_URL", vllm)
    # The breaker this opens is this test's alone (and its keys expire).
    monkeypatch.setenv("FINE_TUNING_BREAKER_KEY_PREFIX", f"test:{uuid.uuid4().hex[:8]}:breaker")
    body = {**AB_BODY, "candidate_model": {"model_id": "selfhosted:weekly-adapter-7"}}
    response = client.post("/pipeline/evaluation/create-ab-test", json=body, headers=admin)
    assert response.status_code == 502, response.text
    assert vllm in response.json()["detail"] and "weekly-adapter-7" in response.json()["detail"]
    # Its three refused connections opened the vllm breaker: the next try sends nothing.
    again = client.post("/pipeline/evaluation/create-ab-test", json=body, headers=admin)
    assert again.status_code == 503 and "circuit 'vllm' open until" in again.json()["detail"], again.text
    assert 1 < int(again.headers["Retry-After"]) <= 61
    with psycopg.connect(services["pg_url"]) as conn:
        assert conn.execute("SELECT count(*) FROM ab_tests").fetchone()[0] == 0
    assert not redis.Redis.from_url(services["redis_url"]).exists("fine_tuning:routing:body")

    bad = {**AB_BODY, "candidate_model": {"model_id": "selfhosted:../etc"}}
    response = client.post("/pipeline/evaluation/create-ab-test", json=bad, headers=admin)
    assert response.status_code == 422 and "not a self-hosted job id" in response.text


def _promoted_ab_test(client: Any, headers: dict[str, str], pg_url: str, candidate: str) -> str:
    body = {**AB_BODY, "candidate_model": {"model_id": candidate}}
    created = client.post("/pipeline/evaluation/create-ab-test", json=body, headers=headers)
    assert created.status_code == 201, created.text
    ab_test_id = created.json()["ab_test_id"]
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "UPDATE ab_tests SET status = 'promote', last_analysis = %s WHERE id = %s",
            (json.dumps({"srm_ok": True, "decision": "promote"}), ab_test_id),
        )
    return ab_test_id


def test_deploy_is_idempotent_per_test_and_one_rollout_per_model_type(
    client: Any, admin: dict, services: dict
) -> None:
    """Concurrent deploys of one test make one deployment (the library returns it to each); a
    second test's deploy while that rollout is live is a 409 naming the model type."""
    from concurrent.futures import ThreadPoolExecutor

    from fine_tuning.clock import now_utc
    from fine_tuning.config import load_config
    from fine_tuning.deploy import rollout
    from fine_tuning.infra.redis import redis_client

    first = _promoted_ab_test(client, admin, services["pg_url"], CANDIDATE)
    # Decided before the first rollout starts: no one owns the routing when it is created.
    second = _promoted_ab_test(client, admin, services["pg_url"], "ft:gpt-3.5-turbo:threads:other")
    config = load_config()
    with ThreadPoolExecutor(4) as pool:
        records = list(pool.map(lambda _: rollout.deploy(config, redis_client(config), first, now_utc()), range(4)))
    assert len({r["id"] for r in records}) == 1 and records[0]["status"] == "rolling_out"
    with psycopg.connect(services["pg_url"]) as conn:
        assert conn.execute("SELECT count(*) FROM deployments WHERE ab_test_id = %s", (first,)).fetchone()[0] == 1

    # While the rollout is live it owns the routing: a new A/B test is refused, naming it.
    owned = client.post("/pipeline/evaluation/create-ab-test", json=AB_BODY, headers=admin)
    assert owned.status_code == 409, owned.text
    assert owned.json()["detail"].startswith(f"the body routing is owned by rollout {records[0]['id']}")
    body = {
        "model_version": {"model_id": "ft:gpt-3.5-turbo:threads:other"},
        "evaluation_result": {"ab_test_id": second, "recommendation": "promote", "safety_checks_passed": True},
    }
    refused = client.post("/pipeline/deployment/deploy", json=body, headers=admin)
    assert refused.status_code == 409, refused.text
    assert refused.json()["detail"] == f"another rollout of {records[0]['model_type']} models is active"
    # The first test's deploy asked again over the API is the same deployment.
    again = {**body, "model_version": {"model_id": CANDIDATE},
             "evaluation_result": {**body["evaluation_result"], "ab_test_id": first}}
    repeated = client.post("/pipeline/deployment/deploy", json=again, headers=admin)
    assert repeated.status_code == 201 and repeated.json()["deployment_id"] == records[0]["id"]


def test_unknown_ab_tests_and_deployments_are_404(client: Any, admin: dict, services: dict) -> None:
    assert client.get("/pipeline/evaluation/metrics/ab-nope", headers=admin).status_code == 404
    body = {
        "model_version": {"model_id": CANDIDATE},
        "evaluation_result": {"ab_test_id": "ab-nope", "recommendation": "promote", "safety_checks_passed": True},
    }
    assert client.post("/pipeline/deployment/deploy", json=body, headers=admin).status_code == 404
    assert client.post("/pipeline/deployment/rollback/deploy-nope", json={}, headers=admin).status_code == 404


# -- OpenAPI ---------------------------------------------------------------------------------------
def test_openapi_document_is_served(client: Any) -> None:
    document = client.get("/pipeline/openapi.json")
    assert document.status_code == 200
    paths = document.json()["paths"]
    assert {"/fine-tuning/start", "/fine-tuning/status/{pipeline_id}", "/deployment/deploy", "/health"} <= set(paths)


def test_schemathesis_finds_no_server_error(airflow_app: Any, services: dict) -> None:
    """Fuzz every operation from the served OpenAPI document (auth overridden for the fuzz only)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    from fine_tuning_airflow import api
    from fine_tuning_airflow.api import deps

    overrides = {
        dependency: (lambda: None)
        for dependency in (deps.read_pipeline_runs, deps.trigger_pipeline_runs, deps.edit_pipeline_runs,
                           deps.read_pipeline, deps.edit_pipeline, deps.edit_rollouts)
    }
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.security import get_user

    overrides[get_user] = lambda: SimpleAuthManagerUser(username="fuzz", role="admin")
    api.app.dependency_overrides.update(overrides)
    failures: list[str] = []
    calls: dict[str, list[int]] = {}
    started = time.monotonic()
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)

        for operation in schema.get_all_operations():
            op = operation.ok()

            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
            @given(case=op.as_strategy())
            def fuzz(case: Any) -> None:
                _clear_runs()
                response = case.call()
                calls.setdefault(f"{case.method} {case.operation.path}", []).append(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")
                case.validate_response(response, checks=[not_a_server_error])

            try:
                fuzz()
            except Exception as exc:  # collect every operation's failure, then report them all
                failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:500]}")
    finally:
        for dependency in overrides:
            api.app.dependency_overrides.pop(dependency, None)
        _clear_runs()
    summary = {op: sorted(set(codes)) for op, codes in calls.items()}
    print("schemathesis:", sum(map(len, calls.values())), "calls", json.dumps(summary))
    assert not failures, "\n".join(failures)
    assert len(calls) == 9, summary  # every operation was exercised
    assert time.monotonic() - started < 240
