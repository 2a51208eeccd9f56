"""A pipeline run's status as the design shows it, from Airflow's facts about the run: its four
stages' progress from the task states, the stage it is in, and the metrics from the step
manifests (the tasks' XComs). Pure: the facts are read by ``airflow_runs``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# The design's four stages and the DAG's tasks that make each one.
STAGES: dict[str, tuple[str, ...]] = {
    "data_collection": ("collect",),
    "model_training": ("upload", "train", "wait", "register"),
    "evaluation": ("ab_create", "evaluate"),
    "deployment": ("deploy",),
}
# What a running pipeline is doing, by stage (the design's "status": "training").
STAGE_ACTIVITY = {
    "data_collection": "collecting",
    "model_training": "training",
    "evaluation": "evaluating",
    "deployment": "deploying",
}
# The abort's run note starts with this: how a status tells an aborted run from one that failed.
ABORT_NOTE = "aborted via /pipeline/fine-tuning/abort"
ACTIVE_STATES = ("queued", "running")


def stage_state(states: list[str | None]) -> str:
    """One stage's progress from its tasks' states."""
    if any(s in ("failed", "upstream_failed") for s in states):
        return "failed"
    if states and all(s == "skipped" for s in states):
        return "skipped"
    if states and all(s in ("success", "skipped") for s in states):
        return "completed"
    if any(s not in (None, "none", "removed") for s in states):
        return "in_progress"
    return "pending"


# The DAG is one chain in this order, every task with the all_success trigger rule.
TASK_ORDER = tuple(task for task_ids in STAGES.values() for task in task_ids)


def first_skipped(tasks: dict[str, str | None]) -> str | None:
    """The step the run skipped at (too little data, a rejected candidate), or None."""
    return next((t for t in TASK_ORDER if tasks.get(t) == "skipped"), None)


def effective_states(tasks: dict[str, str | None]) -> dict[str, str | None]:
    """The task states with every step after a skip shown skipped: in a chain of all_success
    tasks they will be, and Airflow marks them only as it gets to each one (a read in between
    must not show them as still to come)."""
    skipped = first_skipped(tasks)
    if skipped is None:
        return dict(tasks)
    after = TASK_ORDER[TASK_ORDER.index(skipped) + 1 :]
    return {**tasks, **{t: "skipped" for t in after if tasks.get(t) in (None, "none", "scheduled", "queued")}}


def stage_progress(tasks: dict[str, str | None]) -> dict[str, str]:
    """Every stage's progress, in pipeline order."""
    states = effective_states(tasks)
    return {stage: stage_state([states.get(t) for t in task_ids]) for stage, task_ids in STAGES.items()}


def skip_summary(tasks: dict[str, str | None], reasons: dict[str, str]) -> dict[str, str] | None:
    """Where and why the run skipped; a step in a pod leaves its reason in the pod's log."""
    skipped = first_skipped(tasks)
    if skipped is None:
        return None
    return {"task": skipped, "reason": reasons.get(skipped, "the step exited as skipped; its log says why")}


def current_stage(progress: dict[str, str], run_state: str) -> str | None:
    """The stage at work or failed; for an active run with none, the next one to start."""
    current = next((s for s, p in progress.items() if p in ("in_progress", "failed")), None)
    if current is None and run_state in ACTIVE_STATES:
        current = next((s for s, p in progress.items() if p == "pending"), None)
    return current


def overall_status(
    run_state: str, current: str | None, note: str | None, skipped_at: str | None = None
) -> str:
    """The design's one-word status: what an active run does, ``skipping``/``skipped`` once a step
    before the A/B decision skipped (too little data: this run decides nothing), ``aborted``,
    ``completed`` (also when deploy skipped: the candidate was rejected, the run did its work), or
    the run's state."""
    if skipped_at not in (None, "deploy") and run_state in (*ACTIVE_STATES, "success"):
        return "skipping" if run_state in ACTIVE_STATES else "skipped"
    if run_state in ACTIVE_STATES:
        return STAGE_ACTIVITY.get(current or "", run_state)
    if run_state == "failed" and note and note.startswith(ABORT_NOTE):
        return "aborted"
    return {"success": "completed"}.get(run_state, run_state)


def estimated_completion(progress: dict[str, str], xcoms: dict[str, Any]) -> Any:
    """The A/B test's planned end while the evaluation runs (the longest stage); else unknown."""
    if progress["evaluation"] != "in_progress":
        return None
    return xcoms.get("ab_create", {}).get("planned_end_at")


def run_metrics(xcoms: dict[str, Any], started: datetime | None, ended: datetime | None) -> dict[str, Any]:
    """The design's status metrics, from the step manifests."""
    collect, train, wait = xcoms.get("collect", {}), xcoms.get("train", {}), xcoms.get("wait", {})
    register, ab, deploy = xcoms.get("register", {}), xcoms.get("ab_create", {}), xcoms.get("deploy", {})
    metrics: dict[str, Any] = {}
    if collect:
        metrics.update(
            training_examples=collect.get("examples_written"),
            posts_scanned=collect.get("posts_scanned"),
            examples_rejected=sum((collect.get("rejected") or {}).values()),
            training_tokens=collect.get("tokens"),
            data_window_start=collect.get("window_start"),
            data_window_end=collect.get("window_end"),
            collection_seconds=collect.get("seconds"),
        )
    if train:
        metrics.update(
            training_job_id=train.get("job_id"),
            training_file_id=train.get("file_id"),
            base_model=train.get("base_model"),
            estimated_training_cost_usd=train.get("estimated_cost_usd"),
        )
    if wait:
        metrics.update(
            job_status=wait.get("status"),
            fine_tuned_model=wait.get("fine_tuned_model"),
            trained_tokens=wait.get("trained_tokens"),
        )
        if wait.get("created_at") and wait.get("finished_at"):
            metrics["training_duration_minutes"] = round((wait["finished_at"] - wait["created_at"]) / 60, 2)
    if register:
        metrics.update(
            model_name=register.get("model_name"),
            model_version=register.get("model_version"),
            mlflow_run_id=register.get("mlflow_run_id"),
        )
    if ab:
        metrics["ab_test_id"] = ab.get("ab_test_id")
    if xcoms.get("evaluate"):
        metrics["ab_decision"] = xcoms["evaluate"].get("decision")
    if deploy:
        metrics.update(
            deployment_id=deploy.get("deployment_id"), current_traffic=deploy.get("current_traffic")
        )
    if started:
        metrics["execution_time_seconds"] = round(((ended or datetime.now(UTC)) - started).total_seconds(), 1)
    return metrics
