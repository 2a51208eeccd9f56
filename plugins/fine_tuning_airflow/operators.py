"""Operators that run the library's steps, in the worker (local mode) or in a pod (kubernetes).

One switch, ``FINE_TUNING_MODE`` (``local`` or ``kubernetes``), picks how a step runs; the DAG's
shape is the same in both. The wait for the fine-tuning job is deferrable in both modes: a
trigger in the triggerer polls, no worker slot or pod is held for hours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

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

    params = dict(context["params"])
    config = ServiceConnectionsHook().apply_to(load_config(params=params))
    return OpenAIFineTuningHook(openai_conn_id).apply_to(config)


def _fail_fast(exc: BaseException) -> BaseException:
    """Errors a retry cannot fix fail the task at once instead of burning its retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from fine_tuning.pipeline import exit_code_for
    from fine_tuning.step_graph import FAIL_FAST_EXIT_CODES

    code = exit_code_for(exc)
    if code in FAIL_FAST_EXIT_CODES:
        return AirflowFailException(f"{FAIL_FAST_EXIT_CODES[code]} (exit {code}): {exc}")
    return exc


# The steps that call the training provider: they check its breaker before they start (and
# fail fast on it, retrying after the open time). ``register`` checks none: while MLflow is
# down it queues the registration and succeeds.
PROVIDER_STEPS = frozenset({"upload", "train"})


def provider_breakers(config: PipelineConfig, provider: str | None = None) -> tuple[str, ...]:
    """The breaker of the provider that trains this run (none for self-hosted training: an
    OpenAI outage must not stop it)."""
    from fine_tuning.train.providers import provider_class

    breaker = provider_class(provider or config.training.provider).breaker
    return (breaker,) if breaker else ()


def record_skip(context: Context, reason: str) -> str:
    """Leave the reason of this task's skip where the run's status reads it; returns it."""
    from fine_tuning.step_graph import SKIP_REASON_KEY

    context["ti"].xcom_push(key=SKIP_REASON_KEY, value=reason)
    return reason


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

    def breakers_for_task(self, config: PipelineConfig) -> Sequence[str]:
        return provider_breakers(config) if self.step in PROVIDER_STEPS else ()

    def pipeline_config(self, context: Context) -> PipelineConfig:
        return resolve_config(context, self.openai_conn_id)

    def execute_guarded(self, context: Context, config: PipelineConfig) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from fine_tuning.evaluate.ab import CandidateSuperseded, RoutingOwned
        from fine_tuning.pipeline import CandidateRejected, InsufficientDataError, run_step
        from fine_tuning.step_graph import STEP_INPUTS, task_id

        inputs = {name: context["ti"].xcom_pull(task_ids=task_id(name)) for name in STEP_INPUTS[self.step]}
        try:
            manifest = run_step(self.step, config, run_context(context), inputs)
        except RoutingOwned as exc:
            self._wait_for_routing(exc)
        except InsufficientDataError as exc:
            raise AirflowSkipException(record_skip(context, f"not enough training data: {exc}")) from exc
        except (CandidateRejected, CandidateSuperseded) as exc:
            raise AirflowSkipException(record_skip(context, str(exc))) from exc
        except Exception as exc:
            raise _fail_fast(exc) from exc
        return manifest.model_dump(mode="json")

    # While another A/B test or a rollout owns the routing, ab_create looks again this often,
    # deferred in the triggerer (Airflow's own DateTimeTrigger): no worker slot is held.
    ROUTING_POLL = timedelta(minutes=15)

    def _wait_for_routing(self, exc: Exception) -> NoReturn:
        from airflow.providers.standard.triggers.temporal import DateTimeTrigger

        self.log.warning("%s; looking again in %s", exc, self.ROUTING_POLL)
        self.defer(
            trigger=DateTimeTrigger(moment=datetime.now(UTC) + self.ROUTING_POLL),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: Any = None) -> dict[str, Any]:
        """After waiting for the routing's owner: try the step again (it is idempotent)."""
        return self.execute(context)


class WaitForFineTuningJobOperator(CircuitBreakerOperator):
    """Wait for the fine-tuning job without holding a worker: defer to :class:`FineTuningJobTrigger`.

    Succeeds with the job's result (fine-tuned model id, trained tokens) as XCom; fails with
    the provider's error message when the job fails or is cancelled. ``on_kill`` cancels the
    job. Checks the provider's breaker first; the trigger waits out an open breaker between polls.
    """

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

    def breakers_for_task(self, config: PipelineConfig) -> Sequence[str]:
        return provider_breakers(config, self.provider)

    def execute_guarded(self, context: Context, config: PipelineConfig) -> dict[str, Any] | None:
        from fine_tuning.train.providers import get_provider
        from fine_tuning_airflow.triggers import FineTuningJobTrigger, trigger_config

        provider = get_provider(config, self.provider)
        status = provider.status(self.job_id)
        if status.terminal:  # a retry after the job ended needs no trigger
            return self._finish(context, config, provider.name, status.as_dict())
        self.defer(
            trigger=FineTuningJobTrigger(
                job_id=self.job_id,
                openai_conn_id=self.openai_conn_id,
                poll_interval=config.training.poll_interval_seconds,
                provider=provider.name,
                config=trigger_config(config),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=config.training.timeout_seconds),
        )
        return None

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resume with the trigger's event, checked against its schema: a job that ended is
        finished as every path finishes it; anything else fails with the event's message."""
        from airflow.sdk.exceptions import AirflowException
        from pydantic import ValidationError

        from fine_tuning_airflow.triggers import JobEvent

        try:
            checked = JobEvent.model_validate(event)
        except ValidationError as exc:
            raise AirflowException(
                f"fine-tuning job {self.job_id}: malformed trigger event {event!r}: {exc}"
            ) from None
        if checked.result is None:
            raise AirflowException(checked.message)
        config = resolve_config(context, self.openai_conn_id)
        return self._finish(context, config, checked.provider or self.provider, checked.result)

    def _finish(
        self, context: Context, config: PipelineConfig, provider_name: str | None, status: dict[str, Any]
    ) -> dict[str, Any]:
        """The job's terminal status as the wait's manifest (``JobStatus.as_dict()``): its metric,
        ``wait.json`` beside the other manifests, and a failure raised with the provider's error."""
        from airflow.sdk.exceptions import AirflowException

        from fine_tuning.infra.metrics import get_metrics
        from fine_tuning.manifests import write_manifest
        from fine_tuning.pipeline import run_dir
        from fine_tuning.train.providers import JobStatus, get_provider

        result = get_provider(config, provider_name).result(JobStatus.from_dict(status))
        get_metrics(config).training_job_finished(result)
        directory = run_dir(config, run_context(context))
        if directory.exists():  # local mode: keep the manifest beside the others
            write_manifest(result, directory / "wait.json")
        if result.status != "succeeded":
            raise AirflowException(result.error)
        self.log.info("job %s succeeded: %s", result.job_id, result.fine_tuned_model)
        return result.model_dump(mode="json")

    def on_kill(self) -> None:
        from fine_tuning.config import load_config
        from fine_tuning.train.providers import get_provider
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
    from fine_tuning.step_graph import task_id

    return FineTuningStepOperator(task_id=task_id(step), step=step, **kwargs)
