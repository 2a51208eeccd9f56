"""Upload and job creation against the OpenAI emulator: idempotent under retries, faults and refusals."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fine_tuning import pipeline
from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.manifests import CollectManifest, RunContext
from fine_tuning.train.providers import TrainingRefusedError

WINDOW_END = datetime(2026, 11, 22, 2, tzinfo=UTC)


def write_dataset(directory: Path, n: int = 20) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dataset.jsonl"
    with path.open("w") as handle:
        for i in range(n):
            messages = [
                {"role": "system", "content": "You write social posts as persona p1."},
                {"role": "user", "content": "Create engaging content"},
                {"role": "assistant", "content": f"Hook number {i}: the thing nobody tells you"},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture
def config(openai_env: object, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PipelineConfig:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("FINE_TUNING_DATA_DIR", str(tmp_path / "data"))
    return load_config(params={"poll_interval_seconds": 0.1, "timeout_seconds": 60})


@pytest.fixture
def ctx(request: pytest.FixtureRequest) -> RunContext:
    return RunContext(dag_id="weekly_fine_tuning", run_id=f"test__{request.node.name}", window_end=WINDOW_END)


@pytest.fixture
def collected(config: PipelineConfig, ctx: RunContext) -> CollectManifest:
    path = write_dataset(pipeline.run_dir(config, ctx))
    data = path.read_bytes()
    return CollectManifest(
        status="ready",
        dag_id=ctx.dag_id,
        run_id=ctx.run_id,
        window_start=WINDOW_END - timedelta(days=7),
        window_end=WINDOW_END,
        dataset_path=str(path),
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        posts_scanned=10,
        examples_written=20,
        rejected={},
        duplicates=0,
        tokens=600,
        min_examples=10,
        seconds=0.1,
    )


def test_upload_and_train_twice_make_one_file_and_one_job(
    config: PipelineConfig, ctx: RunContext, collected: CollectManifest, openai_env
) -> None:
    first = pipeline.upload(config, ctx, collected)
    again = pipeline.upload(config, ctx, collected)
    assert again.file_id == first.file_id and again.reused_file and not first.reused_file
    job = pipeline.train(config, ctx, first)
    job_again = pipeline.train(config, ctx, again)
    assert job_again.job_id == job.job_id and job_again.reused_job
    state = openai_env.state()
    assert len(state["files"]) == 1 and len(state["jobs"]) == 1
    assert state["jobs"][0]["metadata"]["idempotency_key"] == first.idempotency_key
    result = pipeline.wait(config, ctx, job)
    assert result.status == "succeeded" and result.fine_tuned_model.startswith("ft:gpt-3.5-turbo-0125")


@pytest.mark.parametrize("path", ["/v1/files", "/v1/fine_tuning/jobs"])
def test_a_lost_reply_is_not_a_second_create(
    config: PipelineConfig, ctx: RunContext, collected: CollectManifest, openai_env, path: str
) -> None:
    """The server makes the file/job and answers 502: the retry finds it instead of making another."""
    openai_env.inject_fault(method="POST", path=path, status=502, count=1, after_effect=True)
    uploaded = pipeline.upload(config, ctx, collected)
    pipeline.train(config, ctx, uploaded)
    state = openai_env.state()
    assert len(state["files"]) == 1 and len(state["jobs"]) == 1


@pytest.mark.parametrize("path", ["/v1/files", "/v1/fine_tuning/jobs"])
def test_a_create_that_times_out_but_lands_later_is_not_made_twice(
    collected: CollectManifest, ctx: RunContext, openai_env, path: str
) -> None:
    """The client gives up after 1 s; the server makes the file/job 0.6 s later. A look right
    after the timeout finds nothing, and a create then would make a second one: the retry
    waits out the client's timeout before it looks again."""
    config = load_config(params={"services": {"openai_timeout_seconds": 1.0, "openai_max_retries": 2}})
    openai_env.inject_fault(method="POST", path=path, status=None, delay_seconds=1.6, count=1)
    uploaded = pipeline.upload(config, ctx, collected)
    pipeline.train(config, ctx, uploaded)
    # The delayed request is logged when the server has answered it (the client gave up long
    # before): wait for that, not for a guessed time.
    deadline = time.monotonic() + 15
    while not any(r.get("fault") for r in openai_env.state()["requests"]):
        assert time.monotonic() < deadline, "the injected delay never hit a request: the test proved nothing"
        time.sleep(0.05)
    state = openai_env.state()
    assert len(state["files"]) == 1 and len(state["jobs"]) == 1


def test_rate_limit_with_retry_after_is_retried(
    config: PipelineConfig, ctx: RunContext, collected: CollectManifest, openai_env
) -> None:
    uploaded = pipeline.upload(config, ctx, collected)
    openai_env.inject_fault(
        method="POST", path="/v1/fine_tuning/jobs", status=429, count=2, retry_after=0.2,
        error_code="rate_limit_exceeded",
    )
    pipeline.train(config, ctx, uploaded)
    assert len(openai_env.state()["jobs"]) == 1


def test_insufficient_quota_fails_at_once_with_a_plain_message(
    config: PipelineConfig, ctx: RunContext, collected: CollectManifest, openai_env
) -> None:
    uploaded = pipeline.upload(config, ctx, collected)
    openai_env.inject_fault(
        method="POST", path="/v1/fine_tuning/jobs", status=429, count=5, error_code="insufficient_quota"
    )
    with pytest.raises(TrainingRefusedError, match="insufficient_quota"):
        pipeline.train(config, ctx, uploaded)
    assert openai_env.state()["jobs"] == []


