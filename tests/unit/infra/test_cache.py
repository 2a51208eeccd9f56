"""The metrics cache on a real Redis and PostgreSQL: TTL, hit/miss counts, Redis down falls through."""

from __future__ import annotations

import logging
import uuid

import airflow.sdk  # noqa: F401 - importing Airflow puts plugins/ on sys.path
import psycopg
import pytest
import redis

from fine_tuning.infra.cache import MetricsCache
from fine_tuning.config import load_config
from fine_tuning_airflow.cache_hook import CachedMetricsHook
from support import TEST_REDIS_URL

REDIS_URL = TEST_REDIS_URL

AGGREGATE = "SELECT arm, count(*) AS posts, avg(engagement)::float AS rate FROM arm_posts GROUP BY arm ORDER BY arm"


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:10]}:cache"


@pytest.fixture
def arm_table(pg_url: str) -> str:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE arm_posts (arm text, engagement double precision)")
        conn.execute("INSERT INTO arm_posts VALUES ('baseline', 0.05), ('baseline', 0.07), ('candidate', 0.09)")
    return pg_url


def test_a_value_is_computed_once_then_served_with_its_ttl(prefix: str) -> None:
    cache = MetricsCache(REDIS_URL, ttl_seconds=300, key_prefix=prefix)
    computed: list[int] = []

    def compute() -> dict:
        computed.append(1)
        return {"baseline": 0.06, "candidate": 0.09}

    assert cache.get_or_compute("ab-1", compute) == {"baseline": 0.06, "candidate": 0.09}
    assert cache.get_or_compute("ab-1", compute) == {"baseline": 0.06, "candidate": 0.09}
    assert cache.get_or_compute("ab-1", compute)["candidate"] == 0.09
    assert len(computed) == 1
    assert 290 < (cache.ttl("ab-1") or 0) <= 300
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.errors) == (2, 1, 0)
    assert stats.hit_rate == pytest.approx(2 / 3)
    assert (stats.shared_hits, stats.shared_misses) == (2, 1)  # counted in Redis for every worker
    assert redis.Redis.from_url(REDIS_URL).ttl(f"{prefix}:stats") > 0

    cache.invalidate("ab-1")
    cache.get_or_compute("ab-1", compute)
    assert len(computed) == 2


def test_many_pollers_of_an_expired_entry_compute_it_once(prefix: str) -> None:
    """Eight pollers (two processes' worth of threads, separate caches) miss the same entry at
    once: one computes, the others wait and get its value. A computation that fails frees the
    turn: the next caller computes."""
    import threading
    import time

    computed: list[int] = []

    def slow() -> dict:
        computed.append(1)
        time.sleep(0.4)
        return {"rate": 0.07}

    caches = [MetricsCache(REDIS_URL, ttl_seconds=300, key_prefix=prefix) for _ in range(2)]
    results: list[dict] = []
    start = threading.Barrier(8)

    def poll(cache: MetricsCache) -> None:
        start.wait()
        results.append(cache.get_or_compute("ab_metrics:x", slow))

    threads = [threading.Thread(target=poll, args=(caches[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [{"rate": 0.07}] * 8
    assert len(computed) == 1
    # The seven that waited were served from the cache: hits, in each process and in Redis.
    stats = [cache.stats() for cache in caches]
    assert (sum(s.hits for s in stats), sum(s.misses for s in stats)) == (7, 1)
    assert (stats[0].shared_hits, stats[0].shared_misses) == (7, 1)

    def broken() -> dict:
        raise RuntimeError("database went away")

    with pytest.raises(RuntimeError):
        caches[0].get_or_compute("ab_metrics:y", broken)
    assert not redis.Redis.from_url(REDIS_URL).exists(f"{prefix}:ab_metrics:y:computing")  # turn released
    assert caches[1].get_or_compute("ab_metrics:y", lambda: {"rate": 0.1}) == {"rate": 0.1}


def test_the_default_ttl_comes_from_the_config() -> None:
    config = load_config(env={})
    assert config.cache.ttl_seconds == 300
    assert MetricsCache.from_config(config).ttl_seconds == 300


def test_hook_caches_postgres_aggregates(arm_table: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", arm_table)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    config = load_config(params={"cache": {"key_prefix": prefix}})
    hook = CachedMetricsHook(config=config)
    first = hook.get_records(AGGREGATE)
    assert first == [
        {"arm": "baseline", "posts": 2, "rate": pytest.approx(0.06)},
        {"arm": "candidate", "posts": 1, "rate": pytest.approx(0.09)},
    ]
    with psycopg.connect(arm_table, autocommit=True) as conn:
        conn.execute("INSERT INTO arm_posts VALUES ('candidate', 0.5)")
    assert hook.get_records(AGGREGATE) == first  # served from Redis within the TTL
    assert hook.get_records(AGGREGATE + " LIMIT 5")[1]["posts"] == 2  # another query is another key
    stats = CachedMetricsHook(config=config).stats()  # hooks are stateless; the counts are not in them
    assert (stats.shared_hits, stats.shared_misses) == (1, 2)


def test_redis_down_falls_through_to_postgres(
    arm_table: str, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DATABASE_URL", arm_table)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/7")  # nothing listens there (own URL: own log-once)
    hook = CachedMetricsHook(config=load_config(params={"cache": {"key_prefix": prefix}}))
    with caplog.at_level(logging.WARNING):
        rows = [hook.get_records(AGGREGATE) for _ in range(3)]
    assert rows[0][0]["posts"] == 2 and rows[0] == rows[2]
    stats = hook.stats()
    assert (stats.hits, stats.misses) == (0, 3) and stats.errors >= 1 and stats.shared_hits is None
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
