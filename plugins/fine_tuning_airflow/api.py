"""The pipeline's domain REST API, served by the Airflow API server under ``/pipeline``.

Airflow mounts a plugin's FastAPI app without its own authentication (the core API's router
dependency does not reach a mounted app), so every route here states its access with Airflow's
own dependencies: a request without a valid token gets 401, a user without the DAG permission
403. Reads need read access to the DAG's runs, writes need edit/trigger access. ``/health`` and
``/metrics`` are public, like Airflow's ``/api/v2/monitor/health``, for probes and Prometheus.

A pipeline is a run of the ``weekly_fine_tuning`` DAG: ``pipeline_id`` is its run id. Runs are
triggered, read and failed with Airflow's internals (the same functions its REST API v2 uses);
A/B tests and deployments are the library's records in PostgreSQL and Redis.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Body, Depends, FastAPI, HTTPException, Path as PathParam, status
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag

if TYPE_CHECKING:
    from fine_tuning.config import PipelineConfig

log = logging.getLogger(__name__)

PIPELINE_DAG_ID = "weekly_fine_tuning"
ROLLOUT_DAG_ID = "rollout_monitor"
URL_PREFIX = "/pipeline"

# The design's four stages and the DAG's tasks that make each one.
STAGES: dict[str, tuple[str, ...]] = {
    "data_collection": ("collect",),
    "model_training": ("upload", "train", "wait", "register"),
    "evaluation": ("ab_create", "evaluate"),
    "deployment": ("deploy",),
}
# What a running pipeline is doing, by stage (the design's "status": "training").
STAGE_ACTIVITY = {
    "data_collection": "collecting",
    "model_training": "training",
    "evaluation": "evaluating",
    "deployment": "deploying",
}
ABORT_NOTE = "aborted via /pipeline/fine-tuning/abort"

# Kept as module-level objects so that a test (the OpenAPI fuzz) can override them in
# ``app.dependency_overrides``; Airflow builds a new closure on every call of the factory.
read_pipeline_runs = requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN, param_dag_id=PIPELINE_DAG_ID)
trigger_pipeline_runs = requires_access_dag(
    method="POST", access_entity=DagAccessEntity.RUN, param_dag_id=PIPELINE_DAG_ID
)
edit_pipeline_runs = requires_access_dag(method="PUT", access_entity=DagAccessEntity.RUN, param_dag_id=PIPELINE_DAG_ID)
read_pipeline = requires_access_dag(method="GET", param_dag_id=PIPELINE_DAG_ID)
edit_pipeline = requires_access_dag(method="PUT", param_dag_id=PIPELINE_DAG_ID)
edit_rollouts = requires_access_dag(method="PUT", param_dag_id=ROLLOUT_DAG_ID)



def identifier() -> Any:
    """A path id (run ids hold ``:`` and ``+``); one object per parameter: FastAPI binds it to a name."""
    return PathParam(min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_.:+@~-]+$")

COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid token"},
    403: {"description": "The user lacks the DAG permission"},
}


# -- request and response bodies ---------------------------------------------------------------
class _Body(BaseModel):
    # A typo in a request is an error that names the field, not a silently ignored key.
    model_config = ConfigDict(extra="forbid")


class StartConfig(_Body):
    """Per-run overrides (the DAG's params); unset keeps the configured value."""

    training_data_threshold: int | None = Field(None, ge=10)
    engagement_threshold: float | None = Field(None, ge=0.0, le=1.0)
    days_back: int | None = Field(None, ge=1, le=366)
    max_records: int | None = Field(None, ge=1)
    base_model: str | None = Field(None, min_length=1, max_length=200)
    n_epochs: Literal["auto"] | int | None = None
    max_training_cost_usd: float | None = Field(None, ge=0)
    traffic_split: float | None = Field(None, gt=0.0, lt=1.0)
    a_b_test_duration_hours: float | None = Field(None, gt=0)
    evaluation_interval_minutes: float | None = Field(None, gt=0)
    strict_power: bool | None = None
    deployment_strategy: Literal["gradual_rollout", "immediate"] | None = None
    # In the design's body, but the schedule is the DAG's, not a run's: accepted, checked, unused.
    weekly_schedule: str | None = Field(None, max_length=100)

    @model_validator(mode="after")
    def _epochs_range(self) -> StartConfig:
        if isinstance(self.n_epochs, int) and not 1 <= self.n_epochs <= 50:
            raise ValueError(f"config.n_epochs must be 'auto' or 1-50, got {self.n_epochs}")
        return self


class StartRequest(_Body):
    config: StartConfig = Field(default_factory=StartConfig)
    force_run: bool = Field(
        False, description="Trigger even if a run is already active or fine_tuning_enabled is false."
    )
    logical_date: datetime | None = Field(
        None, description="The week to train on (its data interval); default: the week before now."
    )


class StartResponse(BaseModel):
    status: Literal["success"]
    pipeline_id: str
    dag_id: str
    state: str
    logical_date: datetime | None
    run_after: datetime | None
    conf: dict[str, Any]
    ignored_config: list[str]
    # The run is asynchronous: these are known once its tasks ran (see the status endpoint).
    model_version: dict[str, Any] | None = None
    training_data: dict[str, Any] | None = None
    links: dict[str, str]


class StatusResponse(BaseModel):
    pipeline_id: str
    dag_id: str
    status: str
    state: str
    progress: dict[str, str]
    current_stage: str | None
    tasks: dict[str, str | None]
    start_date: datetime | None
    end_date: datetime | None
    estimated_completion: datetime | None
    metrics: dict[str, Any]
    note: str | None = None


class AbortRequest(_Body):
    reason: str = Field("user_requested", min_length=1, max_length=500)


class AbortResponse(BaseModel):
    pipeline_id: str
    status: Literal["aborted"]
    cleanup_status: Literal["completed", "partial"]
    reason: str
    resources_cleaned: list[str]
    details: dict[str, Any]


# Model ids are printable text (OpenAI's, "ft:...", "selfhosted:..."); no control characters,
# which PostgreSQL text and the agent's routing cannot hold.
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"


class ModelRef(_Body):
    model_id: str = Field(min_length=1, max_length=200, pattern=PRINTABLE)
    version: str | None = Field(None, max_length=100, pattern=PRINTABLE)


class ABSuccessCriteria(_Body):
    min_engagement_lift: float | None = Field(None, gt=0)
    min_cost_efficiency_gain: float | None = Field(None, ge=0)
    significance_threshold: float | None = Field(None, gt=0.0, lt=1.0)


class CreateABTestRequest(_Body):
    baseline_model: ModelRef
    candidate_model: ModelRef
    traffic_split: float = Field(0.1, gt=0.0, lt=1.0)
    duration_hours: float = Field(168, gt=0, le=24 * 366)
    success_criteria: ABSuccessCriteria = Field(default_factory=ABSuccessCriteria)
    model_type: Literal["hook", "body"] | None = None

    @model_validator(mode="after")
    def _different_models(self) -> CreateABTestRequest:
        if self.baseline_model.model_id == self.candidate_model.model_id:
            raise ValueError("candidate_model.model_id must differ from baseline_model.model_id")
        return self


class CreateABTestResponse(BaseModel):
    ab_test_id: str
    status: str
    model_type: str
    start_time: datetime
    estimated_end_time: datetime
    traffic_allocation: dict[str, float]
    power_plan: dict[str, Any]
    monitoring_endpoints: dict[str, str]


class ABMetricsResponse(BaseModel):
    ab_test_id: str
    status: str
    duration_hours: float
    metrics: dict[str, dict[str, Any]]
    performance_comparison: dict[str, float | None]
    statistical_analysis: dict[str, Any]
    recommendation: str
    cached: bool


class EvaluationResult(_Body):
    ab_test_id: str = Field(min_length=1, max_length=250)
    recommendation: Literal["promote", "reject", "continue"]
    safety_checks_passed: bool


class RolloutOverrides(_Body):
    initial_traffic: float | None = Field(None, gt=0.0, le=1.0)
    increment_interval_hours: float | None = Field(None, gt=0)
    increment_percentage: float | None = Field(None, gt=0.0, le=1.0)
    max_traffic: float | None = Field(None, gt=0.0, le=1.0)


class DeployRequest(_Body):
    model_version: ModelRef
    evaluation_result: EvaluationResult
    deployment_strategy: Literal["gradual_rollout", "immediate"] = "gradual_rollout"
    rollout_config: RolloutOverrides = Field(default_factory=RolloutOverrides)


class DeploymentResponse(BaseModel):
    deployment_id: str
    status: str
    deployment_strategy: str
    ab_test_id: str | None
    candidate_model: str
    previous_model: str
    current_traffic: float
    rollback_reason: str | None
    rollback_plan: dict[str, Any]
    monitoring: dict[str, Any]
    events: list[dict[str, Any]]


class RollbackRequest(_Body):
    reason: str = Field("user_requested", min_length=1, max_length=500)


# -- helpers -----------------------------------------------------------------------------------
def pipeline_config(overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The typed config (defaults < file < environment < overrides); a bad override is a 422."""
    from fine_tuning.config import ConfigError, load_config

    try:
        return load_config(params=overrides)
    except ConfigError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def with_openai_connection(config: PipelineConfig, conn_id: str = "openai_default") -> PipelineConfig:
    """The config with the ``openai_default`` connection's key and URL, read as the API server can
    (the Task SDK's ``BaseHook`` is for workers; the server reads secrets backends and its DB)."""
    from pydantic import SecretStr

    try:
        from airflow.models.connection import Connection

        conn = Connection.get_connection_from_secrets(conn_id)
    except Exception:  # not found, or no metadata DB: keep the environment's values
        return config
    services = config.services.model_copy(
        update={
            "openai_api_key": SecretStr(conn.password) if conn.password else config.services.openai_api_key,
            "openai_base_url": conn.host or config.services.openai_base_url,
        }
    )
    return config.model_copy(update={"services": services})


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _stage_state(states: list[str | None]) -> str:
    """One stage's progress from its tasks' states."""
    if any(s in ("failed", "upstream_failed") for s in states):
        return "failed"
    if states and all(s == "skipped" for s in states):
        return "skipped"
    if states and all(s in ("success", "skipped") for s in states):
        return "completed"
    if any(s not in (None, "none", "removed") for s in states):
        return "in_progress"
    return "pending"


def _find_run(session: Any, run_id: str) -> Any:
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    dag_run = session.scalar(select(DagRun).where(DagRun.dag_id == PIPELINE_DAG_ID, DagRun.run_id == run_id))
    if dag_run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no pipeline (run of {PIPELINE_DAG_ID}) {run_id!r}")
    return dag_run


def _task_states(session: Any, run_id: str) -> dict[str, str | None]:
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    rows = session.execute(
        select(TaskInstance.task_id, TaskInstance.state).where(
            TaskInstance.dag_id == PIPELINE_DAG_ID, TaskInstance.run_id == run_id
        )
    ).all()
    return {task_id: (str(state.value if hasattr(state, "value") else state) if state else None) for task_id, state in rows}


def _xcoms(session: Any, run_id: str) -> dict[str, Any]:
    """Each task's return value (the step manifests: ids, counts, checksums; never data)."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    rows = session.scalars(
        select(XComModel).where(
            XComModel.dag_id == PIPELINE_DAG_ID,
            XComModel.run_id == run_id,
            XComModel.key == "return_value",
            XComModel.map_index == -1,
        )
    ).all()
    values: dict[str, Any] = {}
    for row in rows:
        try:
            values[row.task_id] = XComModel.deserialize_value(row)
        except Exception:  # an unreadable XCom leaves its metrics out, it does not fail the read
            continue
    return {k: v for k, v in values.items() if isinstance(v, dict)}


def _run_metrics(xcoms: dict[str, Any], started: datetime | None, ended: datetime | None) -> dict[str, Any]:
    """The design's status metrics, from the step manifests."""
    collect, train, wait = xcoms.get("collect", {}), xcoms.get("train", {}), xcoms.get("wait", {})
    register, ab, deploy = xcoms.get("register", {}), xcoms.get("ab_create", {}), xcoms.get("deploy", {})
    metrics: dict[str, Any] = {}
    if collect:
        metrics.update(
            training_examples=collect.get("examples_written"),
            posts_scanned=collect.get("posts_scanned"),
            examples_rejected=sum((collect.get("rejected") or {}).values()),
            training_tokens=collect.get("tokens"),
            data_window_start=collect.get("window_start"),
            data_window_end=collect.get("window_end"),
            collection_seconds=collect.get("seconds"),
        )
    if train:
        metrics.update(
            training_job_id=train.get("job_id"),
            training_file_id=train.get("file_id"),
            base_model=train.get("base_model"),
            estimated_training_cost_usd=train.get("estimated_cost_usd"),
        )
    if wait:
        metrics.update(job_status=wait.get("status"), fine_tuned_model=wait.get("fine_tuned_model"),
                       trained_tokens=wait.get("trained_tokens"))
        if wait.get("created_at") and wait.get("finished_at"):
            metrics["training_duration_minutes"] = round((wait["finished_at"] - wait["created_at"]) / 60, 2)
    if register:
        metrics.update(model_name=register.get("model_name"), model_version=register.get("model_version"),
                       mlflow_run_id=register.get("mlflow_run_id"))
    if ab:
        metrics["ab_test_id"] = ab.get("ab_test_id")
    if xcoms.get("evaluate"):
        metrics["ab_decision"] = xcoms["evaluate"].get("decision")
    if deploy:
        metrics.update(deployment_id=deploy.get("deployment_id"), current_traffic=deploy.get("current_traffic"))
    if started:
        metrics["execution_time_seconds"] = round(((ended or datetime.now(UTC)) - started).total_seconds(), 1)
    return metrics


def _deployment_body(record: dict[str, Any], config: PipelineConfig) -> DeploymentResponse:
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
            {"at": e["at"], "kind": e["kind"], "traffic": e["traffic"]} for e in record.get("events", [])
        ],
    )


# -- the app -----------------------------------------------------------------------------------
app = FastAPI(
    title="Fine-tuning pipeline API",
    version="1.0.0",
    description=(
        "The weekly fine-tuning pipeline's domain endpoints, served by the Airflow API server under "
        "`/pipeline`. Authenticate with a token from `POST /auth/token` (`Authorization: Bearer`); "
        "`/health` and `/metrics` are public."
    ),
)


@app.post(
    "/fine-tuning/start",
    response_model=StartResponse,
    status_code=status.HTTP_201_CREATED,
    responses={**COMMON_ERRORS, 409: {"description": "A run is already active (use force_run)"}},
    dependencies=[Depends(trigger_pipeline_runs)],
)
def start_pipeline(user: GetUserDep, body: StartRequest = Body(default_factory=StartRequest)) -> StartResponse:
    """Trigger a run of ``weekly_fine_tuning`` with the given config as its conf."""
    import uuid

    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.exceptions import DagNotFound, DagRunAlreadyExists, ParamValidationError
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import func, select

    conf = body.config.model_dump(exclude_none=True)
    ignored = []
    schedule = conf.pop("weekly_schedule", None)
    if schedule is not None:
        ignored.append("weekly_schedule")
    # Validate the merged config now: a bad value is a 422 here, not a failed task later.
    config = pipeline_config(conf)
    if not config.fine_tuning_enabled and not body.force_run:
        raise HTTPException(status.HTTP_409_CONFLICT, "fine_tuning_enabled is false; set force_run to run anyway")
    now = datetime.now(UTC)
    run_id = f"ft-pipeline-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    with create_session() as session:
        active = session.scalar(
            select(func.count()).select_from(DagRun).where(
                DagRun.dag_id == PIPELINE_DAG_ID, DagRun.state.in_([DagRunState.QUEUED, DagRunState.RUNNING])
            )
        )
        if active and not body.force_run:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"{active} run(s) of {PIPELINE_DAG_ID} already queued or running; set force_run to queue another",
            )
        try:
            dag_run = trigger_dag(
                PIPELINE_DAG_ID,
                triggered_by=DagRunTriggeredByType.REST_API,
                triggering_user_name=user.get_name(),
                run_id=run_id,
                conf=conf,
                logical_date=_aware(body.logical_date),
                session=session,
            )
        except DagNotFound:
            # Not parsed yet (or removed): the client can retry once the dag processor ran.
            raise HTTPException(status.HTTP_409_CONFLICT, f"DAG {PIPELINE_DAG_ID} is not parsed yet") from None
        except DagRunAlreadyExists:
            raise HTTPException(status.HTTP_409_CONFLICT, f"run {run_id} already exists") from None
        except (ParamValidationError, ValueError) as exc:  # a Param error, a date before the start date
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        session.flush()
        response = StartResponse(
            status="success",
            pipeline_id=dag_run.run_id,
            dag_id=dag_run.dag_id,
            state=str(dag_run.state.value if hasattr(dag_run.state, "value") else dag_run.state),
            logical_date=dag_run.logical_date,
            run_after=dag_run.run_after,
            conf=dict(dag_run.conf or {}),
            ignored_config=ignored,
            links={
                "status": f"{URL_PREFIX}/fine-tuning/status/{dag_run.run_id}",
                "abort": f"{URL_PREFIX}/fine-tuning/abort/{dag_run.run_id}",
                "airflow": f"/api/v2/dags/{PIPELINE_DAG_ID}/dagRuns/{dag_run.run_id}",
            },
        )
    log.info("pipeline %s triggered by %s with conf %s", run_id, user.get_name(), conf)
    return response


