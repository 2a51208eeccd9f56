"""In-memory files and fine-tuning jobs, and the job lifecycle on a lazily computed clock.

No background thread moves jobs: every read first calls :meth:`Store.advance`, which replays
the transitions that are due (validating_files -> queued -> running -> succeeded, each lasting
``stage_seconds``) with the timestamps at which they happened. One re-entrant lock guards all
state, which is enough for one uvicorn worker (handlers may run in its thread pool).
"""

from __future__ import annotations

import collections
import itertools
import math
import random
import secrets
import string
import threading
from dataclasses import dataclass, field
from typing import Any

from openai_emulator import models
from openai_emulator.errors import APIError, bad_request, not_found
from openai_emulator.schemas import Hyperparameters, JobCreate
from openai_emulator.settings import Settings
from openai_emulator.validation import DataReport, check_file

_ALPHABET = string.ascii_letters + string.digits
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = ("validating_files", "queued", "running")  # the timed stages, in order

FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
AUTO_EPOCHS = 3
AUTO_LEARNING_RATE_MULTIPLIER = 1.8
MAX_METRIC_EVENTS = 50
CHECKPOINTS_KEPT = 3

# Metadata limits of OpenAI's API.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_SUFFIX = 64
MAX_SEED = 2_147_483_647


def new_id(prefix: str, length: int = 24) -> str:
    """A random OpenAI-style id such as ``file-…`` or ``ftjob-…``."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


@dataclass
class StoredFile:
    id: str
    seq: int
    filename: str
    purpose: str
    data: bytes
    created_at: float

    def to_api(self) -> dict[str, Any]:
        """OpenAI's FileObject."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass
class Event:
    id: str
    created_at: float
    level: str
    message: str
    type: str = "message"
    data: dict[str, Any] | None = None

    def to_api(self) -> dict[str, Any]:
        """OpenAI's ``fine_tuning.job.event``."""
        return {
            "object": "fine_tuning.job.event",
            "id": self.id,
            "created_at": int(self.created_at),
            "level": self.level,
            "message": self.message,
            "data": self.data or {},
            "type": self.type,
        }


@dataclass
class Job:
    """A fine-tuning job; ``status_since`` is when the current status began (Unix seconds)."""

    id: str
    seq: int
    created_at: float
    model: str
    base: models.BaseModel
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]]
    requested: dict[str, Any]  # hyperparameters as asked ("auto" where not given)
    training_report: DataReport
    validation_report: DataReport | None
    status: str = "validating_files"
    status_since: float = 0.0
    paused_elapsed: float = 0.0  # seconds of running done before a pause
    resolved: dict[str, Any] | None = None  # hyperparameters once validation passed
    finished_at: float | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    result_files: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    steps_reported: int = 0  # how many of ``report_steps`` have their metrics event

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.resolved or self.requested)

    @property
    def steps_per_epoch(self) -> int:
        batch = (self.resolved or {}).get("batch_size", 1)
        return max(1, math.ceil(self.training_report.examples / batch))

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * (self.resolved or {}).get("n_epochs", AUTO_EPOCHS)

    @property
    def report_steps(self) -> list[int]:
        """The steps that get a metrics event: all of them, or 50 spread evenly."""
        total = self.total_steps
        if total <= MAX_METRIC_EVENTS:
            return list(range(1, total + 1))
        return sorted({max(1, round(i * total / MAX_METRIC_EVENTS)) for i in range(1, MAX_METRIC_EVENTS + 1)})

    def metrics(self, step: int) -> dict[str, float]:
        """Plausible, deterministic metrics: loss falls and accuracy rises with noise."""
        rng = random.Random(f"{self.id}:{step}")
        progress = step / max(1, self.total_steps)
        loss = max(0.01, 0.2 + 1.8 * math.exp(-3.0 * progress) + rng.uniform(-0.08, 0.08))
        accuracy = 0.55 + 0.4 * (1 - math.exp(-3.0 * progress)) + rng.uniform(-0.03, 0.03)
        accuracy = min(0.999, max(0.0, accuracy))
        values = {
            "step": float(step),
            "train_loss": round(loss, 4),
            "train_mean_token_accuracy": round(accuracy, 4),
        }
        if self.validation_file is not None:
            values["valid_loss"] = round(loss * 1.1 + rng.uniform(0, 0.05), 4)
            values["valid_mean_token_accuracy"] = round(accuracy * 0.97, 4)
        return values

    def estimated_finish(self, stage_seconds: float) -> int | None:
        if self.status not in ACTIVE:
            return None
        stages_left = len(ACTIVE) - ACTIVE.index(self.status)
        return math.ceil(self.status_since + stages_left * stage_seconds)

    def to_api(self, settings: Settings) -> dict[str, Any]:
        """OpenAI's FineTuningJob, with every field the official client's model has."""
        hyperparameters = self.hyperparameters
        return {
            "object": "fine_tuning.job",
            "id": self.id,
            "model": self.model,
            "created_at": int(self.created_at),
            "finished_at": None if self.finished_at is None else int(self.finished_at),
            "fine_tuned_model": self.fine_tuned_model,
            "organization_id": settings.organization_id,
            "result_files": list(self.result_files),
            "status": self.status,
            "validation_file": self.validation_file,
            "training_file": self.training_file,
            "hyperparameters": hyperparameters,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            "trained_tokens": self.trained_tokens,
            "error": self.error,
            "seed": self.seed,
            "metadata": None if self.metadata is None else dict(self.metadata),
            "estimated_finish": self.estimated_finish(settings.stage_seconds),
            "integrations": list(self.integrations),
            "user_provided_suffix": self.suffix,
        }


