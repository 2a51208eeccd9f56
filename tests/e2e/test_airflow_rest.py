"""A real Airflow (``airflow standalone``: API server, scheduler, dag processor, triggerer) on
loopback, driven through its REST API v2 and the plugin's ``/pipeline`` endpoints.

One Airflow for the module (startup is the expensive part): its metadata database is a fresh
PostgreSQL database, its DAGs and plugins are the repo's, its services the real PostgreSQL,
Redis, MLflow and the OpenAI emulator. Every process it spawned is stopped at the end (its
process group).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from fine_tuning.infra import db
from fine_tuning.dev.demo import DAG_ID, airflow_env
from fine_tuning.dev.devstack import Stack
from fine_tuning.dev.seed import seed_posts
from support import REPO, StatsdListener, airflow_standalone, lease_redis_db

pytestmark = pytest.mark.slow

PG_BASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
# Three past weekly ticks of "0 2 * * 0" (Sundays 02:00 UTC), each with its own number of posts.
BACKFILL_WEEKS = {
    datetime(2026, 11, 1, 2, tzinfo=UTC): 11,
    datetime(2026, 11, 8, 2, tzinfo=UTC): 17,
    datetime(2026, 11, 15, 2, tzinfo=UTC): 23,
}
# Three earlier weeks for the same backfill from the CLI (`airflow backfill create`).
CLI_BACKFILL_WEEKS = {
    datetime(2026, 10, 11, 2, tzinfo=UTC): 13,
    datetime(2026, 10, 18, 2, tzinfo=UTC): 19,
    datetime(2026, 10, 25, 2, tzinfo=UTC): 29,
}
# A/B test of ~11 s, looked at every 12 s: with no agent traffic it ends "reject", the deploy is
# skipped, and the run succeeds. The look interval stays above the ~5 s the LocalExecutor takes
# to report a deferred workload finished: a trigger that fires sooner races that report, and the
# scheduler marks the task up_for_retry (a minute's retry delay; seen with a 3 s interval).
FAST_CONF = {"a_b_test_duration_hours": 0.003, "evaluation_interval_minutes": 0.2}


def _database_url(name: str) -> str:
    parts = urlsplit(PG_BASE_URL)
    return urlunsplit(parts._replace(path=f"/{name}", query=""))


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str, emulator: Any) -> Iterator[dict[str, Any]]:
    """A posts schema seeded for the manual run (last 4 days) and three backfill weeks."""
    schema = f"rest_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    from fine_tuning.dev.demo import with_search_path

    posts_url = with_search_path(PG_BASE_URL, schema)
    now = datetime.now(UTC)
    with db.connect(posts_url) as conn:
        db.migrate(conn)
        # Only the last 4 days: the scheduled run the unpause makes (the tick before now) finds
        # too few posts in its own week and is skipped quickly.
        seed_posts(conn, 300, end=now, days=4)
        for tick, count in {**BACKFILL_WEEKS, **CLI_BACKFILL_WEEKS}.items():
            seed_posts(conn, count, end=tick, days=7, bad_fraction=0.0, seed=count)
    emulator.reset()  # type: ignore[attr-defined]
    with lease_redis_db() as redis_url:  # the runs write routing (fixed key names): a database of its own
        yield {"posts_url": posts_url, "mlflow_uri": mlflow_uri, "emulator": emulator, "now": now,
               "redis_url": redis_url}
    with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(scope="module")
def statsd() -> Iterator[StatsdListener]:
    """A StatsD server on loopback for Airflow's own metrics (scheduler: dagrun.*) and ours."""
    listener = StatsdListener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def airflow(
    services: dict[str, Any], statsd: StatsdListener, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """``airflow standalone`` on a free loopback port, its metadata in a fresh PostgreSQL database."""
    home = tmp_path_factory.mktemp("airflow-rest")
    meta_db = f"airflow_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{meta_db}"')
    emulator = services["emulator"]
    stack = Stack(
        database_url=services["posts_url"], redis_url=services["redis_url"], mlflow_uri=services["mlflow_uri"],
        openai_base_url=emulator.base_url, emulator_admin_url=emulator.admin_url, workdir=home,
    )
    env = airflow_env(stack, services["posts_url"], home / "airflow", home / "data")
    env.update(
        {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _database_url(meta_db).replace("postgresql://", "postgresql+psycopg2://"),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
            "MLFLOW_EXPERIMENT_NAME": f"rest_{home.name}",
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
            "STATSD_HOST": "127.0.0.1",
            "STATSD_PORT": str(statsd.port),
        }
    )
    env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
    try:
        with airflow_standalone(env, home) as running:
            yield {**running, "data_dir": home / "data"}
    finally:
        with psycopg.connect(PG_BASE_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{meta_db}" WITH (FORCE)')


def _token(airflow: dict[str, Any], username: str) -> dict[str, str]:
    response = httpx.post(
        f"{airflow['base']}/auth/token",
        json={"username": username, "password": airflow["users"][username]},
        timeout=30,
    )
    assert response.status_code in (200, 201), response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture(scope="module")
def api(airflow: dict[str, Any]) -> httpx.Client:
    """An authenticated client, with the DAG parsed and unpaused."""
    client = httpx.Client(base_url=airflow["base"], headers=_token(airflow, "admin"), timeout=30)
    deadline = time.monotonic() + 90
    while client.get(f"/api/v2/dags/{DAG_ID}").status_code != 200:
        assert time.monotonic() < deadline, "the dag processor did not parse weekly_fine_tuning in 90 s"
        time.sleep(1)
    assert client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    return client


def _wait_for_state(client: httpx.Client, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()
        if run["state"] in ("success", "failed") or time.monotonic() > deadline:
            return run
        time.sleep(2)


def _task_states(client: httpx.Client, run_id: str) -> dict[str, str | None]:
    tis = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    return {ti["task_id"]: ti["state"] for ti in tis}


def test_rest_trigger_with_conf_runs_to_success(airflow: dict[str, Any], api: httpx.Client, services: dict) -> None:
    started = time.monotonic()
    # Param validation: a conf the DAG's Params reject never becomes a run.
    bad = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {"engagement_threshold": 3}})
    assert bad.status_code == 400, bad.text

    conf = {"engagement_threshold": 0.05, **FAST_CONF}
    response = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    run = _wait_for_state(api, run_id, timeout=240)
    tasks = _task_states(api, run_id)
    assert run["state"] == "success", (tasks, run["state"], airflow["log"].read_text()[-3000:])
    assert run["conf"]["engagement_threshold"] == 0.05
    assert {t: tasks[t] for t in ("collect", "upload", "train", "wait", "register", "ab_create", "evaluate")} == dict.fromkeys(
        ("collect", "upload", "train", "wait", "register", "ab_create", "evaluate"), "success"
    )
    assert tasks["deploy"] == "skipped"  # no traffic in the A/B test: rejected, nothing deployed

    # The plugin's endpoints on the same server: status with the token, health without.
    status = api.get(f"/pipeline/fine-tuning/status/{run_id}")
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["status"] == "completed" and body["progress"]["model_training"] == "completed"
    # Deploy skipped because the A/B test rejected the candidate: said, with the step's own reason.
    assert body["skipped"]["task"] == "deploy" and "reject" in body["skipped"]["reason"]
    assert body["metrics"]["training_examples"] > 0 and body["metrics"]["training_job_id"].startswith("ftjob-")
    assert body["metrics"]["fine_tuned_model"].startswith("ft:")
    assert httpx.get(f"{airflow['base']}/pipeline/fine-tuning/status/{run_id}").status_code == 401
    viewer = httpx.Client(base_url=airflow["base"], headers=_token(airflow, "viewer"), timeout=30)
    assert viewer.get(f"/pipeline/fine-tuning/status/{run_id}").status_code == 200
    assert viewer.post("/pipeline/fine-tuning/start", json={}).status_code == 403
    health = httpx.get(f"{airflow['base']}/pipeline/health", timeout=30)
    assert health.status_code == 200 and health.json()["components"]["database"] == "healthy"
    print(f"startup {airflow['startup_seconds']:.0f} s; triggered run to success in {time.monotonic() - started:.0f} s")


def test_marking_the_deferred_wait_failed_cancels_the_remote_job(
    airflow: dict[str, Any], api: httpx.Client, services: dict
) -> None:
    """A person marks the deferred ``wait`` failed in the UI (the same PATCH): Airflow's
    triggerer calls the trigger's ``on_kill``, which cancels the job at the provider — the
    worker's ``on_kill`` never runs for a deferred task, so without it the job would train on."""
    emulator = services["emulator"]
    emulator.set_stage_seconds(600)  # this run's job stays live until something cancels it
    try:
        before = {job["id"] for job in emulator.state()["jobs"]}
        conf = {"engagement_threshold": 0.05, **FAST_CONF}
        response = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
        assert response.status_code == 200, response.text
        run_id = response.json()["dag_run_id"]
        deadline = time.monotonic() + 180
        while _task_states(api, run_id).get("wait") != "deferred":
            assert time.monotonic() < deadline, (_task_states(api, run_id), airflow["log"].read_text()[-3000:])
            time.sleep(1)
        (job,) = [job for job in emulator.state()["jobs"] if job["id"] not in before]
        assert job["status"] in ("validating_files", "queued", "running"), job
        # "deferred" is written before a triggerer picks the trigger up; marked failed in that
        # window, the trigger never runs and there is nothing to call on_kill on. The worker
        # polled once before deferring: a second poll is the trigger's, running in the triggerer.
        job_path = f"/v1/fine_tuning/jobs/{job['id']}"
        deadline = time.monotonic() + 60
        while len(emulator.requests("GET", job_path)) < 2:
            assert time.monotonic() < deadline, (emulator.requests("GET", job_path), airflow["log"].read_text()[-3000:])
            time.sleep(0.5)

        marked = api.patch(
            f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/wait", json={"new_state": "failed"}
        )
        assert marked.status_code == 200, marked.text
        deadline = time.monotonic() + 60
        while (status := _job_status(emulator, job["id"])) != "cancelled":
            assert time.monotonic() < deadline, (status, airflow["log"].read_text()[-3000:])
            time.sleep(0.5)
        assert len(emulator.requests("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel")) == 1
        assert _wait_for_state(api, run_id, timeout=120)["state"] == "failed"
    finally:
        emulator.set_stage_seconds(0.2)


def _job_status(emulator: Any, job_id: str) -> str:
    return next(job["status"] for job in emulator.state()["jobs"] if job["id"] == job_id)


def test_scheduler_and_health_metrics_reach_statsd(
    airflow: dict[str, Any], api: httpx.Client, statsd: StatsdListener
) -> None:
    """Under a real scheduler Airflow sends dagrun.* (which `airflow dags test` never does), our
    tasks send theirs, and each /pipeline/health call sends the pool and breaker gauges."""
    runs = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"state": "success"}).json()["dag_runs"]
    assert runs, "no successful run yet: this test follows the REST trigger test"
    statsd.wait_for(f"airflow.dagrun.duration.success.{DAG_ID}", timeout=30)
    names = statsd.names()
    assert f"airflow.dagrun.duration.success.{DAG_ID}" in names, sorted(n for n in names if n.startswith("airflow.dag"))
    assert statsd.values(f"airflow.dagrun.duration.success.{DAG_ID}")[-1][0] > 0
    assert f"airflow.ti.finish.{DAG_ID}.collect.success" in names
    assert statsd.total("fine_tuning.step.runs.register.success") >= 1

    seen = len(statsd.values("fine_tuning.redis.connections.idle"))
    health = httpx.get(f"{airflow['base']}/pipeline/health", timeout=30)
    assert health.status_code == 200
    deadline = time.monotonic() + 5
    while len(statsd.values("fine_tuning.redis.connections.idle")) == seen and time.monotonic() < deadline:
        time.sleep(0.02)  # this call's gauges, not an earlier call's
    # The gauges are the pools this health call reported (the same numbers, one source); the
    # API server pools its connections, and the Redis ping left one idle in the pool.
    pools = health.json()["connection_pools"]
    assert pools["db_connections_active"] is not None and pools["redis_connections_idle"] >= 1
    for name in ("db_connections_active", "db_connections_idle", "redis_connections_active", "redis_connections_idle"):
        assert statsd.last(f"fine_tuning.{name.replace('_connections_', '.connections.')}") == pools[name], name
    assert statsd.last("fine_tuning.breaker.openai.state") in (0.0, 0.5, 1.0)
    # Every name that arrived maps to a Prometheus series through the exporter's mapping.
    from support import map_statsd

    unmapped = sorted(n for n in statsd.names() if n.startswith("fine_tuning.") and map_statsd(n) is None)
    assert not unmapped, unmapped
    # Airflow's own names are the chart's default mappings' business, except those our rules use.
    assert map_statsd(f"airflow.dagrun.duration.success.{DAG_ID}") == ("airflow_dagrun_duration", {"dag_id": DAG_ID})


