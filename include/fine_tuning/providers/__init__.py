"""Training providers: where a fine-tuning job runs, behind one interface.

OpenAI closes new fine-tuning jobs on 2027-01-06, so everything but the training step
(collection, A/B test, rollout, MLflow, breakers) must not care which provider trained the
candidate. A provider prepares the dataset in its format, estimates the cost, uploads and
submits idempotently (a key from dag_id, run_id and the dataset's sha256; it looks for an
earlier try's file/job first), reports status in the same states for every provider, cancels,
and names the trained model in a way the A/B routing and MLflow understand.

``get_provider(config)`` picks the implementation from ``training.provider``:
``openai`` (default), ``azure_openai`` or ``selfhosted`` (LoRA with transformers + peft + trl).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from fine_tuning.config import PipelineConfig

JobState = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class UnknownProviderError(ValueError):
    """``training.provider`` names no provider this build knows."""


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
        return cls(**{k: data.get(k) for k in ("job_id", "status", "model_reference", "trained_tokens",
                                                "error", "created_at", "finished_at")},
                   details=data.get("details") or {})


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
        from fine_tuning import tokens as token_math

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
    def submit(self, file_id: str, metadata: dict[str, str]) -> tuple[str, bool]:
        """Start the job once per ``metadata["idempotency_key"]`` (looking first): ``(job_id, reused)``.

        :raises TrainingRefusedError: the provider will not train at all (no retry can help).
        """

    @abstractmethod
    def status(self, job_id: str) -> JobStatus:
        """The job's state now."""

    async def astatus(self, job_id: str) -> JobStatus:
        """The job's state without blocking the triggerer's event loop."""
        return await asyncio.to_thread(self.status, job_id)

    @abstractmethod
    def cancel(self, job_id: str) -> str:
        """Cancel unless already finished; returns the state afterwards."""

    def model_reference(self, status: JobStatus) -> str | None:
        """The id that routing and MLflow use for the trained model."""
        return status.model_reference

    def artifacts(self, status: JobStatus) -> dict[str, Any]:
        """Files and metrics to log to MLflow with the candidate (none for hosted providers)."""
        return {}


PROVIDERS: dict[str, str] = {
    "openai": "fine_tuning.providers.openai:OpenAIProvider",
    "azure_openai": "fine_tuning.providers.azure_openai:AzureOpenAIProvider",
    "selfhosted": "fine_tuning.providers.selfhosted:SelfHostedProvider",
}


def provider_class(name: str) -> type[TrainingProvider]:
    """The class behind a provider name (imported lazily: heavy clients load only when used)."""
    import importlib

    try:
        module_name, class_name = PROVIDERS[name].split(":")
    except KeyError:
        raise UnknownProviderError(
            f"training.provider {name!r} is not one of {', '.join(PROVIDERS)}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)


def get_provider(config: PipelineConfig, name: str | None = None) -> TrainingProvider:
    """The provider that ``training.provider`` (or ``name``) selects, bound to ``config``."""
    return provider_class(name or config.training.provider)(config)
