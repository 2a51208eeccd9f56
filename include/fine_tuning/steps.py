"""The pipeline's steps: one function each, shared by the CLI (pods) and the Airflow worker.

Each step takes the typed config, the run's context and its upstream manifests, does its one
external effect idempotently, writes its own manifest next to the dataset, and returns it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fine_tuning import ab_steps, metrics
from fine_tuning.config import PipelineConfig
from fine_tuning.manifests import (
    ABTestManifest,
    CollectManifest,
    EvaluationManifest,
    JobResult,
    Manifest,
    RegistrationManifest,
    RunContext,
    TrainingManifest,
    UploadManifest,
    idempotency_key,
    write_manifest,
)

if TYPE_CHECKING:
    from fine_tuning.providers import JobStatus as JobStatusLike

log = logging.getLogger(__name__)

PROVIDER = "openai"
# The CLI's exit code for "skipped" (too little data): the pod's task is marked skipped, not failed.
EXIT_SKIPPED = 99


class InsufficientDataError(RuntimeError):
    """Too few valid examples: the rest of the run is skipped, not failed."""


class CostLimitExceeded(RuntimeError):
    """The estimated training cost is over ``training.max_training_cost_usd``."""


def run_dir(config: PipelineConfig, ctx: RunContext) -> Path:
    """Where this run's dataset and manifests live (one folder per dag run)."""

    def safe(part: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", part)

    return Path(config.data_dir) / safe(ctx.dag_id) / safe(ctx.run_id)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _save(config: PipelineConfig, ctx: RunContext, name: str, manifest: Manifest) -> None:
    write_manifest(manifest, run_dir(config, ctx) / f"{name}.json")


@metrics.timed_step("collect")
def collect(config: PipelineConfig, ctx: RunContext) -> CollectManifest:
    """Stream the window's high-engagement posts into a validated chat JSONL dataset."""
    from fine_tuning.collect import collect_training_data

    manifest = collect_training_data(config, ctx, run_dir(config, ctx))
    metrics.get_metrics(config).collected(manifest)
    if manifest.status != "ready":
        raise InsufficientDataError(manifest.reason or "not enough training data")
    return manifest


@metrics.timed_step("upload")
def upload(config: PipelineConfig, ctx: RunContext, collected: CollectManifest) -> UploadManifest:
    """Check the cost guard, then upload the dataset once (found again by its key on a retry)."""
    from fine_tuning import registry
    from fine_tuning.providers import get_provider

    if collected.dataset_path is None or collected.sha256 is None:
        raise ValueError(f"collect manifest of {ctx.run_id} has no dataset (status {collected.status})")
    provider = get_provider(config)
    estimate = provider.estimate_cost(collected.tokens, collected.examples_written)
    epochs, cost = estimate.epochs, estimate.cost_usd
    metrics.get_metrics(config).training_cost_estimated(cost)
    registry.log_cost_estimate(
        config, ctx.dag_id, ctx.run_id, tokens=collected.tokens, epochs=epochs, cost_usd=cost
    )
    log.info(
        "cost estimate: %d tokens x %d epochs x $%.2f/1M = $%.2f (limit $%.2f)",
        collected.tokens,
        epochs,
        estimate.price_per_million_tokens,
        cost,
        config.training.max_training_cost_usd,
    )
    if cost > config.training.max_training_cost_usd:
        raise CostLimitExceeded(
            f"estimated training cost ${cost:.2f} ({collected.tokens} tokens x {epochs} epochs of "
            f"{config.training.trained_model()}) exceeds training.max_training_cost_usd "
            f"${config.training.max_training_cost_usd:.2f}; not starting a job"
        )
    key = idempotency_key(ctx.dag_id, ctx.run_id, collected.sha256)
    dataset = Path(collected.dataset_path)
    if not dataset.exists() or _sha256(dataset) != collected.sha256:
        raise ValueError(f"dataset {dataset} is missing or does not match sha256 {collected.sha256}")
    file_id, reused = provider.upload(provider.prepare_dataset(dataset), key)
    manifest = UploadManifest(
        provider=provider.name,
        idempotency_key=key,
        dataset_sha256=collected.sha256,
        file_id=file_id,
        reused_file=reused,
        base_model=config.training.trained_model(),
        estimated_tokens=collected.tokens,
        estimated_epochs=epochs,
        estimated_cost_usd=round(cost, 4),
    )
    return manifest


@metrics.timed_step("train")
def train(config: PipelineConfig, ctx: RunContext, uploaded: UploadManifest) -> TrainingManifest:
    """Start the fine-tuning job once per (dag_id, run_id, dataset sha256), with the provider
    that uploaded the dataset."""
    from fine_tuning import openai_training
    from fine_tuning.providers import get_provider

    metadata = openai_training.job_metadata(
        uploaded.idempotency_key, ctx.dag_id, ctx.run_id, uploaded.dataset_sha256
    )
    job_id, reused = get_provider(config, uploaded.provider).submit(uploaded.file_id, metadata)
    metrics.get_metrics(config).training_job_started(reused)
    manifest = TrainingManifest(
        **uploaded.model_dump(), job_id=job_id, suffix=config.training.suffix, reused_job=reused
    )
    return manifest


def job_result(job: object) -> JobResult:
    """The terminal state of an OpenAI job as a manifest."""
    from fine_tuning.openai_training import job_error_message

    status = getattr(job, "status")
    return JobResult(
        provider=PROVIDER,
        job_id=getattr(job, "id"),
        status=status,
        fine_tuned_model=getattr(job, "fine_tuned_model", None),
        trained_tokens=getattr(job, "trained_tokens", None),
        error=None if status == "succeeded" else job_error_message(job),  # type: ignore[arg-type]
        created_at=getattr(job, "created_at", None),
        finished_at=getattr(job, "finished_at", None),
    )


def status_result(provider: str, status: JobStatusLike, model_reference: str | None) -> JobResult:
    """The terminal state of any provider's job (see ``fine_tuning.providers.JobStatus``) as a manifest."""
    return JobResult(
        provider=provider,
        job_id=status.job_id,
        status=status.status,  # type: ignore[arg-type]
        fine_tuned_model=model_reference if status.status == "succeeded" else None,
        trained_tokens=status.trained_tokens,
        error=None if status.status == "succeeded" else (status.error or f"job {status.job_id} {status.status}"),
        created_at=status.created_at,
        finished_at=status.finished_at,
    )


@metrics.timed_step("wait")
def wait(config: PipelineConfig, ctx: RunContext, training: TrainingManifest) -> JobResult:
    """Poll the job until it ends (the CLI's blocking wait; in Airflow a trigger does this)."""
    from fine_tuning.openai_training import FineTuningJobFailed
    from fine_tuning.providers import get_provider

    provider = get_provider(config, training.provider)
    deadline = time.monotonic() + config.training.timeout_seconds
    while True:
        status = provider.status(training.job_id)
        if status.terminal:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"fine-tuning job {training.job_id} still {status.status} after "
                f"training.timeout_seconds={config.training.timeout_seconds}"
            )
        time.sleep(config.training.poll_interval_seconds)
    result = status_result(provider.name, status, provider.model_reference(status))
    metrics.get_metrics(config).training_job_finished(result)
    _save(config, ctx, "wait", result)
    if result.status != "succeeded":
        raise FineTuningJobFailed(result.error)
    return result


