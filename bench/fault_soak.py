"""Fault soak: the training half of the pipeline (upload -> train -> wait) under injected faults.

    python bench/fault_soak.py                       # SOAK_RUNS (20) runs at 0%, 10%, 30%, 50%
    SOAK_RUNS=5 SOAK_RATES=0,0.3 python bench/fault_soak.py

For each failure rate, each run gets a fresh schedule of emulator faults over its OpenAI
requests: each request fails with that probability, as a 429 with Retry-After, a 500 or 503
(half of those "reply lost": the server did the work, then answered the error), or a timeout
(the server answers after the client gave up, and still does the work). Steps run as the DAG's
tasks do: the library's steps with their breakers and bounded retries, and up to two task
retries (a circuit-open failure is retried after the breaker's remaining open time, as
``CircuitOpenRetryPolicy`` makes Airflow do; other failures after a short delay).

Times are compressed: the emulator's job stages take 0.2 s, the client's timeout is 1 s, and the
openai breaker opens for ``SOAK_OPEN_SECONDS`` (default 3) instead of 120.

Prints a table and writes ``bench/results/fault_soak.json``:
``{"rows": [{"failure_rate", "runs", "completed", "failed_with_reason", "breaker_openings",
"duplicate_files", "duplicate_jobs", "mean_extra_latency_s"}]}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "fault_soak.json"
WINDOW_END = datetime(2026, 11, 22, 2, tzinfo=UTC)
OPENAI_PATHS = r"/v1/(files|fine_tuning/jobs)(/.*)?"
CLIENT_TIMEOUT_SECONDS = 1.0
SCHEDULE_LENGTH = 40  # faults are drawn for this many requests of each run
TASK_RETRIES = 2


def fault_schedule(rng: random.Random, rate: float) -> list[dict[str, Any]]:
    """One entry per upcoming request: a pass-through (status None, no delay) or a fault."""
    schedule = []
    for _ in range(SCHEDULE_LENGTH):
        if rng.random() >= rate:
            schedule.append({"status": None})
            continue
        kind = rng.choice(("429", "500", "503", "timeout"))
        if kind == "429":
            schedule.append({"status": 429, "retry_after": 0.2, "error_code": "rate_limit_exceeded"})
        elif kind == "timeout":
            schedule.append({"status": None, "delay_seconds": CLIENT_TIMEOUT_SECONDS + 0.5})
        else:
            schedule.append({"status": int(kind), "after_effect": rng.random() < 0.5})
    return schedule


def write_collect(config: Any, run_id: str) -> Any:
    from fine_tuning import pipeline
    from fine_tuning.manifests import CollectManifest, RunContext

    ctx = RunContext(dag_id="weekly_fine_tuning", run_id=run_id, window_end=WINDOW_END)
    directory = pipeline.run_dir(config, ctx)
    directory.mkdir(parents=True, exist_ok=True)
    dataset = directory / "dataset.jsonl"
    with dataset.open("w") as handle:
        for i in range(20):
            messages = [{"role": "user", "content": "Create engaging content"},
                        {"role": "assistant", "content": f"{run_id} hook {i}"}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    data = dataset.read_bytes()
    collect = CollectManifest(
        status="ready", dag_id=ctx.dag_id, run_id=run_id, window_start=WINDOW_END - timedelta(days=7),
        window_end=WINDOW_END, dataset_path=str(dataset), sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
        posts_scanned=20, examples_written=20, rejected={}, duplicates=0, tokens=400, min_examples=10, seconds=0.0,
    )
    return ctx, collect


def run_task(step: Any, *args: Any) -> Any:
    """One task with Airflow's retries as the DAG sets them (compressed delays)."""
    from fine_tuning.infra.breakers import CircuitOpenError
    from fine_tuning.config import ConfigError
    from fine_tuning.train.providers import TrainingRefusedError

    for attempt in range(TASK_RETRIES + 1):
        try:
            return step(*args)
        except (ConfigError, TrainingRefusedError):
            raise  # fail-fast errors: no retry
        except CircuitOpenError as exc:
            if attempt == TASK_RETRIES:
                raise
            time.sleep(exc.remaining_seconds + 0.2)  # CircuitOpenRetryPolicy's delay
        except Exception:
            if attempt == TASK_RETRIES:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")  # pragma: no cover


