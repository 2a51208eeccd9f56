"""The kubernetes mode: each step is a pod running the project's image and CLI.

Settings come from the environment of the component that parses the DAG (set by the Helm
values), never from a Variable or a database at parse time.

The data volume (claim ``FINE_TUNING_DATA_PVC``, ReadWriteMany) is mounted in every step pod at
the path where the Airflow components have it (``FINE_TUNING_DATA_DIR``): the self-hosted
trainer's status files, the datasets and the manifests are then the same files at the same
absolute paths in a pod, a worker and the triggerer (tests/integration/test_deploy_files.py checks
the Helm values against this).

A step pod behaves as the local step does: :class:`StepPodOperator` checks the step's breakers
before a pod is created (an open one fails the task, retried no sooner than it closes) and maps
the pod's exit code (``fine_tuning.step_graph``): 99 skips, 2 and 3 fail without a retry, 1 and
anything else go to the task's retries (see :mod:`fine_tuning_airflow.pod_operator`).
"""

from __future__ import annotations

import os
from typing import Any

from fine_tuning.step_graph import EXIT_SKIPPED

# Where the data volume is mounted when the parsing component does not say (FINE_TUNING_DATA_DIR).
DATA_MOUNT = "/data/fine_tuning"
CONFIG_MOUNT = "/etc/fine-tuning"


def pod_settings() -> dict[str, str]:
    env = os.environ
    return {
        "image": env.get("FINE_TUNING_IMAGE", "ghcr.io/example/fine-tuning-pipeline:0.1.0"),
        "namespace": env.get("FINE_TUNING_NAMESPACE", "fine-tuning"),
        "service_account": env.get("FINE_TUNING_SERVICE_ACCOUNT", "fine-tuning-steps"),
        "secret": env.get("FINE_TUNING_SECRET", "fine-tuning-env"),
        "config_map": env.get("FINE_TUNING_CONFIGMAP", "fine-tuning-config"),
        "data_pvc": env.get("FINE_TUNING_DATA_PVC", "fine-tuning-data"),
        "data_dir": env.get("FINE_TUNING_DATA_DIR") or DATA_MOUNT,
    }


def step_arguments(step: str) -> list[str]:
    """The CLI's arguments, templated with the run's ids, window and upstream manifests."""
    from fine_tuning.step_graph import STEP_INPUTS, task_id

    arguments = [
        step,
        "--dag-id",
        "{{ dag_run.dag_id }}",
        "--run-id",
        "{{ dag_run.run_id }}",
        "--window-end",
        "{{ (data_interval_end or logical_date or dag_run.run_after).isoformat() }}",
        "--params",
        "{{ params.dump() | tojson }}",
        "--xcom-file",
        "/airflow/xcom/return.json",
    ]
    for upstream in STEP_INPUTS[step]:
        arguments += [
            "--input",
            f"{upstream}={{{{ ti.xcom_pull(task_ids='{task_id(upstream)}') | tojson }}}}",
        ]
    return arguments


def selfhosted_training() -> Any | None:
    """``training.selfhosted`` when the configured provider is ``selfhosted``, else None.

    Read at parse time from the config file and environment (local files only, no network),
    because the train pod's shape (GPU, node, base model volume) depends on it.
    """
    from fine_tuning.config import ConfigError, load_config

    try:
        training = load_config().training
    except (ConfigError, OSError):
        return None
    return training.selfhosted if training.provider == "selfhosted" else None


def _base_model_overrides(settings: Any, image: str) -> dict[str, Any]:
    """The trainer image and the base model volume (read-only): what reading the model needs."""
    from kubernetes.client import models as k8s

    return {
        "image": settings.trainer_image or os.environ.get("FINE_TUNING_TRAINER_IMAGE") or image,
        "volumes": [
            k8s.V1Volume(
                name="base-model",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=settings.base_model_pvc, read_only=True
                ),
            )
        ],
        "volume_mounts": [
            k8s.V1VolumeMount(name="base-model", mount_path=settings.base_model_mount, read_only=True)
        ],
        "env_vars": {"HF_HUB_OFFLINE": "1"},
    }


def selfhosted_collect_overrides(settings: Any, image: str) -> dict[str, Any]:
    """The collect pod of the ``selfhosted`` provider: the trainer image (it has transformers)
    and the base model volume, so tokens are counted exactly with the model's own tokenizer and
    chat template; no GPU (the slim image would only approximate the count)."""
    return _base_model_overrides(settings, image)


