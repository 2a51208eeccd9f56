"""Health against the real services: the /health report, its HTTP code, /metrics text, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fine_tuning.config import load_config
from fine_tuning.infra.health import check_health, prometheus_text
from support import TEST_REDIS_URL


@pytest.fixture
def service_env(pg_url: str, mlflow_uri: str, openai_env: object) -> dict[str, str]:
    return {
        "DATABASE_URL": pg_url,
        "REDIS_URL": TEST_REDIS_URL,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "OPENAI_BASE_URL": openai_env.base_url,  # type: ignore[attr-defined]
        "OPENAI_API_KEY": "sk-test-key",
    }


def test_all_up_is_healthy_and_metrics_parse(service_env: dict[str, str]) -> None:
    report = check_health(load_config(env=service_env))
    assert report.status == "healthy" and report.healthy and report.http_status == 200, report.checks
    assert {report.components[c] for c in ("database", "redis", "mlflow", "openai")} == {"healthy"}
    assert report.components["openai_circuit_breaker"] in ("CLOSED", "UNKNOWN")
    assert report.connection_pools["db_connections_max"] > 0
    assert report.checks["openai"].detail["authenticated"] is True

    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(report))}
    assert families["fine_tuning_healthy"].samples[0].value == 1
    up = {s.labels["component"]: s.value for s in families["fine_tuning_component_up"].samples}
    assert up == {"database": 1, "redis": 1, "mlflow": 1, "openai": 1}
    # This process keeps no PostgreSQL pool (the API server does): no figure rather than a made-up 0.
    assert report.connection_pools["db_connections_active"] is None
    assert "fine_tuning_db_connections_active" not in families
    assert "fine_tuning_redis_connections_idle" in families
    if report.breakers["openai"].state != "unknown":
        assert families["fine_tuning_openai_circuit_breaker_state"].samples[0].value == 0


def test_required_down_is_503_and_optional_down_degrades(service_env: dict[str, str]) -> None:
    # Port 9 (discard) refuses on loopback: a dependency that is down, answered at once.
    optional_down = check_health(load_config(env={**service_env, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}))
    assert optional_down.status == "degraded" and optional_down.http_status == 200
    assert optional_down.checks["openai"].status == "unhealthy" and optional_down.checks["openai"].error

    required_down = check_health(load_config(env={**service_env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}))
    assert required_down.status == "unhealthy" and not required_down.healthy
    assert required_down.http_status == 503
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(required_down))}
    assert families["fine_tuning_healthy"].samples[0].value == 0


def test_cli_health_prints_the_report_and_sends_gauges(service_env: dict[str, str]) -> None:
    from support import StatsdListener

    listener = StatsdListener()
    try:
        env = {**os.environ, **service_env, "STATSD_HOST": "127.0.0.1", "STATSD_PORT": str(listener.port)}
        ok = subprocess.run([sys.executable, "-m", "fine_tuning", "health"], env=env,
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert json.loads(ok.stdout)["status"] == "healthy"
        listener.wait_for("fine_tuning.health.database.up")
        assert listener.last("fine_tuning.health.database.up") == 1
        # The CLI's own pools: Redis (the breakers' reads), no PostgreSQL pool in a one-shot process.
        assert "fine_tuning.redis.connections.idle" in listener.names()
        assert "fine_tuning.db.connections.active" not in listener.names()

        env["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:9/test"
        down = subprocess.run([sys.executable, "-m", "fine_tuning", "health"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 1 and json.loads(down.stdout)["checks"]["database"]["status"] == "unhealthy"
    finally:
        listener.close()
