"""The weekly DAG's typed params, made from the pipeline's config schema (one source of bounds)."""

from __future__ import annotations

from airflow.sdk import Param

from fine_tuning.config import run_param_schemas


def dag_params() -> dict[str, Param]:
    """One ``Param`` per run param: empty (None) keeps the configured value; the type and bounds
    are the config field's, so the trigger form, REST ``conf`` and the config agree."""
    params: dict[str, Param] = {}
    for name, schema in run_param_schemas().items():
        keywords = {key: value for key, value in schema.items() if key != "description"}
        params[name] = Param(None, description=schema["description"], **keywords)
    return params
