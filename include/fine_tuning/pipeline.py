"""The pipeline's steps: one function each, shared by the CLI (pods) and the Airflow worker.

Each step takes the typed config, the run's context and its upstream manifests, does its one
external effect idempotently, writes its own manifest next to the dataset, and returns it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fine_tuning import clock
from fine_tuning.collect.dataset import collect_training_data
from fine_tuning.config import PipelineConfig
from fine_tuning.deploy import rollout
from fine_tuning.deploy.serving import serve_adapters
from fine_tuning.evaluate import ab
from fine_tuning.infra import metrics
from fine_tuning.infra.redis import redis_client
from fine_tuning.manifests import (
    ABTestManifest,
    CollectManifest,
    DeploymentManifest,
    EvaluationManifest,
    JobResult,
    Manifest,
    RegistrationManifest,
    RolloutWatchManifest,
    RunContext,
    TrainingManifest,
    UploadManifest,
    idempotency_key,
    write_manifest,
)
from fine_tuning.step_graph import INPUT_TYPES, STEP_INPUTS
from fine_tuning.track import registry
from fine_tuning.train import loss_gate
from fine_tuning.train.providers import FineTuningJobFailed, get_provider, job_metadata

log = logging.getLogger(__name__)


class InsufficientDataError(RuntimeError):
    """Too few valid examples: the rest of the run is skipped, not failed."""


class CandidateRejected(RuntimeError):
    """The A/B test rejected the candidate: nothing to deploy (the deploy is skipped, not failed)."""


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
    manifest = collect_training_data(config, ctx, run_dir(config, ctx))
    metrics.get_metrics(config).collected(manifest)
    if manifest.status != "ready":
        raise InsufficientDataError(manifest.reason or "not enough training data")
    return manifest


@metrics.timed_step("upload")
def upload(config: PipelineConfig, ctx: RunContext, collected: CollectManifest) -> UploadManifest:
    """Check the cost guard, then upload the dataset once (found again by its key on a retry)."""
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
    validation_file_id = None
    if collected.validation_path is not None:
        validation = Path(collected.validation_path)
        if not validation.exists() or _sha256(validation) != collected.validation_sha256:
            raise ValueError(
                f"validation file {validation} is missing or does not match sha256 "
                f"{collected.validation_sha256}"
            )
        validation_file_id, _ = provider.upload(provider.prepare_dataset(validation), f"{key}-validation")
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
        validation_file_id=validation_file_id,
    )
    return manifest


@metrics.timed_step("train")
def train(config: PipelineConfig, ctx: RunContext, uploaded: UploadManifest) -> TrainingManifest:
    """Start the fine-tuning job once per (dag_id, run_id, dataset sha256), with the provider
    that uploaded the dataset."""
    metadata = job_metadata(uploaded.idempotency_key, ctx.dag_id, ctx.run_id, uploaded.dataset_sha256)
    job_id, reused = get_provider(config, uploaded.provider).submit(
        uploaded.file_id, metadata, validation_file_id=uploaded.validation_file_id
    )
    metrics.get_metrics(config).training_job_started(reused)
    manifest = TrainingManifest(
        **uploaded.model_dump(), job_id=job_id, suffix=config.training.suffix, reused_job=reused
    )
    return manifest


@metrics.timed_step("wait")
def wait(config: PipelineConfig, ctx: RunContext, training: TrainingManifest) -> JobResult:
    """Poll the job until it ends (the CLI's blocking wait; in Airflow a trigger does this)."""
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
    result = provider.result(status)
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
    """Track the run in MLflow (with the job's loss curves) and register the candidate with the
    ``challenger`` alias, unless the loss gate rejects it: then it is registered without the
    alias, tagged with the reason, and the run stops here, before any traffic."""
    # The curves are read where there is a validation loss to judge (a run without a validation
    # file is not gated, and says so in the verdict).
    has_validation = training.validation_file_id is not None
    curves = get_provider(config, training.provider).loss_curves(result.job_id) if has_validation else []
    verdict = loss_gate.judge(config, curves, has_validation_file=has_validation)
    log.info("loss gate for %s: %s", result.fine_tuned_model, verdict.reason)
    # When MLflow is down the registration is queued (status "buffered") and the run goes on;
    # the replay rewrites register.json with the MLflow ids (see fine_tuning.track.outbox).
    manifest = registry.register_candidate(
        config,
        collected,
        training,
        result,
        manifest_path=run_dir(config, ctx) / "register.json",
        curves=curves,
        loss_verdict=verdict.as_dict(),
    )
    metrics.get_metrics(config).pipeline_registered(
        result, run_dir(config, ctx) / "collect.json", collected.seconds
    )
    _save(config, ctx, "register", manifest)
    if not verdict.passed:
        raise CandidateRejected(f"loss gate rejected {result.fine_tuned_model}: {verdict.reason}")
    return manifest


def baseline_model(config: PipelineConfig) -> str:
    """This week's baseline: the MLflow champion's model if there is one, else the configured model."""
    champion = registry.champion_model(config)
    if champion:
        return champion
    return config.body_model if config.evaluation.model_type == "body" else config.hook_model


def ab_create(config: PipelineConfig, ctx: RunContext, registered: RegistrationManifest) -> ABTestManifest:
    """Start the A/B test of the registered candidate (idempotent per dag run).

    A self-hosted candidate (and a self-hosted baseline, the rollback target) is loaded into
    the vLLM server first: if vLLM refuses, the error names the server and the adapter, and no
    test is recorded and no traffic is routed.
    """
    baseline = baseline_model(config)
    serve_adapters(config, [baseline, registered.fine_tuned_model])
    test = ab.create_ab_test(
        config,
        redis_client(config),
        baseline_model=baseline,
        candidate_model=registered.fine_tuned_model,
        candidate_version=registered.model_version,
        now=clock.now_utc(),
        dag_id=ctx.dag_id,
        run_id=ctx.run_id,
    )
    return ABTestManifest(
        ab_test_id=test["id"],
        model_type=test["model_type"],
        baseline_model=test["baseline_model"],
        candidate_model=test["candidate_model"],
        candidate_version=test["candidate_version"],
        traffic_split=test["traffic_split"],
        started_at=test["started_at"],
        planned_end_at=test["planned_end_at"],
        power_adequate=bool(test["power_plan"].get("adequate")),
        power_message=str(test["power_plan"].get("message", "")),
    )


def evaluation_manifest(result: dict[str, Any], looks: int) -> EvaluationManifest:
    analysis = result.get("analysis") or {}
    return EvaluationManifest(
        ab_test_id=result["ab_test_id"],
        decision=result["decision"] if result["decision"] in ("promote", "reject", "continue") else "reject",
        final=result["final"],
        looks=looks,
        p_value=analysis.get("p_value"),
        relative_lift=analysis.get("relative_lift"),
        ci_lower=analysis.get("ci_lower"),
        ci_upper=analysis.get("ci_upper"),
        srm_p_value=analysis.get("srm_p_value"),
        reasons=analysis.get("reasons", []),
    )


def evaluate(config: PipelineConfig, ctx: RunContext, test: ABTestManifest) -> EvaluationManifest:
    """One look at the A/B test (the Airflow operator repeats it, deferring in between)."""
    result = ab.evaluate_ab_test(config, redis_client(config), test.ab_test_id, clock.now_utc())
    looks = ab.get_ab_test(config, test.ab_test_id)["looks"]
    manifest = evaluation_manifest(result, looks)
    for reason in manifest.reasons:
        log.info("A/B %s: %s", test.ab_test_id, reason)
    return manifest


def deployment_manifest(record: dict[str, Any]) -> DeploymentManifest:
    return DeploymentManifest(
        deployment_id=record["id"],
        ab_test_id=record["ab_test_id"],
        status=record["status"],
        candidate_model=record["candidate_model"],
        previous_model=record["previous_model"],
        current_traffic=record["current_traffic"],
        rollback_reason=record["rollback_reason"],
    )


def deploy(config: PipelineConfig, ctx: RunContext, evaluation: EvaluationManifest) -> DeploymentManifest:
    """Start the rollout of a promoted candidate; a rejected one is not deployed.

    Self-hosted adapters (the candidate, and the baseline that a rollback returns to) are loaded
    into vLLM again first, idempotently: a vLLM restart since the A/B test forgets them.
    """
    if evaluation.decision != "promote":
        verdicts = [r.get("note") for r in evaluation.reasons if r.get("criterion") == "verdict"]
        raise CandidateRejected(
            f"A/B test {evaluation.ab_test_id} decided {evaluation.decision!r}: "
            + ("; ".join(v for v in verdicts if v) or "criteria not met")
        )
    test = ab.get_ab_test(config, evaluation.ab_test_id)
    serve_adapters(config, [test["baseline_model"], test["candidate_model"]])
    record = rollout.deploy(config, redis_client(config), evaluation.ab_test_id, clock.now_utc())
    return deployment_manifest(record)


def watch_rollouts(config: PipelineConfig, ctx: RunContext) -> RolloutWatchManifest:
    """The hourly watch: advance each active rollout whose interval passed, or roll it back."""
    client = redis_client(config)
    results = [
        deployment_manifest(rollout.watch(config, client, deployment_id, clock.now_utc()))
        for deployment_id in rollout.active_deployments(config)
    ]
    return RolloutWatchManifest(deployments=results)


STEPS: dict[str, Callable[..., Manifest]] = {
    "collect": collect,
    "upload": upload,
    "train": train,
    "wait": wait,
    "register": register,
    "ab-create": ab_create,
    "evaluate": evaluate,
    "deploy": deploy,
    "rollout": watch_rollouts,
}


def run_step(name: str, config: PipelineConfig, ctx: RunContext, inputs: dict[str, dict | str]) -> Manifest:
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


@dataclass
class AbortCleanup:
    """What aborting a run cleaned up (``cleaned``: names such as ``ab_test_stopped``), what it
    found (``details``), and what it could not clean (``problems``, also in ``details``)."""

    cleaned: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def abort_run(
    config: PipelineConfig,
    dag_id: str,
    run_id: str,
    *,
    training: dict[str, Any] | None = None,
    ab_test_id: str | None = None,
) -> AbortCleanup:
    """Clean up after a run that was stopped: cancel its fine-tuning job (``training``, the train
    step's manifest), stop its A/B test, delete its run folder. Each part is tried whatever the
    others did, and may be repeated (an already cancelled job, a stopped test, no folder).
    """
    cleanup = AbortCleanup()
    job_id = (training or {}).get("job_id")
    if job_id:
        try:
            provider = get_provider(config, (training or {}).get("provider"))
            cancelled = provider.cancel(job_id)
            cleanup.details[f"{provider.name}_job"] = {"job_id": job_id, "status": cancelled}
            cleanup.cleaned.append(f"{provider.name}_job_cancelled")  # the design's openai_job_cancelled
        except Exception as exc:  # noqa: BLE001 - reported; the rest of the cleanup still runs
            cleanup.problems.append(f"training job {job_id}: {type(exc).__name__}: {exc}")
    if ab_test_id:
        try:
            if ab.stop_ab_test(config, redis_client(config), ab_test_id):
                cleanup.cleaned.append("ab_test_stopped")
            cleanup.details["ab_test_id"] = ab_test_id
        except Exception as exc:  # noqa: BLE001 - reported; the rest of the cleanup still runs
            cleanup.problems.append(f"A/B test {ab_test_id}: {type(exc).__name__}: {exc}")

    directory = run_dir(config, RunContext(dag_id=dag_id, run_id=run_id, window_end=clock.now_utc()))
    if directory.exists():
        files = [p for p in directory.rglob("*") if p.is_file()]
        cleanup.details["temporary_files"] = {
            "path": str(directory),
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
        }
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            cleanup.problems.append(f"could not delete {directory}")
        else:
            cleanup.cleaned.extend(["temporary_files", "training_data_cache"])
    if cleanup.problems:
        cleanup.details["problems"] = cleanup.problems
    log.info("run %s of %s cleaned up after its abort: %s", run_id, dag_id, cleanup.cleaned)
    return cleanup
