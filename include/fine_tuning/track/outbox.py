"""A durable outbox for MLflow tracking: the pipeline's result never waits on MLflow.

What is buffered is a *logical, idempotent operation* ("log this run's cost estimate",
"register this candidate"), not raw HTTP calls: each is one JSON file in
``{data_dir}/{mlflow.outbox_dir}`` (written atomically, fsynced), named by the time it was
queued so that replay goes in order. Applying an operation finds its MLflow run by tag and its
model version by run id, logs only params and metrics not already there with that value, and
overwrites its artifacts: so a replay that is killed after MLflow took it and before its file
was removed, and therefore runs again, changes nothing. That is how "replayed exactly once"
holds without a distributed transaction: at-least-once delivery of idempotent effects.

When: :func:`submit` first replays what is pending (every MLflow-bound step does, so the next
pipeline step or run drains the outbox), then applies its own operation, or queues it behind the
pending ones when MLflow is down or its breaker is open. :func:`replay` (also
``python -m fine_tuning.track.outbox replay``) drains it on demand. An operation MLflow
rejects for a reason that is not an outage goes to ``dead/`` with the error, never silently lost.

The outbox is on the data volume because the steps already share it (the worker's disk in local
mode, the ``fine-tuning-data`` PVC in kubernetes mode); a file lock serialises replays.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pkgutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.infra.breakers import CircuitOpenError, is_breaker_failure

log = logging.getLogger(__name__)

LOCK_WAIT_SECONDS = 30.0

Operation = Callable[[PipelineConfig, dict[str, Any]], dict[str, Any]]
# kind -> the function that applies it, by name: the MLflow logic is the registry's, which
# imports this module, so the outbox looks its appliers up when it replays instead of importing
# them (a replay in a fresh process, ``python -m fine_tuning.track.outbox``, needs no set-up).
OPERATIONS: dict[str, str] = {
    "cost_estimate": "fine_tuning.track.registry:apply_cost_estimate",
    "register_candidate": "fine_tuning.track.registry:apply_registration",
    "champion_alias": "fine_tuning.track.registry:apply_champion",
    "demote_candidate": "fine_tuning.track.registry:apply_demotion",
    "supersede_candidate": "fine_tuning.track.registry:apply_supersession",
    "run_artifact": "fine_tuning.track.registry:apply_run_artifact",
}


class OutboxBusy(RuntimeError):
    """Another process holds the outbox's lock for longer than we wait."""


@dataclass
class ReplayReport:
    """What one replay did: operation file names replayed, still pending, and dead-lettered."""

    replayed: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SubmitResult:
    """``buffered`` False: applied now, ``result`` is the operation's. True: queued at ``path``."""

    buffered: bool
    result: dict[str, Any] | None
    path: Path | None
    reason: str | None = None


def outbox_dir(config: PipelineConfig) -> Path:
    path = Path(config.mlflow.outbox_dir)
    return path if path.is_absolute() else Path(config.data_dir) / path


def operation(kind: str) -> Operation:
    """The function that applies ``kind`` (see :data:`OPERATIONS`)."""
    if kind not in OPERATIONS:
        raise ValueError(f"unknown tracking operation {kind!r}; known: {', '.join(sorted(OPERATIONS))}")
    function: Operation = pkgutil.resolve_name(OPERATIONS[kind])
    return function


@contextmanager
def _locked(directory: Path, wait_seconds: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a+") as handle:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OutboxBusy(f"outbox {directory} is locked by another process") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _key_digest(kind: str, key: str) -> str:
    return hashlib.sha256(f"{kind}\0{key}".encode()).hexdigest()[:24]


def pending_operations(config: PipelineConfig) -> list[Path]:
    """Queued operation files, oldest first."""
    directory = outbox_dir(config)
    if not directory.exists():
        return []
    return sorted(directory.glob("*.json"))


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def _enqueue(directory: Path, kind: str, key: str, payload: dict[str, Any]) -> Path:
    """Queue one operation (the caller holds the lock); the same (kind, key) is queued once."""
    digest = _key_digest(kind, key)
    for existing in directory.glob(f"*-{kind}-{digest}.json"):
        return existing
    path = directory / f"{time.time_ns():020d}-{kind}-{digest}.json"
    _write_atomically(path, {"kind": kind, "key": key, "queued_at": time.time(), "payload": payload})
    log.warning("MLflow unavailable: queued %s %s in %s", kind, key, path)
    return path


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, CircuitOpenError) or is_breaker_failure(exc)


