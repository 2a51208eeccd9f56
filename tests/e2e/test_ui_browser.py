"""The Experiments view in a real browser: Debian's chromium, driven by selenium through
chromedriver, on a real ``airflow standalone`` (the repo's DAGs and plugin, PostgreSQL metadata).

A person's steps: log in on Airflow's login page, open Experiments from Airflow's navigation
(the plugin's page in Airflow's iframe), open an A/B test and check its numbers are the API's,
open its rollout and press Rollback (reason, confirmation), see the routing switched in Redis,
and find the same experiment on its DAG run's tab. The experiment is made by the library's own
functions on simulated traffic, tagged with a real run of ``weekly_fine_tuning``. A screenshot
of each page and the page load times (the browser's navigation timing) go to
``bench/results/ui/`` (not committed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis

from fine_tuning.config import load_config
from fine_tuning.dev.demo import DAG_ID, airflow_env
from fine_tuning.dev.devstack import Stack
from fine_tuning.dev.experiment_sim import BASELINE, SIM_PARAMS, simulate_experiment
from fine_tuning.infra import db
from fine_tuning.routing import get_routing
from support import REPO, airflow_standalone, lease_redis_db

pytestmark = pytest.mark.slow

PG_BASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR", REPO / "bench" / "results")) / "ui"


def _database_url(name: str) -> str:
    return urlunsplit(urlsplit(PG_BASE_URL)._replace(path=f"/{name}", query=""))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str, emulator: Any) -> Iterator[dict[str, Any]]:
    """A posts schema, a Redis database, and Airflow standalone on them (metadata in PostgreSQL)."""
    home = tmp_path_factory.mktemp("airflow-ui")
    schema, meta_db = f"ui_{uuid.uuid4().hex[:10]}", f"airflow_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE DATABASE "{meta_db}"')
    posts_url = f"{PG_BASE_URL}?options={quote(f'-csearch_path={schema}')}"
    with db.connect(posts_url) as conn:
        db.migrate(conn)
    try:
        with lease_redis_db() as redis_url:
            stack = Stack(database_url=posts_url, redis_url=redis_url, mlflow_uri=mlflow_uri,
                          openai_base_url=emulator.base_url, emulator_admin_url=emulator.admin_url, workdir=home)
            env = airflow_env(stack, posts_url, home / "airflow", home / "data")
            env.update({
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _database_url(meta_db).replace("postgresql://", "postgresql+psycopg2://"),
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "MLFLOW_EXPERIMENT_NAME": f"ui_{home.name}",
            })  # fmt: skip
            env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
            with airflow_standalone(env, home) as airflow:
                yield {**airflow, "posts_url": posts_url, "redis_url": redis_url, "mlflow_uri": mlflow_uri}
    finally:
        with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            conn.execute(f'DROP DATABASE IF EXISTS "{meta_db}" WITH (FORCE)')


@pytest.fixture(scope="module")
def api(world: dict[str, Any]) -> httpx.Client:
    password = world["users"]["admin"]
    response = httpx.post(f"{world['base']}/auth/token", json={"username": "admin", "password": password}, timeout=30)
    assert response.status_code in (200, 201), response.text
    return httpx.Client(base_url=world["base"], headers={"Authorization": f"Bearer {response.json()['access_token']}"},
                        timeout=30)  # fmt: skip


@pytest.fixture(scope="module")
def experiment(world: dict[str, Any], api: httpx.Client) -> dict[str, Any]:
    """A real run of the DAG (its week has no posts: it skips at collect), and the experiment the
    library makes on hours of simulated traffic, tagged with that run."""
    deadline = time.monotonic() + 120
    while api.get(f"/api/v2/dags/{DAG_ID}").status_code != 200:
        assert time.monotonic() < deadline, "the dag processor did not parse weekly_fine_tuning"
        time.sleep(1)
    assert api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    triggered = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": "2026-06-07T02:00:00Z"})
    assert triggered.status_code == 200, triggered.text
    run_id = triggered.json()["dag_run_id"]
    config = load_config(
        env={"DATABASE_URL": world["posts_url"], "REDIS_URL": world["redis_url"], "MLFLOW_TRACKING_URI": world["mlflow_uri"],
             "MLFLOW_EXPERIMENT_NAME": world["env"]["MLFLOW_EXPERIMENT_NAME"]},
        params=SIM_PARAMS,
    )  # fmt: skip
    client = redis.Redis.from_url(world["redis_url"])
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=8)
    result = simulate_experiment(config, client, start, dag_id=DAG_ID, run_id=run_id)
    assert result.decision == "promote" and result.deployment_status == "rolling_out"
    deadline = time.monotonic() + 240
    while (run := api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json())["state"] not in ("success", "failed"):
        assert time.monotonic() < deadline, run
        time.sleep(2)
    return {"run_id": run_id, "result": result, "redis": client, "run_state": run["state"]}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _wait(driver: Any, condition: Any, timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _in_plugin_frame(driver: Any, element_id: str) -> float:
    """Switch into Airflow's iframe once it shows ``element_id``; returns the page's load time
    (navigation timing of the iframe's document, ms)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    driver.switch_to.default_content()
    _wait(driver, ec.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
    _wait(driver, ec.presence_of_element_located((By.ID, element_id)))
    return _load_ms(driver)


def _load_ms(driver: Any) -> float:
    _wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")
    timing = driver.execute_script(
        "const n = performance.getEntriesByType('navigation')[0]; return n ? n.duration : null;"
    )
    return round(float(timing), 1)


def _shot(driver: Any, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(RESULTS / f"{name}.png"))


def test_follow_a_candidate_from_its_ab_test_to_a_rollback_in_the_airflow_ui(
    world: dict[str, Any], api: httpx.Client, experiment: dict[str, Any], browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    base, result = world["base"], experiment["result"]
    timings: dict[str, float] = {}

    # Log in on Airflow's own login page; it comes back to the Experiments entry.
    browser.get(f"{base}/plugin/experiments")
    _wait(browser, ec.presence_of_element_located((By.NAME, "username"))).send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(world["users"]["admin"])
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser, lambda d: "/auth/login" not in d.current_url)
    # The entry is in Airflow's navigation, and its page is the plugin's, inside Airflow's iframe.
    browser.get(f"{base}/dags")
    _wait(browser, ec.element_to_be_clickable((By.CSS_SELECTOR, "a[href='/plugin/experiments']"))).click()
    _wait(browser, lambda d: "/plugin/experiments" in d.current_url)
    timings["experiments"] = _in_plugin_frame(browser, "ab-tests")
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-ab-test='{result.ab_test_id}']")
    assert "promote" in row.text
    assert browser.find_element(By.CSS_SELECTOR, f"tr[data-deployment='{result.deployment_id}']")
    browser.switch_to.default_content()
    _shot(browser, "experiments")

    # The A/B test's page: its numbers are the API's.
    _in_plugin_frame(browser, "ab-tests")
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-ab-test='{result.ab_test_id}']")
    row.find_element(By.TAG_NAME, "a").click()
    _wait(browser, ec.presence_of_element_located((By.ID, "arms")))
    timings["ab_test"] = _load_ms(browser)
    metrics = api.get(f"/pipeline/evaluation/metrics/{result.ab_test_id}").json()
    for arm in ("baseline", "candidate"):
        cells = browser.find_elements(By.CSS_SELECTOR, f"tr[data-arm='{arm}'] td[data-field]")
        shown = {c.get_attribute("data-field"): c.get_attribute("data-value") for c in cells}
        assert int(cells[0].text.replace(",", "")) == metrics["metrics"][arm]["sample_size"]
        for field in ("engagement_rate", "cost_per_post", "response_time_ms", "quality_score", "error_rate"):
            assert float(shown[field]) == pytest.approx(metrics["metrics"][arm][field]), (arm, field)
    lift = browser.find_element(By.CSS_SELECTOR, "[data-field='relative_lift']")
    assert float(lift.get_attribute("data-value")) == pytest.approx(metrics["statistical_analysis"]["relative_lift"])
    figure = browser.find_element(By.ID, "evaluation-figure")
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", figure))
    assert browser.execute_script("return arguments[0].naturalWidth", figure) > 400
    assert "promote" in browser.find_element(By.ID, "decision").text
    # Once more, warm: the API server has drawn a figure and read this test's report before.
    arms = browser.find_element(By.ID, "arms")
    browser.execute_script("location.reload()")  # the iframe's page, not Airflow's
    _wait(browser, ec.staleness_of(arms))
    _wait(browser, ec.presence_of_element_located((By.ID, "arms")))
    timings["ab_test_warm"] = _load_ms(browser)
    browser.switch_to.default_content()
    _shot(browser, "ab_test")

    # Its rollout: the stages, then the Rollback button (reason, confirmation).
    _in_plugin_frame(browser, "rollout-link")  # the A/B page is still the frame's
    browser.find_element(By.ID, "rollout-link").click()
    _wait(browser, ec.presence_of_element_located((By.ID, "stages")))
    timings["rollout"] = _load_ms(browser)
    kinds = [r.get_attribute("data-kind") for r in browser.find_elements(By.CSS_SELECTOR, "#stages tr[data-kind]")]
    assert kinds == ["started", "advanced"]
    assert browser.find_element(By.ID, "current-traffic").get_attribute("data-value") == "0.5"
    browser.switch_to.default_content()
    _shot(browser, "rollout")
    _in_plugin_frame(browser, "rollback-form")
    browser.find_element(By.ID, "reason").send_keys("latency complaints from the browser test")
    browser.find_element(By.ID, "confirm").click()
    browser.find_element(By.ID, "rollback-button").click()
    _wait(browser, ec.presence_of_element_located((By.ID, "flash")))
    timings["rollout_after_rollback"] = _load_ms(browser)
    assert "manual by admin: latency complaints" in browser.find_element(By.ID, "rollback-reason").text
    routing = get_routing(experiment["redis"], "body")
    assert routing.baseline_model == BASELINE and routing.candidate_share == 0.0
    assert routing.source == f"{result.deployment_id}:rolled_back"
    browser.switch_to.default_content()
    _shot(browser, "rollout_rolled_back")

    # The same experiment on its DAG run, as the run's "Experiment" tab.
    browser.get(f"{base}/dags/{DAG_ID}/runs/{quote(experiment['run_id'], safe='')}/plugin/experiment")
    timings["dag_run_tab"] = _in_plugin_frame(browser, "run-ab-test")
    assert browser.find_element(By.ID, "run-ab-test").text == result.ab_test_id
    assert "rolled_back" in browser.find_element(By.ID, "run-rollout").find_element(By.XPATH, "..").text
    browser.switch_to.default_content()
    _shot(browser, "dag_run_tab")

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "page_load_ms.json").write_text(json.dumps(timings, indent=2))
    print("page load times (ms, navigation timing in chromium):", timings)


def test_the_skipped_run_says_why_on_its_status(api: httpx.Client, experiment: dict[str, Any]) -> None:
    """The run's week has no posts: collect skips (an XCom the real task left), the run says so."""
    assert experiment["run_state"] == "success"
    body = api.get(f"/pipeline/fine-tuning/status/{experiment['run_id']}").json()
    assert body["status"] == "skipped" and set(body["progress"].values()) == {"skipped"}
    assert body["skipped"]["task"] == "collect" and "not enough training data" in body["skipped"]["reason"]


def test_the_pages_are_not_shown_to_someone_not_logged_in(world: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    browser.delete_all_cookies()
    browser.get(f"{world['base']}/pipeline/ui/experiments")
    _wait(browser, ec.presence_of_element_located((By.NAME, "username")))
    assert "/auth/login" in browser.current_url and "ab-tests" not in browser.page_source
