"""Redis clients: the short-timeout pool shared by breakers and the cache, and the routing client.

Two kinds of callers, two kinds of client. Breakers and the metrics cache must never block the
pipeline on Redis, so theirs (``shared_client``) gives up in milliseconds and remembers an
outage (``redis_available``/``mark_redis_down``) to skip Redis for a while. Routing and A/B
records are the pipeline's decisions: ``redis_client`` waits seconds and raises, never skips.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from fine_tuning.config import PipelineConfig, redact_url

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)


def redis_client(config: PipelineConfig) -> redis.Redis:
    """The client for routing and A/B records: an error is raised, never skipped."""
    import redis as redis_lib

    return redis_lib.Redis.from_url(config.services.redis_url.get_secret_value(), socket_timeout=5)


# One client (connection pool) per Redis URL per process, shared by breakers and the cache.
_REDIS_CLIENTS: dict[str, redis.Redis] = {}
_REDIS_LOCK = threading.Lock()
# Redis URLs found down in this process, and when to try them again (monotonic seconds).
_REDIS_DOWN_UNTIL: dict[str, float] = {}


def shared_client(url: str) -> redis.Redis:
    """A Redis client with short timeouts: a dead Redis must cost milliseconds, not seconds."""
    import redis as redis_lib
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    with _REDIS_LOCK:
        client = _REDIS_CLIENTS.get(url)
        if client is None:
            # The seed's pool: 20 connections with keepalive; a caller past 20 waits a moment
            # for one instead of opening more (redis-py's BlockingConnectionPool).
            pool = redis_lib.BlockingConnectionPool.from_url(
                url,
                max_connections=REDIS_POOL_SIZE,
                timeout=0.5,
                socket_connect_timeout=0.25,
                socket_timeout=0.5,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 1),
                health_check_interval=30,
            )
            client = redis_lib.Redis(connection_pool=pool)
            _REDIS_CLIENTS[url] = client
        return client


REDIS_POOL_SIZE = 20


def shared_pool_stats() -> dict[str, int]:
    """This process's shared Redis pools, summed: connections in use and idle."""
    from redis.observability.attributes import DB_CLIENT_CONNECTION_STATE, ConnectionState

    with _REDIS_LOCK:
        pools = [client.connection_pool for client in _REDIS_CLIENTS.values()]
    counts = {"active": 0, "idle": 0}
    for pool in pools:
        for count, attributes in pool.get_connection_count():
            idle = attributes.get(DB_CLIENT_CONNECTION_STATE) == ConnectionState.IDLE.value
            counts["idle" if idle else "active"] += count
    return counts


def redis_available(url: str) -> bool:
    """False while ``url`` is in its back-off after a failure (so callers skip it quickly)."""
    until = _REDIS_DOWN_UNTIL.get(url)
    return until is None or time.monotonic() >= until


def mark_redis_down(url: str, exc: BaseException, retry_seconds: float, who: str) -> None:
    """Remember that Redis failed; log it once per outage (not once per call)."""
    first = url not in _REDIS_DOWN_UNTIL
    _REDIS_DOWN_UNTIL[url] = time.monotonic() + retry_seconds
    if first:
        log.warning(
            "%s: Redis at %s is unreachable (%s); falling back to per-process state, "
            "trying again every %.0f s",
            who,
            redact_url(url),
            exc,
            retry_seconds,
        )


def mark_redis_up(url: str, who: str) -> None:
    if _REDIS_DOWN_UNTIL.pop(url, None) is not None:
        log.warning("%s: Redis answers again; state is shared again", who)
