"""
### Rollout monitor

Every hour: for each active rollout, judge the rollback triggers on the posts since its last
step (engagement drop >= 15% against the baseline, error rate > 5%, p95 response time
> 2000 ms, all configurable) and roll back at once when one fires; otherwise advance the
candidate's traffic share when its interval has passed (default +10% every 24 h). At 100% the
candidate becomes the MLflow `champion` and next week's baseline.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

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
    fine_tuning_step("rollout")
