"""Base models the emulator fine-tunes: snapshot names, aliases, tokenizer, example token limit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BaseModel:
    """A fine-tunable snapshot: its tokenizer and the longest example (in tokens) it trains on."""

    name: str
    encoding: str
    max_example_tokens: int


_SNAPSHOTS = (
    BaseModel("gpt-3.5-turbo-0125", "cl100k_base", 16_385),
    BaseModel("gpt-3.5-turbo-1106", "cl100k_base", 16_385),
    BaseModel("gpt-4o-mini-2024-07-18", "o200k_base", 65_536),
    BaseModel("gpt-4o-2024-08-06", "o200k_base", 65_536),
    BaseModel("gpt-4.1-nano-2025-04-14", "o200k_base", 65_536),
    BaseModel("gpt-4.1-mini-2025-04-14", "o200k_base", 65_536),
    BaseModel("gpt-4.1-2025-04-14", "o200k_base", 65_536),
)
SNAPSHOTS: dict[str, BaseModel] = {model.name: model for model in _SNAPSHOTS}

# Names without a date resolve to the snapshot OpenAI fine-tunes for them.
ALIASES: dict[str, str] = {
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1": "gpt-4.1-2025-04-14",
}


def resolve(model: str) -> tuple[str, BaseModel] | None:
    """``(model as the job reports it, its base snapshot)``, or None when not fine-tunable.

    An alias reports its snapshot; a fine-tuned model (``ft:BASE:org:suffix:id``, to continue
    training it) keeps its own name and trains on BASE's limits.
    """
    if model.startswith("ft:"):
        parts = model.split(":")
        base = SNAPSHOTS.get(ALIASES.get(parts[1], parts[1])) if len(parts) >= 5 else None
        return (model, base) if base is not None else None
    name = ALIASES.get(model, model)
    snapshot = SNAPSHOTS.get(name)
    return (name, snapshot) if snapshot is not None else None


def supported_names() -> list[str]:
    """Every accepted model name, for error messages."""
    return sorted(SNAPSHOTS) + sorted(ALIASES)


def _ts(day: str) -> int:
    from datetime import UTC, datetime

    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp())


# What the emulated Azure Models API reports in ``deprecation`` (Unix seconds): the emulator's
# own copy of Microsoft's retirement schedule, so that the pipeline's reading of it is tested
# against data it does not ship itself. ``POST /_emulator/deprecations`` changes a model's.
AZURE_DEPRECATIONS: dict[str, dict[str, int]] = {
    "gpt-4o-mini-2024-07-18": {"fine_tune": _ts("2027-04-01"), "inference": _ts("2027-10-01")},
    "gpt-4o-2024-08-06": {"fine_tune": _ts("2027-04-01"), "inference": _ts("2027-10-01")},
    "gpt-4.1-mini-2025-04-14": {"fine_tune": _ts("2027-04-14"), "inference": _ts("2027-10-14")},
    "gpt-4.1-2025-04-14": {"fine_tune": _ts("2027-04-14"), "inference": _ts("2027-10-14")},
    "gpt-4.1-nano-2025-04-14": {"fine_tune": _ts("2027-04-14"), "inference": _ts("2027-10-14")},
}