@app.get(
    "/fine-tuning/status/{pipeline_id}",
    response_model=StatusResponse,
    responses={**COMMON_ERRORS, 404: {"description": "No such pipeline"}},
    dependencies=[Depends(read_pipeline_runs)],
)
def pipeline_status(pipeline_id: str = identifier()) -> StatusResponse:
    """Stages from the run's task states, the current stage, and metrics from the step manifests."""
    from airflow.utils.session import create_session

    with create_session() as session:
        dag_run = _find_run(session, pipeline_id)
        tasks = _task_states(session, pipeline_id)
        xcoms = _xcoms(session, pipeline_id)
        state = str(dag_run.state.value if hasattr(dag_run.state, "value") else dag_run.state)
        started, ended, note = _aware(dag_run.start_date), _aware(dag_run.end_date), dag_run.note
    progress = {stage: _stage_state([tasks.get(t) for t in task_ids]) for stage, task_ids in STAGES.items()}
    current = next((s for s, p in progress.items() if p in ("in_progress", "failed")), None)
    if current is None and state in ("queued", "running"):
        current = next((s for s, p in progress.items() if p == "pending"), None)
    if state in ("queued", "running"):
        run_status = STAGE_ACTIVITY.get(current or "", state)
    elif state == "failed" and note and note.startswith(ABORT_NOTE):
        run_status = "aborted"
    else:
        run_status = {"success": "completed"}.get(state, state)
    ab = xcoms.get("ab_create", {})
    estimated = ab.get("planned_end_at") if progress["evaluation"] == "in_progress" else None
    return StatusResponse(
        pipeline_id=pipeline_id,
        dag_id=PIPELINE_DAG_ID,
        status=run_status,
        state=state,
        progress=progress,
        current_stage=current,
        tasks=tasks,
        start_date=started,
        end_date=ended,
        estimated_completion=estimated,
        metrics=_run_metrics(xcoms, started, ended),
        note=note,
    )


