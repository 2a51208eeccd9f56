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
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fine_tuning import clock, retirement
from fine_tuning.collect.dataset import collect_training_data
from fine_tuning.config import ConfigError, PipelineConfig
from fine_tuning.deploy import rollout
from fine_tuning.deploy.serving import serve_adapters
from fine_tuning.evaluate import ab
from fine_tuning.evaluate.report import publish_look
from fine_tuning.infra import metrics
from fine_tuning.infra.cache import MetricsCache
from fine_tuning.infra.health import HealthReport, check_health, emit_report
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
from fine_tuning.routing import Routing, get_routing
from fine_tuning.step_graph import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_REFUSED, INPUT_TYPES, STEP_INPUTS
from fine_tuning.track import outbox, registry
from fine_tuning.train import loss_gate
from fine_tuning.train.providers import FineTuningJobFailed, TrainingRefusedError, get_provider, job_metadata

log = logging.getLogger(__name__)


class InsufficientDataError(RuntimeError):
    """Too few valid examples: the rest of the run is skipped, not failed."""


class CandidateRejected(RuntimeError):
    """The A/B test rejected the candidate: nothing to deploy (the deploy is skipped, not failed)."""


class CostLimitExceeded(RuntimeError):
    """The estimated training cost is over ``training.max_training_cost_usd``."""


# Refusals no retry can fix: the task fails at once (exit 3 in a pod) instead of asking again.
REFUSALS: tuple[type[Exception], ...] = (
    CostLimitExceeded,
    TrainingRefusedError,
    retirement.TrainingRetiredError,
)


def exit_code_for(exc: BaseException) -> int:
    """What a step's failure means, in both modes: refused (3) and bad input or configuration
    (2, any ``ValueError``: ``ConfigError``, a manifest that does not validate) fail the task at
    once; anything else (1) may be fixed by a retry."""
    if isinstance(exc, REFUSALS):
        return EXIT_REFUSED
    if isinstance(exc, ValueError):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


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


def _log_retirements(config: PipelineConfig) -> None:
    """The weekly run says, first, how long each model it depends on has left (and sends it)."""
    try:
        entries = model_retirements(config)
    except Exception as exc:  # noqa: BLE001 - a report; the upload step enforces the dates
        log.warning("could not read the models' retirements: %s: %s", type(exc).__name__, exc)
        return
    emitter = metrics.get_metrics(config)
    for role, entry in entries.items():
        if entry.get("error"):
            log.warning("retirement of the %s: unknown (%s)", role, entry["error"])
            continue
        level = logging.WARNING if "retir" in f"{entry['training']}{entry['inference']}" else logging.INFO
        log.log(
            level,
            "retirement of the %s %s: training %s (%s days, %s), inference %s (%s days, %s)",
            role,
            entry["model"],
            entry["training_retires"],
            entry["days_to_training_retirement"],
            entry["training"],
            entry["inference_retires"],
            entry["days_to_inference_retirement"],
            entry["inference"],
        )
        for kind in ("training", "inference"):
            days = entry[f"days_to_{kind}_retirement"]
            if days is not None:
                emitter.days_to_retirement(role, kind, str(entry["model"]), max(days, 0.0))


@metrics.timed_step("collect")
def collect(config: PipelineConfig, ctx: RunContext) -> CollectManifest:
    """Stream the window's high-engagement posts into a validated chat JSONL dataset."""
    _log_retirements(config)
    manifest = collect_training_data(config, ctx, run_dir(config, ctx))
    metrics.get_metrics(config).collected(manifest)
    if manifest.status != "ready":
        raise InsufficientDataError(manifest.reason or "not enough training data")
    return manifest


def retirement_table(config: PipelineConfig) -> retirement.RetirementTable:
    """The retirement table with the dates the training providers report themselves (Azure)."""
    reported: dict[tuple[str, str], retirement.ReportedDates] = {}
    if config.retirement.read_provider_dates:
        for name in dict.fromkeys([config.training.provider, config.training.fallback_provider]):
            if name is None:
                continue
            try:
                reported.update(get_provider(config, name).reported_retirements())
            except Exception as exc:  # noqa: BLE001 - the shipped table still applies, and we say so
                log.warning(
                    "could not read %s's own model retirement dates (%s: %s): using the shipped table",
                    name,
                    type(exc).__name__,
                    exc,
                )
    return retirement.table_for(config, reported)


