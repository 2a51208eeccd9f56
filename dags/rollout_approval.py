"""
### Rollout approval

One run per deployment (run id `approval__<deployment id>`), started by `rollout_monitor` when a
rollout with `deployment.require_approval` reaches its last step. The rollout keeps its traffic
meanwhile, and the hourly health checks and rollback triggers keep running on it.

- `approval`: Airflow's `ApprovalOperator`. Its page (**Browse → Required Actions**, or the
  task's *Required Actions* tab) shows the evidence: the A/B test's lift and CI, guardrails,
  SRM, the held stage's rollback triggers and the MLflow run, plot and version links. REST:
  `PATCH /api/v2/dags/rollout_approval/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails`
  with `{"chosen_options": ["Approve"]}`. No answer within `deployment.approval_timeout_hours`
  (24 h) is a **Reject**.
- `approved`: nothing to run; skipped on Reject (what the ApprovalOperator does to the task
  right after it).
- `apply_decision`: Approve completes the rollout (100%, MLflow `champion`); Reject or the
  timeout rolls it back, the reason naming who rejected or the timeout. An approval of a rollout
  that was rolled back meanwhile fails here and says so; nothing changes.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param

from fine_tuning.step_graph import APPROVAL_DAG_ID, APPROVAL_TASK_ID
from fine_tuning_airflow.approval import ApplyApprovalOperator, RolloutApprovalOperator

with DAG(
    dag_id=APPROVAL_DAG_ID,
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # One live rollout per model type (hook, body): each may wait for its answer at once, and a
    # run queued behind another's day-long wait would miss its own timeout.
    max_active_runs=2,
    tags=["fine-tuning", "mlops", "rollout", "approval"],
    params={
        "deployment_id": Param(
            type="string",
            pattern=r"^deploy-[0-9]{8}-[0-9a-f]{8}$",
            description="The deployment awaiting approval (started by rollout_monitor)",
        )
    },
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
    },
) as dag:
    approval = RolloutApprovalOperator(task_id=APPROVAL_TASK_ID, deployment_id="{{ params.deployment_id }}")
    approved = EmptyOperator(task_id="approved")
    apply_decision = ApplyApprovalOperator(
        task_id="apply_decision", approval_task_id=APPROVAL_TASK_ID, trigger_rule="none_failed"
    )
    approval >> approved >> apply_decision
