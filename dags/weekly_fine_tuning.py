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
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, chain
from fine_tuning_airflow.ab_operators import ABTestEvaluationOperator
from fine_tuning_airflow.operators import WaitForFineTuningJobOperator, fine_tuning_step

with DAG(
    dag_id="weekly_fine_tuning",
    doc_md=__doc__,
    schedule="0 2 * * 0",
    start_date=pendulum.datetime(2026, 1, 4, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["fine-tuning", "mlops", "openai"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
    },
    params={
        "engagement_threshold": Param(
            None, type=["null", "number"], minimum=0, maximum=1,
            description="Minimum engagement rate of a post (default 0.06).",
        ),
        "days_back": Param(
            None, type=["null", "integer"], minimum=1, maximum=366,
            description="Days of posts before the run's data interval end (default 7).",
        ),
        "max_records": Param(
            None, type=["null", "integer"], minimum=1,
            description="Most posts to read (default 10000).",
        ),
        "training_data_threshold": Param(
            None, type=["null", "integer"], minimum=10,
            description="Fewest valid examples to train on; fewer skips the run (default 100).",
        ),
        "base_model": Param(
            None, type=["null", "string"], description="Model to fine-tune (default gpt-3.5-turbo-0125).",
        ),
        "n_epochs": Param(
            None, type=["null", "string", "integer"], description="'auto' or 1-50 (default auto).",
        ),
        "max_training_cost_usd": Param(
            None, type=["null", "number"], minimum=0,
            description="Refuse to start a job whose estimated cost is higher (default 50).",
        ),
        "traffic_split": Param(
            None, type=["null", "number"], exclusiveMinimum=0, exclusiveMaximum=1,
            description="Share of requests the candidate gets during the A/B test (default 0.1).",
        ),
        "a_b_test_duration_hours": Param(
            None, type=["null", "number"], exclusiveMinimum=0, description="Planned A/B test length (default 168).",
        ),
        "evaluation_interval_minutes": Param(
            None, type=["null", "number"], exclusiveMinimum=0, description="Minutes between A/B looks (default 60).",
        ),
        "strict_power": Param(
            None, type=["null", "boolean"], description="Refuse an A/B test that cannot detect the lift (default false).",
        ),
        "deployment_strategy": Param(
            None, type=["null", "string"], enum=[None, "gradual_rollout", "immediate"],
            description="How a promoted candidate is rolled out (default gradual_rollout).",
        ),
    },
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
