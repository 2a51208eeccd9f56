"""A/B tests: create one (the candidate gets a share of the agent's traffic), read its metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, status

from fine_tuning import clock
from fine_tuning.evaluate import ab, report
from fine_tuning.infra.redis import redis_client
from fine_tuning_airflow.api import deps
from fine_tuning_airflow.api.deps import URL_PREFIX
from fine_tuning_airflow.api.schemas import CreateABTestRequest, CreateABTestResponse

router = APIRouter(prefix="/evaluation")


@router.post(
    "/create-ab-test",
    response_model=CreateABTestResponse,
    status_code=status.HTTP_201_CREATED,
    responses={
        **deps.COMMON_ERRORS,
        409: {"description": "The test cannot start (e.g. strict power check)"},
        **deps.SERVING_ERRORS,
    },
)
def create_ab_test(_: deps.CanEditPipeline, body: CreateABTestRequest) -> CreateABTestResponse:
    """Record an A/B test and route ``traffic_split`` of the agent's requests to the candidate."""
    evaluation: dict[str, Any] = {"traffic_split": body.traffic_split, "duration_hours": body.duration_hours}
    criteria = body.success_criteria
    if criteria.significance_threshold is not None:
        evaluation["significance_threshold"] = criteria.significance_threshold
    success = criteria.model_dump(exclude_none=True, exclude={"significance_threshold"})
    if success:
        evaluation["success_criteria"] = success
    if body.model_type:
        evaluation["model_type"] = body.model_type
    config = deps.pipeline_config({"evaluation": evaluation})
    deps.serve_models(config, body.baseline_model.model_id, body.candidate_model.model_id)
    test = ab.create_ab_test(
        config,
        redis_client(config),
        baseline_model=body.baseline_model.model_id,
        candidate_model=body.candidate_model.model_id,
        candidate_version=body.candidate_model.version,
        now=clock.now_utc(),
    )
    return CreateABTestResponse(
        ab_test_id=test["id"],
        status=test["status"],
        model_type=test["model_type"],
        start_time=test["started_at"],
        estimated_end_time=test["estimated_end_time"],
        traffic_allocation=test["traffic_allocation"],
        power_plan=test["power_plan"],
        monitoring_endpoints={"metrics": f"{URL_PREFIX}/evaluation/metrics/{test['id']}"},
    )


@router.get(
    "/metrics/{ab_test_id}",
    response_model=report.MetricsReport,
    responses={**deps.COMMON_ERRORS, 404: {"description": "No such A/B test"}},
)
def ab_test_metrics(
    _: deps.CanReadPipeline, config: deps.ConfigDep, ab_test_id: Annotated[str, deps.identifier()]
) -> report.MetricsReport:
    """The A/B test's per-arm metrics from SQL, cached in Redis for ``metrics_cache_ttl_seconds``."""
    return report.metrics_report(config, ab_test_id)