def configured_model(config: PipelineConfig) -> str:
    """The agent's configured model for the A/B test's model type (the baseline without a champion)."""
    return config.body_model if config.evaluation.model_type == "body" else config.hook_model


def plan_migration(
    config: PipelineConfig, table: retirement.RetirementTable, now: datetime
) -> dict[str, str] | None:
    """A forced migration when the model serving today stops serving within the horizon:
    train its replacement with ``training.fallback_provider`` (else ``training.provider``) and
    have it be the champion ``retirement.migration_lead_days`` before the date."""
    served = baseline_model(config, table, now, substitute=False)
    found = table.lookup(served)
    days = found.days_to("inference", now)
    if days is None or days > config.retirement.horizon_days:
        return None
    retires_at = found.retires_at("inference")
    assert retires_at is not None
    deadline = retires_at - timedelta(days=config.retirement.migration_lead_days)
    to_provider = config.training.fallback_provider or config.training.provider
    if not config.training.fallback_provider:
        log.error(
            "%s stops serving on %s and training.fallback_provider is not set: replacing it with "
            "training.provider %s",
            served,
            found.inference_retires,
            to_provider,
        )
    return {
        "from_model": served,
        "from_provider": found.ref.provider,
        "to_provider": to_provider,
        "reason": f"{served} stops serving on {found.inference_retires} ({found.source})",
        "retires": retires_at.isoformat(),
        "deadline": deadline.isoformat(),
    }


def training_config(config: PipelineConfig, provider: str) -> PipelineConfig:
    """``config`` with ``training.provider`` set to ``provider`` (a migration's training)."""
    if provider == config.training.provider:
        return config
    changed = config.model_copy(deep=True)
    changed.training.provider = provider  # type: ignore[assignment]
    return changed


def check_candidate_outlives(
    config: PipelineConfig, table: retirement.RetirementTable, now: datetime
) -> None:
    """Refuse to train a candidate that would stop serving within the horizon (a fine-tune
    serves no longer than its base model): it could never be a champion for long."""
    base = config.training.trained_model()
    found = table.lookup(base, config.training.provider)
    days = found.days_to("inference", now)
    if days is not None and days <= config.retirement.horizon_days:
        raise retirement.TrainingRetiredError(
            f"a model fine-tuned from {base} on {config.training.provider} stops serving on "
            f"{found.inference_retires} (source: {found.source}), within retirement.horizon_days="
            f"{config.retirement.horizon_days:g}; not uploading the dataset. Set training.fallback_provider "
            "(or training.provider / training.base_model) to one that serves longer."
        )


@metrics.timed_step("upload")
def upload(config: PipelineConfig, ctx: RunContext, collected: CollectManifest) -> UploadManifest:
    """Check the retirement table and the cost guard, then upload the dataset once (found
    again by its key on a retry).

    A closed training provider, or a base model whose fine-tunes would stop serving within the
    horizon, is refused here, before anything is uploaded or paid for. When the model serving
    today retires within the horizon, this run is a forced migration: it trains with
    ``training.fallback_provider`` and says so in its manifest (and so in MLflow).
    """
    if collected.dataset_path is None or collected.sha256 is None:
        raise ValueError(f"collect manifest of {ctx.run_id} has no dataset (status {collected.status})")
    now = clock.now_utc()
    table = retirement_table(config)
    migration = plan_migration(config, table, now)
    if migration:
        log.warning("FORCED MIGRATION: %s; training with %s", migration["reason"], migration["to_provider"])
        config = training_config(config, migration["to_provider"])
    retirement.check_training_open(
        config, table, config.training.provider, config.training.trained_model(), now
    )
    check_candidate_outlives(config, table, now)
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
        migration=migration,
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


