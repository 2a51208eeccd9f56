"""The ``azure_openai`` provider: OpenAI's job contract on Azure, through the SDK's ``AzureOpenAI``.

Azure serves the same files and fine-tuning endpoints under ``{endpoint}/openai/...`` with an
``api-version`` query parameter and an ``api-key`` header; the SDK's client builds both, so the
whole of the OpenAI provider (look-first creation, retries, breaker, refusal detection) runs
unchanged: only the client differs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from fine_tuning.config import PipelineConfig
from fine_tuning.retirement import ReportedDates
from fine_tuning.train.providers import JobStatus, airflow_connection
from fine_tuning.train.providers.openai import OpenAIProvider

if TYPE_CHECKING:
    from openai import AsyncAzureOpenAI, AzureOpenAI


class AzureConfigError(ValueError):
    """``training.azure`` lacks the endpoint or the key."""


def azure_credentials(config: PipelineConfig) -> tuple[str, str]:
    """``(api_key, endpoint)``: the Airflow connection first, then AZURE_OPENAI_API_KEY/_ENDPOINT."""
    azure = config.training.azure
    conn_key, conn_endpoint = airflow_connection(azure.conn_id)
    api_key = conn_key or (azure.api_key.get_secret_value() if azure.api_key else None)
    endpoint = conn_endpoint or azure.endpoint
    if not endpoint:
        raise AzureConfigError(
            f"training.azure.endpoint is not set (nor the host of connection {azure.conn_id!r}, "
            "nor AZURE_OPENAI_ENDPOINT)"
        )
    if not api_key:
        raise AzureConfigError(
            f"no Azure OpenAI key: set the password of connection {azure.conn_id!r} or AZURE_OPENAI_API_KEY"
        )
    return api_key, endpoint


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI fine-tuning: the same calls as OpenAI's, through ``AzureOpenAI``."""

    name: ClassVar[str] = "azure_openai"

    def client(self, *, max_retries: int | None = None) -> AzureOpenAI:
        from openai import AzureOpenAI

        api_key, endpoint = azure_credentials(self.config)
        services = self.config.services
        return AzureOpenAI(
            azure_endpoint=endpoint,
            api_version=self.config.training.azure.api_version,
            api_key=api_key,
            timeout=services.openai_timeout_seconds,
            max_retries=services.openai_max_retries if max_retries is None else max_retries,
        )

    def aclient(self) -> AsyncAzureOpenAI:
        from openai import AsyncAzureOpenAI

        api_key, endpoint = azure_credentials(self.config)
        return AsyncAzureOpenAI(
            azure_endpoint=endpoint,
            api_version=self.config.training.azure.api_version,
            api_key=api_key,
            timeout=self.config.services.openai_timeout_seconds,
        )

    def model_reference(self, status: JobStatus) -> str | None:
        # Azure serves a fine-tuned model through a deployment; routing calls the deployment.
        return self.config.training.azure.deployment_name or status.model_reference

    def reported_retirements(self) -> dict[tuple[str, str], ReportedDates]:
        """Azure's own dates: ``GET {endpoint}/openai/models`` reports, per model, the Unix
        timestamps ``deprecation.fine_tune`` and ``deprecation.inference``."""
        client = self.client(max_retries=1)
        page = self.guarded(client.models.list)
        reported: dict[tuple[str, str], ReportedDates] = {}
        for model in page.data:
            extra: dict[str, Any] = model.model_extra or {}
            deprecation = extra.get("deprecation") or {}
            if not deprecation:
                continue
            reported[(self.name, model.id)] = ReportedDates(
                training_retires=_day(deprecation.get("fine_tune")),
                inference_retires=_day(deprecation.get("inference")),
                source=f"Azure OpenAI Models API of {azure_credentials(self.config)[1]} (deprecation)",
            )
        return reported


def _day(timestamp: Any) -> Any:
    """A Unix timestamp as its UTC day (None stays None)."""
    if timestamp in (None, ""):
        return None
    return datetime.fromtimestamp(int(timestamp), UTC).date()