def selfhosted_train_overrides(settings: Any, image: str) -> dict[str, Any]:
    """The train pod of the ``selfhosted`` provider: a GPU node, the base model volume, the trainer image.

    The pod runs the same step CLI; ``FINE_TUNING_SELFHOSTED_FOREGROUND=1`` makes the provider
    train in the pod itself (the pod is the job) instead of starting a detached process.
    """
    from kubernetes.client import models as k8s

    overrides = _base_model_overrides(settings, image)
    gpu = {settings.gpu_resource: str(settings.gpu_count)} if settings.gpu_count else {}
    return {
        **overrides,
        "container_resources": k8s.V1ResourceRequirements(
            requests={"cpu": settings.cpu, "memory": settings.memory, **gpu},
            limits={"memory": settings.memory, **gpu},
        ),
        "node_selector": dict(settings.node_selector) or None,
        "tolerations": [k8s.V1Toleration(**t) for t in settings.tolerations] or None,
        "env_vars": {**overrides["env_vars"], "FINE_TUNING_SELFHOSTED_FOREGROUND": "1"},
    }


SELFHOSTED_OVERRIDES = {"collect": selfhosted_collect_overrides, "train": selfhosted_train_overrides}


def step_pod(step: str, **kwargs: Any):  # -> StepPodOperator (a KubernetesPodOperator)
    """A pod running ``python -m fine_tuning STEP``, guarded by the step's breakers."""
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    from fine_tuning_airflow.pod_operator import StepPodOperator

    settings = pod_settings()
    from fine_tuning.step_graph import task_id

    if not settings["data_dir"].startswith("/"):
        raise ValueError(
            f"FINE_TUNING_DATA_DIR {settings['data_dir']!r} must be an absolute path: "
            "the step pods mount the data volume there"
        )

    selfhosted = selfhosted_training() if step in SELFHOSTED_OVERRIDES else None
    overrides = SELFHOSTED_OVERRIDES[step](selfhosted, settings["image"]) if selfhosted is not None else {}
    # The selfhosted pods add to the common pod: they keep the data and config volumes.
    for name in ("node_selector", "tolerations"):
        if overrides.get(name) is not None:
            kwargs.setdefault(name, overrides[name])
    return StepPodOperator(
        step=step,
        task_id=task_id(step),
        name=f"fine-tuning-{step}",
        namespace=settings["namespace"],
        image=overrides.get("image", settings["image"]),
        cmds=["python", "-m", "fine_tuning"],
        arguments=step_arguments(step),
        env_vars={
            "FINE_TUNING_DATA_DIR": settings["data_dir"],
            "FINE_TUNING_CONFIG_FILE": f"{CONFIG_MOUNT}/training_config.json",
            "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", "http://mlflow.monitoring:5000"),
            "OPENAI_BASE_URL": os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
            # The chart's statsd_exporter (release "airflow"), where the steps' metrics go too.
            "STATSD_HOST": os.environ.get("STATSD_HOST", "airflow-statsd"),
            "STATSD_PORT": os.environ.get("STATSD_PORT", "9125"),
            # The reason of a failure, read back by the operator into the task's error.
            "FINE_TUNING_TERMINATION_LOG": "/dev/termination-log",
            **overrides.get("env_vars", {}),
        },
        # Every key of the secret the Airflow components read their environment from, as the
        # step's environment: OPENAI_API_KEY, DATABASE_URL, REDIS_URL, and what a deployment adds
        # (MLFLOW_TRACKING_TOKEN for register, AZURE_OPENAI_* for an Azure run, VLLM_API_KEY for
        # ab_create and deploy of a self-hosted one). A fixed list of keys left those out.
        secrets=[Secret("env", None, settings["secret"])],
        container_resources=overrides.get("container_resources")
        or k8s.V1ResourceRequirements(
            requests={"memory": "512Mi", "cpu": "500m"},
            limits={"memory": "2Gi", "cpu": "2"},
        ),
        volumes=[
            k8s.V1Volume(
                name="data",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=settings["data_pvc"]
                ),
            ),
            k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(name=settings["config_map"])),
            *overrides.get("volumes", []),
        ],
        volume_mounts=[
            k8s.V1VolumeMount(name="data", mount_path=settings["data_dir"]),
            k8s.V1VolumeMount(name="config", mount_path=CONFIG_MOUNT, read_only=True),
            *overrides.get("volume_mounts", []),
        ],
        service_account_name=settings["service_account"],
        # The steps call no Kubernetes API (deploy/kubernetes/: the account has no Role).
        automount_service_account_token=False,
        security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=50000, fs_group=0),
        labels={"app.kubernetes.io/name": "fine-tuning-pipeline", "fine-tuning/step": step},
        do_xcom_push=True,
        skip_on_exit_code=EXIT_SKIPPED,
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        in_cluster=True,
        **kwargs,
    )
