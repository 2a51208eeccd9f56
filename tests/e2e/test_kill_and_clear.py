"""SIGKILL a real step process at a chosen point, run the step again (what clearing the task
does), and count: exactly one file and one job in the emulator, one MLflow run, one model version.

The kill windows come from the emulator's faults (``after_effect`` + ``delay_seconds``: the file
or job is made, and the reply is held back) and from a slow proxy in front of MLflow: no test
hooks in the product code.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow import MlflowClient

from faulty_proxy import FaultyProxy  # noqa: E402

from fine_tuning.manifests import CollectManifest  # noqa: E402

pytestmark = pytest.mark.slow

WINDOW_END = datetime(2026, 11, 22, 2, tzinfo=UTC)
DAG_ID = "weekly_fine_tuning"


def write_collect(data_dir: Path, run_id: str) -> Path:
    """The collect step's output (a valid 20-example dataset and its manifest)."""
    directory = data_dir / DAG_ID / run_id
    directory.mkdir(parents=True)
    dataset = directory / "dataset.jsonl"
    with dataset.open("w") as handle:
        for i in range(20):
            messages = [
                {"role": "user", "content": "Create engaging content"},
                {"role": "assistant", "content": f"Hook {i}: the thing nobody tells you"},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    data = dataset.read_bytes()
    manifest = CollectManifest(
        status="ready", dag_id=DAG_ID, run_id=run_id, window_start=WINDOW_END - timedelta(days=7),
        window_end=WINDOW_END, dataset_path=str(dataset), sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
        posts_scanned=10, examples_written=20, rejected={}, duplicates=0, tokens=400, min_examples=10, seconds=0.1,
    )
    path = directory / "collect.json"
    path.write_text(manifest.to_json())
    return path


class Step:
    """``python -m fine_tuning STEP`` for one pipeline run, as a pod or a cleared task runs it."""

    def __init__(self, env: dict[str, str], run_id: str, run_dir: Path) -> None:
        self.env, self.run_id, self.run_dir = env, run_id, run_dir

    def command(self, step: str, *inputs: str) -> list[str]:
        command = [sys.executable, "-m", "fine_tuning", step, "--dag-id", DAG_ID, "--run-id", self.run_id,
                   "--window-end", WINDOW_END.isoformat()]
        for name in inputs:
            command += ["--input", f"{name}=@{self.run_dir / f'{name}.json'}"]
        return command

    def run(self, step: str, *inputs: str) -> dict:
        result = subprocess.run(self.command(step, *inputs), env=self.env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def kill_when(self, step: str, *inputs: str, ready: Callable[[], bool], timeout: float = 60) -> None:
        """Start the step, SIGKILL it as soon as ``ready()`` says the chosen point is reached."""
        process = subprocess.Popen(self.command(step, *inputs), env=self.env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                assert process.poll() is None, f"{step} ended before the kill point: {process.stderr.read()[-2000:]}"
                assert time.monotonic() < deadline, f"{step}: kill point not reached"
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert process.returncode == -signal.SIGKILL


@pytest.fixture
def mlflow_proxy(mlflow_uri: str):
    target = urlsplit(mlflow_uri)
    with FaultyProxy(target.hostname or "127.0.0.1", target.port or 80) as proxy:
        yield proxy


def test_kill_at_every_point_then_clear_makes_everything_once(
    openai_env, mlflow_proxy: FaultyProxy, mlflow_uri: str, tmp_path: Path, isolated_breakers: str,
) -> None:
    run_id = "scheduled__kill"
    data_dir = tmp_path / "data"
    run_dir = write_collect(data_dir, run_id).parent
    experiment = f"kill_{tmp_path.name}"
    model_name = f"kill_model_{tmp_path.name}"
    config_file = tmp_path / "training_config.json"
    config_file.write_text(json.dumps({"mlflow": {"registered_model_name": model_name}}))
    env = {
        **os.environ,
        "OPENAI_BASE_URL": openai_env.base_url, "OPENAI_API_KEY": "sk-test-key",
        "MLFLOW_TRACKING_URI": mlflow_proxy.url, "MLFLOW_EXPERIMENT_NAME": experiment,
        "FINE_TUNING_DATA_DIR": str(data_dir), "FINE_TUNING_POLL_INTERVAL_SECONDS": "0.2",
        "FINE_TUNING_CONFIG_FILE": str(config_file), "FINE_TUNING_BREAKER_KEY_PREFIX": isolated_breakers,
    }
    step = Step(env, run_id, run_dir)
    emulator = openai_env
    mlflow = MlflowClient(mlflow_uri, mlflow_uri)

    # 1. upload: the file is made, the reply held back; killed there. Cleared: found, not made again.
    emulator.inject_fault(method="POST", path="/v1/files", after_effect=True, delay_seconds=30)
    step.kill_when("upload", "collect", ready=lambda: len(emulator.state()["files"]) == 1)
    # Killed after the effect and before its reply: the request is logged only once answered.
    assert emulator.requests("POST", "/v1/files") == []
    emulator.clear_faults()
    upload = step.run("upload", "collect")
    (run_dir / "upload.json").write_text(json.dumps(upload))
    assert upload["reused_file"] is True

    # 2. train, between upload and job creation: the job is made, the reply held back; killed.
    emulator.inject_fault(method="POST", path="/v1/fine_tuning/jobs", after_effect=True, delay_seconds=30)
    step.kill_when("train", "upload", ready=lambda: len(emulator.state()["jobs"]) == 1)
    assert emulator.requests("POST", "/v1/fine_tuning/jobs") == []  # the job made, its reply not yet sent
    emulator.clear_faults()
    train = step.run("train", "upload")
    (run_dir / "train.json").write_text(json.dumps(train))
    assert train["reused_job"] is True

    # 3. wait: killed while a poll is in flight; cleared, it picks the same job up again.
    job_id = train["job_id"]
    emulator.inject_fault(method="GET", path=f"/v1/fine_tuning/jobs/{job_id}", delay_seconds=30)
    step.kill_when("wait", "train", ready=lambda: any(f["hits"] for f in emulator.state()["faults"]))
    emulator.clear_faults()
    result = step.run("wait", "train")
    (run_dir / "wait.json").write_text(json.dumps(result))
    assert result["status"] == "succeeded"

    # 4. register: MLflow made slow; killed once the MLflow run exists (registration half done).
    def mlflow_run_exists() -> bool:
        found = mlflow.get_experiment_by_name(experiment)
        return found is not None and len(mlflow.search_runs([found.experiment_id])) > 0

    mlflow_proxy.delay_seconds = 0.3
    step.kill_when("register", "collect", "train", "wait", ready=mlflow_run_exists)
    # Killed half way: the run exists, the model version does not yet.
    assert mlflow.search_model_versions(f"name = '{model_name}'") == []
    mlflow_proxy.delay_seconds = 0.0
    registration = step.run("register", "collect", "train", "wait")
    assert registration["status"] == "registered"

    state = emulator.state()
    assert len(state["files"]) == 1 and len(state["jobs"]) == 1
    runs = mlflow.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])
    versions = mlflow.search_model_versions(f"name = '{model_name}'")
    assert len(runs) == 1 and len(versions) == 1
    assert versions[0].tags["fine_tuning_job_id"] == job_id
    assert registration["model_version"] == versions[0].version
