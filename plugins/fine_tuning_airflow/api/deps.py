"""What the routes depend on, in one place: who may call them (Airflow's own DAG permissions),
the pipeline's config, the path id, and the errors every protected route documents.

Airflow mounts a plugin's FastAPI app without its own authentication (the core API's router
dependency does not reach a mounted app), so every route states its access with one of these
checks: a request without a valid token gets 401, a user without the DAG permission 403.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, HTTPException, status
from fastapi import Path as PathParam

from fine_tuning.config import ConfigError, PipelineConfig, load_config
from fine_tuning.deploy.serving import serve_adapters

PIPELINE_DAG_ID = "weekly_fine_tuning"
ROLLOUT_DAG_ID = "rollout_monitor"
URL_PREFIX = "/pipeline"

# -- access --------------------------------------------------------------------------------------
# Kept as module-level objects so that a test (the OpenAPI fuzz) can override them in
# ``app.dependency_overrides``; Airflow builds a new closure on every call of the factory.
read_pipeline_runs = requires_access_dag(
    method="GET", access_entity=DagAccessEntity.RUN, param_dag_id=PIPELINE_DAG_ID
)
trigger_pipeline_runs = requires_access_dag(
    method="POST", access_entity=DagAccessEntity.RUN, param_dag_id=PIPELINE_DAG_ID
)
edit_pipeline_runs = requires_access_dag(
    method="PUT", access_entity=DagAccessEntity.RUN, param_dag_id=PIPELINE_DAG_ID
)
read_pipeline = requires_access_dag(method="GET", param_dag_id=PIPELINE_DAG_ID)
edit_pipeline = requires_access_dag(method="PUT", param_dag_id=PIPELINE_DAG_ID)
edit_rollouts = requires_access_dag(method="PUT", param_dag_id=ROLLOUT_DAG_ID)

# A route's first parameter: the check runs before anything else is read from the request.
CanReadRuns = Annotated[None, Depends(read_pipeline_runs)]
CanTriggerRuns = Annotated[None, Depends(trigger_pipeline_runs)]
CanEditRuns = Annotated[None, Depends(edit_pipeline_runs)]
CanReadPipeline = Annotated[None, Depends(read_pipeline)]
CanEditPipeline = Annotated[None, Depends(edit_pipeline)]
CanEditRollouts = Annotated[None, Depends(edit_rollouts)]
CurrentUser = GetUserDep

COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid token"},
    403: {"description": "The user lacks the DAG permission"},
}
# The routes that load self-hosted adapters into vLLM first (``serve_models``).
SERVING_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"description": "The vLLM server did not load a self-hosted adapter"},
    503: {"description": "The vLLM breaker is open after repeated failures (see Retry-After)"},
}


# -- config --------------------------------------------------------------------------------------
def pipeline_config(overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """The typed config (defaults < file < environment < overrides); a bad override is a 422."""
    try:
        return load_config(params=overrides)
    except ConfigError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def configured() -> PipelineConfig:
    """The config without overrides, read on every request (the environment may change).

    Also where the API server starts pooling its PostgreSQL connections (2-10 per process): a
    request is the first moment known to be in the API server (every Airflow component imports
    the plugin; a task's short process must not keep a pool), and mounted apps get no startup
    event."""
    from fine_tuning.infra import db

    db.use_pools()
    return pipeline_config()


ConfigDep = Annotated[PipelineConfig, Depends(configured)]


# -- path and serving ----------------------------------------------------------------------------
def identifier() -> Any:
    """A path id (run ids hold ``:`` and ``+``); one object per parameter: FastAPI binds it to a name."""
    return PathParam(min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_.:+@~-]+$")


def serve_models(config: PipelineConfig, *model_ids: str) -> None:
    """Load self-hosted adapters into vLLM before any request is routed to them (as the DAG's
    steps do). A name that cannot be an adapter's is a 422; vLLM failing (502) and its open
    breaker (503) are the app's exception handlers'."""
    try:
        serve_adapters(config, model_ids)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
