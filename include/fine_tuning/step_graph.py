"""The shape of the pipeline: its steps' names, what each reads, their task ids and exit codes.

What the DAG files, the pods and the CLI are built from. It imports no service client, so a DAG
file can use it at parse time; the steps themselves are in :mod:`fine_tuning.pipeline`.
"""

from __future__ import annotations

from fine_tuning.manifests import (
    ABTestManifest,
    CollectManifest,
    EvaluationManifest,
    JobResult,
    Manifest,
    RegistrationManifest,
    TrainingManifest,
    UploadManifest,
)

# The CLI's exit code for "skipped" (too little data, a rejected candidate): the pod's task is
# marked skipped, not failed.
EXIT_SKIPPED = 99

# What each step reads: the manifests of these upstream steps, in this order.
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "collect": (),
    "upload": ("collect",),
    "train": ("upload",),
    "wait": ("train",),
    "register": ("collect", "train", "wait"),
    "ab-create": ("register",),
    "evaluate": ("ab-create",),
    "deploy": ("evaluate",),
    "rollout": (),
}
INPUT_TYPES: dict[str, type[Manifest]] = {
    "collect": CollectManifest,
    "upload": UploadManifest,
    "train": TrainingManifest,
    "wait": JobResult,
    "register": RegistrationManifest,
    "ab-create": ABTestManifest,
    "evaluate": EvaluationManifest,
}


def task_id(step: str) -> str:
    """The Airflow task id of a step (task ids read better with underscores)."""
    return step.replace("-", "_")
