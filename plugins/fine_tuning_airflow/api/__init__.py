"""The pipeline's domain REST API, served by the Airflow API server under ``/pipeline``.

Every route states its access with Airflow's own DAG permissions (``deps``): reads need read
access to the DAG's runs, writes need edit/trigger access. ``/health`` and ``/metrics`` are
public, like Airflow's ``/api/v2/monitor/health``, for probes and Prometheus.

A pipeline is a run of the ``weekly_fine_tuning`` DAG: ``pipeline_id`` is its run id. Runs are
triggered, read and failed with Airflow's internals (``airflow_runs``, the same functions its
REST API v2 uses); A/B tests and deployments are the library's records in PostgreSQL and Redis.
A route validates, calls the library, and shapes the answer; the library's errors that have an
HTTP meaning are mapped here, once.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response

from fine_tuning.deploy import rollout
from fine_tuning.deploy.serving import AdapterLoadError
from fine_tuning.evaluate import ab
from fine_tuning.infra.breakers import CircuitOpenError
from fine_tuning_airflow.api.deps import URL_PREFIX
from fine_tuning_airflow.api.routes import deployment, evaluation, monitoring, pipeline
from fine_tuning_airflow.api.ui import UI_PREFIX, error_page
from fine_tuning_airflow.api.ui import router as ui_router

app = FastAPI(
    title="Fine-tuning pipeline API",
    version="1.0.0",
    description=(
        "The weekly fine-tuning pipeline's domain endpoints, served by the Airflow API server under "
        "`/pipeline`. Authenticate with a token from `POST /auth/token` (`Authorization: Bearer`); "
        "`/health` and `/metrics` are public."
    ),
)
for router in (pipeline.router, evaluation.router, deployment.router, monitoring.router, ui_router):
    app.include_router(router)

# The library's errors, as the HTTP status a client can act on; the body is HTTPException's.
LIBRARY_ERRORS: dict[type[Exception], int] = {
    ab.UnknownABTest: status.HTTP_404_NOT_FOUND,
    rollout.UnknownDeployment: status.HTTP_404_NOT_FOUND,
    ab.ABTestError: status.HTTP_409_CONFLICT,  # the test cannot start as asked (e.g. strict power)
    rollout.DeploymentRefused: status.HTTP_409_CONFLICT,  # a safety check, or another active rollout
    AdapterLoadError: status.HTTP_502_BAD_GATEWAY,  # vLLM did not load a self-hosted adapter
    CircuitOpenError: status.HTTP_503_SERVICE_UNAVAILABLE,  # vLLM's breaker is open: retry later
}


def _is_page(request: Request) -> bool:
    """A request for one of the Experiments pages (HTML), not for the JSON API."""
    return request.url.path.startswith(f"{URL_PREFIX}{UI_PREFIX}/")


async def library_error(request: Request, exc: Exception) -> Response:
    """``{"detail": message}`` with the error's status; an open breaker says when to retry."""
    code = next(code for kind, code in LIBRARY_ERRORS.items() if isinstance(exc, kind))
    if _is_page(request):
        return error_page(request, code, str(exc))
    headers = {"Retry-After": str(exc.retry_after_seconds)} if isinstance(exc, CircuitOpenError) else None
    return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)


for error in LIBRARY_ERRORS:
    app.add_exception_handler(error, library_error)


@app.exception_handler(HTTPException)
async def page_or_json_error(request: Request, exc: HTTPException) -> Response:
    """The pages answer errors as pages (not logged in: Airflow's login); the API as FastAPI does."""
    if _is_page(request):
        return error_page(request, exc.status_code, str(exc.detail))
    return await http_exception_handler(request, exc)


fastapi_app = {"app": app, "url_prefix": URL_PREFIX, "name": "Fine-tuning pipeline API"}
