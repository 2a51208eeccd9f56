"""A stateless hook: reads the OpenAI connection and hands out clients and config."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from fine_tuning.config import PipelineConfig
    from openai import AsyncOpenAI


class OpenAIFineTuningHook(BaseHook):
    """OpenAI credentials from an Airflow connection, else from ``OPENAI_API_KEY``/``OPENAI_BASE_URL``.

    The connection keeps the API key in ``password`` and, optionally, the base URL in ``host``
    (e.g. ``https://api.openai.com/v1``, or the emulator's URL in development).
    """

    conn_name_attr = "openai_conn_id"
    default_conn_name = "openai_default"
    conn_type = "generic"
    hook_name = "OpenAI fine-tuning"

    def __init__(self, openai_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.openai_conn_id = openai_conn_id

    @staticmethod
    def _from_connection(conn: Any | None) -> tuple[str | None, str | None]:
        api_key = (conn.password if conn else None) or os.environ.get("OPENAI_API_KEY")
        base_url = (conn.host if conn else None) or os.environ.get("OPENAI_BASE_URL")
        return api_key, base_url

    def credentials(self) -> tuple[str | None, str | None]:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.openai_conn_id)
        except AirflowNotFoundException:
            conn = None
        return self._from_connection(conn)

    async def acredentials(self) -> tuple[str | None, str | None]:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = await self.aget_connection(self.openai_conn_id)
        except AirflowNotFoundException:
            conn = None
        return self._from_connection(conn)

    def apply_to(self, config: PipelineConfig) -> PipelineConfig:
        """The config with the connection's key and URL in place of the environment's."""
        from pydantic import SecretStr

        api_key, base_url = self.credentials()
        services = config.services.model_copy(
            update={
                "openai_api_key": SecretStr(api_key) if api_key else config.services.openai_api_key,
                "openai_base_url": base_url or config.services.openai_base_url,
            }
        )
        return config.model_copy(update={"services": services})

    async def aget_client(self, timeout: float = 30.0, max_retries: int = 3) -> AsyncOpenAI:
        from openai import AsyncOpenAI

        api_key, base_url = await self.acredentials()
        if not api_key:
            raise ValueError(
                f"no OpenAI API key: set the password of connection {self.openai_conn_id!r} or OPENAI_API_KEY"
            )
        return AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
