"""The kubernetes mode behaves as the local one: breakers before a pod, exit codes as outcomes."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pendulum
import pytest
from airflow.sdk import DAG
from airflow.sdk.definitions.retry_policy import RetryAction
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from fine_tuning.config import load_config
from fine_tuning.infra.breakers import CircuitOpenError, get_breaker
from fine_tuning.step_graph import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_REFUSED, EXIT_SKIPPED, EXIT_WAITING
from fine_tuning_airflow.operators import fine_tuning_step
from fine_tuning_airflow.pod_operator import StepPodOperator


def step_pod(step: str, **kwargs: object) -> StepPodOperator:
    with DAG(f"pod_outcomes_{step}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
        operator = fine_tuning_step(step, mode="kubernetes", **kwargs)
    assert isinstance(operator, StepPodOperator)
    return operator


def context() -> dict:
    dag_run = SimpleNamespace(dag_id="weekly_fine_tuning", run_id="manual__pod", run_after=datetime(2026, 11, 22, tzinfo=UTC))
    return {"params": {}, "dag_run": dag_run, "data_interval_end": None}


def open_openai_breaker() -> datetime:
    breaker = get_breaker("openai", load_config())
    for _ in range(breaker.settings.failure_threshold):
        with pytest.raises(ConnectionError):
            breaker.call(lambda: (_ for _ in ()).throw(ConnectionError("connection refused")))
    assert breaker.state == "open" and breaker.opened_until is not None
    return breaker.opened_until


def test_an_open_breaker_fails_the_pod_task_before_a_pod_is_created(openai_env: object) -> None:
    opened_until = open_openai_breaker()
    operator = step_pod("train", retry_delay=timedelta(seconds=30))
    # No Kubernetes API answers here: a task that got past the check would fail on creating the
    # pod, not with the breaker's error.
    with pytest.raises(CircuitOpenError, match=r"circuit 'openai' open until \d\d:\d\d:\d\d UTC") as raised:
        operator.execute(context())
    assert operator.pod is None  # nothing was created
    decision = operator.retry_policy.evaluate(raised.value, try_number=1, max_tries=3)
    assert decision.action == RetryAction.RETRY
    assert decision.retry_delay >= opened_until - datetime.now(UTC) > timedelta(seconds=100)


def test_pod_steps_check_the_breakers_the_local_steps_check() -> None:
    config = load_config()
    assert {step: step_pod(step).breakers_for_task(config) for step in ("collect", "upload", "train", "register", "deploy")} == {
        "collect": (),
        "upload": ("openai",),
        "train": ("openai",),
        "register": (),  # queues the registration while MLflow is down
        "deploy": (),
    }
    assert step_pod("train").breakers_for_task(load_config(params={"training_provider": "selfhosted"})) == ()


def finished_pod(exit_code: int, message: str) -> k8s.V1Pod:
    terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, message=message, reason="Error")
    status = k8s.V1ContainerStatus(
        name="base", image="x", image_id="x", ready=False, restart_count=0,
        state=k8s.V1ContainerState(terminated=terminated),
    )
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="fine-tuning-upload-abc", namespace="fine-tuning"),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base", image="x")]),
        status=k8s.V1PodStatus(phase="Failed" if exit_code else "Succeeded", container_statuses=[status]),
    )


class _PodAPI(BaseHTTPRequestHandler):
    """The two calls the operator's cleanup makes for a failed pod that is kept (a label patch,
    a read): answered as the API server would, with the pod; the requests are recorded."""

    requests: list[str] = []
    pod: dict = {}

    def _pod(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({"apiVersion": "v1", "kind": "Pod", **self.pod})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_PATCH = do_DELETE = _pod

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def kube_config(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A kubeconfig naming a loopback API that answers the cleanup's calls."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PodAPI)
    _PodAPI.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    yield str(path), _PodAPI.requests
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("exit_code", "outcome", "says"),
    [
        (EXIT_SKIPPED, AirflowSkipException, "exit code 99"),
        (EXIT_BAD_INPUT, AirflowFailException, "bad input or configuration (exit 2), not retried"),
        (EXIT_REFUSED, AirflowFailException, "refused, a retry cannot fix it (exit 3), not retried"),
        (EXIT_FAILED, AirflowException, "returned a failure"),
        (137, AirflowException, "returned a failure"),  # OOM-killed: a retry may fit
    ],
)
def test_the_pods_exit_code_is_the_tasks_outcome(
    exit_code: int, outcome: type, says: str, kube_config: tuple[str, list[str]]
) -> None:
    operator = step_pod("upload")  # a failed pod is kept (delete_succeeded_pod)
    operator.in_cluster, operator.config_file = False, kube_config[0]
    reason = "exit 3: upload: CostLimitExceeded: estimated training cost $12.00 exceeds $10.00"
    pod = finished_pod(exit_code, reason)
    _PodAPI.pod = ApiClient().sanitize_for_serialization(pod)
    with pytest.raises(outcome, match=re.escape(says)) as raised:
        operator.cleanup(pod, pod)
    assert type(raised.value) is outcome  # a retryable failure is not turned into a fail-fast one
    if outcome is AirflowFailException:
        assert reason in str(raised.value)  # the pod's termination message says why
    # The provider's own cleanup ran first: the kept pod is labelled as checked, not deleted.
    assert "PATCH /api/v1/namespaces/fine-tuning/pods/fine-tuning-upload-abc" in kube_config[1]
    assert not [r for r in kube_config[1] if r.startswith("DELETE")]


def test_an_ab_create_pod_that_found_the_routing_owned_waits_in_the_triggerer(
    kube_config: tuple[str, list[str]],
) -> None:
    from airflow.providers.standard.triggers.temporal import DateTimeTrigger
    from airflow.sdk.exceptions import TaskDeferred

    from fine_tuning_airflow.operators import FineTuningStepOperator

    operator = step_pod("ab-create")
    operator.in_cluster, operator.config_file = False, kube_config[0]
    pod = finished_pod(EXIT_WAITING, "exit 75: ab-create: the routing of content is owned by rollout r-1")
    _PodAPI.pod = ApiClient().sanitize_for_serialization(pod)
    before = datetime.now(UTC)
    with pytest.raises(TaskDeferred) as deferred:
        operator.cleanup(pod, pod)
    # Not a failure (no retry spent): the task sleeps in the triggerer, then a new pod runs the step.
    assert isinstance(deferred.value.trigger, DateTimeTrigger)
    assert deferred.value.method_name == "execute_after_wait"
    wake = deferred.value.trigger.moment
    assert before + FineTuningStepOperator.ROUTING_POLL <= wake <= datetime.now(UTC) + FineTuningStepOperator.ROUTING_POLL
    assert "PATCH /api/v1/namespaces/fine-tuning/pods/fine-tuning-upload-abc" in kube_config[1]


def test_the_pod_writes_its_reason_where_kubernetes_reads_it() -> None:
    container = step_pod("upload").build_pod_request_obj(dry_run=True).spec.containers[0]
    env = {e.name: e.value for e in container.env}
    assert env["FINE_TUNING_TERMINATION_LOG"] == "/dev/termination-log"
    # The Kubernetes default path, so no terminationMessagePath needs setting.
    assert container.termination_message_path in (None, "/dev/termination-log")


def test_the_weekly_dag_in_kubernetes_mode_guards_every_step_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DAG files as the Helm deployment parses them: every step a guarded pod, and the DAG
    serializes (the scheduler stores it) with them."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    from support import REPO

    monkeypatch.setenv("FINE_TUNING_MODE", "kubernetes")
    bag = DagBag(str(REPO / "dags"))
    assert not bag.import_errors
    dag = bag.dags["weekly_fine_tuning"]
    pods = {t.task_id for t in dag.tasks if isinstance(t, StepPodOperator)}
    assert pods == {"collect", "upload", "train", "register", "ab_create", "deploy"}
    back = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert {t.task_id for t in back.tasks if t.task_type == "StepPodOperator"} == pods