def _replay_locked(config: PipelineConfig, directory: Path) -> ReplayReport:
    report = ReplayReport()
    files = sorted(directory.glob("*.json"))
    for index, path in enumerate(files):
        record = json.loads(path.read_text())
        kind = record["kind"]
        if kind not in OPERATIONS:
            raise ValueError(f"outbox file {path} has unknown operation kind {kind!r}")
        try:
            result = operation(kind)(config, record["payload"])
        except Exception as exc:  # noqa: BLE001 - an outage waits, anything else is dead-lettered
            if _is_outage(exc):  # still down: keep this and everything after it, in order
                report.pending = [p.name for p in files[index:]]
                log.info("MLflow still unavailable (%s); %d operations stay queued", exc, len(report.pending))
                return report
            dead = directory / "dead"
            dead.mkdir(exist_ok=True)
            record["error"] = f"{type(exc).__name__}: {exc}"
            _write_atomically(dead / path.name, record)
            path.unlink()
            report.dead.append(path.name)
            log.error("MLflow rejected queued %s %s; moved to %s: %s", kind, record["key"], dead, exc)
            continue
        # Killed here (MLflow has it, the file is still queued)? The replay runs it again, and
        # the operation is idempotent: no second run, version, param or metric value.
        path.unlink()
        report.replayed.append(path.name)
        report.results[path.name] = result
        log.info("replayed queued %s %s", kind, record["key"])
    return report


def replay(config: PipelineConfig) -> ReplayReport:
    """Apply every queued operation in order, stopping at the first one MLflow cannot take."""
    directory = outbox_dir(config)
    if not directory.exists() or not any(directory.glob("*.json")):
        return ReplayReport()
    with _locked(directory):
        return _replay_locked(config, directory)


def submit(config: PipelineConfig, kind: str, key: str, payload: dict[str, Any]) -> SubmitResult:
    """Apply an operation now, or queue it durably when MLflow is down (or older ones wait).

    :param kind: a registered operation (see :data:`OPERATIONS`).
    :param key: its identity (the same key is queued once).
    :param payload: JSON-serialisable arguments of the operation.
    """
    apply = operation(kind)
    json.dumps(payload)  # fail now, not at replay time, on something that cannot be stored
    directory = outbox_dir(config)
    try:
        with _locked(directory):
            if any(directory.glob("*.json")):
                report = _replay_locked(config, directory)
                if report.pending:  # order: this one goes behind what is still waiting
                    path = _enqueue(directory, kind, key, payload)
                    return SubmitResult(True, None, path, "earlier operations are still queued")
            try:
                return SubmitResult(False, apply(config, payload), None)
            except Exception as exc:
                if not _is_outage(exc):
                    raise
                path = _enqueue(directory, kind, key, payload)
                return SubmitResult(True, None, path, f"{type(exc).__name__}: {exc}")
    except OutboxBusy:
        # A long replay elsewhere: do not wait on it (nor on MLflow); queue behind it.
        with _locked(directory, wait_seconds=300):
            path = _enqueue(directory, kind, key, payload)
        return SubmitResult(True, None, path, "outbox busy replaying")


def main(argv: list[str] | None = None) -> int:
    """``python -m fine_tuning.track.outbox [replay|list]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fine_tuning.track.outbox", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=("replay", "list"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config()
    if args.command == "list":
        print(json.dumps([p.name for p in pending_operations(config)], indent=2))
        return 0
    report = replay(config)
    print(json.dumps({"replayed": report.replayed, "pending": report.pending, "dead": report.dead}))
    return 0 if not report.pending else 1


if __name__ == "__main__":
    sys.exit(main())
