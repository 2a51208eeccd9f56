"""MLflow tracking and registry for the candidate: one run per pipeline run, one model version.

Both are found again on a retry (by tags derived from dag_id and run_id), never made twice.
Every MLflow call goes through the shared ``mlflow`` circuit breaker, and the tracking
operations (cost estimate, registration, the champion and rollback alias moves) go through the
durable outbox of ``fine_tuning.track.outbox``: when MLflow is down they are queued and
replayed later, and the step returns at once (a registration then comes back with ``status="buffered"``).
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fine_tuning.config import PipelineConfig
from fine_tuning.infra.breakers import CircuitOpenError, get_breaker, is_breaker_failure
from fine_tuning.manifests import (
    CollectManifest,
    JobResult,
    RegistrationManifest,
    TrainingManifest,
    write_manifest,
)
from fine_tuning.track.outbox import SubmitResult, submit
from fine_tuning.train.providers import JobStatus, get_provider

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, Run

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
    found = _search_pipeline_run(client, experiment_id, dag_id, run_id)
    if found is not None:
        return found
    key = pipeline_run_key(dag_id, run_id)
    return client.create_run(
        experiment_id,
        run_name=f"{dag_id}__{run_id}"[:250],
        tags={PIPELINE_RUN_TAG: key, "dag_id": dag_id, "airflow_run_id": run_id},
    )


def _search_pipeline_run(client: MlflowClient, experiment_id: str, dag_id: str, run_id: str) -> Run | None:
    escaped = pipeline_run_key(dag_id, run_id).replace("'", "\\'")
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{escaped}'", max_results=1
    )
    return found[0] if found else None


def find_run(config: PipelineConfig, dag_id: str, run_id: str) -> Run | None:
    """The MLflow run of this pipeline run, or None when there is none (nothing is created)."""
    client = make_client(config)
    experiment = client.get_experiment_by_name(config.mlflow.experiment_name)
    if experiment is None:
        return None
    return _search_pipeline_run(client, experiment.experiment_id, dag_id, run_id)


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


def log_run_artifact(
    config: PipelineConfig, dag_id: str, run_id: str, artifact_path: str, content: bytes, key: str
) -> SubmitResult:
    """Log a file (``content``, at ``artifact_path``) to the pipeline run's MLflow run, or queue
    it in the outbox while MLflow is down. ``key`` names this version of the file: the same key
    is queued once; queued versions of one path are replayed in order, so the last one stays.
    """
    return submit(
        config,
        "run_artifact",
        key,
        {
            "dag_id": dag_id,
            "run_id": run_id,
            "experiment_name": config.mlflow.experiment_name,
            "artifact_path": artifact_path,
            "content_base64": base64.b64encode(content).decode("ascii"),
        },
    )


def apply_run_artifact(config: PipelineConfig, payload: dict[str, Any]) -> dict[str, Any]:
    client = make_client(config)
    run = get_or_create_run(config, payload["dag_id"], payload["run_id"], payload["experiment_name"])
    folder, _, name = payload["artifact_path"].rpartition("/")
    with tempfile.TemporaryDirectory(prefix="mlflow-artifact-") as tmp:
        local = Path(tmp) / name
        local.write_bytes(base64.b64decode(payload["content_base64"]))
        # Logging the same path again overwrites it: a replay run twice changes nothing.
        client.log_artifact(run.info.run_id, str(local), folder or None)
    return {"mlflow_run_id": run.info.run_id, "artifact_path": payload["artifact_path"]}


def register_candidate(
    config: PipelineConfig,
    collect: CollectManifest,
    training: TrainingManifest,
    result: JobResult,
    manifest_path: Path | None = None,
    curves: list[dict[str, float]] | None = None,
    loss_verdict: dict[str, Any] | None = None,
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
        "curves": curves or [],
        "loss_verdict": loss_verdict,
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
    metrics.update({f"dropped_{reason}": count for reason, count in collect.dropped_examples.items()})
    metrics.update({f"pii_found_{kind}": count for kind, count in collect.pii_found.items()})
    metrics["validation_examples"] = collect.validation_examples
    metrics["validation_tokens"] = collect.validation_tokens
    if collect.self_generated is not None:
        metrics["self_generated_share_before_cap"] = collect.self_generated.share_before_cap
        metrics["self_generated_share_written"] = collect.self_generated.share_written
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
    # MLflow keeps one input per (dataset name, digest) and run: a replay adds nothing.
    client.log_inputs(mlflow_run_id, datasets=dataset_inputs(collect))
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

    _log_curves(client, mlflow_run_id, payload.get("curves") or [])
    if payload.get("artifacts"):
        _log_training_artifacts(client, mlflow_run_id, payload["artifacts"])
    version = _get_or_create_version(model_name, client, mlflow_run_id, training, result)
    for key, value in (training.migration or {}).items():
        client.set_model_version_tag(model_name, version, f"migration.{key}", value)
    verdict = payload.get("loss_verdict") or {}
    if verdict:
        client.set_model_version_tag(
            model_name, version, "loss_gate", "passed" if verdict["passed"] else "rejected"
        )
        client.set_model_version_tag(model_name, version, "loss_gate_reason", str(verdict["reason"])[:5000])
    if verdict.get("passed", True):
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


def dataset_inputs(collect: CollectManifest) -> list[DatasetInput]:
    """The training and validation files as MLflow dataset inputs: source = the window and the
    query that selected the posts, digest = the file's sha256, profile = counts and rejections."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = json.dumps(
        {
            "query": collect.query,
            "window_start": collect.window_start.isoformat(),
            "window_end": collect.window_end.isoformat(),
            "dag_id": collect.dag_id,
            "run_id": collect.run_id,
        }
    )
    collection_profile = {
        "posts_scanned": collect.posts_scanned,
        "rejected": collect.rejected,
        "duplicates": collect.duplicates,
        "dropped_examples": collect.dropped_examples,
        "pii_found": collect.pii_found,
        "self_generated": None if collect.self_generated is None else collect.self_generated.model_dump(),
        "token_counter": collect.token_counter,
    }
    files = [("training", collect.sha256, collect.examples_written, collect.tokens, collect.bytes)]
    if collect.validation_sha256:
        files.append(
            (
                "validation",
                collect.validation_sha256,
                collect.validation_examples,
                collect.validation_tokens,
                collect.validation_bytes,
            )
        )
    inputs = []
    for context, sha256, examples, tokens, size in files:
        assert sha256 is not None, "a registered candidate's collect manifest has its dataset"
        profile = {"sha256": sha256, "examples": examples, "tokens": tokens, "bytes": size}
        profile.update(collection_profile)
        dataset = Dataset(
            name=f"{collect.dag_id}/{collect.run_id}/{context}"[:500],
            # MLflow's tracking store keeps at most 36 characters of a digest; the full sha256 is
            # in the profile (and on the model version's dataset_sha256 tag).
            digest=sha256[:32],
            source_type="postgresql_query",
            source=source,
            schema=json.dumps({"format": "openai_chat_jsonl", "fields": ["messages"]}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return inputs


def _provider_artifacts(
    config: PipelineConfig, training: TrainingManifest, result: JobResult
) -> dict[str, Any]:
    """What the provider left to log (``selfhosted``: adapter folder and training metrics)."""
    if training.provider != "selfhosted":  # hosted providers keep the model; nothing to upload
        return {}
    provider = get_provider(config, training.provider)
    return provider.artifacts(JobStatus(job_id=result.job_id, status=result.status))


def _log_curves(client: MlflowClient, mlflow_run_id: str, curves: list[dict[str, float]]) -> None:
    """``train_loss`` and ``valid_loss`` by step, once (a replay finds them there)."""
    import time

    from mlflow.entities import Metric

    if not curves or "train_loss" in client.get_run(mlflow_run_id).data.metrics:
        return
    now = int(time.time() * 1000)
    history = [
        Metric(name, float(point[name]), now, int(point["step"]))
        for point in curves
        for name in ("train_loss", "valid_loss")
        if point.get(name) is not None
    ]
    for start in range(0, len(history), 1000):
        client.log_batch(mlflow_run_id, metrics=history[start : start + 1000])


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


def promote_champion(config: PipelineConfig, version: str | None, model: str, key: str) -> SubmitResult:
    """A completed rollout: ``model``'s version becomes ``champion`` (and stops being the
    challenger), through the outbox: applied now, or queued durably while MLflow is down and
    replayed exactly once, in order after whatever was queued before (a buffered registration
    first: ``version`` None is resolved from ``model`` when the move is applied).

    :param key: the move's identity (the deployment), so the same move is queued once.
    """
    payload = {"version": version, "model": model}
    return submit(config, "champion_alias", f"champion:{key}", payload)


def demote_candidate(
    config: PipelineConfig, version: str | None, model: str, reason: str, key: str
) -> SubmitResult:
    """A rollback: the candidate loses ``challenger``; ``champion`` stays where it was. Through the
    outbox, like :func:`promote_champion`."""
    payload = {"version": version, "model": model, "reason": reason[:5000]}
    return submit(config, "demote_candidate", f"demote:{key}", payload)


def mark_superseded(config: PipelineConfig, version: str | None, model: str, by: str) -> SubmitResult:
    """A candidate that waited for the routing and was overtaken by ``by`` (trained on newer
    data): its version is tagged ``deployment_status=superseded`` and ``superseded_by``, and loses
    ``challenger`` if it had it. Through the outbox, like :func:`promote_champion`; keyed by the
    model, so the waiting run and the run that overtook it can both ask and it happens once."""
    payload = {"version": version, "model": model, "by": by}
    return submit(config, "supersede_candidate", f"supersede:{model}", payload)


class VersionNotRegistered(LookupError):
    """MLflow answered, and no version of the registered model is this fine-tuned model."""


def _version_of(config: PipelineConfig, payload: dict[str, Any]) -> str:
    version = payload.get("version") or find_version_of(config, payload["model"])
    if version is None:
        # Not an outage: raised to the caller (or, on replay, dead-lettered with this message).
        raise VersionNotRegistered(
            f"no version of {config.mlflow.registered_model_name!r} is tagged"
            f" fine_tuned_model={payload['model']!r}: its alias cannot move"
        )
    return str(version)


def _drop_challenger(client: MlflowClient, name: str, alias: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        if client.get_model_version_by_alias(name, alias).version == version:
            client.delete_registered_model_alias(name, alias)
    except MlflowException as exc:
        if is_breaker_failure(exc):  # an outage: the operation stays queued
            raise
        # RESOURCE_DOES_NOT_EXIST: no challenger alias, nothing to move


def apply_champion(config: PipelineConfig, payload: dict[str, Any]) -> dict[str, Any]:
    """Move ``champion`` (idempotent: setting an alias where it already points changes nothing)."""
    client = make_client(config)
    name = config.mlflow.registered_model_name
    version = _version_of(config, payload)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(name, version, "deployment_status", "champion")
    _drop_challenger(client, name, config.mlflow.candidate_alias, version)
    return {"version": version, "alias": CHAMPION_ALIAS}


def apply_demotion(config: PipelineConfig, payload: dict[str, Any]) -> dict[str, Any]:
    """Tag a rolled-back version and take ``challenger`` off it (idempotent)."""
    client = make_client(config)
    name = config.mlflow.registered_model_name
    version = _version_of(config, payload)
    client.set_model_version_tag(name, version, "deployment_status", "rolled_back")
    client.set_model_version_tag(name, version, "rollback_reason", payload["reason"])
    _drop_challenger(client, name, config.mlflow.candidate_alias, version)
    return {"version": version, "demoted": True}


def apply_supersession(config: PipelineConfig, payload: dict[str, Any]) -> dict[str, Any]:
    """Tag a superseded version and take ``challenger`` off it (idempotent)."""
    client = make_client(config)
    name = config.mlflow.registered_model_name
    version = _version_of(config, payload)
    client.set_model_version_tag(name, version, "deployment_status", "superseded")
    client.set_model_version_tag(name, version, "superseded_by", payload["by"])
    _drop_challenger(client, name, config.mlflow.candidate_alias, version)
    return {"version": version, "superseded_by": payload["by"]}


class ChampionUnknown(RuntimeError):
    """MLflow could not say who the champion is (unreachable, erroring): not "no champion"."""


def champion_model(config: PipelineConfig) -> str | None:
    """The model id behind the ``champion`` alias (None when there is no champion yet).

    :raises ChampionUnknown: MLflow did not answer the question (down, a 5xx, its breaker
        open): the caller must not take that for "no champion" and route to a default.
    """
    from mlflow.exceptions import MlflowException

    client = make_client(config)
    name = config.mlflow.registered_model_name
    try:
        version = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        # No registered model, or no such alias on it: there is no champion (yet).
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in exc.message
        ):
            return None
        raise ChampionUnknown(
            f"MLflow could not say which version of {name!r} is the champion: {exc}"
        ) from exc
    except CircuitOpenError as exc:
        raise ChampionUnknown(
            f"MLflow could not say which version of {name!r} is the champion: {exc}"
        ) from exc
    return version.tags.get("fine_tuned_model") or None


def find_version_of(config: PipelineConfig, fine_tuned_model: str) -> str | None:
    """The registered version whose ``fine_tuned_model`` tag is this model id, if any."""
    client = make_client(config)
    name = config.mlflow.registered_model_name
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("fine_tuned_model") == fine_tuned_model:
            return version.version
    return None
