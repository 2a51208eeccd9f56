"""The pipeline's health: each dependency probed, each breaker's state, connection counts.

:func:`check_health` returns the report the design's ``GET /health`` shows (HTTP 200 when
healthy, 503 when a required dependency is down: a Kubernetes readiness/liveness probe reads the
code); :func:`prometheus_text` renders the same facts for ``GET /metrics``. The plugin's REST API
serves both under ``/pipeline``; ``python -m fine_tuning health`` prints the report and exits 0
(healthy) or 1.

Probes run in parallel, each bounded by ``monitoring.health_timeout_seconds``, so a dead
dependency costs one timeout, not the sum of them. Nothing here changes state (no table is
created, no breaker is tripped), so a probe every few seconds is safe.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from fine_tuning.infra import breakers, db, metrics

if TYPE_CHECKING:
    from fine_tuning.config import PipelineConfig

log = logging.getLogger(__name__)

COMPONENTS = ("database", "redis", "mlflow", "openai")
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# What ``GET /metrics`` answers with (the Prometheus text exposition format 0.0.4).
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

CheckStatus = Literal["healthy", "unhealthy", "unknown"]


class ComponentCheck(BaseModel):
    """One dependency's probe: ``unknown`` means it could not be judged (not a failure)."""

    status: CheckStatus
    required: bool
    latency_ms: float | None = None
    error: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class BreakerStatus(BaseModel):
    """One circuit breaker as shared through Redis; ``unknown`` when it cannot be read."""

    state: Literal["closed", "half_open", "open", "unknown"]
    failure_count: int | None = None
    opened_until: float | None = None
    # False: the breaker runs on per-process state because Redis is unreachable.
    shared: bool | None = None
    error: str | None = None


class HealthReport(BaseModel):
    """The ``/health`` body: the design's keys (``status``, ``components``,
    ``connection_pools``, ``performance_metrics``) plus each probe's details."""

    status: Literal["healthy", "degraded", "unhealthy"]
    healthy: bool
    timestamp: float
    components: dict[str, str]
    checks: dict[str, ComponentCheck]
    breakers: dict[str, BreakerStatus]
    connection_pools: dict[str, int | None]
    performance_metrics: dict[str, float | None]
    # The models the pipeline depends on, by role, with their retirements (fine_tuning.retirement;
    # filled in by fine_tuning.pipeline.health).
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def with_models(self, models: dict[str, dict[str, Any]]) -> HealthReport:
        """The report with the models' retirements: degraded while one retires within the horizon."""
        retiring = any(
            entry.get(kind) in ("retiring", "retired")
            for entry in models.values()
            for kind in ("inference", "training")
        )
        status = self.status
        if retiring and status == "healthy":
            status = "degraded"
        return self.model_copy(update={"models": models, "status": status})

    @property
    def http_status(self) -> int:
        """200 while every required dependency answers (degraded included), else 503."""
        return 200 if self.healthy else 503


def _error(exc: BaseException) -> str:
    # The class name says more than some drivers' empty messages; URLs with secrets never get here.
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


def _check_database(config: PipelineConfig, timeout: float) -> tuple[CheckStatus, dict[str, Any]]:
    import psycopg

    url = config.services.database_url.get_secret_value()
    with psycopg.connect(
        url, connect_timeout=max(int(timeout), 1), application_name="fine_tuning_health", autocommit=True
    ) as conn:
        conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
        # The database's client sessions other than this probe: "idle in transaction" holds a
        # connection as surely as a running statement, so it counts as active.
        active, idle, limit = db.one_row(
            conn.execute(
                """
            SELECT count(*) FILTER (WHERE state IS DISTINCT FROM 'idle'),
                   count(*) FILTER (WHERE state = 'idle'),
                   current_setting('max_connections')::int
            FROM pg_stat_activity
            WHERE datname = current_database() AND backend_type = 'client backend'
              AND pid <> pg_backend_pid()
            """
            )
        )
    return "healthy", {"connections_active": active, "connections_idle": idle, "max_connections": limit}


