"""Registers the fine-tuning pipeline's plugin with Airflow: its REST API under ``/pipeline`` and
the Experiments pages (``/pipeline/ui``) in the Airflow UI's navigation and on DAG runs."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from fine_tuning_airflow.api import fastapi_app
from fine_tuning_airflow.api.ui import EXTERNAL_VIEWS


class FineTuningPipelinePlugin(AirflowPlugin):
    name = "fine_tuning_pipeline"
    # Served by the Airflow API server next to /api/v2; the app puts auth on its own routes.
    fastapi_apps = [fastapi_app]  # noqa: RUF012 - AirflowPlugin declares an instance attribute
    external_views = EXTERNAL_VIEWS