def champion_or_record(config: PipelineConfig) -> str | None:
    """The champion's model: MLflow's ``champion`` alias, or, when MLflow cannot answer, the
    pipeline's own record of the model at 100% (the last completed rollout).

    :raises ChampionUnknown: MLflow cannot answer and no rollout ever completed: the step fails
        (and is retried) rather than take the configured model for the champion.
    """
    try:
        return registry.champion_model(config)
    except registry.ChampionUnknown as exc:
        recorded = rollout.serving_model(config, config.evaluation.model_type)
        if recorded is None:
            raise
        log.error("%s; using the pipeline's record of the model at 100%%: %s", exc, recorded)
        return recorded


def baseline_model(
    config: PipelineConfig,
    table: retirement.RetirementTable | None = None,
    now: datetime | None = None,
    *,
    substitute: bool = True,
) -> str:
    """This week's baseline: the MLflow champion's model if there is one, else the configured
    model; one past its inference retirement is replaced by the serving fallback (unless
    ``substitute`` is False: the model serving today, retired or not)."""
    served = champion_or_record(config) or configured_model(config)
    if not substitute:
        return served
    table = table or retirement_table(config)
    if table.lookup(served).retired("inference", now or clock.now_utc()):
        fallback = retirement.require_fallback(config, config.evaluation.model_type, served)
        log.error("baseline %s is past its inference retirement: the A/B baseline is %s", served, fallback)
        return fallback
    return served