def test_backfill_over_three_past_weeks_collects_each_week(
    airflow: dict[str, Any], api: httpx.Client, services: dict[str, Any]
) -> None:
    started = time.monotonic()
    ticks = sorted(BACKFILL_WEEKS)
    body = {
        "dag_id": DAG_ID,
        "from_date": (ticks[0] - timedelta(days=1)).isoformat(),
        "to_date": (ticks[-1] + timedelta(days=1)).isoformat(),
        # Every post counts: posts_scanned is then exactly what was seeded in that week.
        "dag_run_conf": {"engagement_threshold": 0.0},
        "max_active_runs": 3,
    }
    dry = api.post("/api/v2/backfills/dry_run", json=body)
    assert dry.status_code == 200, dry.text
    assert sorted(datetime.fromisoformat(r["logical_date"]) for r in dry.json()["backfills"]) == ticks
    response = api.post("/api/v2/backfills", json=body)
    assert response.status_code == 200, response.text
    backfill_id = response.json()["id"]

    _assert_each_week_collected(api, airflow, services, ticks)
    deadline = time.monotonic() + 60  # the scheduler marks the backfill done on a later loop
    while api.get(f"/api/v2/backfills/{backfill_id}").json()["completed_at"] is None:
        assert time.monotonic() < deadline, api.get(f"/api/v2/backfills/{backfill_id}").json()
        time.sleep(1)
    print(f"backfill of 3 weeks in {time.monotonic() - started:.0f} s")


