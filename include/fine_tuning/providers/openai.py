"""The ``openai`` provider: OpenAI's fine-tuning API, through ``fine_tuning.openai_training``.

That module keeps the idempotent look-first creation, the bounded retries, the breaker and the
refusal detection (closed fine-tuning, ``insufficient_quota`` -> ``TrainingRefusedError`` with a
message saying how to switch ``training.provider``); this class only adapts it to the interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fine_tuning.providers import JobStatus, TrainingProvider

if TYPE_CHECKING:
    from openai.types.fine_tuning import FineTuningJob

# OpenAI's ``paused`` is not a state every provider has: the job waits, as a queued one does.
_STATE_MAP = {"paused": "queued"}


def job_status(job: FineTuningJob | Any) -> JobStatus:
    """An OpenAI (or Azure) job object in the provider-neutral vocabulary."""
    from fine_tuning.openai_training import job_error_message

    status = _STATE_MAP.get(job.status, job.status)
    return JobStatus(
        job_id=job.id,
        status=status,
        model_reference=job.fine_tuned_model,
        trained_tokens=job.trained_tokens,
        error=None if status in ("succeeded", "validating_files", "queued", "running") else job_error_message(job),
        created_at=job.created_at,
        finished_at=job.finished_at,
        details={"provider_status": job.status},
    )


class OpenAIProvider(TrainingProvider):
    """OpenAI's hosted fine-tuning (closes to new jobs on 2027-01-06)."""

    name: ClassVar[str] = "openai"
    breaker: ClassVar[str | None] = "openai"

    def upload(self, dataset_path: Path, idempotency_key: str) -> tuple[str, bool]:
        from fine_tuning import openai_training

        return openai_training.upload_file(self.config, dataset_path, idempotency_key)

    def submit(self, file_id: str, metadata: dict[str, str]) -> tuple[str, bool]:
        from fine_tuning import openai_training

        job, reused = openai_training.start_job(self.config, file_id, metadata)
        return job.id, reused

    def retrieve(self, job_id: str) -> FineTuningJob:
        """The provider's own job object (the trigger's event carries it for OpenAI)."""
        from fine_tuning import openai_training

        return openai_training.retrieve_job(self.config, job_id)

    def status(self, job_id: str) -> JobStatus:
        return job_status(self.retrieve(job_id))

    def cancel(self, job_id: str) -> str:
        from fine_tuning import openai_training

        return openai_training.cancel_job(self.config, job_id)
