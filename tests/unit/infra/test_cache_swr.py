"""Stale-while-revalidate on a real Redis: a reader that finds an expired entry never waits."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis

from fine_tuning.infra.cache import ENVELOPE_MARK, MetricsCache

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:10]}:swr"


def age_entry(prefix: str, name: str, seconds: float) -> None:
    """Make the stored entry ``seconds`` older (as if computed that long ago), keeping its TTL."""
    client = redis.Redis.from_url(REDIS_URL)
    key = f"{prefix}:{name}"
    entry = json.loads(client.get(key))
    entry["at"] -= seconds
    client.set(key, json.dumps(entry), keepttl=True)


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_a_stale_entry_is_served_with_its_age_and_refreshed_once_in_the_background(prefix: str) -> None:
    cache = MetricsCache(REDIS_URL, ttl_seconds=60, key_prefix=prefix, stale_seconds=120)
    release = threading.Event()
    computed: list[int] = []

    def compute() -> dict:
        computed.append(1)
        if len(computed) > 1:  # the refresh: held until the readers have all been answered
            release.wait(30)
        return {"version": len(computed)}

    first = cache.lookup("ab-1", compute)
    assert (first.value, first.cached, first.age_seconds) == ({"version": 1}, False, 0.0)
    assert 170 < (cache.ttl("ab-1") or 0) <= 180  # kept for TTL + stale: staleness is bounded

    age_entry(prefix, "ab-1", 90)  # past its TTL, within the stale window
    # Sixteen readers (two "processes": separate caches) find it stale while it is recomputed:
    # every one is answered from the cache, at once, and one of them starts a single refresh.
    other = MetricsCache(REDIS_URL, ttl_seconds=60, key_prefix=prefix, stale_seconds=120)
    answers = [(cache if i % 2 else other).lookup("ab-1", compute) for i in range(16)]
    assert all(a.value == {"version": 1} and a.cached and a.stale for a in answers)
    assert all(90 <= a.age_seconds < 100 for a in answers)
    assert len(computed) == 2  # the refresh started once across both, and is still running
    release.set()
    wait_until(lambda: cache.lookup("ab-1", compute).value == {"version": 2}, "the refreshed value")
    fresh = cache.lookup("ab-1", compute)
    assert fresh.cached and not fresh.stale and fresh.age_seconds < 30
    assert len(computed) == 2
    stats = cache.stats()
    assert stats.misses == 1 and stats.hits >= 9  # stale answers are hits: the hit rate is unchanged


def test_an_entry_past_its_stale_window_is_a_miss(prefix: str) -> None:
    cache = MetricsCache(REDIS_URL, ttl_seconds=1, key_prefix=prefix, stale_seconds=0)
    calls: list[int] = []
    cache.lookup("ab-2", lambda: calls.append(1) or len(calls))
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(f"{prefix}:ab-2")  # what Redis does at TTL + stale
    again = cache.lookup("ab-2", lambda: calls.append(1) or len(calls))
    assert (again.value, again.cached) == (2, False)


def test_a_failed_refresh_keeps_serving_the_stale_value_and_tries_again(prefix: str) -> None:
    cache = MetricsCache(REDIS_URL, ttl_seconds=60, key_prefix=prefix, stale_seconds=120)
    cache.lookup("ab-3", lambda: "v1")
    age_entry(prefix, "ab-3", 70)
    attempts: list[int] = []

    def broken() -> str:
        attempts.append(1)
        raise RuntimeError("PostgreSQL is restarting")

    assert cache.lookup("ab-3", broken).value == "v1"
    wait_until(lambda: attempts and "ab-3" not in cache._refreshing, "the failed refresh")
    answer = cache.lookup("ab-3", lambda: "v2")  # the next reader still gets the stale value ...
    assert answer.value == "v1" and answer.stale
    wait_until(lambda: cache.lookup("ab-3", lambda: "v3").value in ("v2", "v3"), "a second refresh")


def test_an_entry_written_before_entries_carried_their_age_is_read_as_fresh(prefix: str) -> None:
    redis.Redis.from_url(REDIS_URL).set(f"{prefix}:old", json.dumps({"baseline": 0.06}), ex=60)
    cache = MetricsCache(REDIS_URL, ttl_seconds=60, key_prefix=prefix, stale_seconds=60)
    answer = cache.lookup("old", lambda: pytest.fail("a cached entry was recomputed"))
    assert answer.value == {"baseline": 0.06} and answer.cached and not answer.stale
    assert ENVELOPE_MARK not in json.dumps(answer.value)


def test_an_entry_of_another_version_is_served_stale_while_the_new_version_is_computed(prefix: str) -> None:
    """An A/B test's next look changes the version: readers keep the last look's report (saying
    how old it is) while one of them computes the new one, instead of all waiting for it."""
    cache = MetricsCache(REDIS_URL, ttl_seconds=60, key_prefix=prefix, stale_seconds=120)
    cache.lookup("ab-4", lambda: "look 1", version=1)
    release = threading.Event()

    def look_2() -> str:
        release.wait(30)
        return "look 2"

    answers = [cache.lookup("ab-4", look_2, version=2) for _ in range(8)]
    assert all(a.value == "look 1" and a.cached and a.stale for a in answers)
    release.set()
    wait_until(lambda: cache.lookup("ab-4", look_2, version=2).value == "look 2", "the new version")
    current = cache.lookup("ab-4", lambda: pytest.fail("a current entry was recomputed"), version=2)
    assert current.value == "look 2" and current.cached and not current.stale


def test_without_stale_serving_another_version_is_a_miss(prefix: str) -> None:
    cache = MetricsCache(REDIS_URL, ttl_seconds=60, key_prefix=prefix, stale_seconds=0)
    cache.lookup("ab-5", lambda: "look 1", version=1)
    answer = cache.lookup("ab-5", lambda: "look 2", version=2)
    assert (answer.value, answer.cached) == ("look 2", False)
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 2)
    assert (stats.shared_hits, stats.shared_misses) == (0, 2)  # the lookup script's hit was taken back


def test_a_value_stored_through_is_a_fresh_hit_of_its_version(prefix: str) -> None:
    cache = MetricsCache(REDIS_URL, ttl_seconds=60, key_prefix=prefix, stale_seconds=60)
    cache.store("ab-6", {"looks": 3}, version=3)
    answer = cache.lookup("ab-6", lambda: pytest.fail("a stored entry was recomputed"), version=3)
    assert answer.value == {"looks": 3} and answer.cached and not answer.stale
    assert 110 < (cache.ttl("ab-6") or 0) <= 120
