"""Request bodies of the emulated API and the admin API, as pydantic models.

They check types only; limits (suffix length, metadata sizes, hyperparameter ranges) are checked
in the handlers so that the 400s carry OpenAI-style messages and the offending ``param``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    """Supervised hyperparameters; each is "auto" (the default) or a number."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | StrictInt | None = None
    batch_size: Auto | StrictInt | None = None
    learning_rate_multiplier: Auto | StrictFloat | StrictInt | None = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """``method``: only ``supervised`` trains in the emulator; the others are refused plainly."""

    model_config = ConfigDict(extra="allow")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(BaseModel):
    """The body of ``POST /v1/fine_tuning/jobs``; unknown fields are refused, as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    training_file: StrictStr
    validation_file: StrictStr | None = None
    suffix: StrictStr | None = None
    seed: StrictInt | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    integrations: list[dict[str, Any]] | None = None


class StageSeconds(BaseModel):
    """The body of ``POST /_emulator/stage_seconds``."""

    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0)


class RefuseJobs(BaseModel):
    """The body of ``POST /_emulator/refuse_jobs``."""

    model_config = ConfigDict(extra="forbid")

    refuse: bool = True
    status: Literal[400, 403] | None = None
    message: str | None = None


class FailJob(BaseModel):
    """The body of ``POST /_emulator/jobs/{id}/fail``."""

    model_config = ConfigDict(extra="forbid")

    code: str = "server_error"
    message: str = "The job failed due to an internal error."
    param: str | None = None


class Clock(BaseModel):
    """The body of ``POST /_emulator/clock``: set ``now`` (Unix seconds) and/or advance it."""

    model_config = ConfigDict(extra="forbid")

    now: float | None = None
    advance_seconds: float = 0.0


class Deprecation(BaseModel):
    """The body of ``POST /_emulator/deprecations``: one model's Azure ``deprecation`` dates."""

    model_config = ConfigDict(extra="forbid")

    model: str
    fine_tune: int | None = None
    inference: int | None = None
