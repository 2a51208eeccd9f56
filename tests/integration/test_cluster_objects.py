"""What a cluster would accept: every object the project ships or renders, checked against the
schema the receiving side uses. There is no API server here, so the schemas stand in for it:

- ``helm-values.yaml`` against the official chart's ``values.schema.json`` (a copy in
  ``deploy/airflow-chart/``: apache/airflow ``chart/values.schema.json``, defaults Airflow 3.0.5);
- every step pod, the chart's pod template and init container, and every core object of
  ``deploy/kubernetes/`` against Kubernetes 1.37's OpenAPI schemas (kubernetes-validate 1.37.0
  ships them in its wheel, strict: an unknown field is an error, as ``kubectl apply`` makes it);
- the Prometheus Operator objects (CRDs, not in Kubernetes' schemas): their metadata against
  ObjectMeta, the rules with ``promtool``, the selectors against the chart's labels.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pendulum
import pytest
import yaml
from airflow.sdk import DAG
from kubernetes.client import ApiClient

from fine_tuning.dev import cluster_manifests
from support import MONITORING, REPO

KUBERNETES_VERSION = "1.37.0"
STEPS = ["collect", "upload", "train", "register", "ab-create", "deploy", "rollout"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schemas come from files in the repository and the wheel: any connection fails."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access during schema validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def values() -> dict[str, Any]:
    return yaml.safe_load((REPO / "helm-values.yaml").read_text())


def shipped() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "fine-tuning.yaml").read_text()) if doc]


def validate_k8s(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{obj['kind']} {obj['metadata'].get('name')}: {path}: {exc.message}") from None


def test_helm_values_pass_the_charts_own_schema() -> None:
    schema = json.loads((REPO / "deploy" / "airflow-chart" / "values.schema.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(values()), key=lambda e: list(e.path))
    assert not errors, [f"{e.json_path}: {e.message[:200]}" for e in errors]


def test_the_chart_schema_refuses_what_the_chart_would() -> None:
    """The check can fail: a probe path the chart has no key for, a count that is not a number."""
    schema = json.loads((REPO / "deploy" / "airflow-chart" / "values.schema.json").read_text())
    wrong = values()
    wrong["apiServer"]["readinessProbe"] = {"path": "/pipeline/health"}
    wrong["scheduler"]["replicas"] = "two"
    messages = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(wrong)]
    assert any("'path' was unexpected" in m for m in messages), messages
    assert any("'two' is not of type 'integer'" in m for m in messages), messages


def test_the_shipped_manifests_are_the_render_of_their_sources() -> None:
    text = (REPO / "deploy" / "kubernetes" / "fine-tuning.yaml").read_text()
    assert text == cluster_manifests.render_text(), (
        "deploy/kubernetes/fine-tuning.yaml is stale: run python -m fine_tuning.dev.cluster_manifests"
    )


def test_every_shipped_core_object_validates_against_kubernetes() -> None:
    objects = shipped()
    core = [o for o in objects if not o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {o["kind"] for o in core} == {"ServiceAccount", "Role", "RoleBinding", "Job", "ConfigMap"}
    for obj in core:
        validate_k8s(obj)
    broken = {**core[3], "spec": {**core[3]["spec"], "backoffLimit": "three"}}
    with pytest.raises(AssertionError, match="backoffLimit"):
        validate_k8s(broken)


def step_pods(env: dict[str, str] | None = None) -> dict[str, Any]:
    with DAG("cluster_objects", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
        from fine_tuning_airflow.operators import fine_tuning_step

        operators = {step: fine_tuning_step(step, mode="kubernetes") for step in STEPS}
    return {step: op.build_pod_request_obj(dry_run=True) for step, op in operators.items()}


@pytest.mark.parametrize("provider", ["openai", "selfhosted"])
def test_every_step_pod_validates_and_runs_as_the_shipped_account(
    provider: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed as the Helm deployment parses the DAG (its env), for both pod shapes."""
    chart = values()
    for item in chart["env"]:
        monkeypatch.setenv(item["name"], item["value"])
    if provider == "selfhosted":
        config = tmp_path / "training_config.json"
        config.write_text(json.dumps({"training": {"provider": "selfhosted", "selfhosted": {
            "base_model_path": "/models/tiny", "gpu_count": 1,
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}))
        monkeypatch.setenv("FINE_TUNING_CONFIG_FILE", str(config))
    accounts = {o["metadata"]["name"]: o for o in shipped() if o["kind"] == "ServiceAccount"}
    api = ApiClient()
    for step, pod in step_pods().items():
        body = {"apiVersion": "v1", "kind": "Pod", **api.sanitize_for_serialization(pod)}
        validate_k8s(body)
        assert body["spec"]["serviceAccountName"] in accounts, step
        assert body["spec"]["automountServiceAccountToken"] is False, step
        assert body["metadata"]["namespace"] == accounts[body["spec"]["serviceAccountName"]]["metadata"]["namespace"]


def test_the_charts_pod_template_and_init_container_validate() -> None:
    chart = values()
    template = yaml.safe_load(chart["podTemplate"])
    validate_k8s(template)
    binding = next(o for o in shipped() if o["kind"] == "RoleBinding")
    # The task pods run as the account the step launcher Role is bound to.
    assert template["spec"]["serviceAccountName"] == binding["subjects"][0]["name"]
    assert binding["subjects"][0]["namespace"] == chart["config"]["kubernetes_executor"]["namespace"]
    init = chart["scheduler"]["extraInitContainers"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "scheduler"},
           "spec": {"initContainers": init, "containers": [{"name": "scheduler", "image": "x"}]}}
    validate_k8s(pod)
    assert init[0]["command"] == ["python", "-m", "fine_tuning", "migrate"]


def test_the_migration_job_runs_the_releases_image_once_per_release() -> None:
    chart = values()
    job = next(o for o in shipped() if o["kind"] == "Job")
    tag = chart["images"]["airflow"]["tag"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["name"] == f"fine-tuning-migrate-{tag.replace('.', '-')}"
    assert container["image"] == f"{chart['images']['airflow']['repository']}:{tag}"
    assert container["command"] == ["python", "-m", "fine_tuning", "migrate"]
    assert container["envFrom"] == yaml.safe_load(chart["extraEnvFrom"])  # DATABASE_URL


def test_the_step_launcher_role_grants_only_what_the_pod_operator_uses() -> None:
    role = next(o for o in shipped() if o["kind"] == "Role")
    grants = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert grants == {
        ("pods", "create"), ("pods", "get"), ("pods", "list"), ("pods", "watch"), ("pods", "patch"),
        ("pods", "delete"), ("pods/log", "get"), ("pods/exec", "create"),
    }
    assert all(rule["apiGroups"] == [""] for rule in role["rules"])
    assert not [o for o in shipped() if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_the_monitoring_objects_are_rendered_from_include_monitoring() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in shipped()}
    for (kind, name), obj in objects.items():
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            # A CRD's metadata is Kubernetes' ObjectMeta: checked as the metadata of a core object.
            validate_k8s({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})
            assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, name

    rule = objects[("PrometheusRule", "fine-tuning-pipeline")]
    assert rule["spec"] == yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())

    dashboards = objects[("ConfigMap", "fine-tuning-dashboards")]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    sources = sorted((MONITORING / "dashboards").glob("*.json"))
    assert sorted(dashboards["data"]) == [p.name for p in sources]
    for path in sources:
        assert json.loads(dashboards["data"][path.name]) == json.loads(path.read_text())

    # The alert rules' job is the one the pipeline's ServiceMonitor names its target.
    pipeline = objects[("ServiceMonitor", "fine-tuning-pipeline")]["spec"]["endpoints"][0]
    assert pipeline["path"] == "/pipeline/metrics"
    assert {"targetLabel": "job", "replacement": "fine-tuning-pipeline", "action": "replace"} in pipeline["relabelings"]
    assert 'job="fine-tuning-pipeline"' in (MONITORING / "prometheus-rules.yaml").read_text()
    statsd = objects[("ServiceMonitor", "fine-tuning-statsd")]["spec"]
    assert statsd["selector"]["matchLabels"]["component"] == "statsd" and values()["statsd"]["enabled"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) not installed")
def test_the_prometheus_rule_spec_passes_promtool(tmp_path: Path) -> None:
    rule = next(o for o in shipped() if o["kind"] == "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
