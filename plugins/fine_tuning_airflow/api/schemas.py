"""The API's request and response bodies. Requests refuse unknown keys: a typo is a 422 that names
the field, not a silently ignored key."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fine_tuning.config import run_params_model


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- pipelines ---------------------------------------------------------------------------------
# The run params' fields are made from the config's: their types and bounds are stated there once.
class StartConfig(run_params_model()):  # type: ignore[misc]
    """Per-run overrides (the DAG's params); unset keeps the configured value."""

    # In the design's body, but the schedule is the DAG's, not a run's: accepted, checked, unused.
    weekly_schedule: str | None = Field(None, max_length=100)


class StartRequest(_Body):
    config: StartConfig = Field(default_factory=StartConfig)
    force_run: bool = Field(
        False, description="Trigger even if a run is already active or fine_tuning_enabled is false."
    )
    logical_date: datetime | None = Field(
        None, description="The week to train on (its data interval); default: the week before now."
    )


class StartResponse(BaseModel):
    status: Literal["success"]
    pipeline_id: str
    dag_id: str
    state: str
    logical_date: datetime | None
    run_after: datetime | None
    conf: dict[str, Any]
    ignored_config: list[str]
    # The run is asynchronous: these are known once its tasks ran (see the status endpoint).
    model_version: dict[str, Any] | None = None
    training_data: dict[str, Any] | None = None
    links: dict[str, str]


class StatusResponse(BaseModel):
    pipeline_id: str
    dag_id: str
    status: str
    state: str
    progress: dict[str, str]
    current_stage: str | None
    # Set once a step skipped (too little data, a rejected candidate): which one and why.
    skipped: dict[str, str] | None = None
    tasks: dict[str, str | None]
    start_date: datetime | None
    end_date: datetime | None
    estimated_completion: datetime | None
    metrics: dict[str, Any]
    note: str | None = None


class AbortRequest(_Body):
    reason: str = Field("user_requested", min_length=1, max_length=500)


class AbortResponse(BaseModel):
    pipeline_id: str
    status: Literal["aborted"]
    cleanup_status: Literal["completed", "partial"]
    reason: str
    resources_cleaned: list[str]
    details: dict[str, Any]


# -- A/B tests ---------------------------------------------------------------------------------
# Model ids are printable text (OpenAI's, "ft:...", "selfhosted:..."); no control characters,
# which PostgreSQL text and the agent's routing cannot hold.
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"


class ModelRef(_Body):
    model_id: str = Field(min_length=1, max_length=200, pattern=PRINTABLE)
    version: str | None = Field(None, max_length=100, pattern=PRINTABLE)


class ABSuccessCriteria(_Body):
    min_engagement_lift: float | None = Field(None, gt=0)
    min_cost_efficiency_gain: float | None = Field(None, ge=0)
    significance_threshold: float | None = Field(None, gt=0.0, lt=1.0)


class CreateABTestRequest(_Body):
    baseline_model: ModelRef
    candidate_model: ModelRef
    traffic_split: float = Field(0.1, gt=0.0, lt=1.0)
    duration_hours: float = Field(168, gt=0, le=24 * 366)
    success_criteria: ABSuccessCriteria = Field(default_factory=ABSuccessCriteria)
    model_type: Literal["hook", "body"] | None = None

    @model_validator(mode="after")
    def _different_models(self) -> CreateABTestRequest:
        if self.baseline_model.model_id == self.candidate_model.model_id:
            raise ValueError("candidate_model.model_id must differ from baseline_model.model_id")
        return self


class CreateABTestResponse(BaseModel):
    ab_test_id: str
    status: str
    model_type: str
    start_time: datetime
    estimated_end_time: datetime
    traffic_allocation: dict[str, float]
    power_plan: dict[str, Any]
    monitoring_endpoints: dict[str, str]


# -- deployments -------------------------------------------------------------------------------
class EvaluationResult(_Body):
    ab_test_id: str = Field(min_length=1, max_length=250)
    recommendation: Literal["promote", "reject", "continue"]
    safety_checks_passed: bool


class RolloutOverrides(_Body):
    initial_traffic: float | None = Field(None, gt=0.0, le=1.0)
    increment_interval_hours: float | None = Field(None, gt=0)
    increment_percentage: float | None = Field(None, gt=0.0, le=1.0)
    max_traffic: float | None = Field(None, gt=0.0, le=1.0)


class DeployRequest(_Body):
    model_version: ModelRef
    evaluation_result: EvaluationResult
    deployment_strategy: Literal["gradual_rollout", "immediate"] = "gradual_rollout"
    rollout_config: RolloutOverrides = Field(default_factory=RolloutOverrides)


class DeploymentResponse(BaseModel):
    deployment_id: str
    status: str
    deployment_strategy: str
    ab_test_id: str | None
    candidate_model: str
    previous_model: str
    current_traffic: float
    rollback_reason: str | None
    rollback_plan: dict[str, Any]
    monitoring: dict[str, Any]
    events: list[dict[str, Any]]
    # deployment.require_approval: the approval's DAG run and Required Actions page, its answer
    approval: dict[str, Any] | None = None


class RollbackRequest(_Body):
    reason: str = Field("user_requested", min_length=1, max_length=500)
