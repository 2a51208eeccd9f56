"""The Kubernetes objects the pipeline ships next to the official Airflow chart, rendered from
their single sources: ``helm-values.yaml`` (image, namespace, release), ``include/monitoring/``
(alert rules, dashboards) and the step pods' settings.

    python -m fine_tuning.dev.cluster_manifests            # rewrites deploy/kubernetes/fine-tuning.yaml
    kubectl apply -n fine-tuning -f deploy/kubernetes/fine-tuning.yaml

Plain manifests, not a chart of our own: the official chart has no ``extraObjects`` key, no
``helm`` runs where the suite runs, and what the project ships must be what the suite checks
against Kubernetes' schemas; the output is committed and a test keeps it equal to this render.
The one thing a chart would add, a hook that migrates once per release, is the Job named for
the release below (a Job is immutable: applying the same release again changes nothing, a new
release makes a new Job) and the scheduler's init container in ``helm-values.yaml``, which
migrates before any DAG is scheduled (``migrate`` is idempotent and locked, so whichever runs
second applies nothing).

A development tool (it reads the repository's files), so it lives in ``dev/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
OUTPUT = REPO / "deploy" / "kubernetes" / "fine-tuning.yaml"
MONITORING = REPO / "include" / "monitoring"

# The Helm release of the official chart (helm-values.yaml's header installs it as "airflow"):
# the names of the chart's objects below derive from it.
RELEASE = "airflow"
STEPS_SERVICE_ACCOUNT = "fine-tuning-steps"
SECRET = "fine-tuning-env"
LABELS = {
    "app.kubernetes.io/name": "fine-tuning-pipeline",
    "app.kubernetes.io/part-of": "fine-tuning-pipeline",
}
# The Grafana chart's dashboard sidecar loads ConfigMaps with this label (its default).
GRAFANA_DASHBOARD_LABEL = {"grafana_dashboard": "1"}


def _values() -> dict[str, Any]:
    return yaml.safe_load((REPO / "helm-values.yaml").read_text())


def _meta(name: str, namespace: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {**LABELS, **labels}}


def steps_service_account(namespace: str) -> dict[str, Any]:
    """The step pods' identity. They call no Kubernetes API (PostgreSQL, Redis, OpenAI, MLflow
    only), so no token is mounted and no Role is bound to it."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(STEPS_SERVICE_ACCOUNT, namespace),
        "automountServiceAccountToken": False,
    }


# What the KubernetesPodOperator in a worker does with each verb (provider 10.25, do_xcom_push,
# get_logs, delete_succeeded_pod, not deferrable).
STEP_LAUNCHER_RULES: list[dict[str, Any]] = [
    # create: start the step pod; get: follow its phase; list/watch: find the pod of an earlier
    # try by its labels (reattach) and wait for it to start; patch: label a finished pod as
    # checked so a retry does not reattach to it; delete: remove a succeeded pod, and on_kill.
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["create", "get", "list", "watch", "patch", "delete"],
    },
    # get: stream the step's log into the task log.
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    # create: read /airflow/xcom/return.json from the xcom sidecar (exec over a websocket needs
    # "create" since Kubernetes 1.31).
    {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]},
]


def step_launcher_role(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta("fine-tuning-step-launcher", namespace),
        "rules": STEP_LAUNCHER_RULES,
    }


def step_launcher_binding(namespace: str) -> dict[str, Any]:
    """The chart's worker ServiceAccount (the KubernetesExecutor's task pods run as it: see
    ``podTemplate``) may launch the step pods, in the pipeline's namespace only."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta("fine-tuning-step-launcher", namespace),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "fine-tuning-step-launcher",
        },
        "subjects": [{"kind": "ServiceAccount", "name": f"{RELEASE}-worker", "namespace": namespace}],
    }


def migration_job(namespace: str, image: str, tag: str) -> dict[str, Any]:
    """``python -m fine_tuning migrate`` once per release (the name carries the release)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(
            f"fine-tuning-migrate-{tag.replace('.', '-')}", namespace, **{"app.kubernetes.io/version": tag}
        ),
        "spec": {
            "backoffLimit": 3,
            "template": {
                "metadata": {"labels": {**LABELS, "fine-tuning/step": "migrate"}},
                "spec": {
                    "serviceAccountName": STEPS_SERVICE_ACCOUNT,
                    "automountServiceAccountToken": False,
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 50000},
                    "containers": [
                        {
                            "name": "migrate",
                            "image": f"{image}:{tag}",
                            "command": ["python", "-m", "fine_tuning", "migrate"],
                            "envFrom": [{"secretRef": {"name": SECRET}}],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "256Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                        }
                    ],
                },
            },
        },
    }


def service_monitors(namespace: str) -> list[dict[str, Any]]:
    """Prometheus Operator scrapes: the chart's statsd_exporter (Airflow's and the steps'
    metrics) and the API server's public /pipeline/metrics, as the job the alert rules name."""
    statsd = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta("fine-tuning-statsd", namespace),
        "spec": {
            "selector": {"matchLabels": {"tier": "airflow", "component": "statsd", "release": RELEASE}},
            "endpoints": [{"port": "statsd-scrape", "interval": "30s"}],
        },
    }
    pipeline = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta("fine-tuning-pipeline", namespace),
        "spec": {
            "selector": {"matchLabels": {"tier": "airflow", "component": "api-server", "release": RELEASE}},
            "endpoints": [
                {
                    "port": "api-server",
                    "path": "/pipeline/metrics",
                    "interval": "30s",
                    "relabelings": [
                        {"targetLabel": "job", "replacement": "fine-tuning-pipeline", "action": "replace"}
                    ],
                }
            ],
        },
    }
    return [statsd, pipeline]


def prometheus_rule(namespace: str) -> dict[str, Any]:
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _meta("fine-tuning-pipeline", namespace),
        "spec": {"groups": rules["groups"]},
    }


def dashboards_config_map(namespace: str) -> dict[str, Any]:
    data = {
        path.name: json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True) + "\n"
        for path in sorted((MONITORING / "dashboards").glob("*.json"))
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta("fine-tuning-dashboards", namespace, **GRAFANA_DASHBOARD_LABEL),
        "data": data,
    }


def render() -> list[dict[str, Any]]:
    values = _values()
    env = {e["name"]: e["value"] for e in values["env"]}
    namespace = env["FINE_TUNING_NAMESPACE"]
    image, tag = values["images"]["airflow"]["repository"], values["images"]["airflow"]["tag"]
    return [
        steps_service_account(namespace),
        step_launcher_role(namespace),
        step_launcher_binding(namespace),
        migration_job(namespace, image, tag),
        *service_monitors(namespace),
        prometheus_rule(namespace),
        dashboards_config_map(namespace),
    ]


def render_text() -> str:
    header = (
        "# Generated by `python -m fine_tuning.dev.cluster_manifests` from helm-values.yaml and\n"
        "# include/monitoring/: edit those, then render again (a test keeps this file equal).\n"
    )
    return header + yaml.safe_dump_all(render(), sort_keys=False, width=1000, explicit_start=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render_text())
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