def ab_create(config: PipelineConfig, ctx: RunContext, registered: RegistrationManifest) -> ABTestManifest:
    """Start the A/B test of the registered candidate (idempotent per dag run).

    A self-hosted candidate (and a self-hosted baseline, the rollback target) is loaded into
    the vLLM server first: if vLLM refuses, the error names the server and the adapter, and no
    test is recorded and no traffic is routed.
    """
    now = clock.now_utc()
    # Before anything is loaded or routed: a candidate overtaken while it waited stops here.
    ab.queue_candidate(
        config,
        candidate_model=registered.fine_tuned_model,
        candidate_version=registered.model_version,
        dag_id=ctx.dag_id,
        run_id=ctx.run_id,
        data_end=ctx.window_end,
        now=now,
    )
    baseline = baseline_model(config, now=now)
    serve_adapters(config, [baseline, registered.fine_tuned_model])
    test = ab.create_ab_test(
        config,
        redis_client(config),
        baseline_model=baseline,
        candidate_model=registered.fine_tuned_model,
        candidate_version=registered.model_version,
        now=now,
        dag_id=ctx.dag_id,
        run_id=ctx.run_id,
        migration=registered.migration,
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


def evaluate(
    config: PipelineConfig,
    ctx: RunContext,
    test: ABTestManifest,
    metrics_cache: MetricsCache | None = None,
) -> EvaluationManifest:
    """One look at the A/B test (the Airflow operator repeats it, deferring in between).

    The look decides on aggregates read fresh from PostgreSQL, never cached ones; the report it
    makes of them is then written through ``metrics_cache`` (the Airflow side passes
    ``CachedMetricsHook``'s; default: the config's), so the API's next read is this look's.
    """
    cache = metrics_cache or MetricsCache.from_config(config)

    def publish(looked: dict[str, Any], aggregates: dict[str, Any], until: datetime) -> None:
        publish_look(config, cache, looked, aggregates, until)

    result = ab.evaluate_ab_test(
        config, redis_client(config), test.ab_test_id, clock.now_utc(), on_look=publish
    )
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


def enforce_retirements(
    config: PipelineConfig, client: Any, now: datetime, table: retirement.RetirementTable | None = None
) -> tuple[list[str], list[str]]:
    """Rewrite any live routing that names a model past its inference retirement (or, with no
    routing, whose configured model retired), so that the routing names the serving fallback.

    :returns: the model types whose routing changed, and what could not be fixed (a retired
        model with no ``retirement.serving_fallback`` for its type).
    """
    table = table or retirement_table(config)
    changed: list[str] = []
    problems: list[str] = []
    for model_type in ("hook", "body"):
        live = get_routing(client, model_type)
        configured = config.body_model if model_type == "body" else config.hook_model
        routing = live or Routing(configured, None, 0.0, "configured")
        named = [m for m in (routing.baseline_model, routing.candidate_model) if m]
        retired = [m for m in named if table.lookup(m).retired("inference", now)]
        if not retired:
            continue
        try:
            served = retirement.write_routing(config, client, model_type, routing, now, table)
        except ConfigError as exc:
            log.error("%s routing: %s", model_type, exc)
            problems.append(f"{model_type}: {exc}")
            continue
        metrics.get_metrics(config).retired_model_replaced(model_type)
        log.error(
            "%s routing named %s, past its inference retirement: it now serves %s",
            model_type,
            ", ".join(retired),
            served.baseline_model,
        )
        changed.append(model_type)
    return changed, problems


def model_retirements(config: PipelineConfig, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Every model the pipeline depends on, by role, with days to its retirements.

    Roles: ``base_model`` (what the next run trains, on ``training.provider``), ``champion``
    (MLflow's alias), ``baseline`` and ``candidate`` (the live routing of the evaluated model
    type), ``rollback_target`` (an active rollout's previous model), ``fallback`` (the serving
    fallback), and the other model type's served model and fallback (``hook_model``,
    ``hook_fallback`` when the body is evaluated). A role that could not be read says why (``error``) instead.
    """
    now = now or clock.now_utc()
    horizon = config.retirement.horizon_days
    table = retirement_table(config)
    models: dict[str, str | None] = {"base_model": None}
    entries: dict[str, dict[str, Any]] = {}

    def read(role: str, get: Callable[[], str | None]) -> None:
        try:
            models[role] = get()
        except Exception as exc:  # noqa: BLE001 - a health report says what it could not read
            entries[role] = {"model": None, "error": f"{type(exc).__name__}: {exc}"}

    read("champion", lambda: registry.champion_model(config))
    model_type = config.evaluation.model_type
    read(
        "baseline",
        lambda: (get_routing(redis_client(config), model_type) or _no_routing(config)).baseline_model,
    )
    read(
        "candidate",
        lambda: (get_routing(redis_client(config), model_type) or _no_routing(config)).candidate_model,
    )
    read("rollback_target", lambda: rollout.rollback_target(config, model_type))
    models["fallback"] = retirement.serving_fallback(config, model_type)
    # The agent's other model type is served too (its routing's baseline, else its configured model).
    other = "hook" if model_type == "body" else "body"
    other_configured = config.hook_model if other == "hook" else config.body_model

    def other_served() -> str:
        live_other = get_routing(redis_client(config), other)
        return live_other.baseline_model if live_other else other_configured

    read(f"{other}_model", other_served)
    models[f"{other}_fallback"] = retirement.serving_fallback(config, other)
    base = table.lookup(config.training.trained_model(), config.training.provider)
    entries["base_model"] = base.as_dict(now, horizon)
    for role, model in models.items():
        if role != "base_model" and model and role not in entries:
            entries[role] = table.lookup(model).as_dict(now, horizon)
    return entries


def _no_routing(config: PipelineConfig) -> Routing:
    return Routing(configured_model(config), None, 0.0, "configured")


# The models section of health, per process: the liveness probe polls health every few
# seconds, and the section asks MLflow, Redis, PostgreSQL (and Azure) each time otherwise.
_models_cache: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}
MODELS_CACHE_SECONDS = 300.0


def health(config: PipelineConfig, *, emit_metrics: bool = False) -> HealthReport:
    """The health report (:func:`fine_tuning.infra.health.check_health`) with the retirements of
    the models the pipeline depends on: degraded while one retires within the horizon."""
    report = check_health(config, emit_metrics=False)
    key = config.model_dump_json()
    cached = _models_cache.get(key)
    if cached and time.monotonic() - cached[0] < MODELS_CACHE_SECONDS:
        models = cached[1]
    else:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-models")
        try:
            models = pool.submit(model_retirements, config).result(
                timeout=config.monitoring.health_timeout_seconds * 2 + 1
            )
            _models_cache[key] = (time.monotonic(), models)
        except FutureTimeout:
            models = {"models": {"model": None, "error": "the models' retirements could not be read in time"}}
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    report = report.with_models(models)
    if emit_metrics:
        emit_report(config, report)
        _emit_cache_hit_rate(config)
    return report


def _emit_cache_hit_rate(config: PipelineConfig) -> None:
    """The metrics cache's hit rate over every process (its counts are shared in Redis)."""
    stats = MetricsCache.from_config(config, on_lookup=lambda _hit: None).stats()
    if (
        stats.shared_hits is not None
        and stats.shared_misses is not None
        and stats.shared_hits + stats.shared_misses
    ):
        metrics.get_metrics(config).cache_hit_rate(stats.shared_hit_rate or 0.0)


SERVING_WINDOW = timedelta(hours=1)


def emit_serving_metrics(config: PipelineConfig, client: Any, now: datetime) -> dict[str, Any] | None:
    """The model serving the evaluated type (the routing's baseline: the champion), over the last
    hour of its posts, as ``variant="champion"`` gauges: what ``ModelPerformanceDegradation``
    watches between A/B tests. Returns the metrics sent (None: no posts in the window)."""
    model_type = config.evaluation.model_type
    serving = (get_routing(client, model_type) or _no_routing(config)).baseline_model
    aggregates = ab.arm_aggregates(
        config.services.database_url.get_secret_value(), serving, "", now - SERVING_WINDOW, now
    )
    champion = ab.summaries(aggregates)["baseline"]
    if not champion["sample_size"]:
        log.warning("no posts of the serving model %s in the last hour: no champion metrics sent", serving)
        return None
    emitter = metrics.get_metrics(config)
    if champion["engagement_rate"] is not None:
        emitter.model_engagement_rate(champion["engagement_rate"], variant="champion")
    if champion["cost_per_token"] is not None:
        emitter.model_cost_per_token(champion["cost_per_token"], variant="champion")
    if champion["quality_score"] is not None:
        emitter.model_quality_score(champion["quality_score"], variant="champion")
    return {"model": serving, **champion}


def drain_outbox(config: PipelineConfig) -> outbox.ReplayReport | None:
    """Replay the MLflow outbox; MLflow still down leaves it queued (logged, not raised), and a
    replay running elsewhere is left to finish (None)."""
    try:
        report = outbox.replay(config)
    except outbox.OutboxBusy as exc:
        log.info("MLflow outbox: %s; that replay drains it", exc)
        return None
    if report.replayed or report.dead:
        log.warning(
            "MLflow outbox: replayed %d queued operations (%d dead-lettered, %d still queued)",
            len(report.replayed),
            len(report.dead),
            len(report.pending),
        )
    return report


def watch_rollouts(config: PipelineConfig, ctx: RunContext) -> RolloutWatchManifest:
    """The hourly watch: advance each active rollout whose interval passed, or roll it back; and
    take any model past its inference retirement out of the routing. First, it replays what
    MLflow's outbox holds: after an outage the queued registrations and alias moves (the
    champion's) reach MLflow within the hour, not at the next weekly run's first MLflow call."""
    drain_outbox(config)
    client = redis_client(config)
    _, problems = enforce_retirements(config, client, clock.now_utc())
    emit_serving_metrics(config, client, clock.now_utc())
    results = [
        deployment_manifest(rollout.watch(config, client, deployment_id, clock.now_utc()))
        for deployment_id in rollout.active_deployments(config)
    ]
    if problems:  # the rollouts were watched; the task still fails, so that someone looks
        raise ConfigError("a model past its inference retirement is still served: " + "; ".join(problems))
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


def run_step(
    name: str,
    config: PipelineConfig,
    ctx: RunContext,
    inputs: dict[str, dict | str],
    **options: Any,
) -> Manifest:
    """Run one step by name with its upstream manifests (dicts or JSON), as the CLI and operators do.

    ``options`` are the step's own keyword arguments that only a caller can give (the evaluate
    step's ``metrics_cache``, from the Airflow hook).
    """
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; known steps: {', '.join(STEPS)}")
    args = []
    for upstream in STEP_INPUTS[name]:
        if upstream not in inputs or inputs[upstream] in (None, "", "None"):
            raise ValueError(f"step {name!r} needs the manifest of {upstream!r}")
        args.append(INPUT_TYPES[upstream].from_json(inputs[upstream]))
    manifest = STEPS[name](config, ctx, *args, **options)
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