def test_cli_backfill_over_three_other_weeks_collects_each_week(
    airflow: dict[str, Any], api: httpx.Client, services: dict[str, Any]
) -> None:
    """`airflow backfill create` (the CLI, against the same metadata database) does what the REST
    call does; the scheduler runs the three weeks."""
    ticks = sorted(CLI_BACKFILL_WEEKS)
    command = [
        str(Path(sys.executable).parent / "airflow"), "backfill", "create", "--dag-id", DAG_ID,
        "--from-date", (ticks[0] - timedelta(days=1)).date().isoformat(),
        "--to-date", (ticks[-1] + timedelta(days=1)).date().isoformat(),
        "--dag-run-conf", json.dumps({"engagement_threshold": 0.0}), "--max-active-runs", "3",
    ]
    done = subprocess.run(command, env=airflow["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    _assert_each_week_collected(api, airflow, services, ticks)


def _assert_each_week_collected(
    api: httpx.Client, airflow: dict[str, Any], services: dict[str, Any], ticks: list[datetime]
) -> None:
    """The backfill runs of ``ticks`` succeed, and each collected exactly its own week's posts."""
    deadline = time.monotonic() + 120
    while True:
        runs = [
            r for r in api.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill"}).json()["dag_runs"]
            if datetime.fromisoformat(r["logical_date"]) in ticks
        ]
        if len(runs) == len(ticks) and all(r["state"] in ("success", "failed") for r in runs):
            break
        assert time.monotonic() < deadline, runs
        time.sleep(2)
    assert all(r["state"] == "success" for r in runs), runs
    scanned = set()
    for run in runs:
        tick = datetime.fromisoformat(run["logical_date"])
        assert _task_states(api, run["dag_run_id"])["collect"] == "skipped"  # too few posts: skipped, not failed
        skipped = api.get(f"/pipeline/fine-tuning/status/{run['dag_run_id']}").json()
        assert skipped["status"] == "skipped" and set(skipped["progress"].values()) == {"skipped"}
        assert skipped["skipped"]["task"] == "collect" and "not enough training data" in skipped["skipped"]["reason"]
        manifest_path = next((airflow["data_dir"] / DAG_ID).glob(f"*{tick:%Y-%m-%d}*/collect.json"))
        manifest = json.loads(manifest_path.read_text())
        # The run's own week (its data interval), not the week before "now".
        assert datetime.fromisoformat(manifest["window_end"]) == tick
        assert datetime.fromisoformat(manifest["window_start"]) == tick - timedelta(days=7)
        with psycopg.connect(services["posts_url"]) as conn:
            in_week = conn.execute(
                "SELECT count(*) FROM posts WHERE ts >= %s AND ts < %s AND engagement_rate >= 0",
                (tick - timedelta(days=7), tick),
            ).fetchone()[0]
        # Exactly that week's posts (seed_posts spreads posts a little; the weeks differ in size).
        assert manifest["posts_scanned"] == in_week > 0
        scanned.add(manifest["posts_scanned"])
    assert len(scanned) == len(ticks)


def test_status_endpoint_under_concurrent_polling(airflow: dict[str, Any], api: httpx.Client) -> None:
    """50 clients poll one pipeline's status at once: no errors; p50/p99 printed.

    ``FINE_TUNING_LOAD_SECONDS`` sets the length (the issue's check is 30 s; the suite uses 8).
    """
    import asyncio
    import statistics

    seconds = float(os.environ.get("FINE_TUNING_LOAD_SECONDS", "8"))
    runs = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 1}).json()["dag_runs"]
    assert runs, "no run to poll"
    path = f"/pipeline/fine-tuning/status/{runs[0]['dag_run_id']}"
    headers = dict(api.headers)
    latencies: list[float] = []
    errors: list[str] = []

    async def poll(client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            begun = time.perf_counter()
            try:
                response = await client.get(path)
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}")
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
            latencies.append(time.perf_counter() - begun)

    async def main() -> None:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=airflow["base"], headers=headers, timeout=30, limits=limits) as client:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(poll(client, deadline) for _ in range(50)))

    asyncio.run(main())
    ordered = sorted(latencies)
    p50, p99 = statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]
    print(f"load: 50 clients x {seconds:.0f} s: {len(ordered)} requests, p50 {p50 * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, errors {len(errors)}")
    assert not errors, errors[:10]


