"""The kubernetes mode's operator: a step pod behind the step's breakers, exit codes as outcomes.

Imported only by the kubernetes mode (it needs the cncf.kubernetes provider). The provider's
KubernetesPodOperator (10.25.0) turns one set of exit codes into a skip (``skip_on_exit_code``)
and every other failure into a retryable ``AirflowException``; it has no "fail on exit code".
So :meth:`StepPodOperator.cleanup` reads the step container's exit code after the provider has
cleaned up and turns the CLI's fail-fast codes (2 bad input, 3 refused) into
``AirflowFailException``: the task fails at once, its retries are not spent on a pod that would
exit the same way. Exit 75 (``ab-create`` found the routing owned) defers the task, as the local
operator does, and a new pod runs the step once the wait is over.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from fine_tuning.step_graph import EXIT_WAITING, FAIL_FAST_EXIT_CODES
from fine_tuning_airflow.breaker_operator import CircuitBreakerOperator
from fine_tuning_airflow.operators import (
    PROVIDER_STEPS,
    FineTuningStepOperator,
    provider_breakers,
    resolve_config,
)

if TYPE_CHECKING:
    from airflow.sdk import Context
    from kubernetes.client import models as k8s

    from fine_tuning.config import PipelineConfig


def pod_exit_code(remote_pod: k8s.V1Pod | None, container_name: str) -> int | None:
    """The exit code of the pod's step container; None while it has not terminated."""
    statuses = (remote_pod.status.container_statuses if remote_pod and remote_pod.status else None) or []
    status = next((s for s in statuses if s.name == container_name), None)
    terminated = status.state.terminated if status is not None and status.state else None
    return None if terminated is None else terminated.exit_code


class StepPodOperator(CircuitBreakerOperator, KubernetesPodOperator):
    """``python -m fine_tuning STEP`` in a pod, as the local step runs in the worker.

    Before the pod is created, the step's breakers are checked (the training provider's for
    ``upload`` and ``train``): an open one fails the task with ``CircuitOpenError`` and the retry
    waits out the open time (``CircuitOpenRetryPolicy``). After the pod ends, exit 99 skips,
    2 and 3 fail without a retry, 1 (or a pod that never ran) goes to the task's retries.

    :param step: the CLI step the pod runs.
    :param openai_conn_id: the OpenAI connection the breaker check's config is resolved with.
    """

    def __init__(self, *, step: str, openai_conn_id: str = "openai_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.openai_conn_id = openai_conn_id

    def pipeline_config(self, context: Context) -> PipelineConfig:
        return resolve_config(context, self.openai_conn_id)

    def breakers_for_task(self, config: PipelineConfig) -> Sequence[str]:
        return provider_breakers(config) if self.step in PROVIDER_STEPS else ()

    def execute_guarded(self, context: Context, config: PipelineConfig) -> Any:
        return KubernetesPodOperator.execute(self, context)

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, *args: Any, **kwargs: Any) -> None:
        try:
            super().cleanup(pod, remote_pod, *args, **kwargs)
        except AirflowSkipException:
            raise
        except AirflowException as exc:
            code = pod_exit_code(remote_pod, self.base_container_name)
            if code == EXIT_WAITING:
                self._wait_for_routing(exc)
            if code in FAIL_FAST_EXIT_CODES:
                raise AirflowFailException(
                    f"step {self.step}: {FAIL_FAST_EXIT_CODES[code]} (exit {code}), not retried. {exc}"
                ) from exc
            raise

    def _wait_for_routing(self, exc: Exception) -> NoReturn:
        from airflow.providers.standard.triggers.temporal import DateTimeTrigger

        poll = FineTuningStepOperator.ROUTING_POLL
        self.log.warning("step %s waits for the routing's owner, again in %s: %s", self.step, poll, exc)
        self.defer(trigger=DateTimeTrigger(moment=datetime.now(UTC) + poll), method_name="execute_after_wait")

    def execute_after_wait(self, context: Context, event: Any = None) -> Any:
        """The routing's owner may be done: a new pod runs the step again (it is idempotent)."""
        return self.execute(context)
