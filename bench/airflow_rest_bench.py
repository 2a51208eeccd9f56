"""Airflow's own REST API under 16 concurrent clients while a pipeline run executes, with its
metadata in SQLite and in PostgreSQL.

    python bench/airflow_rest_bench.py

For each metadata database (BENCH_REST_BACKENDS, default ``sqlite,postgres``), what ``make serve
DEMO_DATA=1`` runs: the local services (PostgreSQL and Redis on 127.0.0.1, MLflow, the OpenAI
emulator), the demo's world (a week of seeded posts in a schema of the bench's own, the demo's
minutes-long A/B test and ramp, the simulated content agent posting 120 times a second) and
``airflow standalone`` on the repo's DAGs — in SQLite, Airflow's default (a file in the fresh
home), or in a fresh PostgreSQL database of its own (what ``make demo`` and ``make serve`` use).
Once a ``weekly_fine_tuning`` run (unpaused and triggered) has a task running, BENCH_REST_CLIENTS (16) threads
each poll ``GET /api/v2/dags/weekly_fine_tuning/dagRuns/{run_id}`` back to back for
BENCH_REST_SECONDS (40), each request with a BENCH_REST_TIMEOUT (10 s) client timeout. Reported:
requests answered (200), timed out, failed otherwise, latency p50/p99/max of the answered ones,
and how far the run got meanwhile (the run's tasks are the load: the scheduler, the triggerer
and the task runners write the same metadata database the API server reads).

Writes ``airflow_rest.json`` and keeps each standalone's log next to it
(``airflow_rest_{backend}.log``). Standalone starts with ``airflow db migrate`` on the fresh database;
that time is reported apart, not measured as load.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _harness
import httpx
import numpy as np

DAG_ID = "weekly_fine_tuning"
# The bench's own Redis database (tests lease 1-4, 6, 10, 11, 15; the demo uses 5, serve 7).
BENCH_REDIS_DB = 9


def _poll(base: str, headers: dict[str, str], run_id: str, stop_at: float, timeout: float) -> list[list[Any]]:
    """One client: requests back to back until ``stop_at``; [latency s, outcome, start epoch s]
    per request."""
    outcomes: list[list[Any]] = []
    url = f"{base}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"
    with httpx.Client(headers=headers, timeout=timeout) as client:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            at = time.time()
            try:
                response = client.get(url)
                outcome = "ok" if response.status_code == 200 else f"http_{response.status_code}"
            except httpx.TimeoutException:
                outcome = "timeout"
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            outcomes.append([time.perf_counter() - started, outcome, at])
    return outcomes


def _wait_for_running_task(api: httpx.Client, timeout: float) -> tuple[str, dict[str, str]]:
    """The executing run and its task states, once one of its tasks runs (the load the bench
    wants). Unpausing the DAG schedules its latest interval; with ``max_active_runs=1`` the
    manual run triggered next to it waits, so the run polled is whichever executes."""
    deadline = time.monotonic() + timeout
    while True:
        runs = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"state": "running"}).json()["dag_runs"]
        for run in runs:
            run_id = run["dag_run_id"]
            tis = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
            states = {ti["task_id"]: ti["state"] for ti in tis}
            if "running" in states.values() or "deferred" in states.values():
                return run_id, states
        if time.monotonic() > deadline:
            raise RuntimeError(f"no run of {DAG_ID} had a task running within {timeout:.0f} s")
        time.sleep(0.5)


def run_backend(backend: str, settings: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from fine_tuning.dev.demo import TrafficSimulator, airflow_env
    from fine_tuning.dev.devstack import airflow_standalone, local_stack
    from fine_tuning.dev.serve import demo_world

    home = workdir / backend
    home.mkdir(parents=True)
    schema = f"bench_rest_{os.getpid()}_{backend}"
    meta_db = f"bench_rest_airflow_{os.getpid()}"
    with local_stack(home / "stack", stage_seconds=5.0) as stack:
        import psycopg

        posts_url, extra_env = demo_world(
            stack, home, settings["posts"], schema=schema, redis_db=BENCH_REDIS_DB
        )
        metadata_url = None
        if backend == "postgres":
            with psycopg.connect(stack.database_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{meta_db}"')
                conn.execute(f'CREATE DATABASE "{meta_db}"')
            metadata_url = stack.database_url.rsplit("/", 1)[0].replace(
                "postgresql://", "postgresql+psycopg2://"
            ) + f"/{meta_db}"
        env = airflow_env(stack, posts_url, home / "airflow", home / "data", metadata_url)
        env.update(extra_env)
        env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
        env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = "admin:admin"
        simulator = TrafficSimulator(posts_url, stack.redis_url)
        simulator.start()
        try:
            with airflow_standalone(env, home) as airflow:
                base = airflow["base"]
                token = httpx.post(
                    f"{base}/auth/token",
                    json={"username": "admin", "password": airflow["users"]["admin"]},
                    timeout=30,
                ).json()["access_token"]
                headers = {"Authorization": f"Bearer {token}"}
                with httpx.Client(base_url=base, headers=headers, timeout=60) as api:
                    executor = _executor(api)
                    deadline = time.monotonic() + 120
                    while api.get(f"/api/v2/dags/{DAG_ID}").status_code != 200:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{DAG_ID} was not parsed within 120 s")
                        time.sleep(1)
                    api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
                    api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None}).raise_for_status()
                    run_id, before = _wait_for_running_task(api, timeout=180)
                    stop_at = time.monotonic() + settings["seconds"]
                    results: list[list[list[Any]]] = [[] for _ in range(settings["clients"])]

                    def client(i: int) -> None:
                        results[i] = _poll(base, headers, run_id, stop_at, settings["timeout"])

                    threads = [threading.Thread(target=client, args=(i,)) for i in range(settings["clients"])]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    # Read after the load; a server still stalled then is reported, not fatal.
                    tis = _answer(api, f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
                    after = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]} if tis else None
                    run = _answer(api, f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
                    run_state = run["state"] if run else "no answer within 60 s"
        finally:
            simulator.stopping.set()
            simulator.join()
            with psycopg.connect(stack.database_url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                if backend == "postgres":
                    conn.execute(f'DROP DATABASE IF EXISTS "{meta_db}" WITH (FORCE)')
    outcomes = [o for per_client in results for o in per_client]
    # Timeouts that start within the same second across clients are one stall of the server,
    # not a slow database under one client: count the distinct seconds.
    stalls = sorted({int(o[2]) for o in outcomes if o[1] == "timeout"})
    shutil.copy(airflow["log"], _harness.results_dir() / f"airflow_rest_{backend}.log")
    answered = np.array([o[0] for o in outcomes if o[1] == "ok"] or [float("nan")]) * 1000
    counts: dict[str, int] = {}
    for _, outcome, _ in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return {
        "backend": backend,
        "executor": executor,
        "startup_seconds": round(airflow["startup_seconds"], 1),
        "requests": len(outcomes),
        "answered": counts.get("ok", 0),
        "timed_out": counts.get("timeout", 0),
        "seconds_in_which_timed_out_requests_started": len(stalls),
        "other_failures": {k: v for k, v in counts.items() if k not in ("ok", "timeout")},
        "answered_per_s": round(counts.get("ok", 0) / settings["seconds"], 1),
        "p50_ms": round(float(np.nanpercentile(answered, 50)), 1),
        "p99_ms": round(float(np.nanpercentile(answered, 99)), 1),
        "max_ms": round(float(np.nanmax(answered)), 1),
        "tasks_when_polling_started": before,
        "tasks_when_polling_ended": after,
        "run_state_when_polling_ended": run_state,
    }


def _answer(api: httpx.Client, path: str) -> dict[str, Any] | None:
    try:
        response = api.get(path)
    except httpx.TimeoutException:
        return None  # the server is still stalled: the caller reports "no answer within 60 s"
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def _executor(api: httpx.Client) -> str | None:
    """The executor standalone chose (config API; None when the API does not expose config)."""
    response = api.get("/api/v2/config/section/core/option/executor", headers={"Accept": "application/json"})
    if response.status_code != 200:
        return None
    sections = response.json().get("sections", [])
    options = sections[0].get("options", []) if sections else []
    return options[0].get("value") if options else None


def main() -> None:
    _harness.exit_cleanly_on_sigterm()
    settings = {
        "clients": _harness.env_int("BENCH_REST_CLIENTS", 16),
        "seconds": _harness.env_float("BENCH_REST_SECONDS", 40.0),
        "timeout": _harness.env_float("BENCH_REST_TIMEOUT", 10.0),
        "posts": _harness.env_int("BENCH_REST_POSTS", 5000),
        "backends": os.environ.get("BENCH_REST_BACKENDS", "sqlite,postgres").split(","),
    }
    unknown = set(settings["backends"]) - {"sqlite", "postgres"}
    if unknown:
        raise SystemExit(f"BENCH_REST_BACKENDS: unknown backend(s) {sorted(unknown)}; use sqlite, postgres")
    info = _harness.machine()
    print(_harness.machine_line(info), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="rest-bench-"))
    rows = []
    try:
        for backend in settings["backends"]:
            row = run_backend(backend, settings, workdir)
            rows.append(row)
            print(f"  {backend}: {row['answered']} answered, {row['timed_out']} timed out "
                  f"(starting in {row['seconds_in_which_timed_out_requests_started']} distinct seconds), "
                  f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _harness.print_table(
        f"Airflow REST API: {settings['clients']} clients polling one dagRun for {settings['seconds']:.0f} s "
        f"while it executes (client timeout {settings['timeout']:.0f} s; {info['cores']} cores)",
        ["metadata", "executor", "requests", "answered", "answered/s", "timed out", "other failures",
         "p50 ms", "p99 ms", "max ms"],
        [(r["backend"], r["executor"], r["requests"], r["answered"], r["answered_per_s"], r["timed_out"],
          sum(r["other_failures"].values()), r["p50_ms"], r["p99_ms"], r["max_ms"]) for r in rows],
    )
    _harness.write_results("airflow_rest", {"machine": info, "settings": settings, "rows": rows})


if __name__ == "__main__":
    sys.path.insert(0, str(_harness.REPO / "plugins"))
    main()
