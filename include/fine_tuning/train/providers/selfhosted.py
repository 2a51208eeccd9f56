"""The ``selfhosted`` provider: LoRA SFT of an open-weights chat model on our own hardware.

The job is the trainer process (``fine_tuning.train.providers.selfhosted_train``) and its folder
``{output_dir}/{job_id}/`` on the data volume: ``status.json`` (the state, shared with the wait),
``adapter/`` (safetensors) and ``metrics.json``. Local mode starts the trainer as a detached
process, so the worker is not blocked by torch; the kubernetes train pod (GPU node, base model
volume) sets ``FINE_TUNING_SELFHOSTED_FOREGROUND=1`` and trains in the pod itself. Either way the
wait reads the status file.

Idempotency: the job id is derived from the key (dag_id, run_id, dataset sha256); ``submit``
first looks for a job folder of that key that is alive or succeeded and reuses it. A failed or
cancelled one is kept and a new attempt gets the next number.

The trained model's reference is ``selfhosted:<adapter name>``; the adapter name is the
``lora_name`` under which vLLM serves it (``fine_tuning.deploy.serving`` loads it there).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from fine_tuning.train.providers import REUSABLE_STATES, JobNotFound, JobStatus, TrainingProvider
from fine_tuning.train.providers.selfhosted_train import METRICS_FILE, read_status, write_status

log = logging.getLogger(__name__)

FOREGROUND_ENV = "FINE_TUNING_SELFHOSTED_FOREGROUND"
MODEL_PREFIX = "selfhosted:"
STATUS_FILE = "status.json"
LOG_FILE = "train.log"


class SelfHostedConfigError(ValueError):
    """``training.selfhosted`` is missing something the trainer needs."""


def adapter_name(job_id: str) -> str:
    """The adapter's serving name (vLLM ``lora_name``): short, stable, from the job id."""
    return job_id.removeprefix("selfhosted-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


class SelfHostedProvider(TrainingProvider):
    """LoRA SFT with transformers + peft + trl, as a local process or a GPU pod."""

    name: ClassVar[str] = "selfhosted"
    breaker: ClassVar[str | None] = None

    def jobs_dir(self) -> Path:
        configured = Path(self.config.training.selfhosted.output_dir)
        return configured if configured.is_absolute() else Path(self.config.data_dir) / configured

    def job_dir(self, job_id: str) -> Path:
        if "/" in job_id or job_id.startswith("."):
            raise ValueError(f"not a self-hosted job id: {job_id!r}")
        return self.jobs_dir() / job_id

    def price_per_million(self) -> float:
        return self.config.training.selfhosted.price_per_million_tokens

    def upload(self, dataset_path: Path, idempotency_key: str) -> tuple[str, bool]:
        """The trainer reads the dataset from the shared data volume: its path is the file id."""
        if not dataset_path.exists():
            raise FileNotFoundError(f"dataset {dataset_path} does not exist")
        return str(dataset_path.resolve()), True

    def _attempts(self, key: str) -> list[Path]:
        prefix = f"selfhosted-{key}-"
        if not self.jobs_dir().exists():
            return []
        found = [p for p in self.jobs_dir().iterdir() if p.is_dir() and p.name.startswith(prefix)]
        return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))

    def find_job(self, key: str) -> str | None:
        """The job of this key that is alive or succeeded (failed/cancelled ones are not reused)."""
        for folder in reversed(self._attempts(key)):
            if self.status(folder.name).status in REUSABLE_STATES:
                return folder.name
        return None

    def submit(
        self, file_id: str, metadata: dict[str, str], validation_file_id: str | None = None
    ) -> tuple[str, bool]:
        settings = self.config.training.selfhosted
        if not settings.base_model_path:
            raise SelfHostedConfigError(
                "training.selfhosted.base_model_path is not set: point it at the base model's "
                "directory (a volume), e.g. FINE_TUNING_BASE_MODEL_PATH=/models/<name>"
            )
        key = metadata["idempotency_key"]
        existing = self.find_job(key)
        if existing is not None:
            log.info("self-hosted job %s found again (%s)", existing, self.status(existing).status)
            if os.environ.get(FOREGROUND_ENV) == "1":
                self._wait_for_process(existing)
            return existing, True
        job_id = f"selfhosted-{key}-{len(self._attempts(key)) + 1}"
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True)
        status_file = folder / STATUS_FILE
        # The status exists before the process does: a look in between finds the job.
        write_status(
            status_file,
            job_id=job_id,
            status="queued",
            created_at=int(time.time()),
            host=socket.gethostname(),
            metadata=metadata,
            dataset=file_id,
        )
        command = [
            sys.executable,
            "-m",
            "fine_tuning.train.providers.selfhosted_train",
            "--job-id",
            job_id,
            "--dataset",
            file_id,
            "--base-model-path",
            settings.base_model_path,
            "--output-dir",
            str(folder),
            "--status-file",
            str(status_file),
            "--model-reference",
            f"{MODEL_PREFIX}{adapter_name(job_id)}",
            "--lora-r",
            str(settings.lora_r),
            "--lora-alpha",
            str(settings.lora_alpha),
            "--lora-dropout",
            str(settings.lora_dropout),
            "--max-steps",
            str(settings.max_steps),
            "--epochs",
            str(settings.epochs),
            "--learning-rate",
            str(settings.learning_rate),
            "--batch-size",
            str(settings.batch_size),
            "--max-length",
            str(settings.max_length),
            "--seed",
            str(settings.seed),
        ]
        if validation_file_id:  # the validation split is the trainer's eval set
            command += ["--eval-dataset", validation_file_id]
        with (folder / LOG_FILE).open("ab") as log_file:
            # A session of its own: the trainer outlives the task process that started it.
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        write_status(status_file, pid=process.pid)
        log.info("self-hosted job %s started (pid %d, log %s)", job_id, process.pid, folder / LOG_FILE)
        if os.environ.get(FOREGROUND_ENV) == "1":  # the train pod: the pod is the job
            process.wait()
        return job_id, False

    def _wait_for_process(self, job_id: str) -> None:
        while not self.status(job_id).terminal:
            time.sleep(5)

    def status(self, job_id: str) -> JobStatus:
        try:
            status_file = self.job_dir(job_id) / STATUS_FILE
        except ValueError as exc:
            raise JobNotFound(str(exc)) from exc
        data = read_status(status_file)
        if data is None:
            raise JobNotFound(f"self-hosted job {job_id}: no status file {status_file}")
        state = data.get("status", "queued")
        pid = data.get("pid")
        # A trainer that died without a word (SIGKILL, OOM, the machine) must not look alive
        # forever; only checkable from the machine that started it.
        if (
            state not in ("succeeded", "failed", "cancelled")
            and pid
            and data.get("host") == socket.gethostname()
            and not _pid_alive(int(pid))
            and time.time() - data.get("updated_at", 0) > 2
        ):
            data = read_status(status_file) or data  # it may have just finished
            if data.get("status") not in ("succeeded", "failed", "cancelled"):
                data = write_status(
                    status_file,
                    status="failed",
                    finished_at=int(time.time()),
                    error=f"trainer process {pid} is gone (see {status_file.parent / LOG_FILE})",
                )
            state = data["status"]
        error = data.get("error")
        return JobStatus(
            job_id=job_id,
            status=state,
            model_reference=data.get("model_reference") if state == "succeeded" else None,
            trained_tokens=data.get("trained_tokens"),
            error=f"self-hosted job {job_id} {state}: {error}" if error else None,
            created_at=data.get("created_at"),
            finished_at=data.get("finished_at"),
            details={k: data[k] for k in ("step", "max_steps", "loss", "adapter_dir") if k in data},
        )

    def cancel(self, job_id: str) -> str:
        current = self.status(job_id)
        if current.terminal:
            return current.status
        data = read_status(self.job_dir(job_id) / STATUS_FILE) or {}
        pid = data.get("pid")
        if pid and data.get("host") == socket.gethostname() and _pid_alive(int(pid)):
            os.kill(int(pid), signal.SIGTERM)  # the trainer writes "cancelled" itself
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not self.status(job_id).terminal:
                time.sleep(0.2)
        if not self.status(job_id).terminal:
            write_status(
                self.job_dir(job_id) / STATUS_FILE,
                status="cancelled",
                finished_at=int(time.time()),
                error="cancelled",
            )
        return self.status(job_id).status

    def loss_curves(self, job_id: str) -> list[dict[str, float]]:
        """From the trainer's metrics: the loss of every step, the eval loss where it evaluated."""
        metrics_path = self.job_dir(job_id) / METRICS_FILE
        if not metrics_path.exists():
            raise FileNotFoundError(f"self-hosted job {job_id} has no {metrics_path} with its losses")
        metrics = json.loads(metrics_path.read_text())
        curves: dict[float, dict[str, float]] = {}
        for point in metrics.get("loss_history", []):
            curves.setdefault(float(point["step"]), {"step": float(point["step"])})["train_loss"] = point[
                "loss"
            ]
        for point in metrics.get("eval_loss_history", []):
            curves.setdefault(float(point["step"]), {"step": float(point["step"])})["valid_loss"] = point[
                "loss"
            ]
        return [curves[step] for step in sorted(curves)]

    def artifacts(self, status: JobStatus) -> dict[str, Any]:
        """The adapter folder and the training metrics, for MLflow."""
        folder = self.job_dir(status.job_id)
        metrics_path = folder / METRICS_FILE
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        return {"adapter_dir": str(folder / "adapter"), "metrics": metrics}