@app.post(
    "/fine-tuning/abort/{pipeline_id}",
    response_model=AbortResponse,
    responses={**COMMON_ERRORS, 404: {"description": "No such pipeline"}, 409: {"description": "Already succeeded"}},
    dependencies=[Depends(edit_pipeline_runs)],
)
def abort_pipeline(
    user: GetUserDep, pipeline_id: str = identifier(), body: AbortRequest = Body(default_factory=AbortRequest)
) -> AbortResponse:
    """Fail the run, cancel its fine-tuning job, stop its A/B test, delete its temporary files.

    Idempotent: aborting an aborted (failed) run repeats the cleanup and reports it again.
    """
    from airflow.api.common.mark_tasks import set_dag_run_state_to_failed
    from airflow.api_fastapi.common.dagbag import get_dag_for_run
    from airflow.models.dagbag import DBDagBag
    from airflow.utils.session import create_session
    from fine_tuning.manifests import RunContext
    from fine_tuning.steps import run_dir

    cleaned: list[str] = []
    details: dict[str, Any] = {}
    problems: list[str] = []
    with create_session() as session:
        dag_run = _find_run(session, pipeline_id)
        state = str(dag_run.state.value if hasattr(dag_run.state, "value") else dag_run.state)
        if state == "success":
            raise HTTPException(status.HTTP_409_CONFLICT, f"pipeline {pipeline_id} already succeeded; nothing to abort")
        if state != "failed":
            dag = get_dag_for_run(DBDagBag(), dag_run, session=session)
            # The same call as Airflow's PATCH dagRuns {"state": "failed"}: running tasks fail
            # (their workers are told to stop; the wait's on_kill cancels the job too).
            set_dag_run_state_to_failed(dag=dag, run_id=pipeline_id, commit=True, session=session)
            cleaned.append("dag_run_failed")
        from airflow.api_fastapi.core_api.services.public.dag_run import patch_dag_run_note

        # The note is how the status endpoint tells an aborted run from one that failed.
        patch_dag_run_note(
            dag_run=_find_run(session, pipeline_id), note=f"{ABORT_NOTE} by {user.get_name()}: {body.reason}", user=user
        )
        xcoms = _xcoms(session, pipeline_id)

    config = with_openai_connection(pipeline_config())
    job_id = (xcoms.get("train") or {}).get("job_id")
    if job_id:
        from fine_tuning.openai_training import cancel_job

        try:
            details["openai_job"] = {"job_id": job_id, "status": cancel_job(config, job_id)}
            cleaned.append("openai_job_cancelled")
        except Exception as exc:  # reported; the rest of the cleanup still runs
            problems.append(f"openai job {job_id}: {type(exc).__name__}: {exc}")
    ab_test_id = (xcoms.get("ab_create") or {}).get("ab_test_id")
    if ab_test_id:
        try:
            if _stop_ab_test(config, ab_test_id):
                cleaned.append("ab_test_stopped")
            details["ab_test_id"] = ab_test_id
        except Exception as exc:
            problems.append(f"A/B test {ab_test_id}: {type(exc).__name__}: {exc}")

    directory = run_dir(config, RunContext(dag_id=PIPELINE_DAG_ID, run_id=pipeline_id, window_end=datetime.now(UTC)))
    if directory.exists():
        files = [p for p in directory.rglob("*") if p.is_file()]
        details["temporary_files"] = {"path": str(directory), "files": len(files),
                                      "bytes": sum(p.stat().st_size for p in files)}
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            problems.append(f"could not delete {directory}")
        else:
            cleaned.extend(["temporary_files", "training_data_cache"])
    if problems:
        details["problems"] = problems
    log.warning("pipeline %s aborted by %s (%s): %s", pipeline_id, user.get_name(), body.reason, cleaned)
    return AbortResponse(
        pipeline_id=pipeline_id,
        status="aborted",
        cleanup_status="partial" if problems else "completed",
        reason=body.reason,
        resources_cleaned=cleaned,
        details=details,
    )


