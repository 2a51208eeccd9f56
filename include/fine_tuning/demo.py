"""``make demo``: the weekly DAG end to end on local services, then a summary of what happened.

Starts what is missing (PostgreSQL/Redis fallbacks, an MLflow server, the OpenAI emulator),
seeds a ``posts`` table in its own schema, runs ``airflow dags test weekly_fine_tuning``, prints
the run's manifests and its MLflow run and model version, and stops what it started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import psycopg

from fine_tuning import db
from fine_tuning.devstack import Stack, local_stack
from fine_tuning.seed import seed_posts

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "weekly_fine_tuning"
DEMO_SCHEMA = "fine_tuning_demo"


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


def airflow_env(stack: Stack, database_url: str, airflow_home: Path, data_dir: Path) -> dict[str, str]:
    """The environment of a local Airflow pointed at the repo's DAGs, plugins and the local services."""
    venv_bin = str(Path(sys.executable).parent)
    connection = {"conn_type": "generic", "host": stack.openai_base_url, "password": "sk-demo-local"}
    return {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(connection),
        "FINE_TUNING_MODE": "local",
        "FINE_TUNING_DATA_DIR": str(data_dir),
        "FINE_TUNING_POLL_INTERVAL_SECONDS": "1",
        "DATABASE_URL": database_url,
        "REDIS_URL": stack.redis_url,
        "MLFLOW_TRACKING_URI": stack.mlflow_uri,
        "OPENAI_BASE_URL": stack.openai_base_url,
        "OPENAI_API_KEY": "sk-demo-local",
    }


def run_airflow_dag_test(env: dict[str, str], logical_date: str | None = None) -> int:
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    command = [*airflow, "dags", "test", DAG_ID]
    if logical_date:
        command.append(logical_date)
    return subprocess.run(command, env=env).returncode


def latest_run_dir(data_dir: Path) -> Path | None:
    runs = sorted((data_dir / DAG_ID).glob("*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def summary(run_dir: Path | None, mlflow_uri: str) -> str:
    if run_dir is None:
        return "no run directory was written: see the Airflow output above"

    def load(name: str) -> dict:
        path = run_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    collect, upload, train, wait, register = (load(n) for n in ("collect", "upload", "train", "wait", "register"))
    lines = ["", "=== weekly_fine_tuning: what happened ==="]
    if collect:
        rejected = ", ".join(f"{k}={v}" for k, v in sorted(collect["rejected"].items())) or "none"
        lines += [
            f"window:            {collect['window_start']} .. {collect['window_end']}",
            f"posts scanned:     {collect['posts_scanned']}",
            f"examples written:  {collect['examples_written']} ({collect['tokens']} tokens, "
            f"sha256 {str(collect['sha256'])[:12]})",
            f"rejected:          {rejected}; duplicates dropped: {collect['duplicates']}",
        ]
        if collect["status"] != "ready":
            lines.append(f"skipped:           {collect['reason']}")
    if upload:
        lines.append(
            f"uploaded file:     {upload['file_id']} (estimated cost ${upload['estimated_cost_usd']:.2f}, "
            f"{upload['estimated_epochs']} epochs)"
        )
    if train:
        lines.append(f"fine-tuning job:   {train['job_id']} ({train['base_model']})")
    if wait:
        lines.append(f"job final state:   {wait['status']}, trained tokens {wait['trained_tokens']}")
        lines.append(f"fine-tuned model:  {wait['fine_tuned_model']}")
    if register:
        lines.append(
            f"MLflow:            run {register['mlflow_run_id']} -> {mlflow_uri}/#/experiments/"
            f"{register['experiment_id']}/runs/{register['mlflow_run_id']}"
        )
        lines.append(
            f"model version:     {register['model_name']} v{register['model_version']} "
            f"(alias {register['alias']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posts", type=int, default=5000, help="posts to seed (default 5000)")
    parser.add_argument("--stage-seconds", type=float, default=2.0, help="emulator time per job stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.monotonic()
    workdir = REPO / ".local" / "demo"
    data_dir = workdir / "data"
    with local_stack(workdir, stage_seconds=args.stage_seconds) as stack:
        database_url = with_search_path(stack.database_url, DEMO_SCHEMA)
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{DEMO_SCHEMA}" CASCADE')
            conn.execute(f'CREATE SCHEMA "{DEMO_SCHEMA}"')
        now = datetime.now(UTC).replace(microsecond=0)
        with db.connect(database_url) as conn:
            db.migrate(conn)
            inserted = seed_posts(conn, args.posts, end=now, days=7)
        print(f"seeded {inserted} posts into {DEMO_SCHEMA}.posts", flush=True)

        env = airflow_env(stack, database_url, workdir / "airflow", data_dir)
        code = run_airflow_dag_test(env)
        print(summary(latest_run_dir(data_dir), stack.mlflow_uri))
    print(
        f"the services are stopped; to browse the MLflow run again: {sys.executable} -m mlflow ui "
        f"--backend-store-uri sqlite:///{workdir / 'mlflow' / 'mlflow.db'} "
        f"--artifacts-destination {workdir / 'mlflow' / 'artifacts'}"
    )
    print(f"demo wall time: {time.monotonic() - started:.1f} s; airflow dags test exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
