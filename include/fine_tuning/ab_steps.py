"""The second half of the weekly run: A/B test the candidate, decide, deploy; and the rollout watch.

Like :mod:`fine_tuning.steps`, each is a library function with a CLI subcommand; they read and
write small manifests and keep their state in PostgreSQL (records) and Redis (live routing).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fine_tuning.config import PipelineConfig
from fine_tuning.manifests import (
    ABTestManifest,
    DeploymentManifest,
    EvaluationManifest,
    RegistrationManifest,
    RolloutWatchManifest,
    RunContext,
)

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)


class CandidateRejected(RuntimeError):
    """The A/B test rejected the candidate: nothing to deploy (the deploy is skipped, not failed)."""


def redis_client(config: PipelineConfig) -> redis.Redis:
    import redis

    return redis.Redis.from_url(config.services.redis_url.get_secret_value(), socket_timeout=5)


def now_utc() -> datetime:
    return datetime.now(UTC)


def baseline_model(config: PipelineConfig) -> str:
    """This week's baseline: the MLflow champion's model if there is one, else the configured model."""
    from fine_tuning.registry import champion_model

    champion = champion_model(config)
    if champion:
        return champion
    return config.body_model if config.evaluation.model_type == "body" else config.hook_model


def ab_create(config: PipelineConfig, ctx: RunContext, registered: RegistrationManifest) -> ABTestManifest:
    """Start the A/B test of the registered candidate (idempotent per dag run).

    A self-hosted candidate (and a self-hosted baseline, the rollback target) is loaded into
    the vLLM server first: if vLLM refuses, the error names the server and the adapter, and no
    test is recorded and no traffic is routed.
    """
    from fine_tuning import ab
    from fine_tuning.providers.selfhosted import serve_adapters

    baseline = baseline_model(config)
    serve_adapters(config, [baseline, registered.fine_tuned_model])
    test = ab.create_ab_test(
        config,
        redis_client(config),
        baseline_model=baseline,
        candidate_model=registered.fine_tuned_model,
        candidate_version=registered.model_version,
        now=now_utc(),
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
    from fine_tuning import ab

    result = ab.evaluate_ab_test(config, redis_client(config), test.ab_test_id, now_utc())
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
    from fine_tuning import ab, rollout
    from fine_tuning.providers.selfhosted import serve_adapters

    if evaluation.decision != "promote":
        verdicts = [r.get("note") for r in evaluation.reasons if r.get("criterion") == "verdict"]
        raise CandidateRejected(
            f"A/B test {evaluation.ab_test_id} decided {evaluation.decision!r}: "
            + ("; ".join(v for v in verdicts if v) or "criteria not met")
        )
    test = ab.get_ab_test(config, evaluation.ab_test_id)
    serve_adapters(config, [test["baseline_model"], test["candidate_model"]])
    record = rollout.deploy(config, redis_client(config), evaluation.ab_test_id, now_utc())
    return deployment_manifest(record)


def watch_rollouts(config: PipelineConfig, ctx: RunContext) -> RolloutWatchManifest:
    """The hourly watch: advance each active rollout whose interval passed, or roll it back."""
    from fine_tuning import rollout

    client = redis_client(config)
    results = [
        deployment_manifest(rollout.watch(config, client, deployment_id, now_utc()))
        for deployment_id in rollout.active_deployments(config)
    ]
    return RolloutWatchManifest(deployments=results)
