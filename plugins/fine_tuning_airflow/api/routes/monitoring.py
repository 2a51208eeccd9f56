"""Monitoring, public like Airflow's ``/api/v2/monitor/health``: for probes and Prometheus."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from fine_tuning.infra.health import PROMETHEUS_CONTENT_TYPE, prometheus_text
from fine_tuning.pipeline import health as check_health
from fine_tuning_airflow.api import deps

router = APIRouter()


@router.get(
    "/health",
    responses={
        200: {"description": "Every required dependency answers"},
        503: {"description": "One does not"},
    },
)
def health(config: deps.ConfigDep) -> JSONResponse:
    """Public: each dependency's probe and each breaker's state; 503 when a required one is down.

    Each call also sends the pool and breaker gauges over StatsD: the Kubernetes probe that
    polls this keeps them current in Prometheus."""
    report = check_health(config, emit_metrics=True)
    return JSONResponse(report.model_dump(mode="json"), status_code=report.http_status)


@router.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
def metrics(config: deps.ConfigDep) -> PlainTextResponse:
    """Public: the health facts as Prometheus text (scraped by Prometheus)."""
    return PlainTextResponse(prometheus_text(check_health(config)), media_type=PROMETHEUS_CONTENT_TYPE)
