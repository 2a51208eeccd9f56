"""Deployments: roll out an A/B test's promoted candidate, or roll a deployment back."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, status

from fine_tuning import clock
from fine_tuning.deploy import rollout
from fine_tuning.evaluate import ab
from fine_tuning.infra.redis import redis_client
from fine_tuning.step_graph import APPROVAL_DAG_ID, approval_page, approval_run_id
from fine_tuning_airflow.api import deps
from fine_tuning_airflow.api.deps import ROLLOUT_DAG_ID, URL_PREFIX
from fine_tuning_airflow.api.schemas import DeploymentResponse, DeployRequest, RollbackRequest

router = APIRouter(prefix="/deployment")


@router.post(
    "/deploy",
    response_model=DeploymentResponse,
    status_code=status.HTTP_201_CREATED,
    responses={
        **deps.COMMON_ERRORS,
        404: {"description": "No such A/B test"},
        409: {"description": "A safety check refused the deployment"},
        **deps.SERVING_ERRORS,
    },
)
def deploy(_: deps.CanEditRollouts, body: DeployRequest) -> DeploymentResponse:
    """Start rolling out the A/B test's candidate, after the library's safety checks."""
    result = body.evaluation_result
    if result.recommendation != "promote" or not result.safety_checks_passed:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"evaluation_result says recommendation={result.recommendation!r}, "
            f"safety_checks_passed={result.safety_checks_passed}: refusing to deploy",
        )
    overrides = body.rollout_config.model_dump(exclude_none=True)
    deployment: dict[str, Any] = {"strategy": body.deployment_strategy}
    if overrides:
        deployment["rollout_config"] = overrides
    config = deps.pipeline_config({"deployment": deployment})
    test = ab.get_ab_test(config, result.ab_test_id)
    if test["candidate_model"] != body.model_version.model_id:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"model_version.model_id {body.model_version.model_id!r} is not the candidate of "
            f"A/B test {result.ab_test_id} ({test['candidate_model']!r})",
        )
    deps.serve_models(config, test["baseline_model"], test["candidate_model"])
    record = rollout.deploy(
        config, redis_client(config), result.ab_test_id, clock.now_utc(), body.deployment_strategy
    )
    return _deployment_body(record)


@router.post(
    "/rollback/{deployment_id}",
    response_model=DeploymentResponse,
    responses={**deps.COMMON_ERRORS, 404: {"description": "No such deployment"}},
)
def rollback(
    _: deps.CanEditRollouts,
    user: deps.CurrentUser,
    config: deps.ConfigDep,
    deployment_id: Annotated[str, deps.identifier()],
    body: Annotated[RollbackRequest, Body(default_factory=RollbackRequest)],
) -> DeploymentResponse:
    """Send all traffic back to the previous model now (one atomic switch) and record why."""
    reason = f"manual by {user.get_name()}: {body.reason}"
    record = rollout.rollback(config, redis_client(config), deployment_id, reason, clock.now_utc())
    return _deployment_body(record)


def _deployment_body(record: dict[str, Any]) -> DeploymentResponse:
    triggers = record.get("rollback_triggers") or {}
    return DeploymentResponse(
        deployment_id=record["id"],
        status=record["status"],
        deployment_strategy=record["strategy"],
        ab_test_id=record["ab_test_id"],
        candidate_model=record["candidate_model"],
        previous_model=record["previous_model"],
        current_traffic=record["current_traffic"],
        rollback_reason=record["rollback_reason"],
        rollback_plan={
            "previous_model": record["previous_model"],
            # One Redis MULTI/EXEC switches the routing back; the watch runs hourly.
            "rollback_endpoint": f"{URL_PREFIX}/deployment/rollback/{record['id']}",
            "health_check_endpoints": [f"{URL_PREFIX}/health", f"{URL_PREFIX}/metrics"],
        },
        monitoring={
            "watched_by_dag": ROLLOUT_DAG_ID,
            "rollback_triggers": [
                f"engagement_rate_drop_{round(triggers.get('engagement_drop', 0) * 100)}_percent",
                f"error_rate_above_{round(triggers.get('error_rate', 0) * 100)}_percent",
                f"p95_response_time_above_{round(triggers.get('p95_response_time_ms', 0))}ms",
            ],
        },
        events=[
            {"at": event["at"], "kind": event["kind"], "traffic": event["traffic"]}
            for event in record.get("events", [])
        ],
        approval=_approval(record),
    )


def _approval(record: dict[str, Any]) -> dict[str, Any] | None:
    """Whether the last step waits for a person, where they answer, and their answer."""
    ramp = record.get("rollout_config") or {}
    if not ramp.get("require_approval"):
        return None
    answers = [e for e in record.get("events", []) if e["kind"] in ("approved", "rejected")]
    return {
        "required": True,
        "timeout_hours": ramp.get("approval_timeout_hours"),
        "dag_id": APPROVAL_DAG_ID,
        "dag_run_id": approval_run_id(record["id"]),
        "page": approval_page(record["id"]),
        "decision": answers[-1]["kind"] if answers else None,
        "decided_by": answers[-1]["detail"].get("decided_by") if answers else None,
    }
