"""Metrics over real UDP: a StatsD listener on loopback receives what the library and the DAG send."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fine_tuning.infra import db
from fine_tuning.infra import metrics
from fine_tuning.config import load_config
from fine_tuning.manifests import CollectManifest, JobResult
from fine_tuning.dev.seed import seed_posts
from support import LAST_WEEK_END, StatsdListener


def _metrics_for(port: int, prefix: str = "fine_tuning") -> metrics.Metrics:
    config = load_config(env={"STATSD_HOST": "127.0.0.1", "STATSD_PORT": str(port), "STATSD_PREFIX": prefix})
    return metrics.get_metrics(config)


def test_every_metric_is_defined_once_with_its_labels_as_segments() -> None:
    keys = [spec.key for spec in metrics.METRICS]
    assert len(keys) == len(set(keys)) and len(metrics.METRICS) >= 25
    for spec in metrics.METRICS:
        assert spec.prometheus.startswith("fine_tuning_"), spec
        assert [part[1:-1] for part in spec.key.split(".") if part.startswith("{")] == list(spec.labels)
        if spec.kind == "counter":
            assert spec.prometheus.endswith("_total"), spec
    assert metrics.label_value("ft:gpt-4o.mini|x@y") == "ft_gpt-4o_mini_x_y"


def test_emitters_send_the_designs_names_and_values(statsd_server: StatsdListener) -> None:
    emitter = _metrics_for(statsd_server.port)
    now = datetime.now(UTC)
    emitter.collected(CollectManifest(
        status="ready", dag_id="d", run_id="r", window_start=now, window_end=now, dataset_path="/x",
        sha256="a" * 64, bytes=10, posts_scanned=500, examples_written=420,
        rejected={"empty_hook": 3, "too_long": 2}, duplicates=5, tokens=1000, min_examples=100, seconds=1.5,
    ))
    emitter.breaker_state("openai", "half_open")
    emitter.breaker_failure("mlflow")
    emitter.model_engagement_rate(0.082, variant="candidate")
    emitter.ab_test_success_rate(0.9, test_id="ab-2026.11.22")
    emitter.rollout_traffic_share(0.2)
    emitter.rollback("error_rate")
    emitter.step_finished("collect", 1.25, "success")
    emitter.pipeline_registered(
        JobResult(provider="openai", job_id="ftjob-1", status="succeeded", fine_tuned_model="ft:x",
                  trained_tokens=1234, error=None, created_at=1000, finished_at=1600),
    )
    statsd_server.wait_for("fine_tuning.training.trained_tokens")

    assert statsd_server.total("fine_tuning.pipeline.training_examples") == 420
    assert statsd_server.total("fine_tuning.pipeline.posts_scanned") == 500
    assert statsd_server.total("fine_tuning.pipeline.examples_rejected.empty_hook") == 3
    assert statsd_server.total("fine_tuning.pipeline.examples_rejected.duplicate") == 5
    assert statsd_server.last("fine_tuning.breaker.openai.state") == 0.5
    assert statsd_server.total("fine_tuning.breaker.mlflow.failures") == 1
    assert statsd_server.values("fine_tuning.model.candidate.engagement_rate") == [(0.082, "g")]
    assert statsd_server.last("fine_tuning.ab_test.ab-2026_11_22.success_rate") == 0.9
    assert statsd_server.last("fine_tuning.rollout.traffic_share") == 0.2
    assert statsd_server.total("fine_tuning.rollout.rollbacks.error_rate") == 1
    assert statsd_server.values("fine_tuning.step.duration.collect") == [(1250.0, "ms")]
    assert statsd_server.total("fine_tuning.step.runs.collect.success") == 1
    assert 10 < statsd_server.last("fine_tuning.pipeline.memory_peak_mb.collect") < 4096
    assert statsd_server.values("fine_tuning.training.job_duration") == [(600_000.0, "ms")]
    assert statsd_server.total("fine_tuning.pipeline.runs.registered") == 1


def test_no_statsd_is_harmless() -> None:
    # Nobody listens on this port, and a name that does not resolve makes a no-op emitter.
    _metrics_for(9).rollback("manual")
    config = load_config(env={"STATSD_HOST": "statsd.invalid", "STATSD_PORT": "8125"})
    emitter = metrics.get_metrics(config)
    assert not emitter.enabled
    emitter.rollback("manual")


def test_timed_step_counts_skips_and_failures(statsd_server: StatsdListener) -> None:
    config = load_config(env={"STATSD_HOST": "127.0.0.1", "STATSD_PORT": str(statsd_server.port)})

    class InsufficientDataError(RuntimeError):
        pass

    @metrics.timed_step("demo")
    def step(config: object, fail: type[Exception] | None) -> str:
        """A step."""
        if fail:
            raise fail("no")
        return "done"

    assert step(config, None) == "done" and step.__doc__ == "A step."
    for error in (InsufficientDataError, ValueError):
        with pytest.raises(error):
            step(config, error)
    statsd_server.wait_for("fine_tuning.step.runs.demo.failed")
    assert {outcome: statsd_server.total(f"fine_tuning.step.runs.demo.{outcome}")
            for outcome in ("success", "skipped", "failed")} == {"success": 1, "skipped": 1, "failed": 1}


@pytest.mark.slow
def test_dag_run_sends_our_metrics_and_airflows(
    airflow: dict[str, str], pg_url: str, statsd_server: StatsdListener
) -> None:
    """`airflow dags test` of the weekly DAG with StatsD on: our step metrics and Airflow's arrive."""
    with db.connect(pg_url) as conn:
        db.migrate(conn)
        seed_posts(conn, 1500, end=LAST_WEEK_END, days=7)
    airflow.update({
        "STATSD_HOST": "127.0.0.1",
        "STATSD_PORT": str(statsd_server.port),
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd_server.port),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
    })
    # The A/B test after register is shortened to seconds; its outcome is not this test's subject.
    conf = {"a_b_test_duration_hours": 0.001, "evaluation_interval_minutes": 0.01}
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", "weekly_fine_tuning", LAST_WEEK_END.isoformat(),
         "--conf", json.dumps(conf)],
        env=airflow, capture_output=True, text=True, timeout=300,
    )
    statsd_server.wait_for("fine_tuning.pipeline.runs.registered")
    assert "fine_tuning.pipeline.runs.registered" in statsd_server.names(), result.stdout[-3000:] + result.stderr[-3000:]

    collect = json.loads(next(Path(airflow["FINE_TUNING_DATA_DIR"]).glob("*/*/collect.json")).read_text())
    assert statsd_server.total("fine_tuning.pipeline.training_examples") == collect["examples_written"] > 0
    assert statsd_server.total("fine_tuning.pipeline.posts_scanned") == collect["posts_scanned"]
    for reason, count in collect["rejected"].items():
        assert statsd_server.total(f"fine_tuning.pipeline.examples_rejected.{reason}") == count
    assert statsd_server.total("fine_tuning.pipeline.examples_rejected.duplicate") == collect["duplicates"]
    for step in ("collect", "upload", "train", "register"):
        assert statsd_server.total(f"fine_tuning.step.runs.{step}.success") == 1, step
        assert statsd_server.last(f"fine_tuning.pipeline.memory_peak_mb.{step}") > 10
        assert len(statsd_server.values(f"fine_tuning.step.duration.{step}")) == 1
    assert statsd_server.total("fine_tuning.training.jobs.started") == 1
    assert statsd_server.total("fine_tuning.pipeline.runs.registered") == 1
    assert statsd_server.values("fine_tuning.pipeline.execution_duration")[0][0] > 0
    assert statsd_server.last("fine_tuning.pipeline.estimated_training_cost_usd") > 0

    # Airflow's own metrics, next to ours, under its prefix.
    names = statsd_server.names()
    assert any(n.startswith("airflow.ti.finish.weekly_fine_tuning.collect.success") for n in names), sorted(names)
    # (dagrun.* come from the scheduler, which `airflow dags test` does not run: the rules' use of
    # airflow_dagrun_failed is covered by promtool's tests instead.)
    for task in ("upload", "train", "wait", "register"):
        assert f"airflow.ti.finish.weekly_fine_tuning.{task}.success" in names, task
