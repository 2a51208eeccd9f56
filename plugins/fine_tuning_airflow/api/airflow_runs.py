"""Every read and write of Airflow's own records, in one module: the pipeline's runs (find,
trigger, fail, note), their task states and XComs, and the ``openai_default`` connection.

These are the functions Airflow's REST API v2 uses, called in the API server's process. A
pipeline is a run of the ``weekly_fine_tuning`` DAG; ``pipeline_id`` is its run id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from airflow.api.common.mark_tasks import set_dag_run_state_to_failed
from airflow.api.common.trigger_dag import trigger_dag
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.common.dagbag import get_dag_for_run
from airflow.api_fastapi.core_api.services.public.dag_run import patch_dag_run_note
from airflow.exceptions import (
    AirflowNotFoundException,
    DagNotFound,
    DagRunAlreadyExists,
    ParamValidationError,
)
from airflow.models.connection import Connection
from airflow.models.dagbag import DBDagBag
from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from airflow.utils.state import DagRunState
from airflow.utils.types import DagRunTriggeredByType
from fastapi import HTTPException, status
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fine_tuning.config import PipelineConfig
from fine_tuning.step_graph import SKIP_REASON_KEY
from fine_tuning_airflow.api.deps import PIPELINE_DAG_ID
from fine_tuning_airflow.hooks import OpenAIFineTuningHook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineRun:
    """A run of the pipeline DAG as the API reports it. ``xcoms``: each task's return value (the
    step manifests: ids, counts, checksums; never data)."""

    run_id: str
    dag_id: str
    state: str
    logical_date: datetime | None
    run_after: datetime | None
    start_date: datetime | None
    end_date: datetime | None
    conf: dict[str, Any]
    note: str | None


@dataclass(frozen=True)
class RunDetails:
    """A run with its tasks' states and its step manifests (by task id)."""

    run: PipelineRun
    tasks: dict[str, str | None]
    xcoms: dict[str, dict[str, Any]]
    # Why a skipped step skipped, by task id (the step's ``skip_reason`` XCom).
    skip_reasons: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FailedRun:
    """A run that was failed (``failed_now``) or had failed before, with its step manifests."""

    failed_now: bool
    xcoms: dict[str, dict[str, Any]]


