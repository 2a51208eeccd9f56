"""Long-lived processes pool their connections, /pipeline/health reports those pools, and the
dependency probes are reused for a short, configured time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fine_tuning.config import load_config
from fine_tuning.infra import db, health


@pytest.fixture
def pooling(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This test's process pools as the API server does; the pools are closed afterwards."""
    monkeypatch.setattr(db, "_POOLS", {})
    monkeypatch.setattr(db, "_POOL_SIZES", None)
    db.use_pools(min_size=2, max_size=10)
    yield
    for pool in db._POOLS.values():
        pool.close()


@pytest.fixture
def service_env(pg_url: str, mlflow_uri: str, openai_env: object) -> dict[str, str]:
    return {
        "DATABASE_URL": pg_url,
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "OPENAI_BASE_URL": openai_env.base_url,  # type: ignore[attr-defined]
        "OPENAI_API_KEY": "sk-test-key",
    }


def test_a_pooling_process_reuses_its_connections_and_health_reports_the_pool(
    pooling: None, service_env: dict[str, str]
) -> None:
    with db.connect(service_env["DATABASE_URL"]) as conn:
        first_backend = conn.info.backend_pid
        conn.execute("SELECT 1")
        report = health.check_health(load_config(env=service_env))
        assert report.connection_pools["db_connections_active"] == 1  # this one, borrowed
    stats = db.pool_stats()
    assert stats is not None and stats["active"] == 0 and 1 <= stats["idle"] <= 10 and stats["max"] == 10
    # Ten borrows, one at a time: the same few sessions, handed out again (min 2 opened ahead).
    pids = set()
    for _ in range(10):
        with db.connect(service_env["DATABASE_URL"]) as conn:
            pids.add(conn.info.backend_pid)
    assert first_backend in pids or len(pids) <= 3
    assert len(pids) <= 3, pids
    after = health.check_health(load_config(env=service_env)).connection_pools
    assert after["db_connections_active"] == 0 and after["db_connections_idle"] >= 1
    assert after["redis_connections_idle"] is not None  # the shared Redis pool (max 20, keepalive)


def test_explicit_options_open_a_connection_of_their_own(pooling: None, pg_url: str) -> None:
    with db.connect(pg_url, autocommit=True) as conn:
        assert conn.autocommit
    assert db.pool_stats() == {"active": 0, "idle": 0, "max": 10}  # no pool was made for it


def test_the_probes_are_reused_for_health_cache_seconds(service_env: dict[str, str], openai_env) -> None:
    cached = load_config(env=service_env, params=None)
    cached.monitoring.health_cache_seconds = 60
    first = health.check_health(cached)
    second = health.check_health(cached)
    probes = openai_env.requests("GET", "/v1/fine_tuning/jobs")
    assert len(probes) == 1  # one authenticated OpenAI call for two scrapes
    assert second.checks == first.checks
    assert second.performance_metrics["probes_age_seconds"] >= 0
    assert second.timestamp >= first.timestamp

    every_call = load_config(env=service_env)
    every_call.monitoring.health_cache_seconds = 0
    health.check_health(every_call)
    health.check_health(every_call)
    assert len(openai_env.requests("GET", "/v1/fine_tuning/jobs")) == 3


def test_a_changed_dependency_is_probed_at_once(service_env: dict[str, str]) -> None:
    """The cache is per set of dependencies: another URL is never answered from it."""
    config = load_config(env=service_env)
    config.monitoring.health_cache_seconds = 60
    health.check_health(config)
    down = load_config(env={**service_env, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    down.monitoring.health_cache_seconds = 60
    check = health.check_health(down).checks["openai"]
    assert check.status == "unhealthy" and "refused" in (check.error or "").lower(), check
