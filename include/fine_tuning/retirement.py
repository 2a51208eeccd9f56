"""When the models the pipeline depends on stop training and stop serving.

OpenAI takes no new fine-tuning jobs from 2027-01-06, and the fine-tunable base models (and the
fine-tuned models built on them) are reported to stop serving on 2027-01-14; Azure OpenAI keeps
both for some months more. These dates are data with a source and a day checked, not constants
in code: the table ships with the package (``retirements.json``), a deployment overrides rows
in its config (``retirement.overrides``), and where a provider reports dates itself (Azure's
Models API) those are read and win over the shipped table.

Everything that names a model for traffic asks here first: the training step refuses a closed
provider before uploading, the routing never names a model past its inference date (it serves
``retirement.serving_fallback`` instead and says so), and the weekly run starts a migration to
``training.fallback_provider`` while the champion still serves.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time
from fnmatch import fnmatchcase
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fine_tuning.config import ConfigError, PipelineConfig, RetirementRow
from fine_tuning.routing import Routing, set_routing

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

Kind = Literal["training", "inference"]
Status = Literal["ok", "retiring", "retired", "unknown"]


class TrainingRetiredError(RuntimeError):
    """The training provider no longer trains this base model: no retry can help.

    A ``TrainingRefusedError`` in spirit (the operator fails it without retrying); it is its
    own class so that the message can name the date and the way out.
    """


@dataclass(frozen=True)
class ModelRef:
    """A model id as the routing names it, split into who serves it and what it is built on."""

    model: str
    provider: str
    base_model: str
    fine_tuned: bool


def parse_model(model: str, serving_provider: str = "openai") -> ModelRef:
    """Who serves ``model`` and its base model.

    ``ft:BASE:org:suffix:id`` is an OpenAI fine-tune of BASE; ``BASE.ft-<id>`` an Azure OpenAI
    one; ``selfhosted:<adapter>`` a LoRA adapter on our own vLLM; any other id is a provider's
    base model, served by ``serving_provider`` (the provider the content agent calls).
    """
    if model.startswith("ft:"):
        parts = model.split(":")
        return ModelRef(model, "openai", parts[1] if len(parts) > 1 and parts[1] else model, True)
    if model.startswith("selfhosted:"):
        return ModelRef(model, "selfhosted", model, True)
    if ".ft-" in model:
        return ModelRef(model, "azure_openai", model.split(".ft-", 1)[0], True)
    return ModelRef(model, serving_provider, model, False)


@dataclass(frozen=True)
class Retirement:
    """What is known of one model's retirements (``source`` None: no row matched, unknown)."""

    ref: ModelRef
    training_retires: date | None = None
    inference_retires: date | None = None
    source: str | None = None
    checked: date | None = None

    @property
    def model(self) -> str:
        return self.ref.model

    def retires(self, kind: Kind) -> date | None:
        return self.training_retires if kind == "training" else self.inference_retires

    def retires_at(self, kind: Kind) -> datetime | None:
        """The first instant the model no longer trains / serves (00:00 UTC of the day)."""
        day = self.retires(kind)
        return None if day is None else datetime.combine(day, time(0, 0), tzinfo=UTC)

    def days_to(self, kind: Kind, now: datetime) -> float | None:
        """Days until the retirement (negative once past); None when no date is known."""
        at = self.retires_at(kind)
        return None if at is None else (at - now).total_seconds() / 86_400

    def retired(self, kind: Kind, now: datetime) -> bool:
        at = self.retires_at(kind)
        return at is not None and now >= at

    def status(self, kind: Kind, now: datetime, horizon_days: float) -> Status:
        days = self.days_to(kind, now)
        if days is None:
            return "unknown" if self.source is None else "ok"
        if days <= 0:
            return "retired"
        return "retiring" if days <= horizon_days else "ok"

    def as_dict(self, now: datetime, horizon_days: float) -> dict[str, object]:
        return {
            "model": self.model,
            "provider": self.ref.provider,
            "base_model": self.ref.base_model,
            "fine_tuned": self.ref.fine_tuned,
            "training_retires": self.training_retires.isoformat() if self.training_retires else None,
            "inference_retires": self.inference_retires.isoformat() if self.inference_retires else None,
            "days_to_training_retirement": _round(self.days_to("training", now)),
            "days_to_inference_retirement": _round(self.days_to("inference", now)),
            "training": self.status("training", now, horizon_days),
            "inference": self.status("inference", now, horizon_days),
            "source": self.source,
            "checked": self.checked.isoformat() if self.checked else None,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


@dataclass(frozen=True)
class ReportedDates:
    """Dates a provider reports for one of its models (Azure's ``deprecation`` object)."""

    training_retires: date | None
    inference_retires: date | None
    source: str


@cache
def shipped_rows() -> tuple[RetirementRow, ...]:
    """The table shipped with the package (``fine_tuning/retirements.json``)."""
    text = resources.files("fine_tuning").joinpath("retirements.json").read_text()
    return tuple(RetirementRow.model_validate(row) for row in json.loads(text)["rows"])


def file_rows(path: str) -> tuple[RetirementRow, ...]:
    """The rows of a table file (``retirement.table_file``); a bad file is refused, naming it."""
    from pydantic import ValidationError

    try:
        data = json.loads(Path(path).read_text())
        return tuple(RetirementRow.model_validate(row) for row in data["rows"])
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ConfigError(f"retirement.table_file {path!r} is not a retirement table: {exc}") from exc


def _matches(row: RetirementRow, ref: ModelRef) -> bool:
    if row.provider != ref.provider:
        return False
    return any(fnmatchcase(ref.base_model, pattern) for pattern in row.models)


def _earliest(days: list[tuple[date, str]]) -> tuple[date | None, list[str]]:
    if not days:
        return None, []
    first = min(day for day, _ in days)
    return first, [source for day, source in days if day == first]


@dataclass
class RetirementTable:
    """Rows to look models up in: the config's overrides, then what providers reported, then
    the shipped table. A model matched by an override row is described by the overrides alone
    (the deployment's word wins); else by the provider's own dates when it reported some; else
    by the shipped rows. Within one set the earliest date of the matching rows applies: when
    two rows disagree, the pipeline acts on the sooner retirement."""

    overrides: tuple[RetirementRow, ...] = ()
    rows: tuple[RetirementRow, ...] = field(default_factory=shipped_rows)
    reported: dict[tuple[str, str], ReportedDates] = field(default_factory=dict)
    serving_provider: str = "openai"
    # Served ids that do not name their provider: fnmatch pattern -> (provider, base model or None).
    model_providers: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def lookup(self, model: str, provider: str | None = None) -> Retirement:
        """What is known of ``model`` (served by ``provider``, else as :func:`parse_model` says)."""
        ref = parse_model(model, self.serving_provider)
        if provider is not None and not ref.fine_tuned:
            ref = replace(ref, provider=provider)
        for pattern, (owner, base) in self.model_providers.items():
            if fnmatchcase(model, pattern):
                ref = replace(ref, provider=owner, base_model=base or ref.base_model)
                break
        matching = [row for row in self.overrides if _matches(row, ref)]
        if not matching:
            reported = self.reported.get((ref.provider, ref.base_model))
            if reported is not None:
                return Retirement(
                    ref, reported.training_retires, reported.inference_retires, reported.source, None
                )
            matching = [row for row in self.rows if _matches(row, ref)]
        if not matching:
            return Retirement(ref)
        training, training_sources = _earliest(
            [(row.training_retires, row.source) for row in matching if row.training_retires]
        )
        inference, inference_sources = _earliest(
            [
                (row.inference_retires, row.source)
                for row in matching
                if row.inference_retires and (not ref.fine_tuned or row.fine_tunes_share_inference_date)
            ]
        )
        sources = list(dict.fromkeys(training_sources + inference_sources)) or [matching[0].source]
        return Retirement(ref, training, inference, "; ".join(sources), max(row.checked for row in matching))


def table_for(
    config: PipelineConfig, reported: dict[tuple[str, str], ReportedDates] | None = None
) -> RetirementTable:
    """The table this deployment acts on (``reported``: dates a provider gave for its models)."""
    settings = config.retirement
    owners: dict[str, tuple[str, str | None]] = {}
    deployment = config.training.azure.deployment_name
    if deployment:  # Azure serves its fine-tuned model under a deployment name of our choosing
        owners[deployment] = ("azure_openai", config.training.base_model)
    owners.update({pattern: (owner, None) for pattern, owner in settings.model_providers.items()})
    return RetirementTable(
        overrides=tuple(settings.overrides),
        rows=file_rows(settings.table_file) if settings.table_file else shipped_rows(),
        reported=dict(reported or {}),
        serving_provider=settings.serving_provider,
        model_providers=owners,
    )


def check_training_open(
    config: PipelineConfig, table: RetirementTable, provider: str, base_model: str, now: datetime
) -> Retirement:
    """Refuse, before anything is uploaded or paid for, to train where training has closed.

    :raises TrainingRetiredError: naming the date, its source and the way out.
    """
    found = table.lookup(base_model, provider)
    if found.retired("training", now):
        fallback = config.training.fallback_provider
        way_out = (
            f"set training.provider to {fallback!r} (the configured training.fallback_provider)"
            if fallback and fallback != provider
            else "set training.fallback_provider (or training.provider) to a provider that still trains, "
            "e.g. azure_openai, openai_compatible or selfhosted"
        )
        raise TrainingRetiredError(
            f"{provider} stopped fine-tuning {base_model} on {found.training_retires} "
            f"(source: {found.source}); not uploading the dataset. Way out: {way_out}."
        )
    return found


def serving_fallback(config: PipelineConfig, model_type: str) -> str | None:
    """The model served instead of a retired one for ``model_type`` (None: none configured)."""
    return config.retirement.serving_fallback.get(model_type)  # type: ignore[call-overload]


def require_fallback(config: PipelineConfig, model_type: str, instead_of: str) -> str:
    fallback = serving_fallback(config, model_type)
    if not fallback:
        raise ConfigError(
            f"{instead_of!r} is past its inference retirement and retirement.serving_fallback.{model_type} "
            "is not set: configure the model to serve instead"
        )
    return fallback


def served_routing(
    config: PipelineConfig,
    model_type: str,
    routing: Routing,
    now: datetime,
    table: RetirementTable | None = None,
) -> Routing:
    """``routing`` as it may be written: no model past its inference retirement, each model's
    retirement instant recorded for the agent, and the configured fallback named.

    A retired candidate loses its traffic; a retired baseline (the rollback target included) is
    replaced by ``retirement.serving_fallback.<model_type>``.

    :raises ConfigError: the baseline is retired and no fallback is configured (the routing is
        left as it was rather than pointed at a model that no longer answers).
    """
    table = table or table_for(config)
    fallback = serving_fallback(config, model_type)
    baseline, candidate, share, source = (
        routing.baseline_model,
        routing.candidate_model,
        routing.candidate_share,
        routing.source,
    )
    if candidate and table.lookup(candidate).retired("inference", now):
        log.error("routing: candidate %s is past its inference retirement: it gets no traffic", candidate)
        candidate, share, source = None, 0.0, f"{source}:candidate_retired"
    if table.lookup(baseline).retired("inference", now):
        replacement = require_fallback(config, model_type, baseline)
        if table.lookup(replacement).retired("inference", now):
            raise ConfigError(
                f"retirement.serving_fallback.{model_type} {replacement!r} is past its inference "
                f"retirement too: configure a model that still serves instead of {baseline!r}"
            )
        log.error("routing: %s is past its inference retirement: serving %s instead", baseline, replacement)
        baseline, source = replacement, f"{source}:fallback"
    if candidate == baseline:
        candidate, share = None, 0.0
    retires_at: dict[str, float] = {}
    for model in {baseline, candidate, fallback} - {None}:
        at = table.lookup(str(model)).retires_at("inference")
        if at is not None:
            retires_at[str(model)] = at.timestamp()
    return Routing(baseline, candidate, share, source, fallback_model=fallback, retires_at=retires_at)


def write_routing(
    config: PipelineConfig,
    client: redis.Redis,
    model_type: str,
    routing: Routing,
    now: datetime,
    table: RetirementTable | None = None,
) -> Routing:
    """Write ``routing`` as :func:`served_routing` makes it (the one way the pipeline routes)."""
    served = served_routing(config, model_type, routing, now, table)
    set_routing(client, model_type, served)
    return served
