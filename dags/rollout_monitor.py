"""
### Rollout monitor

Every hour: for each active rollout, judge the rollback triggers on the posts since its last
step (engagement drop >= 15% against the baseline, error rate > 5%, p95 response time
> 2000 ms, all configurable) and roll back at once when one fires; otherwise advance the
candidate's traffic share when its interval has passed (default +10% every 24 h). At 100% the
candidate becomes the MLflow `champion` and next week's baseline.

Between the hourly checks, `guard` watches every active rollout continuously: deferred in the
triggerer, every 5 minutes (`rollback_triggers.guard_interval_minutes`) it judges the same
triggers on the last hour of posts (`guard_window_minutes`, widened until each arm has
`min_posts`), and rolls back on the first regression confirmed by an always-valid test, until
55 minutes after the run's data interval (`deployment.guard_watch_minutes`), when the next run
takes over. No worker slot is held while it watches.

With `deployment.require_approval`, the step to 100% waits for a person instead: the rollout
holds its traffic (still watched every hour) and `request_approval` starts one `rollout_approval`
run per deployment awaiting approval (run id `approval__<deployment id>`; a run that exists is
not started again), without waiting for it: the answer may take hours, the health checks may not.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, task

from fine_tuning.step_graph import APPROVAL_DAG_ID
from fine_tuning_airflow.approval import approval_requests
from fine_tuning_airflow.guard import RolloutGuardOperator
from fine_tuning_airflow.operators import fine_tuning_step

with DAG(
    dag_id="rollout_monitor",
    doc_md=__doc__,
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["fine-tuning", "mlops", "rollout"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
    },
) as dag:
    watched = fine_tuning_step("rollout")
    watched >> RolloutGuardOperator(task_id="guard")

    @task
    def awaiting_approval(manifest: dict | None) -> list[dict]:
        return approval_requests(manifest)

    TriggerDagRunOperator.partial(
        task_id="request_approval",
        trigger_dag_id=APPROVAL_DAG_ID,
        wait_for_completion=False,
        skip_when_already_exists=True,
    ).expand_kwargs(awaiting_approval(watched.output))  # type: ignore[arg-type]  # XComArg, resolved at run time
