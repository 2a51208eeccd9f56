"""Registers the fine-tuning pipeline's plugin with Airflow."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


class FineTuningPipelinePlugin(AirflowPlugin):
    name = "fine_tuning_pipeline"
