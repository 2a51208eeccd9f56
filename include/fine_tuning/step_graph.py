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

# The CLI's exit codes, what the task does with each in both modes (the local operator raises
# the matching Airflow exception; the pod operator maps the pod's exit code):
# 1 a failure a retry may fix (an outage, a timeout): retried with backoff.
EXIT_FAILED = 1
# 2 bad input or configuration: failed at once, a retry would read the same input.
EXIT_BAD_INPUT = 2
# 3 a refusal no retry can fix (over the cost limit, a provider closed to new jobs): failed at once.
EXIT_REFUSED = 3
# 75 (EX_TEMPFAIL) ab-create found the routing owned by another A/B test or a rollout: the task
# waits in the triggerer and runs the step again (not a failure, no retry spent).
EXIT_WAITING = 75
# 99 skipped (too little data, a rejected candidate): the task is marked skipped, not failed.
EXIT_SKIPPED = 99
# Where a skipped task leaves why (an XCom key): the run's status says it instead of showing the
# later stages as still to come.
SKIP_REASON_KEY = "skip_reason"
# The exit codes that fail the task without spending its retries.
FAIL_FAST_EXIT_CODES: dict[int, str] = {
    EXIT_BAD_INPUT: "bad input or configuration",
    EXIT_REFUSED: "refused, a retry cannot fix it",
}

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


# The DAG that asks a person before a rollout's last step (deployment.require_approval), its
# ApprovalOperator's task, and one run per deployment, named after it (so a second request for
# the same deployment finds the first).
APPROVAL_DAG_ID = "rollout_approval"
APPROVAL_TASK_ID = "approval"


def approval_run_id(deployment_id: str) -> str:
    """The approval DAG's run for this deployment."""
    return f"approval__{deployment_id}"


def approval_page(deployment_id: str) -> str:
    """The path of the approval's Required Actions page in the Airflow UI (under its base URL)."""
    from urllib.parse import quote

    run_id = quote(approval_run_id(deployment_id), safe="")
    return f"/dags/{APPROVAL_DAG_ID}/runs/{run_id}/tasks/{APPROVAL_TASK_ID}/required_actions"