def paginate(items: list[Any], after: str | None, limit: int) -> tuple[list[Any], bool]:
    """The ``limit`` items following the one whose id is ``after``, and whether more follow."""
    start = 0
    if after:
        ids = [item.id if not isinstance(item, dict) else item["id"] for item in items]
        if after not in ids:
            raise bad_request(f"No such object for the 'after' cursor: {after}", param="after")
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return page, start + limit < len(items)


class Store:
    """All emulator state. Public methods take the lock; ``_``-methods expect it held."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = threading.RLock()
        self._seq = itertools.count(1)
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, Job] = {}
        self._reports: dict[tuple[str, str, int], DataReport] = {}
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=settings.max_request_log)
        self.refuse_jobs = settings.refuse_jobs
        self.refuse_status = settings.refuse_status
        self.refuse_message: str | None = None
        # Seconds added to the settings' clock (``POST /_emulator/clock``); reset forgets it.
        self.clock_offset = 0.0
        self.deprecations: dict[str, dict[str, int]] = {
            k: dict(v) for k, v in models.AZURE_DEPRECATIONS.items()
        }

    def now(self) -> float:
        return self.settings.clock() + self.clock_offset

    def fine_tuning_closed(self) -> bool:
        closes = self.settings.fine_tuning_closes_at
        return self.refuse_jobs or (closes is not None and self.now() >= closes)

    def reset(self) -> None:
        """Forget every file, job and logged request; refusal goes back to the settings' value."""
        with self.lock:
            self.files.clear()
            self.jobs.clear()
            self._reports.clear()
            self.requests.clear()
            self.refuse_jobs = self.settings.refuse_jobs
            self.refuse_status = self.settings.refuse_status
            self.refuse_message = None
            self.clock_offset = 0.0
            self.deprecations = {k: dict(v) for k, v in models.AZURE_DEPRECATIONS.items()}

    # ----------------------------------------------------------------------------- files

    def add_file(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        with self.lock:
            stored = StoredFile(new_id("file-", 22), next(self._seq), filename, purpose, data, self.now())
            self.files[stored.id] = stored
            return stored

    def get_file(self, file_id: str) -> StoredFile:
        with self.lock:
            stored = self.files.get(file_id)
            if stored is None:
                raise not_found(f"No such File object: {file_id}")
            return stored

    def list_files(self, purpose: str | None, order: str) -> list[StoredFile]:
        with self.lock:
            self._advance_all()
            found = [f for f in self.files.values() if purpose is None or f.purpose == purpose]
        found.sort(key=lambda f: (f.created_at, f.seq), reverse=order == "desc")
        return found

    def delete_file(self, file_id: str) -> dict[str, Any]:
        with self.lock:
            self.get_file(file_id)
            del self.files[file_id]
            return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------------------ jobs

    def create_job(self, body: JobCreate) -> Job:
        """Check a create request as OpenAI does (400s) and enqueue the job."""
        with self.lock:
            if self.fine_tuning_closed():
                raise APIError(
                    self.refuse_status,
                    self.refuse_message or REFUSAL_MESSAGE,
                    type="invalid_request_error",
                    code="fine_tuning_unavailable",
                )
            resolved_model = models.resolve(body.model)
            if resolved_model is None:
                raise bad_request(
                    f"Model {body.model} is not available for fine-tuning or does not exist. "
                    f"Fine-tunable models: {', '.join(models.supported_names())}.",
                    param="model",
                    code="model_not_available",
                )
            model_name, base = resolved_model
            training = self._fine_tune_file(body.training_file, "training_file")
            validation = None
            if body.validation_file:
                validation = self._fine_tune_file(body.validation_file, "validation_file")
            _check_suffix(body.suffix)
            _check_metadata(body.metadata)
            if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
                raise bad_request(f"seed must be between 0 and {MAX_SEED}, got {body.seed}.", param="seed")
            requested = _requested_hyperparameters(body)
            now = self.now()
            job = Job(
                id=new_id("ftjob-"),
                seq=next(self._seq),
                created_at=now,
                status_since=now,
                model=model_name,
                base=base,
                training_file=training.id,
                validation_file=validation.id if validation else None,
                suffix=body.suffix,
                seed=body.seed if body.seed is not None else secrets.randbelow(MAX_SEED),
                metadata=None if body.metadata is None else dict(body.metadata),
                integrations=list(body.integrations or []),
                requested=requested,
                training_report=self._report(training, base, self.settings.min_training_examples, "training"),
                validation_report=self._report(validation, base, 0, "validation") if validation else None,
            )
            self._event(job, now, f"Created fine-tuning job: {job.id}")
            self._event(job, now, f"Validating training file: {job.training_file}")
            if job.validation_file:
                self._event(job, now, f"Validating validation file: {job.validation_file}")
            self.jobs[job.id] = job
            return job

    def get_job(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise not_found(f"Fine-tuning job {job_id} not found.", param="fine_tuning_job_id")
            self.advance(job)
            return job

    def list_jobs(self, metadata: dict[str, str] | None, metadata_null: bool) -> list[Job]:
        """Jobs newest first, filtered by metadata pairs, or to those without metadata."""
        with self.lock:
            self._advance_all()
            jobs = sorted(self.jobs.values(), key=lambda j: (j.created_at, j.seq), reverse=True)
        if metadata_null:
            return [job for job in jobs if not job.metadata]
        if metadata:
            wanted = metadata.items()
            return [job for job in jobs if job.metadata and all(job.metadata.get(k) == v for k, v in wanted)]
        return jobs

    def cancel_job(self, job_id: str) -> Job:
        with self.lock:
            job = self.get_job(job_id)
            if job.status in TERMINAL:
                raise bad_request(
                    f"Job {job_id} has already {job.status} and cannot be cancelled.",
                    param="fine_tuning_job_id",
                    code="invalid_job_status",
                )
            now = self.now()
            job.status, job.status_since, job.finished_at = "cancelled", now, now
            self._event(job, now, "The job was cancelled")
            return job

    def pause_job(self, job_id: str) -> Job:
        with self.lock:
            job = self.get_job(job_id)
            if job.status != "running":
                raise bad_request(
                    f"Only a running job can be paused; job {job_id} is {job.status}.",
                    param="fine_tuning_job_id",
                    code="invalid_job_status",
                )
            now = self.now()
            job.paused_elapsed = now - job.status_since
            job.status, job.status_since = "paused", now
            self._event(job, now, "Fine-tuning job paused")
            return job

    def resume_job(self, job_id: str) -> Job:
        with self.lock:
            job = self.get_job(job_id)
            if job.status != "paused":
                raise bad_request(
                    f"Only a paused job can be resumed; job {job_id} is {job.status}.",
                    param="fine_tuning_job_id",
                    code="invalid_job_status",
                )
            now = self.now()
            job.status, job.status_since = "running", now - job.paused_elapsed
            self._event(job, now, "Fine-tuning job resumed")
            return job

    def fail_job(self, job_id: str, code: str, message: str, param: str | None = None) -> Job:
        """Admin: end a live job as failed with this error."""
        with self.lock:
            job = self.get_job(job_id)
            if job.status in TERMINAL:
                raise APIError(409, f"Job {job_id} has already {job.status}.", param="fine_tuning_job_id")
            self._fail(job, self.now(), code, message, param)
            return job

    def job_events(self, job_id: str) -> list[Event]:
        """Events newest first."""
        with self.lock:
            job = self.get_job(job_id)
            # Not sorted(reverse=True): events of one second stay newest (last appended) first.
            return list(reversed(sorted(job.events, key=lambda e: e.created_at)))  # noqa: C413

    def job_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """Checkpoints newest first (there are some only after success)."""
        with self.lock:
            return list(reversed(self.get_job(job_id).checkpoints))

    # ------------------------------------------------------------------------ lifecycle

    def advance(self, job: Job, now: float | None = None) -> None:
        """Replay every transition of ``job`` that is due by ``now``."""
        now = self.now() if now is None else now
        stage = self.settings.stage_seconds
        with self.lock:
            while job.status in ACTIVE:
                ends = job.status_since + stage
                if job.status == "running":
                    self._report_metrics(job, now)
                if now < ends:
                    return
                if job.status == "validating_files":
                    self._finish_validation(job, ends)
                elif job.status == "queued":
                    job.status, job.status_since = "running", ends
                    self._event(job, ends, "Fine-tuning job started")
                else:
                    self._succeed(job, ends)

    def _advance_all(self) -> None:
        now = self.now()
        for job in list(self.jobs.values()):
            self.advance(job, now)

    def _finish_validation(self, job: Job, at: float) -> None:
        for report, what in ((job.training_report, "training"), (job.validation_report, "validation")):
            if report is not None and not report.ok:
                message = f"The job failed due to an invalid {what} file. {report.error}"
                self._fail(job, at, f"invalid_{what}_file", message, f"{what}_file")
                return
        requested = job.requested
        examples = job.training_report.examples
        job.resolved = {
            "n_epochs": AUTO_EPOCHS if requested["n_epochs"] == "auto" else requested["n_epochs"],
            "batch_size": (
                min(256, max(1, round(examples * 0.002)))
                if requested["batch_size"] == "auto"
                else requested["batch_size"]
            ),
            "learning_rate_multiplier": (
                AUTO_LEARNING_RATE_MULTIPLIER
                if requested["learning_rate_multiplier"] == "auto"
                else float(requested["learning_rate_multiplier"])
            ),
        }
        job.status, job.status_since = "queued", at
        self._event(job, at, "Files validated, moving job to queued state")

    def _report_metrics(self, job: Job, now: float) -> None:
        """Emit the metrics events of the steps done by ``now`` (all of them once time is up)."""
        stage = self.settings.stage_seconds
        steps = job.report_steps
        total = job.total_steps
        done_fraction = 1.0 if stage <= 0 else min(1.0, (now - job.status_since) / stage)
        while job.steps_reported < len(steps) and steps[job.steps_reported] <= done_fraction * total:
            step = steps[job.steps_reported]
            at = job.status_since + (step / total) * stage
            values = job.metrics(step)
            text = f"Step {step}/{total}: training loss={values['train_loss']:.2f}"
            if "valid_loss" in values:
                text += f", validation loss={values['valid_loss']:.2f}"
            data = {**values, "step": step, "total_steps": total}
            self._event(job, at, text, type_="metrics", data=data)
            job.steps_reported += 1

    def _succeed(self, job: Job, at: float) -> None:
        self._report_metrics(job, at)
        epochs = job.resolved["n_epochs"] if job.resolved else AUTO_EPOCHS
        short = job.id.removeprefix("ftjob-")[:8]
        job.fine_tuned_model = f"ft:{job.base.name}:{self.settings.model_owner}:{job.suffix or ''}:{short}"
        job.trained_tokens = job.training_report.tokens * epochs
        for epoch in range(max(1, epochs - CHECKPOINTS_KEPT + 1), epochs + 1):
            step = job.steps_per_epoch * epoch
            job.checkpoints.append(
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": new_id("ftckpt_"),
                    "created_at": int(at),
                    "fine_tuned_model_checkpoint": f"{job.fine_tuned_model}:ckpt-step-{step}",
                    "fine_tuning_job_id": job.id,
                    "metrics": {
                        **job.metrics(step),
                        "full_valid_loss": None,
                        "full_valid_mean_token_accuracy": None,
                    },
                    "step_number": step,
                }
            )
            self._event(job, at, f"Checkpoint created at step {step}")
        results = self.add_file("step_metrics.csv", "fine-tune-results", _metrics_csv(job).encode())
        results.created_at = at
        job.result_files = [results.id]
        job.status, job.status_since, job.finished_at = "succeeded", at, at
        self._event(job, at, f"New fine-tuned model created: {job.fine_tuned_model}")
        self._event(job, at, "The job has successfully completed")

    def _fail(self, job: Job, at: float, code: str, message: str, param: str | None) -> None:
        job.status, job.status_since, job.finished_at = "failed", at, at
        job.error = {"code": code, "message": message, "param": param}
        self._event(job, at, message, level="error")

    def _event(
        self,
        job: Job,
        at: float,
        message: str,
        *,
        level: str = "info",
        type_: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        job.events.append(Event(new_id("ftevent-"), at, level, message, type_, data))

    # ---------------------------------------------------------------------------- helpers

    def _fine_tune_file(self, file_id: str, param: str) -> StoredFile:
        stored = self.files.get(file_id)
        if stored is None:
            raise bad_request(f"invalid {param}: {file_id} (no such file)", param=param, code="invalid_file")
        if stored.purpose != "fine-tune":
            raise bad_request(
                f"File {file_id} has purpose '{stored.purpose}', but fine-tuning needs a file uploaded "
                "with purpose 'fine-tune'.",
                param=param,
                code="invalid_file_purpose",
            )
        return stored

    def _report(self, stored: StoredFile, base: models.BaseModel, min_examples: int, what: str) -> DataReport:
        key = (stored.id, base.name, min_examples)
        if key not in self._reports:
            self._reports[key] = check_file(stored.data, base, min_examples=min_examples, what=what)
        return self._reports[key]

    def state(self) -> dict[str, Any]:
        """Everything, for tests: uploaded files, generated result files, jobs, request log."""
        with self.lock:
            self._advance_all()
            files = sorted(self.files.values(), key=lambda f: f.seq)
            jobs = sorted(self.jobs.values(), key=lambda j: j.seq)
            statuses = collections.Counter(job.status for job in jobs)
            uploaded = [f.to_api() for f in files if f.purpose != "fine-tune-results"]
            results = [f.to_api() for f in files if f.purpose == "fine-tune-results"]
            return {
                "files": uploaded,
                "result_files": results,
                "jobs": [job.to_api(self.settings) for job in jobs],
                "requests": list(self.requests),
                "counts": {
                    "files": len(uploaded),
                    "result_files": len(results),
                    "jobs": len(jobs),
                    "jobs_by_status": dict(statuses),
                    "requests": len(self.requests),
                },
                "refuse_jobs": self.refuse_jobs,
                "stage_seconds": self.settings.stage_seconds,
            }


REFUSAL_MESSAGE = (
    "Fine-tuning is no longer available for this organization: OpenAI has wound down its "
    "self-serve fine-tuning platform, so new fine-tuning jobs cannot be created. Existing "
    "fine-tuned models remain available for inference until their base models are deprecated."
)


def _check_suffix(suffix: str | None) -> None:
    if suffix is None:
        return
    if not 1 <= len(suffix) <= MAX_SUFFIX:
        raise bad_request(
            f"suffix must be between 1 and {MAX_SUFFIX} characters long, got {len(suffix)}.", param="suffix"
        )
    if ":" in suffix or any(ch.isspace() for ch in suffix):
        raise bad_request("suffix may not contain ':' or whitespace.", param="suffix")


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(
            f"metadata may have at most {MAX_METADATA_PAIRS} key-value pairs, got {len(metadata)}.",
            param="metadata",
        )
    for key, value in metadata.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY:
            raise bad_request(
                f"metadata keys must be 1 to {MAX_METADATA_KEY} characters long; "
                f"{key[:80]!r} has {len(key)}.",
                param="metadata",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise bad_request(
                f"metadata values may be at most {MAX_METADATA_VALUE} characters long; "
                f"the value of {key!r} has {len(value)}.",
                param="metadata",
            )


def _requested_hyperparameters(body: JobCreate) -> dict[str, Any]:
    """Merge ``method.supervised.hyperparameters`` and the deprecated ``hyperparameters``."""
    if body.method is not None and body.method.type != "supervised":
        raise bad_request(
            f"The emulator trains with method type 'supervised' only, not {body.method.type!r}.",
            param="method.type",
        )
    legacy = body.hyperparameters.model_dump(exclude_none=True) if body.hyperparameters else {}
    method_hp: Hyperparameters | None = None
    if body.method is not None and body.method.supervised is not None:
        method_hp = body.method.supervised.hyperparameters
    current = method_hp.model_dump(exclude_none=True) if method_hp else {}
    for name in set(legacy) & set(current):
        if legacy[name] != current[name]:
            raise bad_request(
                f"hyperparameters.{name} ({legacy[name]!r}) conflicts with "
                f"method.supervised.hyperparameters.{name} ({current[name]!r}); "
                "hyperparameters is deprecated: use method only.",
                param="hyperparameters",
            )
    merged: dict[str, Any] = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    merged.update(legacy)
    merged.update(current)
    param = "method.supervised.hyperparameters" if current else "hyperparameters"
    limits = {"n_epochs": (1, 50), "batch_size": (1, 256)}
    for name, (low, high) in limits.items():
        value = merged[name]
        if value != "auto" and not low <= value <= high:
            raise bad_request(
                f"{name} must be 'auto' or between {low} and {high}, got {value}.", param=f"{param}.{name}"
            )
    rate = merged["learning_rate_multiplier"]
    if rate != "auto" and not 0 < rate <= 10:
        raise bad_request(
            f"learning_rate_multiplier must be 'auto' or in (0, 10], got {rate}.",
            param=f"{param}.learning_rate_multiplier",
        )
    return merged


def _metrics_csv(job: Job) -> str:
    """The result file's content: one row per reported step."""
    columns = ["step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    rows = [",".join(columns)]
    for step in job.report_steps:
        values = job.metrics(step)
        rows.append(",".join(str(values.get(c, "")) if c != "step" else str(step) for c in columns))
    return "\n".join(rows) + "\n"