def _stop_ab_test(config: PipelineConfig, ab_test_id: str) -> bool:
    """Mark a running A/B test aborted and send all traffic back to its baseline."""
    from fine_tuning import db
    from fine_tuning.ab_steps import redis_client
    from fine_tuning.routing import Routing, set_routing

    with db.connect(config.services.database_url.get_secret_value()) as conn:
        row = conn.execute(
            "UPDATE ab_tests SET status = 'aborted', ended_at = now() WHERE id = %s AND status = 'running'"
            " RETURNING model_type, baseline_model",
            (ab_test_id,),
        ).fetchone()
    if row is None:
        return False
    set_routing(redis_client(config), row[0], Routing(row[1], None, 0.0, f"{ab_test_id}:aborted"))
    return True


@app.post(
    "/evaluation/create-ab-test",
    response_model=CreateABTestResponse,
    status_code=status.HTTP_201_CREATED,
    responses={
        **COMMON_ERRORS,
        409: {"description": "The test cannot start (e.g. strict power check)"},
        502: {"description": "The vLLM server did not load a self-hosted adapter"},
        503: {"description": "The vLLM breaker is open after repeated failures (see Retry-After)"},
    },
    dependencies=[Depends(edit_pipeline)],
)
def create_ab_test(body: CreateABTestRequest) -> CreateABTestResponse:
    """Record an A/B test and route ``traffic_split`` of the agent's requests to the candidate."""
    from fine_tuning import ab
    from fine_tuning.ab_steps import now_utc, redis_client

    evaluation: dict[str, Any] = {"traffic_split": body.traffic_split, "duration_hours": body.duration_hours}
    criteria = body.success_criteria
    if criteria.significance_threshold is not None:
        evaluation["significance_threshold"] = criteria.significance_threshold
    success = criteria.model_dump(exclude_none=True, exclude={"significance_threshold"})
    if success:
        evaluation["success_criteria"] = success
    if body.model_type:
        evaluation["model_type"] = body.model_type
    config = pipeline_config({"evaluation": evaluation})
    _serve(config, body.baseline_model.model_id, body.candidate_model.model_id)
    try:
        test = ab.create_ab_test(
            config,
            redis_client(config),
            baseline_model=body.baseline_model.model_id,
            candidate_model=body.candidate_model.model_id,
            candidate_version=body.candidate_model.version,
            now=now_utc(),
        )
    except ab.ABTestError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
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