def test_closed_fine_tuning_says_so(
    config: PipelineConfig, ctx: RunContext, collected: CollectManifest, openai_env
) -> None:
    uploaded = pipeline.upload(config, ctx, collected)
    openai_env.refuse_jobs(True)
    try:
        with pytest.raises(TrainingRefusedError, match="training.provider"):
            pipeline.train(config, ctx, uploaded)
    finally:
        openai_env.refuse_jobs(False)


def test_cost_guard_refuses_before_uploading_and_logs_the_estimate(
    config: PipelineConfig, ctx: RunContext, collected: CollectManifest, openai_env, mlflow_uri: str
) -> None:
    config.training.max_training_cost_usd = 0.001
    with pytest.raises(pipeline.CostLimitExceeded, match=r"estimated training cost \$0\.0\d+"):
        pipeline.upload(config, ctx, collected)
    assert openai_env.state()["files"] == []
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment_name)
    runs = client.search_runs([experiment.experiment_id], f"tags.dag_id = '{ctx.dag_id}'")
    mine = [r for r in runs if r.data.tags.get("airflow_run_id") == ctx.run_id]
    assert len(mine) == 1
    # 600 tokens x 5 epochs (the auto rule for 20 examples) x $8/1M
    assert mine[0].data.metrics["estimated_cost_usd"] == pytest.approx(600 * 5 * 8 / 1e6)


def test_failed_job_fails_wait_with_openais_message(
    config: PipelineConfig, ctx: RunContext, collected: CollectManifest, openai_env
) -> None:
    uploaded = pipeline.upload(config, ctx, collected)
    job = pipeline.train(config, ctx, uploaded)
    openai_env.fail_job(job.job_id, code="server_error", message="The job failed due to an internal error")
    with pytest.raises(Exception, match="internal error"):
        pipeline.wait(config, ctx, job)
    # A cleared train task makes a new job: a failed one is not reused.
    retried = pipeline.train(config, ctx, uploaded)
    assert retried.job_id != job.job_id and not retried.reused_job


def _cli_args(step: str, ctx: RunContext, params: dict, **inputs: str) -> list[str]:
    args = [step, "--dag-id", ctx.dag_id, "--run-id", ctx.run_id, "--window-end", ctx.window_end.isoformat()]
    args += ["--params", json.dumps(params)]
    for name, manifest in inputs.items():
        args += ["--input", f"{name}={manifest}"]
    return args


def test_the_cli_exits_3_on_a_refusal_and_says_why_in_the_termination_log(
    config: PipelineConfig, ctx: RunContext, collected: CollectManifest, openai_env, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """What a pod's exit code tells the operator: 3 refused (not retried), with the reason."""
    from fine_tuning.cli import main
    from fine_tuning.step_graph import EXIT_REFUSED

    termination_log = tmp_path / "termination-log"
    monkeypatch.setenv("FINE_TUNING_TERMINATION_LOG", str(termination_log))
    code = main(_cli_args("upload", ctx, {"max_training_cost_usd": 0.001}, collect=collected.to_json()))
    assert code == EXIT_REFUSED
    assert openai_env.state()["files"] == []
    message = termination_log.read_text()
    assert message.startswith("exit 3: upload: CostLimitExceeded: estimated training cost $0.0")
    assert "max_training_cost_usd" in capsys.readouterr().err

    uploaded = pipeline.upload(config, ctx, collected)
    openai_env.refuse_jobs(True)
    try:
        assert main(_cli_args("train", ctx, {}, upload=uploaded.to_json())) == EXIT_REFUSED
    finally:
        openai_env.refuse_jobs(False)
    assert "TrainingRefusedError" in termination_log.read_text()
    assert openai_env.state()["jobs"] == []


def test_the_cli_exits_2_on_bad_input_naming_it(
    ctx: RunContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fine_tuning.cli import main
    from fine_tuning.step_graph import EXIT_BAD_INPUT

    termination_log = tmp_path / "termination-log"
    monkeypatch.setenv("FINE_TUNING_TERMINATION_LOG", str(termination_log))
    assert main(_cli_args("collect", ctx, {"engagement_threshold": 7})) == EXIT_BAD_INPUT
    assert "engagement_threshold" in termination_log.read_text()
    assert main(_cli_args("upload", ctx, {}, collect='{"status": "ready"}')) == EXIT_BAD_INPUT
    assert "upload" in capsys.readouterr().err


def test_the_local_step_fails_a_refusal_without_retrying(
    config: PipelineConfig, ctx: RunContext, collected: CollectManifest, openai_env
) -> None:
    """Local mode, the same rule as a pod's exit 3: ``AirflowFailException``, retries unspent."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from fine_tuning_airflow.operators import FineTuningStepOperator

    dag_run = SimpleNamespace(dag_id=ctx.dag_id, run_id=ctx.run_id, run_after=ctx.window_end)
    ti = SimpleNamespace(xcom_pull=lambda task_ids: collected.model_dump(mode="json"))
    context = {"params": {"max_training_cost_usd": 0.001}, "dag_run": dag_run, "data_interval_end": ctx.window_end, "ti": ti}
    operator = FineTuningStepOperator(task_id="upload", step="upload", retries=2)
    with pytest.raises(AirflowFailException, match=r"refused, a retry cannot fix it \(exit 3\): estimated training cost"):
        operator.execute(context)
    assert openai_env.state()["files"] == []
