"""Stateless hooks: the OpenAI connection (clients and config), and the services' connections."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from fine_tuning.config import PipelineConfig


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
    def from_connection(conn: Any | None) -> tuple[str | None, str | None]:
        """The key and URL from a connection (or None), else from the environment."""
        api_key = (conn.password if conn else None) or os.environ.get("OPENAI_API_KEY")
        base_url = (conn.host if conn else None) or os.environ.get("OPENAI_BASE_URL")
        return api_key, base_url

    def credentials(self) -> tuple[str | None, str | None]:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.openai_conn_id)
        except AirflowNotFoundException:
            conn = None
        return self.from_connection(conn)

    async def acredentials(self) -> tuple[str | None, str | None]:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = await self.aget_connection(self.openai_conn_id)
        except AirflowNotFoundException:
            conn = None
        return self.from_connection(conn)

    def apply_to(self, config: PipelineConfig) -> PipelineConfig:
        """The config with the connection's key and URL in place of the environment's."""
        return self.with_credentials(config, *self.credentials())

    async def aapply_to(self, config: PipelineConfig) -> PipelineConfig:
        """:meth:`apply_to` for the triggerer: the connection is looked up without blocking."""
        return self.with_credentials(config, *await self.acredentials())

    @staticmethod
    def with_credentials(config: PipelineConfig, api_key: str | None, base_url: str | None) -> PipelineConfig:
        """The config with this key and URL where they are set; the config's own otherwise."""
        from pydantic import SecretStr

        services = config.services.model_copy(
            update={
                "openai_api_key": SecretStr(api_key) if api_key else config.services.openai_api_key,
                "openai_base_url": base_url or config.services.openai_base_url,
            }
        )
        return config.model_copy(update={"services": services})


def connection_url(conn: Any, scheme: str) -> str:
    """A connection as a URL the libraries take (psycopg, redis-py): ``scheme://login:password@host:port/schema``.

    For PostgreSQL the extras (``sslmode``, ``options``...) become libpq query parameters; for
    Redis the database number comes from the extra ``db`` (else the schema, else 0).
    """
    from urllib.parse import quote, urlencode

    auth = ""
    if conn.login or conn.password:
        auth = (
            quote(conn.login or "", safe="")
            + (f":{quote(conn.password, safe='')}" if conn.password else "")
            + "@"
        )
    port = f":{conn.port}" if conn.port else ""
    extras = conn.extra_dejson or {}
    if scheme == "redis":
        return f"redis://{auth}{conn.host or '127.0.0.1'}{port}/{extras.get('db', conn.schema or 0)}"
    query = urlencode({k: v for k, v in extras.items() if isinstance(v, str | int | float)})
    return f"{scheme}://{auth}{conn.host or '127.0.0.1'}{port}/{conn.schema or ''}" + (
        f"?{query}" if query else ""
    )


class ServiceConnectionsHook(BaseHook):
    """The posts database, Redis and MLflow from Airflow connections, where they exist.

    ``postgres_default`` (the posts database), ``redis_default`` (routing, breakers, cache) and
    ``mlflow_default`` (the tracking server: its host is the URI) take the place of
    ``DATABASE_URL`` / ``REDIS_URL`` / ``MLFLOW_TRACKING_URI``; a missing connection leaves the
    environment's value. ``airflow_settings.yaml`` defines all three.
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "postgres_default"
    conn_type = "postgres"
    hook_name = "Fine-tuning pipeline services"

    def __init__(
        self,
        postgres_conn_id: str = "postgres_default",
        redis_conn_id: str = "redis_default",
        mlflow_conn_id: str = "mlflow_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.postgres_conn_id = postgres_conn_id
        self.redis_conn_id = redis_conn_id
        self.mlflow_conn_id = mlflow_conn_id

    def _connection(self, conn_id: str) -> Any | None:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            return self.get_connection(conn_id)
        except AirflowNotFoundException:
            return None

    async def _aconnection(self, conn_id: str) -> Any | None:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            return await self.aget_connection(conn_id)
        except AirflowNotFoundException:
            return None

    def database_url(self) -> str | None:
        conn = self._connection(self.postgres_conn_id)
        return connection_url(conn, "postgresql") if conn else None

    def redis_url(self) -> str | None:
        conn = self._connection(self.redis_conn_id)
        return connection_url(conn, "redis") if conn else None

    def mlflow_tracking_uri(self) -> str | None:
        return self._tracking_uri(self._connection(self.mlflow_conn_id))

    @staticmethod
    def _tracking_uri(conn: Any | None) -> str | None:
        if conn is None or not conn.host:
            return None
        if "://" in conn.host:
            return conn.host
        return f"http://{conn.host}" + (f":{conn.port}" if conn.port else "")

    def apply_to(self, config: PipelineConfig) -> PipelineConfig:
        """The config with each existing connection in place of the environment's value."""
        return self._applied(config, self.database_url(), self.redis_url(), self.mlflow_tracking_uri())

    async def aapply_to(self, config: PipelineConfig) -> PipelineConfig:
        """:meth:`apply_to` for the triggerer: the connections are looked up without blocking."""
        postgres = await self._aconnection(self.postgres_conn_id)
        redis_conn = await self._aconnection(self.redis_conn_id)
        return self._applied(
            config,
            connection_url(postgres, "postgresql") if postgres else None,
            connection_url(redis_conn, "redis") if redis_conn else None,
            self._tracking_uri(await self._aconnection(self.mlflow_conn_id)),
        )

    @staticmethod
    def _applied(
        config: PipelineConfig, database_url: str | None, redis_url: str | None, tracking_uri: str | None
    ) -> PipelineConfig:
        from pydantic import SecretStr

        services: dict[str, Any] = {}
        if database_url is not None:
            services["database_url"] = SecretStr(database_url)
        if redis_url is not None:
            services["redis_url"] = SecretStr(redis_url)
        update: dict[str, Any] = {"services": config.services.model_copy(update=services)}
        if tracking_uri is not None:
            update["mlflow"] = config.mlflow.model_copy(update={"tracking_uri": tracking_uri})
        return config.model_copy(update=update)
