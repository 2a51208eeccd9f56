"""The kubernetes mode: every step renders to a pod running the project's image and CLI."""

from __future__ import annotations

import pendulum
import pytest
from airflow.sdk import DAG

from fine_tuning.steps import STEP_INPUTS
from fine_tuning_airflow.operators import fine_tuning_step
from fine_tuning_airflow.pods import EXIT_SKIPPED

STEPS = ["collect", "upload", "train", "register", "ab-create", "deploy", "rollout"]


@pytest.fixture
def pods(monkeypatch: pytest.MonkeyPatch) -> dict:
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
    from_secrets = {
        env.name: (env.value_from.secret_key_ref.name, env.value_from.secret_key_ref.key)
        for env in container.env
        if env.value_from is not None and env.value_from.secret_key_ref is not None
    }
    assert from_secrets == {
        "OPENAI_API_KEY": ("fine-tuning-secrets", "openai-api-key"),
        "DATABASE_URL": ("fine-tuning-secrets", "database-url"),
        "REDIS_URL": ("fine-tuning-secrets", "redis-url"),
    }
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
