"""The ``openai_compatible`` provider: a gateway or host that speaks OpenAI's files and
fine-tuning jobs API at its own base URL (a LiteLLM proxy's managed fine-tuning, a hosted trainer
driven with the openai SDK).

Only the client differs from the OpenAI provider, so the whole of its contract holds unchanged:
the file and the job are looked for (by name and size, by ``metadata``) before they are made,
creation is never retried blindly, and a refusal is recognised by its code and its message. The
host's own training prices are in ``training.openai_compatible.price_per_million_training_tokens``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from fine_tuning.train.providers import TrainingRefusedError, airflow_connection
from fine_tuning.train.providers.openai import OpenAIProvider

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI

CONN_ID = "openai_compatible_default"


class OpenAICompatibleProvider(OpenAIProvider):
    """Fine-tuning through any server with OpenAI's files + fine-tuning jobs endpoints."""

    name: ClassVar[str] = "openai_compatible"

    def credentials(self) -> tuple[str, str]:
        """``(api_key, base_url)``: the Airflow connection first, then the config / environment."""
        settings = self.config.training.openai_compatible
        conn_key, conn_url = airflow_connection(CONN_ID)
        api_key = conn_key or (settings.api_key.get_secret_value() if settings.api_key else None)
        base_url = conn_url or settings.base_url
        if not base_url:
            raise TrainingRefusedError(
                "training.openai_compatible.base_url is not set (nor the host of connection "
                f"{CONN_ID!r}, nor FINE_TUNING_OPENAI_COMPATIBLE_BASE_URL)"
            )
        if not api_key:
            raise TrainingRefusedError(
                f"no key for the OpenAI-compatible endpoint {base_url}: set the password of connection "
                f"{CONN_ID!r} or FINE_TUNING_OPENAI_COMPATIBLE_API_KEY"
            )
        return api_key, base_url

    def client(self, *, max_retries: int | None = None) -> OpenAI:
        from openai import OpenAI

        api_key, base_url = self.credentials()
        services = self.config.services
        return OpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=services.openai_timeout_seconds,
            max_retries=services.openai_max_retries if max_retries is None else max_retries,
        )

    def aclient(self) -> AsyncOpenAI:
        from openai import AsyncOpenAI

        api_key, base_url = self.credentials()
        services = self.config.services
        return AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=services.openai_timeout_seconds,
            max_retries=services.openai_max_retries,
        )
