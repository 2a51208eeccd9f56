"""The Experiments pages inside Airflow's own API app, on an experiment the library made (hours of
simulated traffic, hourly looks, a rollout): what each page shows is what the API and the
records say, the figure is the one logged to MLflow, and the Rollback button switches the routing.

Browsers authenticate with Airflow's ``_token`` cookie, so the pages are read with it here; the
real browser on a real ``airflow standalone`` is ``tests/e2e/test_ui_browser.py``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import psycopg
import pytest
import redis

from fine_tuning.config import load_config
from fine_tuning.dev.experiment_sim import BASELINE, CANDIDATE, SIM_PARAMS, simulate_experiment
from fine_tuning.dev.simulator import ModelBehaviour
from fine_tuning.routing import get_routing
from support import token

DAG_ID = "weekly_fine_tuning"


class Cells(HTMLParser):
    """Every element's ``data-*`` attributes, by element id or data key: what the tests compare."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append({"tag": tag, **dict(attrs)})


def elements(html: str) -> list[dict[str, str | None]]:
    parser = Cells()
    parser.feed(html)
    return parser.elements


def as_number(value: str | None) -> float | None:
    return None if value in (None, "None") else float(value)  # type: ignore[arg-type]


@pytest.fixture
def browser(airflow_app: Any) -> Any:
    """A client that authenticates as a browser does: Airflow's ``_token`` cookie, no header."""
    from fastapi.testclient import TestClient

    def as_user(username: str, role: str | None) -> TestClient:
        jwt = token(username, role)["Authorization"].removeprefix("Bearer ")
        return TestClient(airflow_app, cookies={"_token": jwt}, follow_redirects=False)

    return as_user


@pytest.fixture
def experiment(services: dict) -> dict[str, Any]:
    """A promoted candidate half-way through its rollout, made by the library's own functions."""
    config = load_config(params=SIM_PARAMS)
    client = redis.Redis.from_url(services["redis_url"])
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=8)
    run_id = f"manual__{start.isoformat()}"
    result = simulate_experiment(config, client, start, dag_id=DAG_ID, run_id=run_id)
    assert result.decision == "promote" and result.deployment_status == "rolling_out"
    return {"config": config, "redis": client, "run_id": run_id, "result": result}


def test_pages_need_a_login_and_the_dag_permission(browser: Any, client: Any, services: dict) -> None:
    anonymous = client.get("/pipeline/ui/experiments", follow_redirects=False)
    # Not logged in: Airflow's own login, which comes back to the page.
    assert anonymous.status_code == 303
    assert anonymous.headers["location"].startswith("/auth/login")
    assert "next=%2Fpipeline%2Fui%2Fexperiments" in anonymous.headers["location"]
    nobody = browser("nobody", None).get("/pipeline/ui/experiments")
    assert nobody.status_code == 403 and "text/html" in nobody.headers["content-type"]
    assert 'id="error"' in nobody.text and "<table" not in nobody.text


def test_the_plugin_puts_experiments_in_the_navigation_and_on_dag_runs(client: Any, admin: dict) -> None:
    """What Airflow's UI reads to draw its menu and run tabs: ``/api/v2/plugins``."""
    plugins = client.get("/api/v2/plugins", headers=admin).json()["plugins"]
    views = {v["destination"]: v for p in plugins if p["name"] == "fine_tuning_pipeline" for v in p["external_views"]}
    assert views["nav"]["name"] == "Experiments" and views["nav"]["href"] == "/pipeline/ui/experiments"
    assert views["dag_run"]["href"] == "/pipeline/ui/runs/{DAG_ID}/{RUN_ID}"


