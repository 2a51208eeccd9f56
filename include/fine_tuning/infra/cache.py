"""A Redis cache with a TTL for evaluation metrics, with its hit rate measured.

Values are JSON under ``{cache.key_prefix}:{key}`` with a TTL (``cache.ttl_seconds``, default
300 s). Hits and misses are counted twice: in this process (for tests and logs) and in a Redis
hash shared by every worker (``{prefix}:stats``; the hit rate the dashboards show). A hit and
its count are one round trip (a Lua script); a miss is counted once it is known whether this
caller computed the value or got it from another that did. When Redis is unreachable the cache
falls through: every lookup computes the value from the source (PostgreSQL), is counted as a miss, and the
outage is logged once; nothing fails because Redis is down.

Stale-while-revalidate: an entry is stored with the time it was computed and kept in Redis for
its TTL plus ``stale_seconds``. Past its TTL it is still served (a hit, with its age) while one
caller across all processes recomputes it in a background thread, so a reader never waits for
a recompute of an entry it has; only a reader that finds nothing (a new key, or an entry older
than TTL + stale) computes, and the others wait for it. ``lookup`` says how old the answer is.

Versions: a caller may say which version of a value it wants (an A/B test's look count). An
entry of another version is served as stale in the same way (never beyond TTL + stale, and only
when ``stale_seconds`` > 0; else it is a miss), so a new version does not make every reader
wait for a recompute. ``store`` writes a value through (the evaluation step stores each look's
report as it makes it, so readers find the new version already there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fine_tuning.infra.metrics import get_metrics
from fine_tuning.infra.redis import mark_redis_down, mark_redis_up, redis_available, shared_client

if TYPE_CHECKING:
    from fine_tuning.config import PipelineConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
STATS_TTL_SECONDS = 7 * 86_400
# The longest one computation of an entry may hold the others waiting.
COMPUTE_LOCK_SECONDS = 30

# GET the value and, when there is one, count the hit in the same round trip. A miss is counted
# once its outcome is known (see get_or_compute). KEYS: value, stats. ARGV: stats TTL (s).
LOOKUP_LUA = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('HINCRBY', KEYS[2], 'hits', 1)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
end
return value
"""


# Entries are {"__swr": 1, "at": computed at (epoch s), "v": value, "ver": version or null}; a
# bare value (written before entries carried their age) is read as fresh, of no version.
ENVELOPE_MARK = "__swr"


def _unwrap(raw: str | bytes) -> tuple[Any, float, Any]:
    """The stored value, its age in seconds, and its version."""
    data = json.loads(raw)
    if isinstance(data, dict) and data.get(ENVELOPE_MARK) == 1 and "v" in data:
        return data["v"], max(0.0, time.time() - float(data["at"])), data.get("ver")
    return data, 0.0, None


def _fresh(raw: str | bytes, ttl: float, version: Any) -> bool:
    _, age, stored_version = _unwrap(raw)
    return age < ttl and stored_version == version


@dataclass(frozen=True)
class CachedValue:
    """A lookup's answer: the value, whether the cache served it, and how old it is (seconds
    since it was computed; 0 for a value computed for this caller)."""

    value: Any
    cached: bool
    age_seconds: float
    stale: bool = False


@dataclass(frozen=True)
class CacheStats:
    """Lookups counted by this process (``hits``/``misses``/``errors``) and by all (``shared_*``)."""

    hits: int
    misses: int
    errors: int
    shared_hits: int | None
    shared_misses: int | None

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def shared_hit_rate(self) -> float | None:
        if self.shared_hits is None or self.shared_misses is None:
            return None
        total = self.shared_hits + self.shared_misses
        return self.shared_hits / total if total else 0.0


