"""What several test modules share: the repository's paths, the StatsD listener, statsd_exporter's
mapping as a function, and the runners of the real Airflow CLI."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from fine_tuning.config import PipelineConfig
from fine_tuning.dev.devstack import airflow_standalone, stop_group  # noqa: F401 - the tests' names
from fine_tuning.manifests import RegistrationManifest

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "include" / "monitoring"
MAPPINGS: list[dict] = yaml.safe_load((MONITORING / "statsd-mapping.yaml").read_text())["mappings"]

LAST_WEEK_END = datetime(2026, 11, 22, 2, tzinfo=UTC)  # a Sunday 02:00 tick of the schedule

PG_BASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
# The tests' Redis, named in this one place. Pointed at a dead port (TEST_REDIS_URL=redis://127.0.0.1:1/0)
# every test that claims shared (Redis) state must fail: the breakers and the cache fall back to
# per-process state when Redis is down, so a test that does not check it was shared proves nothing.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Database numbers a test may lease for keys whose names are fixed (routing:
# ``fine_tuning:routing:{model_type}``). Others use this Redis too: 0 holds prefixed keys only, 5 is
# `make demo`'s (DEMO_REDIS_DB), and 7, 8, 9, 12, 13 and 14 are left to the tests that still name a
# database (main's retirement and routing-outage tests use 13 and 14).
LEASABLE_REDIS_DBS = (1, 2, 3, 4, 6, 10, 11, 15)


def redis_url_db(db: int) -> str:
    """TEST_REDIS_URL with another database number."""
    return urlunsplit(urlsplit(TEST_REDIS_URL)._replace(path=f"/{db}"))


@contextmanager
def lease_redis_db(wait_seconds: float = 120.0) -> Iterator[str]:
    """The URL of a Redis database held by the caller alone until the block ends.

    The lease is a key with an expiry in database 0 (a killed run frees it within the hour); the
    database is emptied before (a killed holder's leftovers) and after. No other test on this
    Redis holds it meanwhile, so emptying it touches nobody else's keys."""
    import redis

    leases = redis.Redis.from_url(TEST_REDIS_URL)
    owner = uuid.uuid4().hex.encode()
    deadline = time.monotonic() + wait_seconds
    while True:
        db = next(
            (n for n in LEASABLE_REDIS_DBS if leases.set(f"fine_tuning_tests:redis_db:{n}", owner, nx=True, ex=3600)),
            None,
        )
        if db is not None:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no Redis database free among {LEASABLE_REDIS_DBS} on {TEST_REDIS_URL}")
        time.sleep(0.5)
    url = redis_url_db(db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        lease = f"fine_tuning_tests:redis_db:{db}"
        if leases.get(lease) == owner:
            leases.delete(lease)


class StatsdListener:
    """A real StatsD server, as far as the wire goes: one UDP socket on loopback, lines parsed."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.lines.extend(line for line in data.decode("ascii").splitlines() if line)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def wait_for(self, name: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and name not in self.names():
            time.sleep(0.02)

    def names(self) -> set[str]:
        return {line.split(":", 1)[0] for line in self.lines}

    def values(self, name: str) -> list[tuple[float, str]]:
        """Every (value, type) received for ``name``; a gauge keeps its last value meaningful."""
        found = []
        for line in self.lines:
            stat, _, rest = line.partition(":")
            if stat == name:
                value, _, kind = rest.partition("|")
                found.append((float(value), kind.split("|")[0]))
        return found

    def total(self, name: str) -> float:
        return sum(value for value, kind in self.values(name) if kind == "c")

    def last(self, name: str) -> float:
        return self.values(name)[-1][0]


def map_statsd(name: str) -> tuple[str, dict[str, str]] | None:
    """statsd_exporter's glob matching: `*` is one dotted segment; $n fills names and labels."""
    for mapping in MAPPINGS:
        pattern = "^" + re.escape(mapping["match"]).replace(r"\*", "([^.]+)") + "$"
        found = re.match(pattern, name)
        if found:
            def fill(text: str) -> str:
                return re.sub(r"\$\{?(\d+)\}?", lambda m: found.group(int(m.group(1))), text)

            return fill(mapping["name"]), {k: fill(str(v)) for k, v in mapping.get("labels", {}).items()}
    return None


def airflow_json(env: dict[str, str], *args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "airflow", *args, "-o", "json"], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # log lines may come before the JSON


def dags_test(env: dict[str, str], logical_date: datetime) -> tuple[str, dict[str, str]]:
    """``airflow dags test`` of the weekly DAG for one week: the run's state and its tasks' states."""
    from fine_tuning.dev.demo import DAG_ID

    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", DAG_ID, logical_date.isoformat()],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    runs = airflow_json(env, "dags", "list-runs", DAG_ID)
    run = next(r for r in runs if r["logical_date"].startswith(logical_date.strftime("%Y-%m-%dT%H:%M")))
    states = airflow_json(env, "tasks", "states-for-dag-run", DAG_ID, run["run_id"])
    return run["state"], {s["task_id"]: s["state"] for s in states}


def token(username: str, role: str | None) -> dict[str, str]:
    """An ``Authorization`` header with the simple auth manager's own JWT for this user and role."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    jwt = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role))  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {jwt}"}


def registered_version(config: PipelineConfig, model: str) -> RegistrationManifest:
    """A registered version of ``model`` (as ``register`` leaves it), with ``challenger``."""
    from mlflow import MlflowClient

    mlflow = MlflowClient(config.mlflow.tracking_uri)
    name = config.mlflow.registered_model_name
    if not mlflow.search_registered_models(f"name = '{name}'"):
        mlflow.create_registered_model(name)
    run = mlflow.create_run(mlflow.get_experiment_by_name("Default").experiment_id)
    version = mlflow.create_model_version(
        name, source=f"runs:/{run.info.run_id}/m", run_id=run.info.run_id, tags={"fine_tuned_model": model}
    )
    mlflow.set_registered_model_alias(name, "challenger", version.version)
    return RegistrationManifest(mlflow_run_id=run.info.run_id, experiment_id="0", model_name=name,
                                model_version=version.version, alias="challenger", fine_tuned_model=model)
