"""DAG integrity: the real bundle parses without errors and follows the house rules."""

from __future__ import annotations

import subprocess
import sys

import pytest
from airflow.dag_processing.dagbag import DagBag

from conftest import REPO


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(str(REPO / "dags"))


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert "weekly_fine_tuning" in dagbag.dags


def test_every_dag_follows_the_rules(dagbag: DagBag) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, dag_id
        assert dag.doc_md, dag_id
        assert dag.catchup is False, dag_id
        assert dag.max_active_runs == 1, dag_id
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
    assert [t.task_id for t in dag.tasks] == ["rollout"]


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