def test_settings_file_loads_into_airflow(airflow: dict[str, Any], api: httpx.Client, tmp_path: Path) -> None:
    """`python -m fine_tuning settings` puts airflow_settings.yaml's entries where the REST API
    (and the tasks) find them; a wrong file names its mistake and imports nothing. Last in the
    module: from here on the tasks of this Airflow would use the file's postgres_default."""
    repo = REPO
    loader = [sys.executable, "-m", "fine_tuning", "settings"]
    done = subprocess.run([*loader, str(repo / "airflow_settings.yaml")], env=airflow["env"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    import yaml

    expected = yaml.safe_load((repo / "airflow_settings.yaml").read_text())["airflow"]
    for conn in expected["connections"]:
        got = api.get(f"/api/v2/connections/{conn['conn_id']}")
        assert got.status_code == 200, got.text
        assert got.json()["conn_type"] == conn["conn_type"] and got.json()["host"] == conn.get("conn_host")
    for pool in expected["pools"]:
        assert api.get(f"/api/v2/pools/{pool['pool_name']}").json()["slots"] == pool["pool_slot"]
    # Variables too (the repo's file has none: the pipeline reads its config, not Variables).
    extra = tmp_path / "more_settings.yaml"
    extra.write_text("airflow:\n  variables:\n    - variable_name: team_contact\n      variable_value: ml-platform\n")
    done = subprocess.run([*loader, str(extra)], env=airflow["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert api.get("/api/v2/variables/team_contact").json()["value"] == "ml-platform"

    bad = tmp_path / "airflow_settings.yaml"
    bad.write_text("airflow:\n  connections:\n    - conn_id: extra_one\n      conn_type: http\n"
                   "    - conn_id: broken\n      conn_type: postgres\n      conn_prot: 5432\n")
    done = subprocess.run([*loader, str(bad)], env=airflow["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "airflow.connections[1] (broken).conn_prot: unknown key" in done.stderr, done.stderr
    assert api.get("/api/v2/connections/extra_one").status_code == 404  # nothing half-imported
