"""The monitoring files: promtool checks the alert rules, the mapping covers every metric, dashboards
and rules name only series that the mapping or /metrics produce, helm-values carries the mapping."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from fine_tuning.infra import metrics
from fine_tuning.infra.breakers import BREAKER_NAMES

from support import MAPPINGS, MONITORING, REPO, map_statsd

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool not installed (`make promtool` installs Debian's prometheus package)"
)


def produced_series() -> set[str]:
    """Every Prometheus name the mapping makes from our metrics and Airflow's, plus /metrics' own."""
    from fine_tuning.infra.health import BreakerStatus, ComponentCheck, HealthReport, prometheus_text

    names: set[str] = set()
    for spec in metrics.METRICS:
        services = BREAKER_NAMES if "service" in spec.labels else ("x",)
        for service in services:
            mapped = map_statsd("fine_tuning." + spec.statsd_name(**{label: service for label in spec.labels}))
            assert mapped, spec
            if spec.kind == "timer":
                names |= {mapped[0] + suffix for suffix in ("_bucket", "_sum", "_count")}
            else:
                names.add(mapped[0])
    for mapping in MAPPINGS:
        if mapping["match"].startswith("airflow."):
            names |= {mapping["name"]} | {mapping["name"] + s for s in ("_sum", "_count", "_bucket")}
    report = HealthReport(
        status="healthy", healthy=True, timestamp=1.0,
        components={}, checks={c: ComponentCheck(status="healthy", required=True, latency_ms=1) for c in ("database",)},
        breakers={b: BreakerStatus(state="closed", failure_count=0) for b in BREAKER_NAMES},
        connection_pools={"db_connections_active": 1, "db_connections_idle": 1, "db_connections_max": 9,
                          "redis_connections_active": 1, "redis_connections_idle": 1},
        performance_metrics={"memory_peak_mb": 1.0},
    )
    names |= {line.split("{")[0].split(" ")[0] for line in prometheus_text(report).splitlines() if line[:1] != "#"}
    return names | {"up"}


def test_every_metric_maps_to_its_prometheus_name_and_labels() -> None:
    for spec in metrics.METRICS:
        labels = {label: f"v{i}" for i, label in enumerate(spec.labels)}
        mapped = map_statsd("fine_tuning." + spec.statsd_name(**labels))
        assert mapped is not None, f"{spec.key} has no mapping"
        assert mapped == (spec.prometheus.format(**labels), labels), spec


# Written by hand from the design's series names (reference/seed.md, the dashboards, the alert
# rules), not from the mapping or metrics.py: what statsd_exporter must make of each StatsD line.
# `map_statsd` is the tests' own model of statsd_exporter's glob matching (a `*` is one dotted
# segment, the first match wins, $n/${n} fill names and labels); these pairs check the model and
# the mapping together against an answer neither produced.
GOLDEN_STATSD = [
    ("fine_tuning.pipeline.execution_duration", ("fine_tuning_pipeline_execution_duration_seconds", {})),
    ("fine_tuning.pipeline.runs.success", ("fine_tuning_pipeline_runs_total", {"status": "success"})),
    ("fine_tuning.step.runs.collect.failed", ("fine_tuning_step_runs_total", {"step": "collect", "outcome": "failed"})),
    ("fine_tuning.step.duration.train", ("fine_tuning_step_duration_seconds", {"step": "train"})),
    ("fine_tuning.cache.requests.hit", ("fine_tuning_cache_requests_total", {"result": "hit"})),
    ("fine_tuning.breaker.openai.state", ("fine_tuning_openai_circuit_breaker_state", {"service": "openai"})),
    ("fine_tuning.breaker.mlflow.failures", ("fine_tuning_mlflow_failures_total", {"service": "mlflow"})),
    ("fine_tuning.health.redis.up", ("fine_tuning_component_up", {"component": "redis"})),
    ("fine_tuning.model.candidate.engagement_rate", ("fine_tuning_model_engagement_rate", {"variant": "candidate"})),
    ("fine_tuning.ab_test.decisions.promote", ("fine_tuning_ab_test_decisions_total", {"decision": "promote"})),
    ("fine_tuning.rollout.rollbacks.error_rate", ("fine_tuning_rollbacks_total", {"trigger": "error_rate"})),
    ("airflow.dagrun.duration.success.weekly_fine_tuning", ("airflow_dagrun_duration", {"dag_id": "weekly_fine_tuning"})),
    ("airflow.dag.weekly_fine_tuning.collect.duration",
     ("airflow_task_duration", {"dag_id": "weekly_fine_tuning", "task_id": "collect"})),
    # A `*` never spans a dot, and a name no rule covers is not exported under a guessed name.
    ("fine_tuning.step.runs.collect", None),
    ("fine_tuning.breaker.openai.extra.state", None),
    ("fine_tuning.pipeline.runs", None),
    ("fine_tuning.no_such_metric", None),
]


@pytest.mark.parametrize(("statsd_name", "expected"), GOLDEN_STATSD, ids=[pair[0] for pair in GOLDEN_STATSD])
def test_the_mapping_turns_statsd_names_into_the_designs_series(statsd_name: str, expected: object) -> None:
    assert map_statsd(statsd_name) == expected


def test_helm_values_carry_the_mapping() -> None:
    values = yaml.safe_load((REPO / "helm-values.yaml").read_text())
    assert values["statsd"]["enabled"] is True
    assert values["statsd"]["extraMappings"] == MAPPINGS
    assert {e["name"] for e in values["env"]} >= {"STATSD_HOST", "STATSD_PORT"}


def _series_in(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:fine_tuning|airflow)_[a-z0-9_]+|up)\b(?!\s*\()", expr))


def test_dashboards_and_rules_use_only_produced_series() -> None:
    produced = produced_series()
    dashboards = sorted((MONITORING / "dashboards").glob("*.json"))
    assert {d.name for d in dashboards} == {"pipeline-performance.json", "business-kpis.json"}
    used: dict[str, str] = {}
    for path in dashboards:
        board = json.loads(path.read_text())
        assert board["uid"] and board["title"] and board["panels"]
        for panel in board["panels"]:
            for target in panel["targets"]:
                used.update(dict.fromkeys(_series_in(target["expr"]), f"{path.name}: {panel['title']}"))
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    for rule in rules["groups"][0]["rules"]:
        used.update(dict.fromkeys(_series_in(rule["expr"]), f"rule {rule['alert']}"))
    unknown = {name: where for name, where in used.items() if name not in produced}
    assert not unknown, unknown
    # The design's business and pipeline metrics all have a panel.
    for name in ("fine_tuning_model_engagement_rate", "fine_tuning_model_cost_per_token",
                 "fine_tuning_ab_test_success_rate", "fine_tuning_pipeline_memory_peak_mb",
                 "fine_tuning_openai_circuit_breaker_state", "fine_tuning_db_connections_active"):
        assert name in used, name


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool, "check", "rules", "prometheus-rules.yaml"], cwd=MONITORING,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_the_rules() -> None:
    result = subprocess.run([promtool, "test", "rules", "prometheus-rules.test.yaml"], cwd=MONITORING,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())["groups"][0]["rules"]
    tested = (MONITORING / "prometheus-rules.test.yaml").read_text()
    assert all(f"alertname: {rule['alert']}" in tested for rule in rules)