def test_the_pages_show_what_the_api_and_the_records_say(
    browser: Any, client: Any, admin: dict, viewer: dict, experiment: dict, services: dict, mlflow_uri: str
) -> None:
    result = experiment["result"]
    reader = browser("viewer", "viewer")
    listing = reader.get("/pipeline/ui/experiments")
    assert listing.status_code == 200, listing.text
    rows = {e.get("data-ab-test") for e in elements(listing.text)} | {e.get("data-deployment") for e in elements(listing.text)}
    assert {result.ab_test_id, result.deployment_id} <= rows

    page = reader.get(f"/pipeline/ui/experiments/ab/{result.ab_test_id}")
    assert page.status_code == 200, page.text
    api = client.get(f"/pipeline/evaluation/metrics/{result.ab_test_id}", headers=viewer).json()
    cells = elements(page.text)
    arm = None
    shown: dict[str, dict[str, float | None]] = {"baseline": {}, "candidate": {}}
    for element in cells:
        if element["tag"] == "tr":
            arm = element.get("data-arm")
        if arm and element["tag"] == "td" and element.get("data-field") and element.get("data-value") is not None:
            shown[arm][element["data-field"]] = as_number(element["data-value"])  # type: ignore[index]
    for arm_name in ("baseline", "candidate"):
        for field, value in shown[arm_name].items():
            assert value == pytest.approx(api["metrics"][arm_name][field]), (arm_name, field)
        assert len(shown[arm_name]) >= 8
    lift = next(e for e in cells if e.get("data-field") == "relative_lift")
    assert as_number(lift["data-value"]) == pytest.approx(api["statistical_analysis"]["relative_lift"])
    ci = next(e for e in cells if e.get("data-field") == "ci")
    assert as_number(ci["data-lower"]) == pytest.approx(api["statistical_analysis"]["ci_lower"])
    assert "promote" in page.text and 'data-criterion="srm"' in page.text and 'data-guardrail="error_rate"' in page.text
    # The looks table has one row per look the pipeline took; the links go where they say.
    looks = re.findall(r"<tr><td class=\"n\">(\d+)</td>", page.text)
    with psycopg.connect(services["pg_url"]) as conn:
        (recorded_looks,) = conn.execute("SELECT looks FROM ab_tests WHERE id = %s", (result.ab_test_id,)).fetchone()
    assert len(looks) == recorded_looks >= 1
    assert f'href="/dags/{DAG_ID}/runs/' in page.text and f"/experiments/rollouts/{result.deployment_id}" in page.text
    run_link = re.search(r'href="([^"]+)"[^>]*id="mlflow-run-link"', page.text)
    assert run_link and run_link.group(1).startswith(mlflow_uri)

    # The picture is the pipeline's own, byte for byte the one it logged to MLflow at the last look.
    figure = reader.get(f"/pipeline/ui/experiments/ab/{result.ab_test_id}/evaluation.png")
    assert figure.status_code == 200 and figure.headers["content-type"] == "image/png"
    from mlflow import MlflowClient

    mlflow_run_id = run_link.group(1).rsplit("/", 1)[1]
    logged = MlflowClient(mlflow_uri).download_artifacts(mlflow_run_id, f"ab_tests/{result.ab_test_id}/evaluation.png")
    with open(logged, "rb") as file:
        assert file.read() == figure.content

    run_page = reader.get(f"/pipeline/ui/runs/{DAG_ID}/{experiment['run_id']}")
    assert f'id="run-ab-test">{result.ab_test_id}<' in run_page.text
    assert f'id="run-rollout">{result.deployment_id}<' in run_page.text
    other = reader.get(f"/pipeline/ui/runs/rollout_monitor/{experiment['run_id']}")
    assert 'id="not-pipeline"' in other.text


def test_the_rollout_page_and_its_rollback_button(browser: Any, experiment: dict, services: dict) -> None:
    result = experiment["result"]
    from fine_tuning.deploy import rollout

    record = rollout.get_deployment(experiment["config"], result.deployment_id)
    reader, operator = browser("viewer", "viewer"), browser("admin", "admin")
    page = reader.get(f"/pipeline/ui/experiments/rollouts/{result.deployment_id}")
    assert page.status_code == 200, page.text
    stages = [e for e in elements(page.text) if e.get("data-kind")]
    assert [e["data-kind"] for e in stages] == [e["kind"] for e in record["events"]] == ["started", "advanced"]
    traffic = [as_number(e["data-value"]) for e in elements(page.text) if e.get("data-field") == "traffic"]
    assert traffic == [e["traffic"] for e in record["events"]] == [0.2, 0.5]
    # Each gate's verdict of the step, as the health check recorded it.
    assert [e["data-gate"] for e in elements(page.text) if e.get("data-gate")] == [
        "engagement_rate_drop", "error_rate", "p95_response_time"
    ]
    assert page.text.count('data-status="pass"') >= 3

    form_token = re.search(r'name="token" value="([0-9a-f]+)"', operator.get(page.url).text).group(1)  # type: ignore[union-attr]
    action = f"/pipeline/ui/experiments/rollouts/{result.deployment_id}/rollback"
    routing_before = get_routing(experiment["redis"], "body")
    # A viewer may read the page but not press the button (the API's rollback permission).
    denied = reader.post(action, data={"reason": "x", "confirm": "yes", "token": form_token})
    assert denied.status_code == 403
    # Not confirmed, or a form this page did not make: refused, nothing changes.
    unconfirmed = operator.post(action, data={"reason": "looks off", "token": form_token})
    assert unconfirmed.status_code == 422 and "confirm" in unconfirmed.text
    forged = operator.post(action, data={"reason": "looks off", "confirm": "yes", "token": "0" * 64})
    assert forged.status_code == 403
    assert get_routing(experiment["redis"], "body") == routing_before
    assert rollout.get_deployment(experiment["config"], result.deployment_id)["status"] == "rolling_out"

    pressed = operator.post(action, data={"reason": "latency complaints", "confirm": "yes", "token": form_token})
    assert pressed.status_code == 303
    after = operator.get(pressed.headers["location"])
    assert 'id="flash"' in after.text and "manual by admin: latency complaints" in after.text
    routing = get_routing(experiment["redis"], "body")
    assert routing.baseline_model == BASELINE and routing.candidate_share == 0.0
    assert routing.source == f"{result.deployment_id}:rolled_back"
    assert rollout.get_deployment(experiment["config"], result.deployment_id)["status"] == "rolled_back"
    assert 'id="rollback-form"' not in after.text  # nothing left to roll back


