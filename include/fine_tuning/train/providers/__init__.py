"""Training providers: where a fine-tuning job runs, behind one interface.

OpenAI closes new fine-tuning jobs on 2027-01-06, so everything but the training step
(collection, A/B test, rollout, MLflow, breakers) must not care which provider trained the
candidate. A provider prepares the dataset in its format, estimates the cost, uploads and
submits idempotently (a key from dag_id, run_id and the dataset's sha256; it looks for an
earlier try's file/job first), reports status in the same states for every provider, cancels,
and names the trained model in a way the A/B routing and MLflow understand.

``get_provider(config)`` picks the implementation from ``training.provider``:
``openai`` (default), ``azure_openai``, ``openai_compatible`` (a gateway or host speaking OpenAI's
files + fine-tuning jobs API) or ``selfhosted`` (LoRA with transformers + peft + trl).
"""

from __future__ import annotations

import asyncio
import logging
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

from fine_tuning.collect import tokens as token_math
from fine_tuning.config import PipelineConfig
from fine_tuning.manifests import JobResult
from fine_tuning.retirement import ReportedDates

log = logging.getLogger(__name__)

JobState = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
# The one set of states a job does not leave, for every provider (the wait ends on them).
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
# A job of this run in one of these states is the run's job: a retry reuses it instead of
# starting another (a failed or cancelled one is not reused).
REUSABLE_STATES = frozenset({"validating_files", "queued", "running", "succeeded"})


class UnknownProviderError(ValueError):
    """``training.provider`` names no provider this build knows."""


class TrainingRefusedError(RuntimeError):
    """The provider will not train (closed fine-tuning, no quota, no key): retrying cannot help."""


class FineTuningJobFailed(RuntimeError):
    """The fine-tuning job ended failed or cancelled; the message carries the provider's error."""


class JobNotFound(LookupError):
    """The provider has no job of this id (any more): waiting for it cannot help."""


def job_metadata(idempotency_key: str, dag_id: str, run_id: str, dataset_sha256: str) -> dict[str, str]:
    """What a job carries to be found again on a retry (OpenAI limits values to 512 characters)."""
    return {
        "idempotency_key": idempotency_key,
        "dag_id": dag_id[:512],
        "run_id": run_id[:512],
        "dataset_sha256": dataset_sha256,
    }


@dataclass(frozen=True)
class CostEstimate:
    """What the cost guard compares with ``training.max_training_cost_usd``."""

    tokens: int
    epochs: int
    price_per_million_tokens: float
    cost_usd: float


@dataclass(frozen=True)
class JobStatus:
    """A job's state in the provider-neutral vocabulary (see ``JOB_STATES``).

    ``model_reference`` is what the A/B routing and MLflow use as the model id once the job
    succeeded: ``ft:...`` for OpenAI, the fine-tuned model for Azure, ``selfhosted:<adapter>``.
    """

    job_id: str
    status: JobState
    model_reference: str | None = None
    trained_tokens: int | None = None
    error: str | None = None
    created_at: int | None = None
    finished_at: int | None = None
    # Progress for the logs (step, loss, ...); not part of the contract.
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATES

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe form (a trigger event carries it to the operator)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "model_reference": self.model_reference,
            "trained_tokens": self.trained_tokens,
            "error": self.error,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobStatus:
        if data.get("status") not in JOB_STATES:
            raise ValueError(f"job status {data.get('status')!r} is not one of {', '.join(JOB_STATES)}")
        return cls(
            job_id=str(data["job_id"]),
            status=cast(JobState, data["status"]),
            model_reference=data.get("model_reference"),
            trained_tokens=data.get("trained_tokens"),
            error=data.get("error"),
            created_at=data.get("created_at"),
            finished_at=data.get("finished_at"),
            details=data.get("details") or {},
        )


