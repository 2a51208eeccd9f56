"""Small JSON manifests that steps hand to each other: ids, counts, checksums, paths.

Never the data itself: the dataset goes to a file, and a manifest says where it is.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict

M = TypeVar("M", bound="Manifest")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes | dict) -> Self:
        if isinstance(text, dict):
            return cls.model_validate(text)
        return cls.model_validate_json(text)


class RunContext(Manifest):
    """Who is running: the deterministic part of every idempotency key."""

    dag_id: str
    run_id: str
    window_end: datetime


class CollectManifest(Manifest):
    status: Literal["ready", "insufficient"]
    dag_id: str
    run_id: str
    window_start: datetime
    window_end: datetime
    dataset_path: str | None
    sha256: str | None
    bytes: int
    posts_scanned: int
    examples_written: int
    rejected: dict[str, int]
    duplicates: int
    tokens: int
    min_examples: int
    seconds: float
    reason: str | None = None
    # Which tokenizer counted ``tokens`` (an approximation says so, and why).
    token_counter: str | None = None


class UploadManifest(Manifest):
    provider: str
    idempotency_key: str
    dataset_sha256: str
    file_id: str
    reused_file: bool
    base_model: str
    estimated_tokens: int
    estimated_epochs: int
    estimated_cost_usd: float
    # Set when this run replaces a champion whose model retires (see fine_tuning.retirement):
    # {"from_model", "from_provider", "to_provider", "reason", "retires", "deadline"}.
    migration: dict[str, str] | None = None


class TrainingManifest(UploadManifest):
    job_id: str
    suffix: str
    reused_job: bool


class JobResult(Manifest):
    provider: str
    job_id: str
    status: Literal["succeeded", "failed", "cancelled"]
    fine_tuned_model: str | None
    trained_tokens: int | None
    error: str | None = None
    created_at: int | None = None
    finished_at: int | None = None


class RegistrationManifest(Manifest):
    """The candidate in MLflow; ``buffered`` when MLflow was down and the registration is queued
    in the tracking outbox (ids are then None until it is replayed; see ``tracking_buffer``)."""

    mlflow_run_id: str | None
    experiment_id: str | None
    model_name: str
    model_version: str | None
    alias: str
    fine_tuned_model: str
    status: Literal["registered", "buffered"] = "registered"
    outbox_path: str | None = None
    # The forced migration this candidate is for (the upload manifest's), else None.
    migration: dict[str, str] | None = None


def idempotency_key(dag_id: str, run_id: str, dataset_sha256: str) -> str:
    """A key that a retried or cleared task derives again (XCom does not survive a retry)."""
    digest = hashlib.sha256(f"{dag_id}\0{run_id}\0{dataset_sha256}".encode()).hexdigest()
    return f"ftp-{digest[:32]}"


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write atomically: a reader never sees half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json.loads(manifest.to_json()), indent=2))
    tmp.replace(path)
    return path


class ABTestManifest(Manifest):
    ab_test_id: str
    model_type: str
    baseline_model: str
    candidate_model: str
    candidate_version: str | None
    traffic_split: float
    started_at: datetime
    planned_end_at: datetime
    power_adequate: bool
    power_message: str


class EvaluationManifest(Manifest):
    ab_test_id: str
    decision: Literal["promote", "reject", "continue"]
    final: bool
    looks: int
    p_value: float | None
    relative_lift: float | None
    ci_lower: float | None
    ci_upper: float | None
    srm_p_value: float | None
    reasons: list[dict]


class DeploymentManifest(Manifest):
    deployment_id: str
    ab_test_id: str | None
    status: str
    candidate_model: str
    previous_model: str
    current_traffic: float
    rollback_reason: str | None = None


class RolloutWatchManifest(Manifest):
    deployments: list[DeploymentManifest]
