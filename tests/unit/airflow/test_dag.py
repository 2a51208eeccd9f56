"""DAG integrity: the real bundle parses without errors and follows the house rules."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from airflow.dag_processing.dagbag import DagBag

from support import REPO


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(str(REPO / "dags"))


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert "weekly_fine_tuning" in dagbag.dags


# The approval's runs wait up to a day each: one per model type may wait at once. The weekly run:
# next week trains while this week's candidate waits for the routing (and supersedes it).
MAX_ACTIVE_RUNS = {"rollout_approval": 2, "weekly_fine_tuning": 2}


def test_every_dag_follows_the_rules(dagbag: DagBag) -> None:
    assert set(dagbag.dags) == {"weekly_fine_tuning", "rollout_monitor", "rollout_approval"}
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, dag_id
        assert dag.doc_md, dag_id
        assert dag.catchup is False, dag_id
        assert dag.max_active_runs == MAX_ACTIVE_RUNS.get(dag_id, 1), dag_id
        for task in dag.tasks:
            assert task.owner not in (None, "", "airflow"), (dag_id, task.task_id)
            assert task.retries >= 2, (dag_id, task.task_id)
            assert task.retry_exponential_backoff, (dag_id, task.task_id)


def test_weekly_shape_and_schedule(dagbag: DagBag) -> None:
    dag = dagbag.dags["weekly_fine_tuning"]
    order = ["collect", "upload", "train", "wait", "register", "ab_create", "evaluate", "deploy"]
    assert [t.task_id for t in dag.topological_sort()] == order
    for upstream, downstream in zip(order, order[1:]):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    assert dag.timetable.expression == "0 2 * * 0"
    assert {"engagement_threshold", "days_back", "max_records", "base_model", "traffic_split"} <= set(dag.params.keys())


def test_rollout_monitor_runs_hourly(dagbag: DagBag) -> None:
    dag = dagbag.dags["rollout_monitor"]
    assert dag.timetable.expression == "0 * * * *"
    assert [t.task_id for t in dag.topological_sort()] == ["rollout", "guard", "awaiting_approval", "request_approval"]
    assert dag.get_task("guard").upstream_task_ids == {"rollout"}
    request = dag.get_task("request_approval")
    assert request.partial_kwargs["trigger_dag_id"] == "rollout_approval"
    assert request.partial_kwargs["wait_for_completion"] is False
    assert request.partial_kwargs["skip_when_already_exists"] is True


def test_rollout_approval_asks_a_person_and_rejects_on_timeout(dagbag: DagBag) -> None:
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    dag = dagbag.dags["rollout_approval"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # schedule=None: started by rollout_monitor
    assert [t.task_id for t in dag.topological_sort()] == ["approval", "approved", "apply_decision"]
    approval = dag.get_task("approval")
    assert isinstance(approval, ApprovalOperator) and approval.defaults == ["Reject"]
    # Reject skips the task right after the approval; the decision is applied past it either way.
    assert dag.get_task("approved").upstream_task_ids == {"approval"}
    apply = dag.get_task("apply_decision")
    assert apply.upstream_task_ids == {"approved"} and apply.trigger_rule == "none_failed"
    assert dag.params.get_param("deployment_id").schema["pattern"] == r"^deploy-[0-9]{8}-[0-9a-f]{8}$"


def test_parse_touches_no_heavy_import() -> None:
    """Parsing the DAG file must not import openai, mlflow, scipy or pandas (they load in tasks)."""
    code = (
        "import sys; from airflow.dag_processing.dagbag import DagBag; "
        f"b = DagBag({str(REPO / 'dags')!r}); assert not b.import_errors, b.import_errors; "
        "print('HEAVY=' + ','.join(m for m in ('openai', 'mlflow', 'scipy', 'pandas', 'psycopg', 'kubernetes') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY=\n" in out.stdout, out.stdout


def test_weekly_params_are_the_config_schema(dagbag: DagBag) -> None:
    """The DAG's params are the config's run params, with the config fields' types and bounds."""
    from fine_tuning.config import RUN_PARAMS, run_param_schemas

    params = dagbag.dags["weekly_fine_tuning"].params
    assert set(params.keys()) == set(RUN_PARAMS)
    for name, schema in run_param_schemas().items():
        assert params.get_param(name).schema == {k: v for k, v in schema.items() if k != "description"}, name
        assert params.get_param(name).value is None  # empty keeps the configured value


# A value each side must refuse, and one it must take: the trigger form's Param and the config
# (which every task builds) agree because both come from the config field.
BAD_AND_GOOD = [
    ("engagement_threshold", 1.5, 0.07),
    ("days_back", 0, 14),
    ("max_records", 0, 500),
    ("training_data_threshold", 5, 10),
    ("training_provider", "vertex", "selfhosted"),
    ("base_model", "", "gpt-4o-mini-2024-07-18"),
    ("n_epochs", 60, 3),
    ("n_epochs", "many", "auto"),
    ("max_training_cost_usd", -1, 0),
    ("traffic_split", 1.0, 0.5),
    ("a_b_test_duration_hours", 0, 0.5),
    ("evaluation_interval_minutes", 0, 5),
    ("strict_power", "maybe", True),
    ("deployment_strategy", "big_bang", "immediate"),
]


@pytest.mark.parametrize(("name", "bad", "good"), BAD_AND_GOOD)
def test_a_bound_is_enforced_alike_by_the_dag_param_and_the_config(
    dagbag: DagBag, name: str, bad: object, good: object
) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    from fine_tuning.config import RUN_PARAMS, ConfigError, load_config

    # A copy: Param.resolve() keeps the value it resolved, and the DagBag is shared by the module
    # (in a random order, test_weekly_params_are_the_config_schema then saw 'days_back' = 14).
    param = copy.deepcopy(dagbag.dags["weekly_fine_tuning"].params.get_param(name))
    with pytest.raises(ParamValidationError):
        param.resolve(bad)
    with pytest.raises(ConfigError, match=".".join(RUN_PARAMS[name].path)):  # the error names it
        load_config(env={}, params={name: bad})
    assert param.resolve(good) == good
    load_config(env={}, params={name: good})
