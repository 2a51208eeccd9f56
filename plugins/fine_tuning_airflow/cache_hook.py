"""A stateless hook for cached metrics: SQL aggregates from PostgreSQL, cached in Redis with a TTL.

An A/B test's metrics are read many times while it runs (every API status call, every UI
page); the hook serves repeats from Redis (TTL ``cache.ttl_seconds``, 300 s by default, served
stale for ``cache.stale_seconds`` more while one caller refreshes) and counts hits and misses.
The evaluate task (``ABTestEvaluationOperator``, in both execution modes) decides each look on
fresh aggregates and writes the look's report through this hook's cache, so readers find the
new look without a recompute. When Redis is down every read goes to PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from fine_tuning.config import PipelineConfig
    from fine_tuning.infra.cache import CacheStats, MetricsCache

T = TypeVar("T")


class CachedMetricsHook(BaseHook):
    """PostgreSQL from ``postgres_conn_id`` (else ``DATABASE_URL``), Redis from ``redis_conn_id``
    (else ``REDIS_URL``); TTL and key prefix from the pipeline config.

    :param postgres_conn_id: Airflow connection of the posts database.
    :param redis_conn_id: Airflow connection of the cache's Redis.
    :param config: the pipeline config (default: loaded from the environment).
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "postgres_default"
    conn_type = "postgres"
    hook_name = "Cached pipeline metrics"

    def __init__(
        self,
        postgres_conn_id: str = "postgres_default",
        redis_conn_id: str = "redis_default",
        config: PipelineConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.postgres_conn_id = postgres_conn_id
        self.redis_conn_id = redis_conn_id
        self._config = config

    @property
    def config(self) -> PipelineConfig:
        if self._config is None:
            from fine_tuning.config import load_config

            self._config = load_config()
        return self._config

    def _services(self) -> Any:
        from fine_tuning_airflow.hooks import ServiceConnectionsHook

        return ServiceConnectionsHook(
            postgres_conn_id=self.postgres_conn_id, redis_conn_id=self.redis_conn_id
        )

    def database_url(self) -> str:
        url = self._services().database_url()
        return url or os.environ.get("DATABASE_URL") or self.config.services.database_url.get_secret_value()

    def redis_url(self) -> str:
        url = self._services().redis_url()
        return url or os.environ.get("REDIS_URL") or self.config.services.redis_url.get_secret_value()

    def get_cache(self) -> MetricsCache:
        """The cache, as the config sets it up (TTL, stale serving, key prefix, StatsD counts) on
        the hook's Redis; its counters live in Redis and in the process, not in the hook."""

        config = self.config
        return _cache_for(config, self.redis_url() if config.cache.enabled else None)

    def get_metrics(self, name: str, compute: Callable[[], T], ttl_seconds: int | None = None) -> T:
        """A cached value by name, computed by ``compute`` on a miss."""
        return self.get_cache().get_or_compute(name, compute, ttl_seconds)

    def get_records(
        self,
        sql: str,
        parameters: Sequence[Any] | Mapping[str, Any] | None = None,
        ttl_seconds: int | None = None,
    ) -> list[dict[str, Any]]:
        """Rows of a (read-only, aggregate) query as dicts, cached by the query and its parameters."""
        import psycopg
        from psycopg.rows import dict_row

        from fine_tuning.infra.cache import MetricsCache

        def run_query() -> list[dict[str, Any]]:
            with psycopg.connect(self.database_url(), row_factory=dict_row) as conn:
                return [dict(row) for row in conn.execute(sql, parameters)]

        name = "sql:" + MetricsCache.key_for(sql, parameters)
        return self.get_cache().get_or_compute(name, run_query, ttl_seconds)

    def stats(self) -> CacheStats:
        return self.get_cache().stats()


# Caches per (url, ttl, stale, prefix) per process: the hook stays stateless, the process counts.
_CACHES: dict[tuple[str | None, int, int, str], Any] = {}


def _cache_for(config: PipelineConfig, url: str | None) -> MetricsCache:
    from fine_tuning.infra.cache import MetricsCache

    key = (url, config.cache.ttl_seconds, config.cache.stale_seconds, config.cache.key_prefix)
    cache = _CACHES.get(key)
    if cache is None:
        cache = _CACHES[key] = MetricsCache.from_config(config, redis_url=url)
    return cache
