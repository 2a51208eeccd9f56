"""Operators that run the library's steps, in the worker (local mode) or in a pod (kubernetes).

One switch, ``FINE_TUNING_MODE`` (``local`` or ``kubernetes``), picks how a step runs; the DAG's
shape is the same in both. The wait for the fine-tuning job is deferrable in both modes: a
trigger in the triggerer polls, no worker slot or pod is held for hours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from fine_tuning_airflow.breaker_operator import CircuitBreakerOperator

if TYPE_CHECKING:
    from airflow.sdk import Context
    from fine_tuning.config import PipelineConfig
    from fine_tuning.manifests import RunContext

MODE_ENV = "FINE_TUNING_MODE"


def run_context(context: Context) -> RunContext:
    """dag_id, run_id and the end of the run's data window (a backfill gets its own week)."""
    from fine_tuning.manifests import RunContext

    dag_run = context["dag_run"]
    window_end: datetime = (
        context.get("data_interval_end") or context.get("logical_date") or dag_run.run_after
    )
    return RunContext(dag_id=dag_run.dag_id, run_id=dag_run.run_id, window_end=window_end)


def resolve_config(context: Context, openai_conn_id: str) -> PipelineConfig:
    """Defaults < config file < environment < this run's params, then the Airflow connections
    (OpenAI's key and URL; the posts database, Redis and MLflow where those connections exist)."""
    from fine_tuning.config import load_config

    from fine_tuning_airflow.hooks import OpenAIFineTuningHook, ServiceConnectionsHook

    params = {k: v for k, v in dict(context["params"]).items()}
    config = ServiceConnectionsHook().apply_to(load_config(params=params))
    return OpenAIFineTuningHook(openai_conn_id).apply_to(config)


def _fail_fast(exc: BaseException) -> BaseException:
    """Errors a retry cannot fix fail the task at once instead of burning its retries."""
    from airflow.sdk.exceptions import AirflowFailException
    from fine_tuning.config import ConfigError
    from fine_tuning.openai_training import TrainingRefusedError
    from fine_tuning.steps import CostLimitExceeded

    if isinstance(exc, ConfigError | CostLimitExceeded | TrainingRefusedError):
        return AirflowFailException(str(exc))
    return exc


# The breakers a step checks before it starts (and fails fast on, retrying after the open time).
# ``register`` checks none: while MLflow is down it queues the registration and succeeds.
STEP_BREAKERS: dict[str, tuple[str, ...]] = {"upload": ("openai",), "train": ("openai",)}


