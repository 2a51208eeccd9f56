"""Pipelines: start a run of ``weekly_fine_tuning``, read its status, abort it."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, status

from fine_tuning.pipeline import abort_run
from fine_tuning_airflow.api import airflow_runs, deps, run_status
from fine_tuning_airflow.api.deps import PIPELINE_DAG_ID, URL_PREFIX
from fine_tuning_airflow.api.schemas import (
    AbortRequest,
    AbortResponse,
    StartRequest,
    StartResponse,
    StatusResponse,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/fine-tuning")


@router.post(
    "/start",
    response_model=StartResponse,
    status_code=status.HTTP_201_CREATED,
    responses={**deps.COMMON_ERRORS, 409: {"description": "A run is already active (use force_run)"}},
)
def start_pipeline(
    _: deps.CanTriggerRuns,
    user: deps.CurrentUser,
    body: Annotated[StartRequest, Body(default_factory=StartRequest)],
) -> StartResponse:
    """Trigger a run of ``weekly_fine_tuning`` with the given config as its conf."""
    conf = body.config.model_dump(exclude_none=True)
    ignored = []
    if conf.pop("weekly_schedule", None) is not None:
        ignored.append("weekly_schedule")
    # Validate the merged config now: a bad value is a 422 here, not a failed task later.
    config = deps.pipeline_config(conf)
    if not config.fine_tuning_enabled and not body.force_run:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "fine_tuning_enabled is false; set force_run to run anyway"
        )
    if not body.force_run and (active := airflow_runs.count_active_runs()):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"{active} run(s) of {PIPELINE_DAG_ID} already queued or running; set force_run to queue another",
        )
    run_id = f"ft-pipeline-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    run = airflow_runs.trigger_run(run_id, conf, body.logical_date, user)
    log.info("pipeline %s triggered by %s with conf %s", run_id, user.get_name(), conf)
    return StartResponse(
        status="success",
        pipeline_id=run.run_id,
        dag_id=run.dag_id,
        state=run.state,
        logical_date=run.logical_date,
        run_after=run.run_after,
        conf=run.conf,
        ignored_config=ignored,
        links={
            "status": f"{URL_PREFIX}/fine-tuning/status/{run.run_id}",
            "abort": f"{URL_PREFIX}/fine-tuning/abort/{run.run_id}",
            "airflow": f"/api/v2/dags/{PIPELINE_DAG_ID}/dagRuns/{run.run_id}",
        },
    )


@router.get(
    "/status/{pipeline_id}",
    response_model=StatusResponse,
    responses={**deps.COMMON_ERRORS, 404: {"description": "No such pipeline"}},
)
def pipeline_status(_: deps.CanReadRuns, pipeline_id: Annotated[str, deps.identifier()]) -> StatusResponse:
    """Stages from the run's task states, the current stage, and metrics from the step manifests."""
    details = airflow_runs.read_run(pipeline_id)
    run = details.run
    progress = run_status.stage_progress(details.tasks)
    current = run_status.current_stage(progress, run.state)
    skipped = run_status.skip_summary(details.tasks, details.skip_reasons)
    return StatusResponse(
        pipeline_id=pipeline_id,
        dag_id=PIPELINE_DAG_ID,
        status=run_status.overall_status(run.state, current, run.note, skipped["task"] if skipped else None),
        state=run.state,
        progress=progress,
        current_stage=current,
        skipped=skipped,
        tasks=details.tasks,
        start_date=run.start_date,
        end_date=run.end_date,
        estimated_completion=run_status.estimated_completion(progress, details.xcoms),
        metrics=run_status.run_metrics(details.xcoms, run.start_date, run.end_date),
        note=run.note,
    )


@router.post(
    "/abort/{pipeline_id}",
    response_model=AbortResponse,
    responses={
        **deps.COMMON_ERRORS,
        404: {"description": "No such pipeline"},
        409: {"description": "Already succeeded"},
    },
)
def abort_pipeline(
    _: deps.CanEditRuns,
    user: deps.CurrentUser,
    config: deps.ConfigDep,
    pipeline_id: Annotated[str, deps.identifier()],
    body: Annotated[AbortRequest, Body(default_factory=AbortRequest)],
) -> AbortResponse:
    """Fail the run, cancel its fine-tuning job, stop its A/B test, delete its temporary files.

    Idempotent: aborting an aborted (failed) run repeats the cleanup and reports it again.
    """
    note = f"{run_status.ABORT_NOTE} by {user.get_name()}: {body.reason}"
    failed = airflow_runs.fail_run(pipeline_id, note, user)
    cleanup = abort_run(
        airflow_runs.with_openai_connection(config),
        PIPELINE_DAG_ID,
        pipeline_id,
        training=failed.xcoms.get("train"),
        ab_test_id=failed.xcoms.get("ab_create", {}).get("ab_test_id"),
    )
    cleaned = (["dag_run_failed"] if failed.failed_now else []) + cleanup.cleaned
    log.warning("pipeline %s aborted by %s (%s): %s", pipeline_id, user.get_name(), body.reason, cleaned)
    return AbortResponse(
        pipeline_id=pipeline_id,
        status="aborted",
        cleanup_status="partial" if cleanup.problems else "completed",
        reason=body.reason,
        resources_cleaned=cleaned,
        details=cleanup.details,
    )