class MetricsCache:
    """``get_or_compute(key, compute)``: the cached value, or ``compute()``'s, stored with a TTL.

    :param redis_url: the Redis to cache in; None disables caching (everything computes).
    :param ttl_seconds: default time to live of an entry.
    :param key_prefix: Redis key prefix (tests use their own).
    :param on_lookup: called with ``True`` (hit) or ``False`` (miss) after each lookup, e.g. to
        send ``fine_tuning_cache_requests_total``.
    """

    def __init__(
        self,
        redis_url: str | None,
        ttl_seconds: int = 300,
        key_prefix: str = "fine_tuning:cache",
        *,
        redis_retry_seconds: float = 15.0,
        on_lookup: Callable[[bool], None] | None = None,
        stale_seconds: int = 0,
    ) -> None:
        if ttl_seconds < 1:
            raise ValueError(f"cache ttl_seconds must be >= 1, got {ttl_seconds!r}")
        if stale_seconds < 0:
            raise ValueError(f"cache stale_seconds must be >= 0, got {stale_seconds!r}")
        self.redis_url = redis_url
        self.ttl_seconds = ttl_seconds
        self.stale_seconds = stale_seconds
        self._refreshing: set[str] = set()
        self.key_prefix = key_prefix
        self.redis_retry_seconds = redis_retry_seconds
        self.on_lookup = on_lookup
        self.stats_key = f"{key_prefix}:stats"
        self._lock = threading.Lock()
        self._hits = self._misses = self._errors = 0
        self._script: Any = None

    @classmethod
    def from_config(
        cls,
        config: PipelineConfig,
        on_lookup: Callable[[bool], None] | None = None,
        redis_url: str | None = None,
    ) -> MetricsCache:
        """The cache the config sets up, on ``redis_url`` (default: the config's Redis)."""
        url = (redis_url or config.services.redis_url.get_secret_value()) if config.cache.enabled else None
        if on_lookup is None:  # by default every lookup is counted over StatsD (hit rate metric)
            on_lookup = get_metrics(config).cache_lookup
        return cls(
            url or None,
            config.cache.ttl_seconds,
            config.cache.key_prefix,
            redis_retry_seconds=config.breakers.redis_retry_seconds,
            on_lookup=on_lookup,
            stale_seconds=config.cache.stale_seconds,
        )

    def key(self, name: str) -> str:
        return f"{self.key_prefix}:{name}"

    @staticmethod
    def key_for(*parts: Any) -> str:
        """A stable key for arbitrary JSON-able parts (e.g. a query and its parameters)."""
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _client(self) -> Any:
        if self.redis_url is None or not redis_available(self.redis_url):
            return None
        return shared_client(self.redis_url)

    def _count(self, hit: bool, error: bool = False) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1
            if error:
                self._errors += 1
        if self.on_lookup is not None:
            try:
                self.on_lookup(hit)
            except Exception:  # metrics must not break a lookup
                log.exception("cache on_lookup hook failed")

    def _redis_failed(self, exc: BaseException) -> None:
        mark_redis_down(self.redis_url or "", exc, self.redis_retry_seconds, "metrics cache")

    def get_or_compute(self, name: str, compute: Callable[[], T], ttl_seconds: int | None = None) -> T:
        """The cached value of ``name``, else ``compute()`` (stored for ``ttl_seconds``)."""
        value: T = self.lookup(name, compute, ttl_seconds).value
        return value

    def lookup(
        self,
        name: str,
        compute: Callable[[], Any],
        ttl_seconds: int | None = None,
        version: Any = None,
    ) -> CachedValue:
        """``name``'s value with whether it was cached and its age; a stale one (past its TTL, or
        of another ``version``) is served and refreshed in the background, a missing one is
        computed (by one caller; others wait)."""
        from redis.exceptions import RedisError

        ttl = ttl_seconds or self.ttl_seconds
        client = self._client()
        if client is not None:
            try:
                if self._script is None:
                    self._script = client.register_script(LOOKUP_LUA)
                raw = self._script(keys=[self.key(name), self.stats_key], args=[STATS_TTL_SECONDS])
            except RedisError as exc:
                self._redis_failed(exc)
                client = None
            else:
                mark_redis_up(self.redis_url or "", "metrics cache")
                if raw is not None:
                    value, age, stored_version = _unwrap(raw)
                    if age < ttl and stored_version == version:
                        self._count(hit=True)
                        return CachedValue(value, True, age)
                    if self.stale_seconds > 0:
                        self._count(hit=True)
                        self._refresh_in_background(client, name, compute, ttl, version)
                        return CachedValue(value, True, age, stale=True)
                    # Another version and no stale serving: a miss (the script counted a hit).
                    self._uncount_shared_hit(client)
        if client is None:
            self._count(hit=False, error=self.redis_url is not None)
            return CachedValue(compute(), False, 0.0)
        # A caller that waited for another's computation was served from the cache: a hit, as
        # the API's "cached" says. Counting it as a miss made the shared hit rate read 89.9%
        # while readers got 98.7% of their answers from the cache (bench/cache_bench.py).
        computed = True  # also when compute() raises: a miss
        try:
            value, computed, age = self._compute_once(client, name, compute, ttl, version)
            return CachedValue(value, not computed, age)
        finally:
            self._count(hit=not computed)
            self._count_shared(client, hit=not computed)

    def store(self, name: str, value: Any, ttl_seconds: int | None = None, version: Any = None) -> None:
        """Write ``value`` through as ``name``'s fresh entry (of ``version``); nothing when Redis
        is unreachable (the outage is logged once, readers compute)."""
        client = self._client()
        if client is not None:
            self._store(client, name, value, ttl_seconds or self.ttl_seconds, version)

    def _store(self, client: Any, name: str, value: Any, ttl_seconds: int, version: Any = None) -> None:
        from redis.exceptions import RedisError

        envelope = {ENVELOPE_MARK: 1, "at": time.time(), "v": value, "ver": version}
        try:
            client.set(self.key(name), json.dumps(envelope, default=str), ex=ttl_seconds + self.stale_seconds)
        except RedisError as exc:
            self._redis_failed(exc)

    def _refresh_in_background(
        self, client: Any, name: str, compute: Callable[[], Any], ttl: int, version: Any
    ) -> None:
        """Recompute a stale entry in a thread, once across all processes (the compute lock,
        not waited for: a holder is already refreshing it) and once in this one."""
        with self._lock:
            if name in self._refreshing:
                return
            self._refreshing.add(name)

        def refresh() -> None:
            from redis.exceptions import LockError, RedisError

            lock = client.lock(self.key(name) + ":computing", timeout=COMPUTE_LOCK_SECONDS)
            try:
                if not lock.acquire(blocking=False):
                    return
                try:
                    raw = client.get(self.key(name))
                    if raw is None or not _fresh(raw, ttl, version):  # nobody refreshed it meanwhile
                        self._store(client, name, compute(), ttl, version)
                finally:
                    with contextlib.suppress(LockError, RedisError):
                        lock.release()
            except RedisError as exc:
                self._redis_failed(exc)
            except Exception:  # the stale value was served; the next reader tries again
                log.exception("refreshing cache entry %s failed", name)
            finally:
                with self._lock:
                    self._refreshing.discard(name)

        threading.Thread(target=refresh, name=f"cache-refresh:{name}"[:60], daemon=True).start()

    def _count_shared(self, client: Any, hit: bool) -> None:
        from redis.exceptions import RedisError

        try:
            with client.pipeline(transaction=True) as pipe:
                pipe.hincrby(self.stats_key, "hits" if hit else "misses", 1)
                pipe.expire(self.stats_key, STATS_TTL_SECONDS)
                pipe.execute()
        except RedisError as exc:
            self._redis_failed(exc)

    def _uncount_shared_hit(self, client: Any) -> None:
        from redis.exceptions import RedisError

        try:
            client.hincrby(self.stats_key, "hits", -1)
        except RedisError as exc:
            self._redis_failed(exc)

    def _compute_once(
        self, client: Any, name: str, compute: Callable[[], T], ttl_seconds: int, version: Any = None
    ) -> tuple[T, bool, float]:
        """On a miss, one caller across all processes computes; the others wait for its value.
        Returns the value, whether this caller computed it, and its age.

        Without this every poller of an expired entry recomputes it at once (a cache stampede:
        bench/cache_bench.py measured a 17 s p99 with 32 pollers on 2 cores). redis-py's ``Lock``
        (a token, a TTL, Lua release) holds the turn; a holder that dies frees it after
        ``COMPUTE_LOCK_SECONDS``, and a waiter that waited that long computes by itself.
        """
        from redis.exceptions import LockError, RedisError

        lock = client.lock(
            self.key(name) + ":computing",
            timeout=COMPUTE_LOCK_SECONDS,
            blocking_timeout=COMPUTE_LOCK_SECONDS,
            sleep=0.05,
        )
        try:
            acquired = lock.acquire()
            raw = client.get(self.key(name)) if acquired else None  # filled while we waited?
        except RedisError as exc:
            self._redis_failed(exc)
            return compute(), True, 0.0
        try:
            if raw is not None and _fresh(raw, ttl_seconds, version):
                value, age, _ = _unwrap(raw)
                return value, False, age
            value = compute()
            self._store(client, name, value, ttl_seconds, version)
            return value, True, 0.0
        finally:
            if acquired:
                with contextlib.suppress(LockError, RedisError):
                    lock.release()

    def invalidate(self, name: str) -> None:
        from redis.exceptions import RedisError

        client = self._client()
        if client is not None:
            try:
                client.delete(self.key(name))
            except RedisError as exc:
                self._redis_failed(exc)

    def ttl(self, name: str) -> int | None:
        """Seconds left on an entry (None: absent, or Redis unreachable)."""
        from redis.exceptions import RedisError

        client = self._client()
        if client is None:
            return None
        try:
            left = client.ttl(self.key(name))
        except RedisError as exc:
            self._redis_failed(exc)
            return None
        return int(left) if left is not None and left >= 0 else None

    def stats(self) -> CacheStats:
        """This process's counts and, when Redis answers, everyone's."""
        from redis.exceptions import RedisError

        shared_hits = shared_misses = None
        client = self._client()
        if client is not None:
            try:
                raw = client.hmget(self.stats_key, "hits", "misses")
                shared_hits, shared_misses = (int(v or 0) for v in raw)
            except RedisError as exc:
                self._redis_failed(exc)
        with self._lock:
            return CacheStats(self._hits, self._misses, self._errors, shared_hits, shared_misses)
