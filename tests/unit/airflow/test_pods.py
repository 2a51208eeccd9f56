"""The kubernetes mode: every step renders to a pod running the project's image and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pendulum
import pytest
import yaml
from airflow.sdk import DAG

from fine_tuning.step_graph import STEP_INPUTS
from fine_tuning_airflow.operators import fine_tuning_step
from fine_tuning_airflow.pods import EXIT_SKIPPED

from support import REPO
STEPS = ["collect", "upload", "train", "register", "ab-create", "deploy", "rollout"]


@pytest.fixture
def pods(monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.delenv("FINE_TUNING_DATA_DIR", raising=False)
    monkeypatch.delenv("FINE_TUNING_DATA_PVC", raising=False)
    monkeypatch.setenv("FINE_TUNING_IMAGE", "registry.example/fine-tuning:1.2.3")
    monkeypatch.setenv("FINE_TUNING_NAMESPACE", "ml-fine-tuning")
    with DAG("pods_render", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
        operators = {step: fine_tuning_step(step, mode="kubernetes") for step in STEPS}
    return {step: (op, op.build_pod_request_obj(dry_run=True)) for step, op in operators.items()}


@pytest.mark.parametrize("step", STEPS)
def test_pod_runs_the_cli_of_its_step(pods: dict, step: str) -> None:
    operator, pod = pods[step]
    container = pod.spec.containers[0]
    assert pod.metadata.namespace == "ml-fine-tuning"
    assert container.image == "registry.example/fine-tuning:1.2.3"
    assert container.command == ["python", "-m", "fine_tuning"]
    assert container.args[0] == step
    assert "--xcom-file" in container.args and "/airflow/xcom/return.json" in container.args
    inputs = [container.args[i + 1].split("=", 1)[0] for i, a in enumerate(container.args) if a == "--input"]
    assert inputs == list(STEP_INPUTS[step])
    assert operator.skip_on_exit_code == [EXIT_SKIPPED]
    assert operator.do_xcom_push


@pytest.mark.parametrize("step", STEPS)
def test_pod_resources_secrets_and_volumes(pods: dict, step: str) -> None:
    _, pod = pods[step]
    container = pod.spec.containers[0]
    resources = container.resources
    assert resources.requests == {"memory": "512Mi", "cpu": "500m"}
    assert resources.limits == {"memory": "2Gi", "cpu": "2"}
    # The whole secret the Airflow components read (helm-values.yaml's extraEnvFrom), so keys
    # a deployment adds (MLFLOW_TRACKING_TOKEN, AZURE_OPENAI_API_KEY, VLLM_API_KEY) reach the step.
    chart = yaml.safe_load((REPO / "helm-values.yaml").read_text())
    components_env = [source["secretRef"]["name"] for source in yaml.safe_load(chart["extraEnvFrom"])]
    assert [source.secret_ref.name for source in container.env_from] == components_env == ["fine-tuning-env"]
    assert not [env.name for env in container.env if env.value_from is not None]
    plain = {env.name: env.value for env in container.env if env.value_from is None}
    assert plain["FINE_TUNING_CONFIG_FILE"] == "/etc/fine-tuning/training_config.json"
    assert not any("sk-" in str(value) for value in plain.values())
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    assert mounts["/data/fine_tuning"] == "data" and mounts["/etc/fine-tuning"] == "config"
    assert pod.spec.security_context.run_as_non_root is True


def test_local_mode_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from fine_tuning_airflow.operators import FineTuningStepOperator

    monkeypatch.delenv("FINE_TUNING_MODE", raising=False)
    with DAG("local_mode", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
        assert isinstance(fine_tuning_step("collect"), FineTuningStepOperator)
    monkeypatch.setenv("FINE_TUNING_MODE", "cluster")
    with pytest.raises(ValueError, match="FINE_TUNING_MODE"):
        fine_tuning_step("collect")


def test_step_pods_mount_the_data_claim_where_the_helm_values_put_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Parsed by a component of the Helm deployment (its env), every step pod, the self-hosted
    train pod included, mounts the data claim at the components' data path: a status file or a
    dataset path written in a pod names the same file in the worker and the triggerer."""
    values = yaml.safe_load((REPO / "helm-values.yaml").read_text())
    env = {e["name"]: e["value"] for e in values["env"]}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config_file = tmp_path / "training_config.json"  # the ConfigMap's file, switched to self-hosted
    configmap_data = yaml.safe_load(values["extraConfigMaps"]["fine-tuning-config"]["data"])
    configmap = json.loads(configmap_data["training_config.json"])
    configmap["training"] = {"provider": "selfhosted", "selfhosted": {"base_model_path": "/models/tiny"}}
    config_file.write_text(json.dumps(configmap))
    monkeypatch.setenv("FINE_TUNING_CONFIG_FILE", str(config_file))

    with DAG("pods_helm", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
        operators = [fine_tuning_step(step, mode="kubernetes") for step in STEPS]
    for operator in operators:
        pod = operator.build_pod_request_obj(dry_run=True)
        container = pod.spec.containers[0]
        claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes
                  if v.persistent_volume_claim}
        data = [m.mount_path for m in container.volume_mounts
                if claims.get(m.name) == env["FINE_TUNING_DATA_PVC"]]
        assert data == [env["FINE_TUNING_DATA_DIR"]], operator.task_id
        plain = {e.name: e.value for e in container.env if e.value_from is None}
        assert plain["FINE_TUNING_DATA_DIR"] == env["FINE_TUNING_DATA_DIR"], operator.task_id
        if operator.task_id == "train":
            assert "/models" in {m.mount_path for m in container.volume_mounts}


def test_a_relative_data_dir_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINE_TUNING_DATA_DIR", "data")
    with (
        DAG("pods_relative", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")),
        pytest.raises(ValueError, match="FINE_TUNING_DATA_DIR 'data' must be an absolute path"),
    ):
        fine_tuning_step("collect", mode="kubernetes")
