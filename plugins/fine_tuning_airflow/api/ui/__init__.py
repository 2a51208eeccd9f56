"""The Experiments view inside the Airflow UI: A/B tests and rollouts as pages.

Server-rendered HTML (Jinja2, installed with Airflow) served by the plugin's FastAPI app under
``/pipeline/ui`` and shown by Airflow's UI in an iframe (the plugin's ``external_views``): in the
navigation (the list) and on every run of ``weekly_fine_tuning`` (its A/B test and rollout).
External views rather than a React app: no JavaScript build in the project (no npm at run
time, no CDN), the pages work without scripts, and they are one more router of the same app.

Every number comes from the library's own reads: the A/B page's per-arm table and analysis
are :func:`fine_tuning.evaluate.report.metrics_report` (what ``/pipeline/evaluation/metrics``
answers), the picture is :func:`fine_tuning.evaluate.plots.evaluation_figure` (what the pipeline
logs to MLflow), the recorded decision is the test's last look, the rollout's steps and gate
verdicts are its ``deployment_events``. The view computes nothing of its own.

Access is the API's: reading needs read access to ``weekly_fine_tuning``, the Rollback button
the edit access to ``rollout_monitor`` that ``POST /pipeline/deployment/rollback`` needs. Not
logged in, a page redirects to Airflow's login; the identity is Airflow's ``_token`` cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from fine_tuning import clock
from fine_tuning.config import PipelineConfig
from fine_tuning.deploy import rollout
from fine_tuning.evaluate import ab, plots, report
from fine_tuning.infra.redis import redis_client
from fine_tuning.step_graph import approval_page
from fine_tuning.track import registry
from fine_tuning_airflow.api import deps
from fine_tuning_airflow.api.deps import PIPELINE_DAG_ID, URL_PREFIX

log = logging.getLogger(__name__)

UI_PREFIX = "/ui"
LIST_PATH = f"{URL_PREFIX}{UI_PREFIX}/experiments"
# How many of the newest A/B tests and deployments the list shows.
LIST_LIMIT = 50

router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


# -- presentation filters (formatting only) -----------------------------------------------------
NONE_SHOWN = "-"


def _pct(value: Any, digits: int = 1) -> str:
    return NONE_SHOWN if value is None else f"{float(value):.{digits}%}"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return NONE_SHOWN
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value and abs(value) < 1e-3:
            return f"{value:.{digits}g}"
        shown = f"{value:,.{digits}f}"
        return shown.rstrip("0").rstrip(".") if "." in shown else shown
    return str(value)


def _when(value: Any) -> str:
    if value is None:
        return NONE_SHOWN
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return f"{value:%Y-%m-%d %H:%M:%S} UTC"


templates.env.filters.update(pct=_pct, num=_num, when=_when)


# -- access ----------------------------------------------------------------------------------------
def _credential(request: Request) -> str:
    """The token this request is authenticated with (the header wins, as in Airflow's get_user)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:]
    return request.cookies.get("_token", "")


def form_token(request: Request, action: str) -> str:
    """A form's anti-forgery token: bound to the session's own credential and to the action, so a
    page of another site (which cannot read the cookie) cannot make one."""
    return hmac.new(_credential(request).encode(), action.encode(), hashlib.sha256).hexdigest()


def login_redirect(request: Request) -> RedirectResponse:
    from airflow.api_fastapi.app import get_auth_manager

    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(get_auth_manager().get_url_login(next_url=target), status.HTTP_303_SEE_OTHER)


def error_page(request: Request, code: int, detail: str) -> Response:
    """A readable page for a UI route's error: not logged in goes to Airflow's login instead."""
    if code == status.HTTP_401_UNAUTHORIZED and request.method == "GET":
        return login_redirect(request)
    return templates.TemplateResponse(
        request, "error.html", {"code": code, "detail": detail, "list_path": LIST_PATH}, status_code=code
    )


# -- pages -----------------------------------------------------------------------------------------
def _page(request: Request, template: str, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, template, {"list_path": LIST_PATH, "prefix": f"{URL_PREFIX}{UI_PREFIX}", **context}
    )


@router.get("/experiments", response_class=HTMLResponse)
def experiments(_: deps.CanReadPipeline, request: Request, config: deps.ConfigDep) -> HTMLResponse:
    """The newest A/B tests and rollouts, each linking to its page."""
    return _page(
        request,
        "experiments.html",
        tests=ab.list_ab_tests(config, LIST_LIMIT),
        deployments=rollout.list_deployments(config, LIST_LIMIT),
        limit=LIST_LIMIT,
    )


def _mlflow_links(config: PipelineConfig, test: dict[str, Any]) -> dict[str, Any]:
    """Links to the MLflow run of the pipeline run and to the registered version. MLflow down does
    not take the page down: the page says it could not ask."""
    base = config.mlflow.tracking_uri.rstrip("/")
    links: dict[str, Any] = {}
    if not base.startswith(("http://", "https://")):
        return {"note": f"MLflow is not served over HTTP here ({base}): no links"}
    if test.get("candidate_version"):
        links["version"] = (
            f"{base}/#/models/{quote(config.mlflow.registered_model_name)}/versions/{test['candidate_version']}"
        )
    if test.get("dag_id") and test.get("run_id"):
        try:
            run = registry.find_run(config, test["dag_id"], test["run_id"])
        except Exception as exc:  # noqa: BLE001 - a link is not worth failing the page for; it says why
            links["note"] = f"MLflow did not answer: {exc}"
        else:
            if run is not None:
                links["run"] = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return links


@router.get("/experiments/ab/{ab_test_id}", response_class=HTMLResponse)
def ab_test_page(
    _: deps.CanReadPipeline,
    request: Request,
    config: deps.ConfigDep,
    ab_test_id: Annotated[str, deps.identifier()],
) -> HTMLResponse:
    """One A/B test: arms, lift and its always-valid CI over time, decision, guardrails, SRM, plan."""
    test = ab.get_ab_test(config, ab_test_id)
    metrics = report.metrics_report(config, ab_test_id)
    recorded = test["last_analysis"] or {}
    return _page(
        request,
        "ab_test.html",
        test=test,
        report=metrics,
        recorded=recorded,
        history=recorded.get("history", []),
        deployment_id=rollout.deployment_of_test(config, ab_test_id),
        mlflow=_mlflow_links(config, test),
        dag_run_url=(
            f"/dags/{test['dag_id']}/runs/{quote(test['run_id'], safe='')}" if test["run_id"] else None
        ),
    )


@router.get("/experiments/ab/{ab_test_id}/evaluation.png")
def ab_test_figure(
    _: deps.CanReadPipeline, config: deps.ConfigDep, ab_test_id: Annotated[str, deps.identifier()]
) -> Response:
    """The figure the pipeline logs to MLflow at every look, drawn from the same records."""
    test = ab.get_ab_test(config, ab_test_id)
    until = min(clock.now_utc(), test["ended_at"]) if test["ended_at"] else clock.now_utc()
    history = (test["last_analysis"] or {}).get("history", [])
    png = plots.evaluation_png(test, ab.test_aggregates(config, test, until), history)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/experiments/rollouts/{deployment_id}", response_class=HTMLResponse)
def rollout_page(
    _: deps.CanReadPipeline,
    request: Request,
    config: deps.ConfigDep,
    deployment_id: Annotated[str, deps.identifier()],
) -> HTMLResponse:
    """One rollout: its stages over time, each gate's verdict, the rollback and its trigger."""
    record = rollout.get_deployment(config, deployment_id)
    return _page(
        request,
        "rollout.html",
        deployment=record,
        rolled_back=next((e for e in record["events"] if e["kind"] == "rolled_back"), None),
        asked=next((e for e in reversed(record["events"]) if e["kind"] == "awaiting_approval"), None),
        approval_url=approval_page(deployment_id),
        form_token=form_token(request, f"rollback:{deployment_id}"),
        done=request.query_params.get("done"),
    )


@router.post("/experiments/rollouts/{deployment_id}/rollback")
def rollback_action(
    _: deps.CanEditRollouts,
    request: Request,
    user: deps.CurrentUser,
    config: deps.ConfigDep,
    deployment_id: Annotated[str, deps.identifier()],
    reason: Annotated[str, Form(max_length=500)] = "",
    confirm: Annotated[str, Form()] = "",
    token: Annotated[str, Form()] = "",
) -> Response:
    """The page's Rollback button: the API's rollback (one atomic routing switch), with a reason,
    confirmed by ticking the box; back to the rollout page, which shows the new state."""
    if not hmac.compare_digest(token, form_token(request, f"rollback:{deployment_id}")):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the form is stale or was not made by this page")
    if not reason.strip():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "reason: a rollback needs a reason")
    if confirm != "yes":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "confirm: tick the box to confirm")
    why = f"manual by {user.get_name()}: {reason.strip()}"
    record = rollout.rollback(config, redis_client(config), deployment_id, why, clock.now_utc())
    log.warning("deployment %s rolled back from the UI by %s: %s", deployment_id, user.get_name(), reason)
    return RedirectResponse(
        f"{URL_PREFIX}{UI_PREFIX}/experiments/rollouts/{quote(record['id'])}?done=rolled_back",
        status.HTTP_303_SEE_OTHER,
    )