def _serve(config: PipelineConfig, *model_ids: str) -> None:
    """Load self-hosted adapters into vLLM before any request is routed to them (as the DAG's
    steps do): 502 when vLLM does not, 503 with Retry-After while its breaker is open, 422 for a
    name that cannot be an adapter's."""
    from fine_tuning.breakers import CircuitOpenError
    from fine_tuning.providers.selfhosted import AdapterLoadError, serve_adapters

    try:
        serve_adapters(config, model_ids)
    except AdapterLoadError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(exc)) from None
    except CircuitOpenError as exc:
        retry_after = {"Retry-After": str(exc.retry_after_seconds)}
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers=retry_after) from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def _relative(candidate: float | None, baseline: float | None, lower_is_better: bool = False) -> float | None:
    if candidate is None or not baseline:
        return None
    change = candidate / baseline - 1
    return round(-change if lower_is_better else change, 6)


def _ab_metrics(config: PipelineConfig, test: dict[str, Any], until: datetime) -> dict[str, Any]:
    """Per-arm metrics, comparison and a read-only analysis (evaluations are the DAG's job)."""
    from fine_tuning import ab, stats

    aggregates = ab.arm_aggregates(
        config.services.database_url.get_secret_value(),
        test["baseline_model"], test["candidate_model"], test["started_at"], until,
    )
    arms = ab.summaries(aggregates)
    b, c = arms["baseline"], arms["candidate"]
    comparison = {
        "engagement_lift": _relative(c["engagement_rate"], b["engagement_rate"]),
        "cost_efficiency_gain": _relative(c["cost_per_token"], b["cost_per_token"], lower_is_better=True),
        "quality_improvement": _relative(c["quality_score"], b["quality_score"]),
        "latency_improvement": _relative(c["response_time_ms"], b["response_time_ms"], lower_is_better=True),
    }
    analysis: dict[str, Any]
    try:
        if aggregates["baseline"]["eng_n"] < 2 or aggregates["candidate"]["eng_n"] < 2:
            raise stats.AnalysisInputError("fewer than 2 scored posts in an arm")
        result = ab.analyze_aggregates(
            aggregates, test["traffic_split"], test["success_criteria"], test["min_sequential_p"],
            finished=until >= test["planned_end_at"],
        )
        alpha = test["success_criteria"].get("significance_threshold", 0.05)
        analysis = {
            "is_significant": result.p_value < alpha,
            "confidence_level": 1 - alpha,
            "method": result.method,
            "p_value": result.p_value,
            "relative_lift": result.relative_lift,
            "ci_lower": result.ci_lower,
            "ci_upper": result.ci_upper,
            "srm_p_value": result.srm_p_value,
            "srm_ok": result.srm_ok,
            "decision": result.decision,
        }
    except stats.AnalysisInputError as exc:
        analysis = {"is_significant": False, "decision": "continue", "note": str(exc)}
    return {"metrics": arms, "performance_comparison": comparison, "statistical_analysis": analysis}