class FineTuningStepOperator(CircuitBreakerOperator):
    """Run one library step (``collect``, ``upload``, ``train``, ``register``) in the worker.

    Upstream manifests are read from the upstream tasks' XComs; the step's own manifest (ids,
    counts, checksums, paths — never data) is returned as this task's XCom. An open breaker of
    the step's service fails the task fast, to be retried after the open time.
    """

    template_fields: Sequence[str] = ("step",)
    ui_color = "#e8f4ff"

    def __init__(self, *, step: str, openai_conn_id: str = "openai_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.openai_conn_id = openai_conn_id

    def breakers_for_task(self) -> Sequence[str]:
        return STEP_BREAKERS.get(self.step, ())

    def pipeline_config(self, context: Context) -> PipelineConfig:
        return resolve_config(context, self.openai_conn_id)

    def execute_guarded(self, context: Context, config: PipelineConfig) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException
        from fine_tuning.ab_steps import CandidateRejected
        from fine_tuning.steps import STEP_INPUTS, InsufficientDataError, run_step, task_id

        inputs = {name: context["ti"].xcom_pull(task_ids=task_id(name)) for name in STEP_INPUTS[self.step]}
        try:
            manifest = run_step(self.step, config, run_context(context), inputs)
        except InsufficientDataError as exc:
            raise AirflowSkipException(f"not enough training data: {exc}") from exc
        except CandidateRejected as exc:
            raise AirflowSkipException(str(exc)) from exc
        except Exception as exc:
            raise _fail_fast(exc) from exc
        return manifest.model_dump(mode="json")


class WaitForFineTuningJobOperator(CircuitBreakerOperator):
    """Wait for the fine-tuning job without holding a worker: defer to :class:`FineTuningJobTrigger`.

    Succeeds with the job's result (fine-tuned model id, trained tokens) as XCom; fails with
    OpenAI's error message when the job fails or is cancelled. ``on_kill`` cancels the job.
    Checks the ``openai`` breaker first; the trigger waits out an open breaker between polls.
    """

    breaker_names = ("openai",)

    template_fields: Sequence[str] = ("job_id", "provider")
    ui_color = "#fff3d6"

    def __init__(
        self,
        *,
        job_id: str,
        openai_conn_id: str = "openai_default",
        provider: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.job_id = job_id
        self.openai_conn_id = openai_conn_id
        # None: the run's ``training.provider`` (the DAG's shape does not name a provider).
        self.provider = provider

    def pipeline_config(self, context: Context) -> PipelineConfig:
        return resolve_config(context, self.openai_conn_id)

    def execute_guarded(self, context: Context, config: PipelineConfig) -> dict[str, Any] | None:
        from fine_tuning.openai_training import TERMINAL_STATES, retrieve_job
        from fine_tuning.providers import get_provider

        from fine_tuning_airflow.triggers import FineTuningJobTrigger, trigger_config

        provider_name = self.provider or config.training.provider
        if provider_name == "openai":
            job = retrieve_job(config, self.job_id)
            if job.status in TERMINAL_STATES:  # a retry after the job ended needs no trigger
                return self._finish(context, job.model_dump(mode="json"))
        else:
            status = get_provider(config, provider_name).status(self.job_id)
            if status.terminal:
                return self._finish_status(context, provider_name, status.as_dict())
        self.defer(
            trigger=FineTuningJobTrigger(
                job_id=self.job_id,
                openai_conn_id=self.openai_conn_id,
                poll_interval=config.training.poll_interval_seconds,
                provider=provider_name,
                config=trigger_config(config),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=config.training.timeout_seconds),
        )
        return None

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowException

        if event.get("status") == "success" and "result" in event:  # a provider other than OpenAI
            return self._finish_status(context, event["provider"], event["result"])
        if event.get("status") != "success" or "job" not in event:
            raise AirflowException(event.get("message") or f"fine-tuning job {self.job_id}: {event}")
        return self._finish(context, event["job"])

    def _finish_status(self, context: Context, provider_name: str, status: dict[str, Any]) -> dict[str, Any]:
        """The manifest of a provider-neutral terminal status (``JobStatus.as_dict()``)."""
        from fine_tuning import steps
        from fine_tuning.providers import JobStatus, get_provider

        config = resolve_config(context, self.openai_conn_id)
        job_status = JobStatus.from_dict(status)
        provider = get_provider(config, provider_name)
        result = steps.status_result(provider_name, job_status, provider.model_reference(job_status))
        return self._write_result(context, config, result)

    def _finish(self, context: Context, job: dict[str, Any]) -> dict[str, Any]:
        from fine_tuning import steps
        from openai.types.fine_tuning import FineTuningJob

        result = steps.job_result(FineTuningJob.model_validate(job))
        config = resolve_config(context, self.openai_conn_id)
        return self._write_result(context, config, result)

    def _write_result(self, context: Context, config: PipelineConfig, result: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowException
        from fine_tuning import steps

        from fine_tuning.metrics import get_metrics

        get_metrics(config).training_job_finished(result)
        directory = steps.run_dir(config, run_context(context))
        if directory.exists():  # local mode: keep the manifest beside the others
            from fine_tuning.manifests import write_manifest

            write_manifest(result, directory / "wait.json")
        if result.status != "succeeded":
            raise AirflowException(result.error)
        self.log.info("job %s succeeded: %s", result.job_id, result.fine_tuned_model)
        return result.model_dump(mode="json")

    def on_kill(self) -> None:
        from fine_tuning.config import load_config
        from fine_tuning.providers import get_provider

        from fine_tuning_airflow.hooks import OpenAIFineTuningHook

        config = OpenAIFineTuningHook(self.openai_conn_id).apply_to(load_config())
        status = get_provider(config, self.provider).cancel(self.job_id)
        self.log.info("on_kill: fine-tuning job %s is now %s", self.job_id, status)


def step_mode() -> str:
    mode = os.environ.get(MODE_ENV, "local")
    if mode not in ("local", "kubernetes"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected 'local' or 'kubernetes'")
    return mode


def fine_tuning_step(step: str, *, mode: str | None = None, **kwargs: Any) -> BaseOperator:
    """The task for one step: a worker-local operator, or a pod running ``python -m fine_tuning STEP``."""
    if (mode or step_mode()) == "kubernetes":
        from fine_tuning_airflow.pods import step_pod

        return step_pod(step, **kwargs)
    from fine_tuning.steps import task_id

    return FineTuningStepOperator(task_id=task_id(step), step=step, **kwargs)
