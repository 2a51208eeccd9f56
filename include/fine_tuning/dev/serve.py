"""``make serve``: Airflow (UI, REST API v2, the /pipeline API) on 127.0.0.1:8080 with the local services.

Starts what is missing like the demo (PostgreSQL/Redis fallbacks, MLflow, the OpenAI emulator),
then ``airflow standalone`` on the repo's DAGs and plugins until Ctrl-C; stops everything then.
The admin password is in ``.local/serve/airflow/simple_auth_manager_passwords.json.generated``.

``--demo-data`` (``make serve DEMO_DATA=1``): the demo's world instead of an empty one — a week
of seeded posts in schema ``fine_tuning_serve``, the demo's minutes-long A/B test and evidence
ramp, and the simulated content agent posting every second under the live routing, so that the
first run a newcomer triggers collects, trains, A/B tests and rolls out (follow it under
Experiments) instead of skipping for too little data.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from fine_tuning.dev.demo import DEMO_CONFIG, REPO, TrafficSimulator, airflow_env, with_search_path
from fine_tuning.dev.devstack import Stack, airflow_metadata_url, local_stack, stop_group
from fine_tuning.dev.seed import seed_posts
from fine_tuning.infra import db

SERVE_SCHEMA = "fine_tuning_serve"
# The serve's own Redis database when it simulates the agent (the demo's is 5).
SERVE_REDIS_DB = 7


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def demo_world(
    stack: Stack,
    workdir: Path,
    posts: int,
    schema: str = SERVE_SCHEMA,
    redis_db: int = SERVE_REDIS_DB,
) -> tuple[str, dict[str, str]]:
    """The demo's data for a served Airflow: the posts schema's URL and the environment to add
    (the benchmark of Airflow's REST API passes a schema and Redis database of its own)."""
    database_url = with_search_path(stack.database_url, schema)
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    with db.connect(database_url) as conn:
        db.migrate(conn)
        (existing,) = db.one_row(conn.execute("SELECT count(*) FROM posts"))
        # A restart keeps what the last serve made (runs, tests, rollouts): seeded once.
        if not existing:
            inserted = seed_posts(conn, posts, end=datetime.now(UTC).replace(microsecond=0), days=7)
            print(f"seeded {inserted} posts into {schema}.posts", flush=True)
    config_file = workdir / "training_config.json"
    config_file.write_text(json.dumps(DEMO_CONFIG, indent=2))
    stack.redis_url = stack.redis_url.rsplit("/", 1)[0] + f"/{redis_db}"
    return database_url, {"FINE_TUNING_CONFIG_FILE": str(config_file)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--demo-data",
        action="store_true",
        help="seed a week of posts and simulate the content agent (the demo's data and timings)",
    )
    parser.add_argument("--posts", type=int, default=5000, help="posts to seed with --demo-data")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly under a process manager too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = REPO / ".local" / "serve"
    with local_stack(workdir, stage_seconds=5.0, fresh=False) as stack:
        database_url, extra_env = stack.database_url, dict[str, str]()
        if args.demo_data:
            database_url, extra_env = demo_world(stack, workdir, args.posts)
        with db.connect(database_url) as conn:
            db.migrate(conn)
        metadata_url = airflow_metadata_url(stack.database_url, "serve")
        env = airflow_env(stack, database_url, workdir / "airflow", workdir / "data", metadata_url)
        env.update(extra_env)
        # standalone runs `airflow db migrate` itself, against this database.
        env["AIRFLOW__API__PORT"] = "8080"
        env["AIRFLOW__API__HOST"] = "127.0.0.1"
        print(f"MLflow: {stack.mlflow_uri}  OpenAI emulator: {stack.openai_base_url}", flush=True)
        print("Airflow: http://127.0.0.1:8080 (Ctrl-C stops everything)", flush=True)
        # Its own process group: standalone's scheduler, triggerer, API server and workers are
        # stopped together with it.
        process = subprocess.Popen(
            [sys.executable, "-m", "airflow", "standalone"], env=env, start_new_session=True
        )
        simulator = TrafficSimulator(database_url, stack.redis_url) if args.demo_data else None
        if simulator:
            simulator.start()
            print("simulating the content agent: 120 posts a second under the live routing", flush=True)
        try:
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            if simulator:
                simulator.stopping.set()
                simulator.join()
            stop_group(process)


if __name__ == "__main__":
    sys.exit(main())