class TrainingProvider(ABC):
    """One place where fine-tuning happens. Every method is safe to call again on a retry."""

    name: ClassVar[str]
    # The circuit breaker guarding the provider's remote API (None: nothing remote to guard).
    breaker: ClassVar[str | None] = None

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    def prepare_dataset(self, dataset_path: Path) -> Path:
        """The dataset in the provider's format. All three read OpenAI's chat JSONL as it is."""
        return dataset_path

    def estimate_cost(self, tokens: int, examples: int) -> CostEstimate:
        """Tokens x epochs x the price per million training tokens of the base model."""
        training = self.config.training
        epochs = token_math.estimate_epochs(examples, training.hyperparameters.n_epochs)
        price = self.price_per_million()
        return CostEstimate(tokens, epochs, price, token_math.estimate_training_cost(tokens, epochs, price))

    def price_per_million(self) -> float:
        return self.config.training.price_per_million()

    @abstractmethod
    def upload(self, dataset_path: Path, idempotency_key: str) -> tuple[str, bool]:
        """Make the dataset available to the trainer once per key: ``(file_id, reused)``."""

    @abstractmethod
    def submit(
        self, file_id: str, metadata: dict[str, str], validation_file_id: str | None = None
    ) -> tuple[str, bool]:
        """Start the job once per ``metadata["idempotency_key"]`` (looking first): ``(job_id, reused)``.
        ``validation_file_id`` (an uploaded validation split) is the job's validation / eval set.

        :raises TrainingRefusedError: the provider will not train at all (no retry can help).
        """

    @abstractmethod
    def status(self, job_id: str) -> JobStatus:
        """The job's state now.

        :raises JobNotFound: there is no such job.
        """

    async def astatus(self, job_id: str) -> JobStatus:
        """The job's state without blocking the triggerer's event loop (what the trigger polls).

        :raises JobNotFound: there is no such job.
        :raises CircuitOpenError: the provider's breaker is open: poll again after its open time.
        """
        return await asyncio.to_thread(self.status, job_id)

    @abstractmethod
    def cancel(self, job_id: str) -> str:
        """Cancel unless already finished; returns the state afterwards."""

    def model_reference(self, status: JobStatus) -> str | None:
        """The id that routing and MLflow use for the trained model."""
        return status.model_reference

    def result(self, status: JobStatus) -> JobResult:
        """A terminal status as the wait's manifest: the one way every path ends a job (the CLI's
        blocking wait, the operator after its trigger, a retry that finds the job done)."""
        if not status.terminal:
            raise ValueError(f"{self.name} job {status.job_id} is {status.status}, not finished")
        succeeded = status.status == "succeeded"
        return JobResult(
            provider=self.name,
            job_id=status.job_id,
            status=cast(Literal["succeeded", "failed", "cancelled"], status.status),
            fine_tuned_model=self.model_reference(status) if succeeded else None,
            trained_tokens=status.trained_tokens,
            error=None if succeeded else (status.error or f"{self.name} job {status.job_id} {status.status}"),
            created_at=status.created_at,
            finished_at=status.finished_at,
        )

    def artifacts(self, status: JobStatus) -> dict[str, Any]:
        """Files and metrics to log to MLflow with the candidate (none for hosted providers)."""
        return {}

    def reported_retirements(self) -> dict[tuple[str, str], ReportedDates]:
        """Retirement dates the provider reports for its models, keyed by (provider, model);
        empty where it reports none (the shipped table then applies)."""
        return {}

    @abstractmethod
    def loss_curves(self, job_id: str) -> list[dict[str, float]]:
        """The finished job's losses by step: ``{"step", "train_loss"[, "valid_loss"]}`` in step
        order (what the loss gate judges and MLflow plots)."""


def airflow_connection(conn_id: str) -> tuple[str | None, str | None]:
    """``(password, host)`` of an Airflow connection, when Airflow and the connection exist (a
    provider's key and endpoint; the library also runs without Airflow: CLI, pods)."""
    try:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:  # the library runs without Airflow (CLI, pods)
        return None, None
    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None, None
    except Exception as exc:  # noqa: BLE001 - outside a task there is no supervisor to ask: use the environment
        log.debug("connection %s not readable here (%s); using the environment", conn_id, exc)
        return None, None
    return conn.password or None, conn.host or None


PROVIDERS: dict[str, str] = {
    "openai": "fine_tuning.train.providers.openai:OpenAIProvider",
    "azure_openai": "fine_tuning.train.providers.azure_openai:AzureOpenAIProvider",
    "selfhosted": "fine_tuning.train.providers.selfhosted:SelfHostedProvider",
    "openai_compatible": "fine_tuning.train.providers.openai_compatible:OpenAICompatibleProvider",
}


def provider_class(name: str) -> type[TrainingProvider]:
    """The class behind a provider name, imported by name when first asked for: a provider's
    module may load a heavy client, and only the configured one is needed."""
    if name not in PROVIDERS:
        raise UnknownProviderError(f"training.provider {name!r} is not one of {', '.join(PROVIDERS)}")
    provider: type[TrainingProvider] = pkgutil.resolve_name(PROVIDERS[name])
    return provider


def get_provider(config: PipelineConfig, name: str | None = None) -> TrainingProvider:
    """The provider that ``training.provider`` (or ``name``) selects, bound to ``config``."""
    return provider_class(name or config.training.provider)(config)
