"""A person's approval of a rollout's last step: Airflow's ApprovalOperator with the evidence,
the operator that applies the answer, and the requests ``rollout_monitor`` starts.

The standard provider's ApprovalOperator (1.21.0, Airflow 3.3) parks the task in
``awaiting_input`` (no worker, no triggerer); the API's HITL response or the scheduler's timeout
sweep resumes it in ``execute_complete``. On a timeout the sweep answers with the ``defaults``:
here ``Reject``, with no user. On Reject the operator skips its direct downstream tasks (by
raising the task SDK's ``DownstreamTasksSkipped``, so its return value is lost), so the DAG is
``approval >> approved >> apply_decision``: ``approved`` (nothing to run) is what gets skipped,
``apply_decision`` (``none_failed``) applies either answer from the approval's ``answer`` XCom,
retried on its own without asking the person again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from fine_tuning.config import PipelineConfig


# The approval task's XCom key for the person's answer (see RolloutApprovalOperator.execute_complete).
ANSWER_KEY = "answer"


def service_config() -> PipelineConfig:
    """The pipeline's config and Airflow's service connections; the run's one param,
    ``deployment_id``, is not configuration."""
    from fine_tuning.config import load_config
    from fine_tuning_airflow.hooks import ServiceConnectionsHook

    return ServiceConnectionsHook().apply_to(load_config())


class RolloutApprovalOperator(ApprovalOperator):
    """Ask a person to approve the last step of ``deployment_id``'s rollout.

    The subject and body (the A/B test's lift and CI, guardrails, SRM, the held stage's rollback
    triggers, the MLflow links) and the timeout (the deployment's ``approval_timeout_hours``)
    are read when the task runs; no answer by then is a Reject. Returns the answer as the
    task's XCom ``answer``: ``deployment_id``, ``approved``, ``decided_by``, ``timed_out``.
    """

    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "deployment_id")

    def __init__(self, *, deployment_id: str, **kwargs: Any) -> None:
        kwargs.setdefault("subject", "Approve the last step of a rollout")
        super().__init__(defaults=ApprovalOperator.REJECT, **kwargs)
        self.deployment_id = deployment_id

    def execute(self, context: Context) -> Any:
        from airflow.sdk.exceptions import AirflowFailException

        from fine_tuning.deploy.approval import NotAwaitingApproval, approval_request
        from fine_tuning.deploy.rollout import UnknownDeployment

        try:
            subject, body, hours = approval_request(service_config(), self.deployment_id)
        except (NotAwaitingApproval, UnknownDeployment) as exc:
            raise AirflowFailException(f"nothing to approve: {exc}") from exc
        self.subject, self.body = subject, body
        self.response_timeout = timedelta(hours=hours)
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        # On Reject the provider skips the task right after this one by raising the task SDK's
        # DownstreamTasksSkipped: the task succeeds but its return value is never pushed. So the
        # answer goes to its own XCom key first, for apply_decision to read in either case.
        if "error" not in event:
            self.validate_chosen_options(event["chosen_options"])
            user = event.get("responded_by_user") or {}
            timed_out = bool(event.get("timedout")) or not user
            answer = {
                "deployment_id": self.deployment_id,
                "approved": event["chosen_options"] == [ApprovalOperator.APPROVE],
                "decided_by": None if timed_out else (user.get("name") or user.get("id")),
                "timed_out": timed_out,
            }
            context["ti"].xcom_push(key=ANSWER_KEY, value=answer)
        return super().execute_complete(context=context, event=event)


class ApplyApprovalOperator(BaseOperator):
    """Apply the approval task's answer to the deployment (:func:`fine_tuning.deploy.rollout.decide`).

    Approve completes the rollout; Reject or the timeout rolls it back. An answer the deployment
    can no longer take (it was rolled back meanwhile) fails the task, saying why; a Reject of a
    rollout already rolled back succeeds and says it changed nothing.
    """

    template_fields: Sequence[str] = ("approval_task_id",)
    ui_color = "#e8f4ff"

    def __init__(self, *, approval_task_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.approval_task_id = approval_task_id

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from fine_tuning import clock
        from fine_tuning.deploy import rollout
        from fine_tuning.infra.redis import redis_client
        from fine_tuning.pipeline import deployment_manifest

        answer = context["ti"].xcom_pull(task_ids=self.approval_task_id, key=ANSWER_KEY)
        if not isinstance(answer, dict) or not {"deployment_id", "approved", "timed_out"} <= answer.keys():
            raise AirflowFailException(
                f"task {self.approval_task_id!r} left no answer to apply (got {answer!r})"
            )
        config = service_config()
        try:
            record = rollout.decide(
                config,
                redis_client(config),
                answer["deployment_id"],
                approved=bool(answer["approved"]),
                decided_by=answer.get("decided_by"),
                timed_out=bool(answer["timed_out"]),
                now=clock.now_utc(),
            )
        except (rollout.DecisionNotApplicable, rollout.UnknownDeployment, ValueError) as exc:
            raise AirflowFailException(str(exc)) from exc
        self.log.info("deployment %s is %s", record["id"], record["status"])
        return deployment_manifest(record).model_dump(mode="json")


def approval_requests(watched: dict[str, Any] | None) -> list[dict[str, Any]]:
    """From the monitor's ``rollout`` manifest: one approval DAG run (run id and conf) per
    deployment awaiting approval. A run that exists already is not started again."""
    from fine_tuning.step_graph import approval_run_id

    return [
        {"trigger_run_id": approval_run_id(d["deployment_id"]), "conf": {"deployment_id": d["deployment_id"]}}
        for d in (watched or {}).get("deployments", [])
        if d["status"] == "awaiting_approval"
    ]
