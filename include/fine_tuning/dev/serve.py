"""``make serve``: Airflow (UI, REST API v2, the /pipeline API) on 127.0.0.1:8080 with the local services.

Starts what is missing like the demo (PostgreSQL/Redis fallbacks, MLflow, the OpenAI emulator),
then ``airflow standalone`` on the repo's DAGs and plugins until Ctrl-C; stops everything then.
The admin password is in ``.local/serve/airflow/simple_auth_manager_passwords.json.generated``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

from fine_tuning.dev.demo import REPO, airflow_env
from fine_tuning.dev.devstack import airflow_metadata_url, local_stack
from fine_tuning.infra import db


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly under a process manager too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = REPO / ".local" / "serve"
    with local_stack(workdir, stage_seconds=5.0, fresh=False) as stack:
        with db.connect(stack.database_url) as conn:
            db.migrate(conn)
        metadata_url = airflow_metadata_url(stack.database_url, "serve")
        env = airflow_env(stack, stack.database_url, workdir / "airflow", workdir / "data", metadata_url)
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
        try:
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    sys.exit(main())