@metrics.timed_step("register")
def register(
    config: PipelineConfig,
    ctx: RunContext,
    collected: CollectManifest,
    training: TrainingManifest,
    result: JobResult,
) -> RegistrationManifest:
    """Track the run in MLflow and register the candidate with the ``challenger`` alias."""
    from fine_tuning.registry import register_candidate

    # When MLflow is down the registration is queued (status "buffered") and the run goes on;
    # the replay rewrites register.json with the MLflow ids (see fine_tuning.tracking_buffer).
    manifest = register_candidate(
        config, collected, training, result, manifest_path=run_dir(config, ctx) / "register.json"
    )
    metrics.get_metrics(config).pipeline_registered(
        result, run_dir(config, ctx) / "collect.json", collected.seconds
    )
    _save(config, ctx, "register", manifest)
    return manifest


# What each step reads: the manifests of these upstream steps, in this order.
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "collect": (),
    "upload": ("collect",),
    "train": ("upload",),
    "wait": ("train",),
    "register": ("collect", "train", "wait"),
    "ab-create": ("register",),
    "evaluate": ("ab-create",),
    "deploy": ("evaluate",),
    "rollout": (),
}
INPUT_TYPES: dict[str, type[Manifest]] = {
    "collect": CollectManifest,
    "upload": UploadManifest,
    "train": TrainingManifest,
    "wait": JobResult,
    "register": RegistrationManifest,
    "ab-create": ABTestManifest,
    "evaluate": EvaluationManifest,
}
STEPS = {
    "collect": collect,
    "upload": upload,
    "train": train,
    "wait": wait,
    "register": register,
    "ab-create": ab_steps.ab_create,
    "evaluate": ab_steps.evaluate,
    "deploy": ab_steps.deploy,
    "rollout": ab_steps.watch_rollouts,
}


def task_id(step: str) -> str:
    """The Airflow task id of a step (task ids read better with underscores)."""
    return step.replace("-", "_")


def run_step(
    name: str, config: PipelineConfig, ctx: RunContext, inputs: dict[str, dict | str]
) -> Manifest:
    """Run one step by name with its upstream manifests (dicts or JSON), as the CLI and operators do."""
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; known steps: {', '.join(STEPS)}")
    args = []
    for upstream in STEP_INPUTS[name]:
        if upstream not in inputs or inputs[upstream] in (None, "", "None"):
            raise ValueError(f"step {name!r} needs the manifest of {upstream!r}")
        args.append(INPUT_TYPES[upstream].from_json(inputs[upstream]))
    manifest = STEPS[name](config, ctx, *args)
    _save(config, ctx, name, manifest)  # every step's manifest sits beside the dataset
    return manifest