def _check_redis(config: PipelineConfig, timeout: float) -> tuple[CheckStatus, dict[str, Any]]:
    import redis

    client = redis.Redis.from_url(
        config.services.redis_url.get_secret_value(), socket_timeout=timeout, socket_connect_timeout=timeout
    )
    try:
        client.ping()
        detail: dict[str, Any] = {}
        try:
            own_id = client.client_id()
            others = [c for c in client.client_list() if int(c.get("id", -1)) != own_id]
            # Active: ran a command within the last second (Redis counts idleness in whole seconds).
            active = sum(1 for c in others if int(c.get("idle", 0)) == 0)
            detail = {"connections_active": active, "connections_idle": len(others) - active}
        except redis.ResponseError as exc:  # CLIENT may be disabled on a managed Redis
            detail = {"client_list_error": str(exc)}
        return "healthy", detail
    finally:
        client.close()


def _http_get(url: str, timeout: float, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of ``GET url`` (4xx/5xx included); network errors raise."""
    request = urllib.request.Request(url, headers=headers or {}, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _check_mlflow(config: PipelineConfig, timeout: float) -> tuple[CheckStatus, dict[str, Any]]:
    uri = config.mlflow.tracking_uri.rstrip("/")
    if not uri.startswith(("http://", "https://")):
        # A file or database store has no server to probe; the register step will tell.
        return "unknown", {"reason": f"tracking URI scheme of {uri.split(':', 1)[0]!r} has no /health"}
    code = _http_get(f"{uri}/health", timeout)
    if code != 200:
        raise ConnectionError(f"GET /health answered HTTP {code}")
    return "healthy", {}


def _check_openai(config: PipelineConfig, timeout: float) -> tuple[CheckStatus, dict[str, Any]]:
    base = (config.services.openai_base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/")
    key = config.services.openai_api_key
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    # Listing one job is the cheapest call the fine-tuning API (and the emulator) both answer.
    code = _http_get(f"{base}/fine_tuning/jobs?limit=1", timeout, headers)
    if code >= 500:
        raise ConnectionError(f"fine-tuning API answered HTTP {code}")
    if key and code in (401, 403):
        raise PermissionError(f"fine-tuning API refused the configured key (HTTP {code})")
    # 429 is a reachable API that asks us to slow down: reachable is what this probe tells.
    return "healthy", {"http_status": code, "authenticated": bool(key) and code < 400}


PROBES: dict[str, Callable[[PipelineConfig, float], tuple[CheckStatus, dict[str, Any]]]] = {
    "database": _check_database,
    "redis": _check_redis,
    "mlflow": _check_mlflow,
    "openai": _check_openai,
}


def _read_breakers(config: PipelineConfig) -> dict[str, BreakerStatus]:
    """Each breaker's shared state (``unknown``, with the error, when it cannot be read)."""
    statuses: dict[str, BreakerStatus] = {}
    for name in breakers.BREAKER_NAMES:
        try:
            breaker = breakers.get_breaker(name, config)
            # One read of the shared state when the breaker offers it, so the fields agree.
            view = breaker.snapshot() if hasattr(breaker, "snapshot") else breaker
            state = str(getattr(view, "state", "unknown")).lower()
            opened_until = getattr(view, "opened_until", None)
            if isinstance(opened_until, datetime):
                opened_until = opened_until.timestamp()
            statuses[name] = BreakerStatus(
                state=state if state in metrics.BREAKER_STATE_VALUES else "unknown",
                failure_count=getattr(view, "failure_count", None),
                opened_until=float(opened_until) if opened_until is not None else None,
                shared=getattr(view, "shared", None),
            )
        except Exception as exc:  # noqa: BLE001 - a broken breaker read is reported, never raised to a probe
            statuses[name] = BreakerStatus(state="unknown", error=_error(exc))
    return statuses


def check_health(config: PipelineConfig, *, emit_metrics: bool = False) -> HealthReport:
    """Probe every dependency in parallel and read the breakers; never raises for a dependency.

    :param emit_metrics: also send the component, pool and breaker gauges over StatsD (the CLI
        does; the REST API leaves that to Prometheus scraping ``/metrics``).
    """
    started = time.monotonic()
    timeout = config.monitoring.health_timeout_seconds
    required = set(config.monitoring.required_components)
    checks: dict[str, ComponentCheck] = {}

    def run(name: str) -> ComponentCheck:
        begun = time.monotonic()
        try:
            status, detail = PROBES[name](config, timeout)
            error = None
        except Exception as exc:  # noqa: BLE001 - any failure of a probe is its dependency's state
            status, detail, error = "unhealthy", {}, _error(exc)
        latency = round((time.monotonic() - begun) * 1000, 1)
        return ComponentCheck(
            status=status, required=name in required, latency_ms=latency, error=error, detail=detail
        )

    pool = ThreadPoolExecutor(max_workers=len(PROBES) + 1, thread_name_prefix="health")
    try:
        futures = {name: pool.submit(run, name) for name in PROBES}
        breakers_future = pool.submit(_read_breakers, config)
        # A probe that ignores its own timeout (a DNS stall) is cut off here, with some slack.
        deadline = time.monotonic() + timeout * 2 + 1
        for name, future in futures.items():
            try:
                checks[name] = future.result(timeout=max(deadline - time.monotonic(), 0.01))
            except FutureTimeout:
                checks[name] = ComponentCheck(
                    status="unhealthy", required=name in required, error=f"no answer within {timeout:g}s"
                )
        try:
            breaker_states = breakers_future.result(timeout=max(deadline - time.monotonic(), 0.01))
        except FutureTimeout:
            breaker_states = {
                n: BreakerStatus(state="unknown", error="breaker state unreadable in time")
                for n in breakers.BREAKER_NAMES
            }
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

    down_required = [n for n, c in checks.items() if c.required and c.status == "unhealthy"]
    degraded = any(c.status == "unhealthy" for c in checks.values()) or any(
        b.state in ("open", "half_open") for b in breaker_states.values()
    )
    status = "unhealthy" if down_required else "degraded" if degraded else "healthy"
    components: dict[str, str] = {name: check.status for name, check in checks.items()}
    # The design's shape: "openai_circuit_breaker": "CLOSED".
    components.update({f"{name}_circuit_breaker": b.state.upper() for name, b in breaker_states.items()})
    db, rd = checks["database"].detail, checks["redis"].detail
    report = HealthReport(
        status=status,
        healthy=not down_required,
        timestamp=time.time(),
        components=components,
        checks=checks,
        breakers=breaker_states,
        connection_pools={
            "db_connections_active": db.get("connections_active"),
            "db_connections_idle": db.get("connections_idle"),
            "db_connections_max": db.get("max_connections"),
            "redis_connections_active": rd.get("connections_active"),
            "redis_connections_idle": rd.get("connections_idle"),
        },
        performance_metrics={
            "health_check_ms": round((time.monotonic() - started) * 1000, 1),
            "memory_peak_mb": round(metrics.peak_memory_mb(), 1),
        },
    )
    if emit_metrics:
        emit_report(config, report)
    return report


def emit_report(config: PipelineConfig, report: HealthReport) -> None:
    """Send the report's gauges over StatsD: component up/down, connection counts, breaker states."""
    emitter = metrics.get_metrics(config)
    for name, check in report.checks.items():
        if check.status != "unknown":
            emitter.component_health(name, check.status == "healthy")
    pools = report.connection_pools
    emitter.pool_stats(
        pools["db_connections_active"],
        pools["db_connections_idle"],
        pools["redis_connections_active"],
        pools["redis_connections_idle"],
    )
    for name, breaker in report.breakers.items():
        emitter.breaker_state(name, breaker.state)
    for role, model, kind, days in _days_to_retirement(report):
        emitter.days_to_retirement(role, kind, model, days)


def _days_to_retirement(report: HealthReport) -> Iterator[tuple[str, str, str, float]]:
    """``(role, model, kind, days)`` for every known retirement date (0 once retired)."""
    for role, entry in report.models.items():
        for kind in ("training", "inference"):
            days = entry.get(f"days_to_{kind}_retirement")
            if days is not None and entry.get("model"):
                yield role, str(entry["model"]), kind, max(float(days), 0.0)


class _ReportCollector:
    """A prometheus_client collector over one report (rendered once, then dropped)."""

    def __init__(self, report: HealthReport) -> None:
        self.report = report

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        report = self.report
        healthy = GaugeMetricFamily("fine_tuning_healthy", "1 while every required dependency answers")
        healthy.add_metric([], 1.0 if report.healthy else 0.0)
        yield healthy

        retiring = GaugeMetricFamily(
            metrics.MODEL_DAYS_TO_RETIREMENT.prometheus,
            metrics.MODEL_DAYS_TO_RETIREMENT.help,
            labels=["role", "kind", "model"],
        )
        for role, model, kind, days in _days_to_retirement(report):
            retiring.add_metric([role, kind, metrics.label_value(model)], days)
        yield retiring

        up = GaugeMetricFamily(
            metrics.COMPONENT_UP.prometheus, metrics.COMPONENT_UP.help, labels=["component", "required"]
        )
        latency = GaugeMetricFamily(
            "fine_tuning_component_check_seconds",
            "How long the health probe of a dependency took",
            labels=["component"],
        )
        for name, check in report.checks.items():
            if check.status != "unknown":
                up.add_metric([name, str(check.required).lower()], 1.0 if check.status == "healthy" else 0.0)
            if check.latency_ms is not None:
                latency.add_metric([name], check.latency_ms / 1000)
        yield up
        yield latency

        pool_specs = {
            "db_connections_active": (
                metrics.DB_CONNECTIONS_ACTIVE.prometheus,
                metrics.DB_CONNECTIONS_ACTIVE.help,
            ),
            "db_connections_idle": (metrics.DB_CONNECTIONS_IDLE.prometheus, metrics.DB_CONNECTIONS_IDLE.help),
            "db_connections_max": ("fine_tuning_db_connections_max", "PostgreSQL's max_connections"),
            "redis_connections_active": (
                metrics.REDIS_CONNECTIONS_ACTIVE.prometheus,
                metrics.REDIS_CONNECTIONS_ACTIVE.help,
            ),
            "redis_connections_idle": (
                metrics.REDIS_CONNECTIONS_IDLE.prometheus,
                metrics.REDIS_CONNECTIONS_IDLE.help,
            ),
        }
        for key, (name, help_text) in pool_specs.items():
            value = report.connection_pools.get(key)
            if value is not None:  # unknown is absent, not a misleading 0
                yield GaugeMetricFamily(name, help_text, value=float(value))

        for service, breaker in report.breakers.items():
            service_label = metrics.label_value(service)
            if breaker.state != "unknown":
                yield GaugeMetricFamily(
                    metrics.BREAKER_STATE.prometheus.format(service=service_label),
                    metrics.BREAKER_STATE.help,
                    value=metrics.BREAKER_STATE_VALUES[breaker.state],
                )
            if breaker.failure_count is not None:
                # Consecutive failures now (resets on close): a gauge; the monotonic total is the
                # StatsD counter fine_tuning_<service>_failures_total.
                yield GaugeMetricFamily(
                    f"fine_tuning_{service_label}_circuit_breaker_failures",
                    "Consecutive failures the breaker counts now",
                    value=float(breaker.failure_count),
                )

        peak = GaugeMetricFamily(
            "fine_tuning_health_memory_peak_mb", "Peak resident memory of the process serving /metrics"
        )
        peak.add_metric([], float(report.performance_metrics.get("memory_peak_mb") or 0.0))
        yield peak
        checked = GaugeMetricFamily("fine_tuning_health_check_timestamp_seconds", "When the probes ran")
        checked.add_metric([], report.timestamp)
        yield checked


def prometheus_text(report: HealthReport) -> str:
    """The report as Prometheus text (``GET /metrics``); serve it with :data:`PROMETHEUS_CONTENT_TYPE`.

    The names are the ones the statsd_exporter mapping gives the same facts, so alert rules and
    dashboards read either source.
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReportCollector(report))
    return generate_latest(registry).decode("utf-8")