@app.get(
    "/evaluation/metrics/{ab_test_id}",
    response_model=ABMetricsResponse,
    responses={**COMMON_ERRORS, 404: {"description": "No such A/B test"}},
    dependencies=[Depends(read_pipeline)],
)
def ab_test_metrics(ab_test_id: str = identifier()) -> ABMetricsResponse:
    """The A/B test's per-arm metrics from SQL, cached in Redis for ``metrics_cache_ttl_seconds``."""
    from fine_tuning import ab
    from fine_tuning.ab_steps import now_utc
    from fine_tuning.cache import MetricsCache

    config = pipeline_config()
    try:
        test = ab.get_ab_test(config, ab_test_id)
    except ab.UnknownABTest as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    now = now_utc()
    until = min(now, test["ended_at"]) if test["ended_at"] else now
    computed = False

    def compute() -> dict[str, Any]:
        nonlocal computed
        computed = True
        return _ab_metrics(config, test, until)

    ttl = config.evaluation.metrics_cache_ttl_seconds
    if ttl > 0:
        # The key holds the test's status: a decision made since the last read is never hidden.
        cache = MetricsCache.from_config(config)
        body = cache.get_or_compute(f"ab_metrics:{ab_test_id}:{test['status']}:{test['looks']}", compute, ttl)
    else:
        body = compute()
    decision = test["status"] if test["status"] != "running" else body["statistical_analysis"].get("decision", "continue")
    return ABMetricsResponse(
        ab_test_id=ab_test_id,
        status=test["status"],
        duration_hours=round((until - test["started_at"]).total_seconds() / 3600, 3),
        recommendation=decision,
        cached=not computed,
        **body,
    )


