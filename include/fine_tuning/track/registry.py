"""MLflow tracking and registry for the candidate: one run per pipeline run, one model version.

Both are found again on a retry (by tags derived from dag_id and run_id), never made twice.
Every MLflow call goes through the shared ``mlflow`` circuit breaker, and the two tracking
operations (cost estimate, registration) go through the durable outbox of
``fine_tuning.track.outbox``: when MLflow is down they are queued and replayed later, and the
step returns at once (a registration then comes back with ``status="buffered"``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fine_tuning.config import PipelineConfig
from fine_tuning.infra.breakers import get_breaker
from fine_tuning.manifests import (
    CollectManifest,
    JobResult,
    RegistrationManifest,
    TrainingManifest,
    write_manifest,
)
from fine_tuning.track.outbox import submit
from fine_tuning.train.providers import JobStatus, get_provider

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

PIPELINE_RUN_TAG = "pipeline.run_key"
MODEL_ARTIFACT_PATH = "fine_tuned_model"


class BreakerGuardedClient:
    """An ``MlflowClient`` whose every method call goes through the ``mlflow`` circuit breaker."""

    def __init__(self, client: MlflowClient, config: PipelineConfig) -> None:
        self._client = client
        self._breaker = get_breaker("mlflow", config)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        breaker = self._breaker

        def call(*args: Any, **kwargs: Any) -> Any:
            return breaker.call(attribute, *args, **kwargs)

        return call


def make_client(config: PipelineConfig) -> MlflowClient:
    """A client guarded by the breaker, with MLflow's own HTTP retries kept short.

    MLflow retries a dead server 7 times with a doubling backoff by default (minutes); the
    breaker and the outbox deal with outages, so a call here fails within seconds instead.
    An explicit ``MLFLOW_HTTP_REQUEST_*`` in the environment still wins.
    """
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(config.mlflow.request_max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(config.mlflow.request_timeout_seconds)))
    client = MlflowClient(tracking_uri=config.mlflow.tracking_uri, registry_uri=config.mlflow.tracking_uri)
    return BreakerGuardedClient(client, config)  # type: ignore[return-value]


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:  # another worker created it in between
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def pipeline_run_key(dag_id: str, run_id: str) -> str:
    return f"{dag_id}/{run_id}"


def get_or_create_run(
    config: PipelineConfig, dag_id: str, run_id: str, experiment_name: str | None = None
) -> Run:
    """The MLflow run of this pipeline run, made on first use and found on every retry."""
    client = make_client(config)
    experiment_id = _experiment_id(client, experiment_name or config.mlflow.experiment_name)
    key = pipeline_run_key(dag_id, run_id)
    escaped = key.replace("'", "\\'")
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{escaped}'", max_results=1
    )
    if found:
        return found[0]
    return client.create_run(
        experiment_id,
        run_name=f"{dag_id}__{run_id}"[:250],
        tags={PIPELINE_RUN_TAG: key, "dag_id": dag_id, "airflow_run_id": run_id},
    )


def _log_batch(client: MlflowClient, run_id: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
    import time

    from mlflow.entities import Metric, Param

    data = client.get_run(run_id).data
    # Params are immutable in MLflow: re-logging the same key on a retry is fine only when equal.
    new_params = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in data.params]
    now = int(time.time() * 1000)
    # A retry or a replay logs only what is not there yet with this value: a metric's history
    # must not get a second point for the same fact.
    metric_list = [Metric(k, float(v), now, 0) for k, v in metrics.items() if data.metrics.get(k) != float(v)]
    for start in range(0, max(len(new_params), len(metric_list)), 100):
        client.log_batch(
            run_id, params=new_params[start : start + 100], metrics=metric_list[start : start + 100]
        )


def log_cost_estimate(config: PipelineConfig, dag_id: str, run_id: str, **estimate: float) -> str | None:
    """Log the cost guard's estimate (also when the guard refuses).

    :returns: the MLflow run id, or None when MLflow is down and the estimate was queued.
    """
    outcome = submit(
        config,
        "cost_estimate",
        pipeline_run_key(dag_id, run_id),
        {
            "dag_id": dag_id,
            "run_id": run_id,
            "experiment_name": config.mlflow.experiment_name,
            "metrics": {f"estimated_{k}": float(v) for k, v in estimate.items()},
        },
    )
    return None if outcome.result is None else outcome.result["mlflow_run_id"]


def apply_cost_estimate(config: PipelineConfig, payload: dict[str, Any]) -> dict[str, Any]:
    client = make_client(config)
    run = get_or_create_run(config, payload["dag_id"], payload["run_id"], payload["experiment_name"])
    _log_batch(client, run.info.run_id, {}, payload["metrics"])
    return {"mlflow_run_id": run.info.run_id}


def register_candidate(
    config: PipelineConfig,
    collect: CollectManifest,
    training: TrainingManifest,
    result: JobResult,
    manifest_path: Path | None = None,
) -> RegistrationManifest:
    """Log the pipeline run and register the fine-tuned model as a version with the candidate alias.

    When MLflow is down (or its breaker open) the registration is queued and this returns at
    once with ``status="buffered"``; the replay writes the final manifest to ``manifest_path``.
    """
    if result.status != "succeeded" or not result.fine_tuned_model:
        raise ValueError(
            f"cannot register job {result.job_id}: status {result.status!r}, "
            f"fine_tuned_model {result.fine_tuned_model!r}"
        )
    # Everything the operation needs travels with it: a replay may run in another process,
    # with another run's config.
    payload = {
        "collect": collect.model_dump(mode="json"),
        "training": training.model_dump(mode="json"),
        "result": result.model_dump(mode="json"),
        "params": config.loggable(),
        "experiment_name": config.mlflow.experiment_name,
        "model_name": config.mlflow.registered_model_name,
        "alias": config.mlflow.candidate_alias,
        "manifest_path": None if manifest_path is None else str(manifest_path),
        # Self-hosted training leaves the model with us: the adapter and its metrics go to MLflow.
        "artifacts": _provider_artifacts(config, training, result),
    }
    key = f"{pipeline_run_key(collect.dag_id, collect.run_id)}/{result.job_id}"
    outcome = submit(config, "register_candidate", key, payload)
    if outcome.result is not None:
        return RegistrationManifest.model_validate(outcome.result)
    log.warning(
        "MLflow unavailable (%s): registration of %s queued in %s; it is replayed at the next "
        "MLflow call or by `python -m fine_tuning.track.outbox replay`",
        outcome.reason,
        result.fine_tuned_model,
        outcome.path,
    )
    return RegistrationManifest(
        mlflow_run_id=None,
        experiment_id=None,
        model_name=config.mlflow.registered_model_name,
        model_version=None,
        alias=config.mlflow.candidate_alias,
        fine_tuned_model=result.fine_tuned_model,
        status="buffered",
        outbox_path=str(outcome.path),
        migration=training.migration,
    )


def apply_registration(config: PipelineConfig, payload: dict[str, Any]) -> dict[str, Any]:
    """The registration itself; idempotent, so a replay that runs twice changes nothing."""
    collect = CollectManifest.model_validate(payload["collect"])
    training = TrainingManifest.model_validate(payload["training"])
    result = JobResult.model_validate(payload["result"])
    model_name, alias = payload["model_name"], payload["alias"]
    client = make_client(config)
    run = get_or_create_run(config, collect.dag_id, collect.run_id, payload["experiment_name"])
    mlflow_run_id = run.info.run_id

    metrics: dict[str, float] = {
        "posts_scanned": collect.posts_scanned,
        "examples_written": collect.examples_written,
        "examples_rejected": sum(collect.rejected.values()),
        "duplicates": collect.duplicates,
        "dataset_tokens": collect.tokens,
        "dataset_bytes": collect.bytes,
        "collect_seconds": collect.seconds,
        "estimated_tokens": training.estimated_tokens,
        "estimated_epochs": training.estimated_epochs,
        "estimated_cost_usd": training.estimated_cost_usd,
    }
    metrics.update({f"rejected_{reason}": count for reason, count in collect.rejected.items()})
    if result.trained_tokens is not None:
        metrics["trained_tokens"] = result.trained_tokens
    if result.created_at and result.finished_at:
        metrics["training_seconds"] = result.finished_at - result.created_at
    params = dict(payload["params"])
    params.update(
        {
            "provider": training.provider,
            "training_file_id": training.file_id,
            "fine_tuning_job_id": training.job_id,
            "dataset_sha256": training.dataset_sha256,
            "window_start": collect.window_start.isoformat(),
            "window_end": collect.window_end.isoformat(),
        }
    )
    _log_batch(client, mlflow_run_id, params, metrics)
    client.set_tag(mlflow_run_id, "fine_tuned_model", result.fine_tuned_model)
    for key, value in (training.migration or {}).items():  # a forced migration says so
        client.set_tag(mlflow_run_id, f"migration.{key}", value)
    client.log_dict(mlflow_run_id, collect.model_dump(mode="json"), "manifests/collect.json")
    client.log_dict(mlflow_run_id, training.model_dump(mode="json"), "manifests/training.json")
    client.log_dict(mlflow_run_id, result.model_dump(mode="json"), "manifests/job.json")
    # The model itself lives at the provider; the artifact says how to reach it.
    client.log_dict(
        mlflow_run_id,
        {
            "provider": training.provider,
            "fine_tuned_model": result.fine_tuned_model,
            "base_model": training.base_model,
            "job_id": result.job_id,
        },
        f"{MODEL_ARTIFACT_PATH}/model.json",
    )

    if payload.get("artifacts"):
        _log_training_artifacts(client, mlflow_run_id, payload["artifacts"])
    version = _get_or_create_version(model_name, client, mlflow_run_id, training, result)
    for key, value in (training.migration or {}).items():
        client.set_model_version_tag(model_name, version, f"migration.{key}", value)
    client.set_registered_model_alias(model_name, alias, version)
    client.set_terminated(mlflow_run_id, "FINISHED")
    log.info(
        "registered %s version %s (alias %s) for %s, MLflow run %s",
        model_name,
        version,
        alias,
        result.fine_tuned_model,
        mlflow_run_id,
    )
    manifest = RegistrationManifest(
        mlflow_run_id=mlflow_run_id,
        experiment_id=run.info.experiment_id,
        model_name=model_name,
        model_version=version,
        alias=alias,
        fine_tuned_model=result.fine_tuned_model or "",
        migration=training.migration,
    )
    if payload.get("manifest_path"):  # a replay brings the step's manifest up to date
        write_manifest(manifest, payload["manifest_path"])
    return manifest.model_dump(mode="json")


def _provider_artifacts(
    config: PipelineConfig, training: TrainingManifest, result: JobResult
) -> dict[str, Any]:
    """What the provider left to log (``selfhosted``: adapter folder and training metrics)."""
    if training.provider != "selfhosted":  # hosted providers keep the model; nothing to upload
        return {}
    provider = get_provider(config, training.provider)
    return provider.artifacts(JobStatus(job_id=result.job_id, status=result.status))


def _log_training_artifacts(client: MlflowClient, mlflow_run_id: str, artifacts: dict[str, Any]) -> None:
    """The adapter (safetensors) under the model's artifact path; loss per step and totals as metrics.

    Idempotent on a replay: the loss history is logged only when the run has none yet, and
    re-uploading the same adapter files overwrites them with themselves.
    """
    import time

    from mlflow.entities import Metric

    adapter_dir = artifacts.get("adapter_dir")
    if adapter_dir and Path(adapter_dir).is_dir():
        client.log_artifacts(mlflow_run_id, adapter_dir, f"{MODEL_ARTIFACT_PATH}/adapter")
    metrics = artifacts.get("metrics") or {}
    if not metrics:
        return
    client.log_dict(mlflow_run_id, metrics, "training/metrics.json")
    if "train_loss" not in client.get_run(mlflow_run_id).data.metrics:
        now = int(time.time() * 1000)
        history = [
            Metric("train_loss", float(p["loss"]), now, int(p["step"]))
            for p in metrics.get("loss_history", [])
        ]
        for start in range(0, len(history), 1000):
            client.log_batch(mlflow_run_id, metrics=history[start : start + 1000])
    totals = {
        k: float(v)
        for k, v in metrics.items()
        if k
        in (
            "trained_tokens",
            "train_seconds",
            "tokens_per_second",
            "peak_rss_mb",
            "adapter_bytes",
            "trainable_parameters",
            "steps",
            "train_loss_first",
            "train_loss_last",
        )
        and v is not None
    }
    _log_batch(client, mlflow_run_id, {}, totals)


def _get_or_create_version(
    name: str,
    client: MlflowClient,
    mlflow_run_id: str,
    training: TrainingManifest,
    result: JobResult,
) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, description="Fine-tuned content models (auto fine-tuning pipeline)"
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for existing in client.search_model_versions(f"name = '{name}' and run_id = '{mlflow_run_id}'"):
        return existing.version
    created = client.create_model_version(
        name,
        source=f"runs:/{mlflow_run_id}/{MODEL_ARTIFACT_PATH}",
        run_id=mlflow_run_id,
        tags={
            "fine_tuned_model": result.fine_tuned_model or "",
            "fine_tuning_job_id": result.job_id,
            "dataset_sha256": training.dataset_sha256,
            "base_model": training.base_model,
            "provider": training.provider,
        },
        description=f"{result.fine_tuned_model} from job {result.job_id}",
    )
    return created.version


CHAMPION_ALIAS = "champion"


def promote_champion(config: PipelineConfig, version: str) -> None:
    """A completed rollout: this version becomes ``champion`` (and stops being the challenger)."""
    from mlflow.exceptions import MlflowException

    client = make_client(config)
    name = config.mlflow.registered_model_name
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(name, version, "deployment_status", "champion")
    try:
        if client.get_model_version_by_alias(name, config.mlflow.candidate_alias).version == version:
            client.delete_registered_model_alias(name, config.mlflow.candidate_alias)
    except MlflowException:
        pass  # no challenger alias: nothing to move


def demote_candidate(config: PipelineConfig, version: str, reason: str) -> None:
    """A rollback: the candidate loses ``challenger``; ``champion`` stays where it was."""
    from mlflow.exceptions import MlflowException

    client = make_client(config)
    name = config.mlflow.registered_model_name
    client.set_model_version_tag(name, version, "deployment_status", "rolled_back")
    client.set_model_version_tag(name, version, "rollback_reason", reason[:5000])
    try:
        if client.get_model_version_by_alias(name, config.mlflow.candidate_alias).version == version:
            client.delete_registered_model_alias(name, config.mlflow.candidate_alias)
    except MlflowException:
        pass


def champion_model(config: PipelineConfig) -> str | None:
    """The model id behind the ``champion`` alias (None when there is no champion yet)."""
    from mlflow.exceptions import MlflowException

    client = make_client(config)
    try:
        version = client.get_model_version_by_alias(config.mlflow.registered_model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None
    return version.tags.get("fine_tuned_model") or None


def find_version_of(config: PipelineConfig, fine_tuned_model: str) -> str | None:
    """The registered version whose ``fine_tuned_model`` tag is this model id, if any."""
    client = make_client(config)
    name = config.mlflow.registered_model_name
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("fine_tuned_model") == fine_tuned_model:
            return version.version
    return None
