"""MLflow down, then up: tracking is queued on disk, the step does not wait, and the queue is
replayed in order exactly once (also when a replay is cut short after MLflow took it)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow import MlflowClient

from faulty_proxy import FaultyProxy  # noqa: E402

from fine_tuning import pipeline  # noqa: E402
from fine_tuning.track import outbox as tracking_buffer  # noqa: E402
from fine_tuning.infra.breakers import get_breaker  # noqa: E402
from fine_tuning.config import PipelineConfig, load_config  # noqa: E402
from fine_tuning.manifests import CollectManifest, JobResult, RunContext, TrainingManifest  # noqa: E402
from fine_tuning.track.registry import log_cost_estimate  # noqa: E402

END = datetime(2026, 11, 22, 2, tzinfo=UTC)


@pytest.fixture
def proxy(mlflow_uri: str):
    target = urlsplit(mlflow_uri)
    with FaultyProxy(target.hostname or "127.0.0.1", target.port or 80) as running:
        yield running


@pytest.fixture
def config(proxy: FaultyProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> PipelineConfig:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in milliseconds while down
    monkeypatch.setenv("FINE_TUNING_DATA_DIR", str(tmp_path / "data"))
    name = request.node.name
    return load_config(params={
        "mlflow": {"experiment_name": f"outage_{name}", "registered_model_name": f"model_{name}"},
        "breakers": {"mlflow": {"recovery_timeout_seconds": 0.5}},
    })


def manifests(ctx: RunContext) -> tuple[CollectManifest, TrainingManifest, JobResult]:
    collect = CollectManifest(
        status="ready", dag_id=ctx.dag_id, run_id=ctx.run_id, window_start=END - timedelta(days=7), window_end=END,
        dataset_path="/tmp/x/dataset.jsonl", sha256="cd" * 32, bytes=999, posts_scanned=500, examples_written=800,
        rejected={"too_long": 2}, duplicates=3, tokens=90_000, min_examples=100, seconds=0.7,
    )
    training = TrainingManifest(
        provider="openai", idempotency_key="ftp-o", dataset_sha256="cd" * 32, file_id="file-o", reused_file=False,
        base_model="gpt-3.5-turbo-0125", estimated_tokens=90_000, estimated_epochs=3, estimated_cost_usd=2.16,
        job_id=f"ftjob-{ctx.run_id}", suffix="weekly", reused_job=False,
    )
    result = JobResult(
        provider="openai", job_id=training.job_id, status="succeeded", fine_tuned_model=f"ft:gpt-3.5:org:weekly:{ctx.run_id}",
        trained_tokens=270_000, created_at=1_795_000_000, finished_at=1_795_000_900,
    )
    return collect, training, result


def mlflow_state(mlflow_uri: str, config: PipelineConfig, ctx: RunContext) -> tuple[list, list]:
    client = MlflowClient(mlflow_uri, mlflow_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment_name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    versions = client.search_model_versions(f"name = '{config.mlflow.registered_model_name}'")
    return runs, versions


def test_outage_is_buffered_then_replayed_in_order_exactly_once(
    config: PipelineConfig, proxy: FaultyProxy, mlflow_uri: str, tmp_path: Path
) -> None:
    ctx = RunContext(dag_id="weekly_fine_tuning", run_id="scheduled__outage", window_end=END)
    collect, training, result = manifests(ctx)
    pipeline.run_dir(config, ctx).mkdir(parents=True)

    proxy.down()
    assert log_cost_estimate(config, ctx.dag_id, ctx.run_id, tokens=90_000, epochs=3, cost_usd=2.16) is None
    registration = pipeline.register(config, ctx, collect, training, result)
    assert registration.status == "buffered" and registration.model_version is None
    assert registration.fine_tuned_model == result.fine_tuned_model  # what the rest of the run needs
    queued = tracking_buffer.pending_operations(config)
    assert [p.name.split("-")[1] for p in queued] == ["cost_estimate", "register_candidate"]
    # A retried register task queues nothing twice.
    assert pipeline.register(config, ctx, collect, training, result).status == "buffered"
    assert len(tracking_buffer.pending_operations(config)) == 2
    saved = tmp_path / "saved_outbox"
    shutil.copytree(tracking_buffer.outbox_dir(config), saved)

    proxy.up()
    get_breaker("mlflow", config).reset()
    report = tracking_buffer.replay(config)
    assert [name.split("-")[1] for name in report.replayed] == ["cost_estimate", "register_candidate"]
    assert report.pending == [] and report.dead == [] and tracking_buffer.pending_operations(config) == []

    runs, versions = mlflow_state(mlflow_uri, config, ctx)
    assert len(runs) == 1 and len(versions) == 1
    run = runs[0]
    assert run.data.metrics["estimated_cost_usd"] == 2.16 and run.data.metrics["examples_written"] == 800
    assert run.data.params["fine_tuning_job_id"] == training.job_id
    final = json.loads((pipeline.run_dir(config, ctx) / "register.json").read_text())
    assert final["status"] == "registered" and final["model_version"] == versions[0].version

    # A replay killed after MLflow took an operation, before its file was removed, runs it again:
    # nothing is made or logged twice.
    for path in saved.glob("*.json"):
        shutil.copy(path, tracking_buffer.outbox_dir(config) / path.name)
    assert len(tracking_buffer.replay(config).replayed) == 2
    runs, versions = mlflow_state(mlflow_uri, config, ctx)
    assert len(runs) == 1 and len(versions) == 1
    client = MlflowClient(mlflow_uri, mlflow_uri)
    for metric in ("estimated_cost_usd", "examples_written", "trained_tokens"):
        assert len(client.get_metric_history(runs[0].info.run_id, metric)) == 1, metric


def test_an_open_breaker_queues_without_calling_mlflow(config: PipelineConfig, proxy: FaultyProxy, mlflow_uri: str) -> None:
    ctx = RunContext(dag_id="weekly_fine_tuning", run_id="scheduled__open", window_end=END)
    breaker = get_breaker("mlflow", config.model_copy(update={"breakers": config.breakers.model_copy(
        update={"mlflow": config.breakers.mlflow.model_copy(update={"recovery_timeout_seconds": 60.0})})}))
    for _ in range(breaker.settings.failure_threshold):
        with pytest.raises(ConnectionError):
            breaker.call(lambda: (_ for _ in ()).throw(ConnectionError("down")))
    slow_config = config.model_copy(update={"breakers": config.breakers.model_copy(
        update={"mlflow": breaker.settings})})
    connections = proxy.connections
    assert log_cost_estimate(slow_config, ctx.dag_id, ctx.run_id, tokens=1, epochs=1, cost_usd=0.1) is None
    assert proxy.connections == connections  # the open breaker answered; MLflow was not called

    # The next MLflow-bound step, once MLflow is reachable, drains the queue first.
    breaker.reset()
    assert log_cost_estimate(slow_config, ctx.dag_id, "scheduled__next", tokens=2, epochs=1, cost_usd=0.2) is not None
    assert tracking_buffer.pending_operations(config) == []
    client = MlflowClient(mlflow_uri, mlflow_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment_name)
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_an_ab_looks_plots_are_queued_while_mlflow_is_down_and_the_latest_is_logged_once(
    config: PipelineConfig, proxy: FaultyProxy, mlflow_uri: str
) -> None:
    from fine_tuning.evaluate.plots import evaluation_png, log_evaluation_plot
    from fine_tuning.track.registry import find_run

    test = {"id": "ab-plot-outage", "dag_id": "weekly_fine_tuning", "run_id": "scheduled__plots", "looks": 0,
            "candidate_model": "ft:cand", "baseline_model": "base", "success_criteria": {"min_engagement_lift": 0.05}}
    aggregates = {"baseline": {"eng_n": 400, "eng_sum": 24.0, "eng_sumsq": 2.0},
                  "candidate": {"eng_n": 100, "eng_sum": 8.0, "eng_sumsq": 0.9}}
    first = [{"lift": 0.2, "ci_lower": -0.5, "ci_upper": 0.9}]
    second = [*first, {"lift": 0.3, "ci_lower": 0.05, "ci_upper": 0.6}]

    proxy.down()
    path = log_evaluation_plot(config, test, aggregates, first)
    assert path == "ab_tests/ab-plot-outage/evaluation.png"  # where it will be: the analysis records it
    assert log_evaluation_plot(config, test, aggregates, first) == path  # the same look re-run: queued once
    assert log_evaluation_plot(config, {**test, "looks": 1}, aggregates, second) == path
    assert [p.name.split("-")[1] for p in tracking_buffer.pending_operations(config)] == ["run_artifact"] * 2

    proxy.up()
    get_breaker("mlflow", config).reset()
    report = tracking_buffer.replay(config)
    assert len(report.replayed) == 2 and report.pending == [] and report.dead == []
    run = find_run(config, test["dag_id"], test["run_id"])
    assert run is not None
    client = MlflowClient(mlflow_uri, mlflow_uri)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "ab_tests/ab-plot-outage")] == [path]
    with open(client.download_artifacts(run.info.run_id, path), "rb") as logged:
        # The second look's picture, byte for byte the one the UI draws: the later look won.
        assert logged.read() == evaluation_png(test, aggregates, second) != evaluation_png(test, aggregates, first)