@router.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse)
def run_page(
    _: deps.CanReadPipeline,
    request: Request,
    config: deps.ConfigDep,
    dag_id: Annotated[str, deps.identifier()],
    run_id: Annotated[str, deps.identifier()],
) -> HTMLResponse:
    """A DAG run's tab: the A/B test this run created and the rollout of its candidate."""
    ab_test_id = ab.ab_test_of_run(config, dag_id, run_id) if dag_id == PIPELINE_DAG_ID else None
    test = ab.get_ab_test(config, ab_test_id) if ab_test_id else None
    deployment_id = rollout.deployment_of_test(config, ab_test_id) if ab_test_id else None
    return _page(
        request,
        "run.html",
        dag_id=dag_id,
        run_id=run_id,
        pipeline_dag=PIPELINE_DAG_ID,
        test=test,
        deployment=rollout.get_deployment(config, deployment_id) if deployment_id else None,
    )


# Airflow's UI shows these pages in an iframe: in the navigation, and as a tab of a DAG run.
EXTERNAL_VIEWS = [
    {
        "name": "Experiments",
        "href": LIST_PATH,
        "destination": "nav",
        "url_route": "experiments",
    },
    {
        "name": "Experiment",
        "href": f"{URL_PREFIX}{UI_PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}",
        "destination": "dag_run",
        "url_route": "experiment",
    },
]
