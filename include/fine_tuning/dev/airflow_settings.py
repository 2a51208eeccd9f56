"""Load ``airflow_settings.yaml`` (the Astro CLI's format) into a local Airflow without the Astro CLI.

``python -m fine_tuning settings [FILE]`` validates the file, turns its three lists into the
files Airflow's own importers read, and runs them against the Airflow that ``AIRFLOW_HOME`` /
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` point at::

    airflow connections import --overwrite connections.json
    airflow variables import --action-on-existing-key overwrite variables.json
    airflow pools import pools.json

Airflow's commands do the writing (and its validation); this module only translates, so the
entries land exactly as ``airflow connections add`` would make them. A mistake in the file (an
unknown key, a missing name, a port that is not a number) stops before anything is imported,
with the entry and the key named. Loading twice gives the same result (entries are overwritten).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class SettingsError(ValueError):
    """The settings file is missing or wrong; the message names the entry and the key."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AstroConnection(_Entry):
    conn_id: str = Field(min_length=1)
    conn_type: str = Field(min_length=1)
    conn_host: str | None = None
    conn_schema: str | None = None
    conn_login: str | None = None
    conn_password: str | None = None
    conn_port: int | None = None
    conn_extra: dict[str, Any] | str | None = None
    conn_description: str | None = None

    def for_import(self) -> dict[str, Any]:
        """The entry as ``airflow connections import`` reads it (its export format)."""
        entry: dict[str, Any] = {"conn_type": self.conn_type}
        for key in ("host", "schema", "login", "password", "port", "description"):
            value = getattr(self, f"conn_{key}")
            if value is not None:
                entry[key] = value
        if self.conn_extra is not None:
            entry["extra"] = (
                self.conn_extra if isinstance(self.conn_extra, str) else json.dumps(self.conn_extra)
            )
        return entry


class AstroPool(_Entry):
    pool_name: str = Field(min_length=1)
    pool_slot: int = Field(ge=-1)  # -1: unlimited, as Airflow allows
    pool_description: str = ""
    include_deferred: bool = False


class AstroVariable(_Entry):
    variable_name: str = Field(min_length=1)
    variable_value: Any


class AstroAirflow(_Entry):
    connections: list[AstroConnection] = Field(default_factory=list)
    pools: list[AstroPool] = Field(default_factory=list)
    variables: list[AstroVariable] = Field(default_factory=list)


def read_settings(path: str | Path) -> AstroAirflow:
    """Parse and validate the file; :raises SettingsError: naming the entry and key at fault."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such settings file") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("airflow"), Mapping):
        raise SettingsError(f"{path}: expected a top-level 'airflow:' mapping (the Astro CLI's format)")
    try:
        settings = AstroAirflow.model_validate(data["airflow"])
    except ValidationError as exc:
        raise SettingsError(f"{path}: {_describe(exc, data['airflow'])}") from None
    for kind, key in (("connections", "conn_id"), ("pools", "pool_name"), ("variables", "variable_name")):
        names = [getattr(entry, key) for entry in getattr(settings, kind)]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SettingsError(
                f"{path}: airflow.{kind}: {key} {', '.join(duplicates)} appears more than once"
            )
    return settings


def _describe(exc: ValidationError, data: Mapping[str, Any]) -> str:
    """``airflow.connections[1] (posts_db).conn_port: Input should be a valid integer``."""
    problems = []
    for error in exc.errors():
        location = list(error["loc"])
        where = "airflow"
        if len(location) >= 2 and isinstance(location[1], int):
            kind, index = location[0], location[1]
            entry = (data.get(str(kind)) or [None] * (index + 1))[index]
            name = next(
                (
                    entry.get(k)
                    for k in ("conn_id", "pool_name", "variable_name")
                    if isinstance(entry, Mapping) and entry.get(k)
                ),
                None,
            )
            where += f".{kind}[{index}]" + (f" ({name})" if name else "")
            location = location[2:]
        if location:
            where += "." + ".".join(str(part) for part in location)
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def import_files(settings: AstroAirflow, directory: Path) -> dict[str, Path]:
    """Write the JSON files Airflow's importers read; only the kinds the settings hold."""
    files: dict[str, Path] = {}
    documents = {
        "connections": {c.conn_id: c.for_import() for c in settings.connections},
        "variables": {v.variable_name: v.variable_value for v in settings.variables},
        "pools": {
            p.pool_name: {
                "slots": p.pool_slot,
                "description": p.pool_description,
                "include_deferred": p.include_deferred,
            }
            for p in settings.pools
        },
    }
    for kind, document in documents.items():
        if document:
            files[kind] = directory / f"{kind}.json"
            files[kind].write_text(json.dumps(document, indent=2))
    return files


IMPORT_COMMANDS = {
    "connections": ["connections", "import", "--overwrite"],
    "variables": ["variables", "import", "--action-on-existing-key", "overwrite"],
    "pools": ["pools", "import"],
}


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Import the file's connections, variables and pools with Airflow's own CLI.

    :param env: the environment for ``airflow`` (default: this process's).
    :returns: the names imported, per kind.
    :raises SettingsError: a bad file (nothing imported) or an import Airflow refused.
    """
    settings = read_settings(path)
    with tempfile.TemporaryDirectory(prefix="airflow-settings-") as tmp:
        for kind, file in import_files(settings, Path(tmp)).items():
            done = subprocess.run(
                [sys.executable, "-m", "airflow", *IMPORT_COMMANDS[kind], str(file)],
                env=None if env is None else dict(env),
                capture_output=True,
                text=True,
                check=False,
            )
            # Airflow prints "Could not import ..." and still exits 0 for a refused entry.
            refused = [line for line in done.stdout.splitlines() if line.startswith("Could not import")]
            if done.returncode != 0 or refused:
                detail = "\n".join(refused) or (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise SettingsError(f"{path}: airflow {' '.join(IMPORT_COMMANDS[kind][:2])} failed: {detail}")
    return {
        "connections": [c.conn_id for c in settings.connections],
        "variables": [v.variable_name for v in settings.variables],
        "pools": [p.pool_name for p in settings.pools],
    }