@app.post(
    "/deployment/deploy",
    response_model=DeploymentResponse,
    status_code=status.HTTP_201_CREATED,
    responses={
        **COMMON_ERRORS,
        404: {"description": "No such A/B test"},
        409: {"description": "A safety check refused the deployment"},
        502: {"description": "The vLLM server did not load a self-hosted adapter"},
        503: {"description": "The vLLM breaker is open after repeated failures (see Retry-After)"},
    },
    dependencies=[Depends(edit_rollouts)],
)
def deploy(body: DeployRequest) -> DeploymentResponse:
    """Start rolling out the A/B test's candidate, after the library's safety checks."""
    import psycopg
    from fine_tuning import ab, rollout
    from fine_tuning.ab_steps import now_utc, redis_client

    result = body.evaluation_result
    if result.recommendation != "promote" or not result.safety_checks_passed:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"evaluation_result says recommendation={result.recommendation!r}, "
            f"safety_checks_passed={result.safety_checks_passed}: refusing to deploy",
        )
    overrides = body.rollout_config.model_dump(exclude_none=True)
    config = pipeline_config(
        {"deployment": {"strategy": body.deployment_strategy, **({"rollout_config": overrides} if overrides else {})}}
    )
    try:
        test = ab.get_ab_test(config, result.ab_test_id)
        if test["candidate_model"] != body.model_version.model_id:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"model_version.model_id {body.model_version.model_id!r} is not the candidate of "
                f"A/B test {result.ab_test_id} ({test['candidate_model']!r})",
            )
        _serve(config, test["baseline_model"], test["candidate_model"])
        record = rollout.deploy(config, redis_client(config), result.ab_test_id, now_utc(), body.deployment_strategy)
    except ab.UnknownABTest as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except rollout.DeploymentRefused as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except psycopg.errors.UniqueViolation:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"another rollout of {test['model_type']} models is active"
        ) from None
    return _deployment_body(record, config)