def test_an_automatic_rollback_shows_the_gate_that_fired(browser: Any, services: dict) -> None:
    config = load_config(params=SIM_PARAMS)
    client = redis.Redis.from_url(services["redis_url"])
    # It wins its A/B test, then fails 30% of its requests once deployed.
    failing = ModelBehaviour(engagement=0.09, prompt_tokens=100.0, completion_tokens=320.0, error_rate=0.3)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=8)
    result = simulate_experiment(config, client, start, candidate=CANDIDATE, rollout_behaviour=failing)
    assert result.deployment_status == "rolled_back"
    page = browser("viewer", "viewer").get(f"/pipeline/ui/experiments/rollouts/{result.deployment_id}")
    reason = re.search(r'id="rollback-reason"[^>]*>([^<]+)<', page.text)
    assert reason and reason.group(1).startswith("automatic: error_rate")
    gates = re.findall(r'data-gate="(\w+)">[^<]*<span class="badge[^"]*" data-status="(\w+)"', page.text)
    assert ("error_rate", "fired") in gates and ("engagement_rate_drop", "pass") in gates
    assert 'id="rollback-form"' not in page.text


def test_unknown_experiments_are_a_404_page(browser: Any, services: dict) -> None:
    reader = browser("viewer", "viewer")
    for path in ("/pipeline/ui/experiments/ab/ab-nope", "/pipeline/ui/experiments/rollouts/deploy-nope"):
        response = reader.get(path)
        assert response.status_code == 404 and 'id="error"' in response.text and "nope" in response.text


def test_a_rollout_awaiting_approval_links_to_airflows_required_actions(
    browser: Any, client: Any, admin: dict, services: dict
) -> None:
    from fine_tuning.deploy import rollout

    config = load_config(params={"deployment": {"strategy": "immediate", "require_approval": True}})
    redis_client = redis.Redis.from_url(services["redis_url"])
    now = datetime.now(UTC)
    with psycopg.connect(services["pg_url"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ab_tests (id, model_type, baseline_model, candidate_model, traffic_split, started_at,"
            " planned_end_at, status, success_criteria, power_plan, last_analysis)"
            " VALUES ('ab-wait', 'body', %s, %s, 0.1, %s, %s, 'promote', '{}', '{}', %s)",
            (BASELINE, CANDIDATE, now, now,
             '{"srm_ok": true, "srm_p_value": 0.6, "relative_lift": 0.12, "ci_lower": 0.04, "ci_upper": 0.2,'
             ' "confidence_level": 0.95, "p_value": 0.003, "method": "sequential", "decision": "promote"}'),
        )
    deployment_id = rollout.deploy(config, redis_client, "ab-wait", now)["id"]
    path = f"/pipeline/ui/experiments/rollouts/{deployment_id}"
    page = browser("viewer", "viewer").get(path)
    assert page.status_code == 200, page.text
    link = next(e for e in elements(page.text) if e.get("id") == "approval-link")
    assert link["href"] == f"/dags/rollout_approval/runs/approval__{deployment_id}/tasks/approval/required_actions"
    assert link["target"] == "_top" and 'data-status="awaiting_approval"' in page.text
    assert 'id="rollback-form"' in page.text  # a rollout awaiting approval can still be rolled back
    listed = browser("viewer", "viewer").get("/pipeline/ui/experiments")
    assert 'data-status="awaiting_approval"' in listed.text
    # The API's answer for it (a second deploy of the same test returns the same deployment).
    body = client.post("/pipeline/deployment/deploy", headers=admin, json={
        "model_version": {"model_id": CANDIDATE},
        "evaluation_result": {"ab_test_id": "ab-wait", "recommendation": "promote", "safety_checks_passed": True},
        "deployment_strategy": "immediate"})
    assert body.status_code == 201, body.text
    assert body.json()["deployment_id"] == deployment_id and body.json()["status"] == "awaiting_approval"
    approval = body.json()["approval"]
    assert approval["dag_run_id"] == f"approval__{deployment_id}" and approval["decision"] is None

    rollout.decide(config, redis_client, deployment_id, approved=False, decided_by="carol", now=now)
    page = browser("viewer", "viewer").get(path)
    decision = next(e for e in elements(page.text) if e.get("data-decision"))
    assert decision["data-decision"] == "rejected" and "by <b>carol</b>" in page.text
    assert 'id="approval-link"' not in page.text and "rejected by carol" in page.text