def aware(value: datetime | None) -> datetime | None:
    """A datetime in UTC (Airflow's may come back naive)."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _state(value: Any) -> str:
    return str(value.value if hasattr(value, "value") else value)


def _snapshot(dag_run: DagRun) -> PipelineRun:
    return PipelineRun(
        run_id=dag_run.run_id,
        dag_id=dag_run.dag_id,
        state=_state(dag_run.state),
        logical_date=dag_run.logical_date,
        run_after=dag_run.run_after,
        start_date=aware(dag_run.start_date),
        end_date=aware(dag_run.end_date),
        conf=dict(dag_run.conf or {}),
        note=dag_run.note,
    )


def _find_run(session: Session, run_id: str) -> DagRun:
    dag_run = session.scalar(select(DagRun).where(DagRun.dag_id == PIPELINE_DAG_ID, DagRun.run_id == run_id))
    if dag_run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no pipeline (run of {PIPELINE_DAG_ID}) {run_id!r}")
    return dag_run


def _task_states(session: Session, run_id: str) -> dict[str, str | None]:
    rows = session.execute(
        select(TaskInstance.task_id, TaskInstance.state).where(
            TaskInstance.dag_id == PIPELINE_DAG_ID, TaskInstance.run_id == run_id
        )
    ).all()
    return {task_id: (_state(state) if state else None) for task_id, state in rows}


def _xcom_values(session: Session, run_id: str, key: str) -> dict[str, Any]:
    """The run's XComs under ``key``, by task id (unmapped tasks). An unreadable one is logged and
    left out: the read of the run still answers."""
    rows = session.scalars(
        select(XComModel).where(
            XComModel.dag_id == PIPELINE_DAG_ID,
            XComModel.run_id == run_id,
            XComModel.key == key,
            XComModel.map_index == -1,
        )
    ).all()
    values: dict[str, Any] = {}
    for row in rows:
        try:
            values[row.task_id] = XComModel.deserialize_value(row)
        except Exception as exc:  # noqa: BLE001 - one bad XCom must not hide the rest of the run
            log.warning("run %s: XCom %r of task %s is unreadable: %s", run_id, key, row.task_id, exc)
    return values


def _xcoms(session: Session, run_id: str) -> dict[str, dict[str, Any]]:
    """The step manifests (each task's return value)."""
    return {k: v for k, v in _xcom_values(session, run_id, "return_value").items() if isinstance(v, dict)}


def _skip_reasons(session: Session, run_id: str) -> dict[str, str]:
    return {k: str(v) for k, v in _xcom_values(session, run_id, SKIP_REASON_KEY).items()}


def read_run(run_id: str) -> RunDetails:
    """The run, its task states and its step manifests; 404 when there is no such run."""
    with create_session() as session:
        dag_run = _find_run(session, run_id)
        return RunDetails(
            _snapshot(dag_run),
            _task_states(session, run_id),
            _xcoms(session, run_id),
            _skip_reasons(session, run_id),
        )


def count_active_runs() -> int:
    """The pipeline's runs queued or running now."""
    with create_session() as session:
        active = DagRun.state.in_([DagRunState.QUEUED, DagRunState.RUNNING])
        count = session.scalar(
            select(func.count()).select_from(DagRun).where(DagRun.dag_id == PIPELINE_DAG_ID, active)
        )
    return int(count or 0)


def trigger_run(
    run_id: str, conf: dict[str, Any], logical_date: datetime | None, user: BaseUser
) -> PipelineRun:
    """Queue a run as Airflow's ``POST dagRuns`` does, triggered by ``user`` over the REST API.

    409 when the DAG is not parsed yet (the client can retry once the dag processor ran) or the
    run id is taken; 422 for a conf its Params refuse or a date before the DAG's start.
    """
    with create_session() as session:
        try:
            dag_run = trigger_dag(
                PIPELINE_DAG_ID,
                triggered_by=DagRunTriggeredByType.REST_API,
                triggering_user_name=user.get_name(),
                run_id=run_id,
                conf=conf,
                logical_date=aware(logical_date),
                session=session,
            )
        except DagNotFound:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"DAG {PIPELINE_DAG_ID} is not parsed yet"
            ) from None
        except DagRunAlreadyExists:
            raise HTTPException(status.HTTP_409_CONFLICT, f"run {run_id} already exists") from None
        except (ParamValidationError, ValueError) as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        if dag_run is None:  # trigger_dag returns None for a DAG it cannot find in the DagBag
            raise HTTPException(status.HTTP_409_CONFLICT, f"DAG {PIPELINE_DAG_ID} is not parsed yet")
        session.flush()
        return _snapshot(dag_run)


def fail_run(run_id: str, note: str, user: BaseUser) -> FailedRun:
    """Fail the run unless it already failed, and set its note (by ``user``); its step manifests
    are read once it stopped. 404 for no such run, 409 for one that succeeded (nothing to abort).
    """
    with create_session() as session:
        dag_run = _find_run(session, run_id)
        state = _state(dag_run.state)
        if state == "success":
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"pipeline {run_id} already succeeded; nothing to abort"
            )
        failed_now = state != "failed"
        if failed_now:
            dag = get_dag_for_run(DBDagBag(), dag_run, session=session)
            # The same call as Airflow's PATCH dagRuns {"state": "failed"}: running tasks fail
            # (their workers are told to stop; the wait's on_kill cancels the job too).
            set_dag_run_state_to_failed(dag=dag, run_id=run_id, commit=True, session=session)
        patch_dag_run_note(dag_run=_find_run(session, run_id), note=note, user=user)
        return FailedRun(failed_now, _xcoms(session, run_id))


def with_openai_connection(config: PipelineConfig) -> PipelineConfig:
    """The config with the ``openai_default`` connection's key and URL, as the hook applies them,
    read as the API server can: the Task SDK's ``BaseHook.get_connection`` is for workers, the
    server reads its secrets backends and metadata DB."""
    try:
        conn = Connection.get_connection_from_secrets(OpenAIFineTuningHook.default_conn_name)
    except AirflowNotFoundException:
        conn = None
    return OpenAIFineTuningHook.with_credentials(config, *OpenAIFineTuningHook.from_connection(conn))
