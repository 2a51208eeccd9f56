"""The validation split reaches the job, its losses reach MLflow by step, and the loss gate
stops an over-fitted candidate before any traffic (against the emulator and a real MLflow)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fine_tuning import pipeline
from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.manifests import CollectManifest, RunContext
from fine_tuning.train.loss_gate import judge

WINDOW_END = datetime(2026, 11, 22, 2, tzinfo=UTC)


def write_jsonl(path: Path, n: int, start: int = 0) -> tuple[str, int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for i in range(start, start + n):
            messages = [
                {"role": "system", "content": "You write social posts as persona p1."},
                {"role": "user", "content": "Create engaging content"},
                {"role": "assistant", "content": f"Hook number {i}: the thing nobody tells you"},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


def make_config(tmp_path: Path, mlflow_uri: str, name: str, **params: object) -> PipelineConfig:
    return load_config(
        env={
            **os.environ,  # the emulator's OPENAI_BASE_URL and key (openai_env)
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "FINE_TUNING_DATA_DIR": str(tmp_path / "data"),
        },
        params={
            "poll_interval_seconds": 0.1,
            "timeout_seconds": 60,
            "batch_size": 4,
            "mlflow": {"experiment_name": f"gate_{name}", "registered_model_name": f"model_{name}"},
            **params,
        },
    )


def collected_with_validation(config: PipelineConfig, ctx: RunContext) -> CollectManifest:
    folder = pipeline.run_dir(config, ctx)
    sha, size = write_jsonl(folder / "dataset.jsonl", 40)
    validation_sha, validation_size = write_jsonl(folder / "validation.jsonl", 10, start=100)
    return CollectManifest(
        status="ready", dag_id=ctx.dag_id, run_id=ctx.run_id, window_start=WINDOW_END - timedelta(days=7),
        window_end=WINDOW_END, dataset_path=str(folder / "dataset.jsonl"), sha256=sha, bytes=size,
        posts_scanned=25, examples_written=40, rejected={}, duplicates=0, tokens=1200, min_examples=10,
        seconds=0.1, validation_path=str(folder / "validation.jsonl"), validation_sha256=validation_sha,
        validation_examples=10, validation_tokens=300, validation_bytes=validation_size,
    )


def run_to_register(config: PipelineConfig, ctx: RunContext):
    collected = collected_with_validation(config, ctx)
    uploaded = pipeline.upload(config, ctx, collected)
    training = pipeline.train(config, ctx, uploaded)
    result = pipeline.wait(config, ctx, training)
    return collected, uploaded, training, result


def test_the_validation_file_is_the_jobs_and_both_losses_reach_mlflow(
    openai_env, mlflow_uri: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = make_config(tmp_path, mlflow_uri, request.node.name)
    ctx = RunContext(dag_id="weekly_fine_tuning", run_id="scheduled__good", window_end=WINDOW_END)
    collected, uploaded, training, result = run_to_register(config, ctx)

    job = next(j for j in openai_env.state()["jobs"] if j["id"] == training.job_id)
    assert uploaded.validation_file_id is not None and job["validation_file"] == uploaded.validation_file_id
    files = {f["id"]: f for f in openai_env.state()["files"]}
    assert files[uploaded.validation_file_id]["bytes"] == collected.validation_bytes
    again = pipeline.upload(config, ctx, collected)  # a retry finds both files
    assert again.validation_file_id == uploaded.validation_file_id

    registered = pipeline.register(config, ctx, collected, training, result)

    client = MlflowClient(mlflow_uri, mlflow_uri)
    train_loss = client.get_metric_history(registered.mlflow_run_id, "train_loss")
    valid_loss = client.get_metric_history(registered.mlflow_run_id, "valid_loss")
    assert len(train_loss) == len(valid_loss) >= 10  # 40 examples / 4 per batch x 3 epochs = 30 steps
    assert sorted(m.step for m in valid_loss) == [m.step for m in sorted(valid_loss, key=lambda m: m.step)]
    assert train_loss[0].value != train_loss[-1].value
    version = client.get_model_version_by_alias(registered.model_name, "challenger")
    assert version.tags["loss_gate"] == "passed"


def test_an_over_fitted_candidate_is_rejected_before_any_traffic(
    openai_env, mlflow_uri: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Past 4 epochs the emulator's validation loss turns upward (as an over-trained model's does).
    config = make_config(tmp_path, mlflow_uri, request.node.name, n_epochs=12)
    ctx = RunContext(dag_id="weekly_fine_tuning", run_id="scheduled__overfit", window_end=WINDOW_END)
    collected, _, training, result = run_to_register(config, ctx)

    with pytest.raises(pipeline.CandidateRejected, match=r"validation loss rises over the last 25% of training"):
        pipeline.register(config, ctx, collected, training, result)

    client = MlflowClient(mlflow_uri, mlflow_uri)
    name = config.mlflow.registered_model_name
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.tags["loss_gate"] == "rejected"
    assert "over-fitting" in version.tags["loss_gate_reason"]
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "challenger")  # nothing for the A/B step to route to


def curve(values: list[float]) -> list[dict[str, float]]:
    return [{"step": float(i + 1), "train_loss": 1.0, "valid_loss": v} for i, v in enumerate(values)]


def test_gate_verdicts() -> None:
    config = load_config(env={})
    falling = [2.0 * math.exp(-i / 10) + 0.3 for i in range(40)]
    assert judge(config, curve(falling), True).passed
    # Noise on a flat end is not a rise.
    flat_noisy = [1.0, 0.7, 0.6, 0.5] + [0.5 + (0.04 if i % 2 else -0.04) for i in range(36)]
    assert judge(config, curve(flat_noisy), True).passed
    rising = falling[:30] + [falling[29] + 0.05 * i for i in range(1, 11)]
    verdict = judge(config, curve(rising), True)
    assert not verdict.passed and "over-fitting" in verdict.reason
    high = load_config(env={}, params={"training": {"loss_gate": {"max_final_valid_loss": 0.2}}})
    verdict = judge(high, curve(falling), True)
    assert not verdict.passed and "above training.loss_gate.max_final_valid_loss 0.2" in verdict.reason
    # A validation file but no validation loss: the gate cannot judge, and says so by refusing.
    verdict = judge(config, [{"step": 1.0, "train_loss": 1.0}], True)
    assert not verdict.passed and "reported 0 validation losses" in verdict.reason
    assert judge(config, [], False).passed  # no split configured: not judged, said in the reason