def soak_rate(emulator: Any, base_params: dict[str, Any], rate: float, runs: int, seed: int) -> dict[str, Any]:
    from fine_tuning import pipeline
    from fine_tuning.infra.breakers import get_breaker
    from fine_tuning.config import load_config

    rng = random.Random(seed)
    params = json.loads(json.dumps(base_params))
    params["breakers"]["key_prefix"] = f"soak:{uuid.uuid4().hex[:8]}:breaker"
    config = load_config(params=params)
    durations: list[float] = []
    completed = 0
    reasons: Counter[str] = Counter()
    duplicate_files = duplicate_jobs = 0
    for index in range(runs):
        run_id = f"soak_{int(rate * 100)}_{index}_{uuid.uuid4().hex[:6]}"
        ctx, collect = write_collect(config, run_id)
        emulator.clear_faults()
        for entry in fault_schedule(rng, rate):
            emulator.inject_fault(method="*", path=OPENAI_PATHS, count=1, **entry)
        started = time.monotonic()
        try:
            uploaded = run_task(pipeline.upload, config, ctx, collect)
            trained = run_task(pipeline.train, config, ctx, uploaded)
            run_task(pipeline.wait, config, ctx, trained)
            completed += 1
        except Exception as exc:
            reasons[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
        durations.append(time.monotonic() - started)
        emulator.clear_faults()
        time.sleep(CLIENT_TIMEOUT_SECONDS + 0.6)  # let requests that timed out on the client land
        state = emulator.state()
        key_prefix = f"{pipeline.idempotency_key(ctx.dag_id, ctx.run_id, collect.sha256)}"
        files = [f for f in state["files"] if f["filename"] == f"{key_prefix}.jsonl"]
        jobs = [j for j in state["jobs"] if (j.get("metadata") or {}).get("idempotency_key") == key_prefix]
        duplicate_files += max(len(files) - 1, 0)
        duplicate_jobs += max(len(jobs) - 1, 0)
    return {
        "failure_rate": rate,
        "runs": runs,
        "completed": completed,
        "failed_with_reason": dict(reasons),
        "breaker_openings": get_breaker("openai", config).snapshot().openings,
        "duplicate_files": duplicate_files,
        "duplicate_jobs": duplicate_jobs,
        "mean_run_s": round(statistics.fmean(durations), 3) if durations else 0.0,
    }


def soak(runs: int, rates: list[float], emulator: Any, mlflow_uri: str, data_dir: Path, open_seconds: float = 3.0,
         seed: int = 20261127) -> list[dict[str, Any]]:
    """The soak's rows (``mean_extra_latency_s`` is relative to the 0% row, or the first row)."""
    os.environ["OPENAI_BASE_URL"] = emulator.base_url
    os.environ["OPENAI_API_KEY"] = "sk-soak"
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    base_params: dict[str, Any] = {
        "data_dir": str(data_dir),
        "poll_interval_seconds": 0.1,
        "timeout_seconds": 120,
        "mlflow": {"experiment_name": f"soak_{uuid.uuid4().hex[:6]}"},
        "services": {"openai_timeout_seconds": CLIENT_TIMEOUT_SECONDS, "openai_max_retries": 2},
        "breakers": {"openai": {"recovery_timeout_seconds": open_seconds}},
    }
    rows = [soak_rate(emulator, base_params, rate, runs, seed + i) for i, rate in enumerate(rates)]
    baseline = next((r["mean_run_s"] for r in rows if r["failure_rate"] == 0), rows[0]["mean_run_s"])
    for row in rows:
        row["mean_extra_latency_s"] = round(row["mean_run_s"] - baseline, 3)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = ("rate", "runs", "completed", "failed", "breaker_openings", "dup_files", "dup_jobs", "mean_run_s", "extra_s")
    lines = [" | ".join(f"{h:>9}" for h in header)]
    for r in rows:
        values = (f"{r['failure_rate']:.0%}", r["runs"], r["completed"], sum(r["failed_with_reason"].values()),
                  r["breaker_openings"], r["duplicate_files"], r["duplicate_jobs"], r["mean_run_s"], r["mean_extra_latency_s"])
        lines.append(" | ".join(f"{v:>9}" for v in values))
    for r in rows:
        for reason, count in r["failed_with_reason"].items():
            lines.append(f"  {r['failure_rate']:.0%} failed x{count}: {reason}")
    return "\n".join(lines)


def main() -> int:
    import logging

    from fine_tuning.dev.devstack import mlflow_server
    from openai_emulator.launch import EmulatorProcess

    logging.basicConfig(level=logging.ERROR)
    runs = int(os.environ.get("SOAK_RUNS", "20"))
    rates = [float(r) for r in os.environ.get("SOAK_RATES", "0,0.1,0.3,0.5").split(",")]
    open_seconds = float(os.environ.get("SOAK_OPEN_SECONDS", "3"))
    workdir = Path(tempfile.mkdtemp(prefix="fault-soak-"))
    started = time.monotonic()
    with mlflow_server(workdir / "mlflow") as mlflow_uri, EmulatorProcess(stage_seconds=0.2) as emulator:
        rows = soak(runs, rates, emulator, mlflow_uri, workdir / "data", open_seconds)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=2))
    print(table(rows))
    print(f"wrote {RESULTS.relative_to(REPO)} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