@app.post(
    "/deployment/rollback/{deployment_id}",
    response_model=DeploymentResponse,
    responses={**COMMON_ERRORS, 404: {"description": "No such deployment"}},
    dependencies=[Depends(edit_rollouts)],
)
def rollback(
    user: GetUserDep,
    deployment_id: str = identifier(),
    body: RollbackRequest = Body(default_factory=RollbackRequest),
) -> DeploymentResponse:
    """Send all traffic back to the previous model now (one atomic switch) and record why."""
    from fine_tuning import rollout
    from fine_tuning.ab_steps import now_utc, redis_client

    config = pipeline_config()
    try:
        record = rollout.rollback(
            config, redis_client(config), deployment_id, f"manual by {user.get_name()}: {body.reason}", now_utc()
        )
    except rollout.UnknownDeployment as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    return _deployment_body(record, config)


@app.get(
    "/health",
    responses={200: {"description": "Every required dependency answers"}, 503: {"description": "One does not"}},
)
def health() -> JSONResponse:
    """Public: each dependency's probe and each breaker's state; 503 when a required one is down.

    Each call also sends the pool and breaker gauges over StatsD: the Kubernetes probe that
    polls this keeps them current in Prometheus."""
    from fine_tuning.health import check_health

    report = check_health(pipeline_config(), emit_metrics=True)
    return JSONResponse(report.model_dump(mode="json"), status_code=report.http_status)


@app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
def metrics() -> PlainTextResponse:
    """Public: the health facts as Prometheus text (scraped by Prometheus)."""
    from fine_tuning.health import PROMETHEUS_CONTENT_TYPE, check_health, prometheus_text

    return PlainTextResponse(prometheus_text(check_health(pipeline_config())), media_type=PROMETHEUS_CONTENT_TYPE)


fastapi_app = {"app": app, "url_prefix": URL_PREFIX, "name": "Fine-tuning pipeline API"}
