"""
### Weekly fine-tuning

Every Sunday at 02:00 UTC: collect last week's high-engagement posts from PostgreSQL into an
OpenAI chat dataset, upload it, start a fine-tuning job (after a cost guard), wait for it in the
triggerer, register the fine-tuned model in MLflow as the `challenger`, A/B test it against the
baseline (looking every hour, waiting in the triggerer in between), and start a gradual rollout
when it wins. The hourly DAG `rollout_monitor` advances the rollout or rolls it back.

Every step is a function of the `fine_tuning` library and a subcommand of
`python -m fine_tuning`; `FINE_TUNING_MODE` picks whether steps run in the worker (`local`) or
as pods (`kubernetes`). Params left empty keep the configured value (defaults < ConfigMap JSON
< environment < these params). Too few examples skips the run; it does not fail it.

One owner of the routing per model type: while an A/B test or a rollout owns it, `ab_create`
waits in the triggerer; next week's run trains meanwhile, and its newer candidate supersedes the
waiting one (skipped, tagged `superseded` in MLflow, recorded in `candidate_queue`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, chain

from fine_tuning_airflow.ab_operators import ABTestEvaluationOperator
from fine_tuning_airflow.operators import WaitForFineTuningJobOperator, fine_tuning_step
from fine_tuning_airflow.params import dag_params

with DAG(
    dag_id="weekly_fine_tuning",
    doc_md=__doc__,
    schedule="0 2 * * 0",
    start_date=pendulum.datetime(2026, 1, 4, tz="UTC"),
    catchup=False,
    # Two: while this week's candidate waits for the routing (last week's A/B test or rollout
    # owns it), next week's run trains; its candidate then supersedes the waiting one
    # (fine_tuning.evaluate.ab.queue_candidate), so at most one candidate ever waits.
    max_active_runs=2,
    tags=["fine-tuning", "mlops", "openai"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
    },
    # Typed params from the config schema: the trigger form and REST conf are validated.
    params=dag_params(),
) as dag:
    collect = fine_tuning_step("collect")
    upload = fine_tuning_step("upload")
    train = fine_tuning_step("train")
    wait = WaitForFineTuningJobOperator(
        task_id="wait",
        job_id="{{ ti.xcom_pull(task_ids='train')['job_id'] }}",
        retry_delay=timedelta(minutes=5),
    )
    register = fine_tuning_step("register")
    ab_create = fine_tuning_step("ab-create")
    evaluate = ABTestEvaluationOperator(task_id="evaluate")
    deploy = fine_tuning_step("deploy")

    chain(collect, upload, train, wait, register, ab_create, evaluate, deploy)
