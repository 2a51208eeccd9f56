"""Every series an alert rule or a dashboard panel reads is one that some code path emits.

"Emits" is read from the code, not from the declared list: a StatsD series counts when some
library, plugin or DAG code calls the ``Metrics`` method that sends it (found in the source),
and a ``/pipeline/metrics`` series when a real health report renders it. A declared metric
that nothing sends (the cache hit rate, before) makes its alert or panel fail here.
"""

from __future__ import annotations

import ast
import json
import re

import yaml
from support import REPO

from fine_tuning.config import load_config
from fine_tuning.infra import metrics
from fine_tuning.infra.health import check_health, prometheus_text

SOURCES = [REPO / "include" / "fine_tuning", REPO / "plugins", REPO / "dags"]
MONITORING = REPO / "include" / "monitoring"
SERIES = re.compile(r"\b((?:fine_tuning|airflow)_[a-z0-9_]+)\b")


def emitter_methods() -> dict[str, set[str]]:
    """``Metrics`` method -> the specs it sends: the ``MetricSpec`` names its body uses, for a
    method that calls ``self.emit``."""
    tree = ast.parse((REPO / "include" / "fine_tuning" / "infra" / "metrics.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Metrics")
    methods: dict[str, set[str]] = {}
    for fn in cls.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        emits = any(
            isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "emit"
            for c in ast.walk(fn)
        )
        specs = {
            n.id
            for n in ast.walk(fn)
            if isinstance(n, ast.Name) and isinstance(getattr(metrics, n.id, None), metrics.MetricSpec)
        }
        if emits and specs:
            methods[fn.name] = specs
    return methods


def called_methods(names: set[str]) -> set[str]:
    """The emitter methods called from code that is itself used: the function around a call
    must be referred to somewhere else (a call, a decorator, a callback), so that a helper
    nobody calls does not count as emitting."""
    trees = [ast.parse(path.read_text()) for root in SOURCES for path in root.rglob("*.py")]
    referred: dict[str, int] = {}
    for tree in trees:
        for node in ast.walk(tree):
            name = (
                node.id
                if isinstance(node, ast.Name)
                else node.attr
                if isinstance(node, ast.Attribute)
                else None
            )
            if name:
                referred[name] = referred.get(name, 0) + 1
    functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and referred.get(node.name):
                # A used class's methods may be called by a framework (a breaker listener's hooks).
                functions += [f for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and referred.get(node.name):
                functions.append(node)
    called: set[str] = set()
    for fn in functions:
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in names
            ):
                called.add(node.func.attr)
    return called


def statsd_series_emitted() -> set[str]:
    """The series of the specs that called methods send; a ``{service}`` in a series name (the
    mapping's ``${1}``) stands for each breaker."""
    from fine_tuning.infra.breakers import BREAKER_NAMES

    methods = emitter_methods()
    names = {
        getattr(metrics, spec).prometheus for name in called_methods(set(methods)) for spec in methods[name]
    }
    return {n.format(service=service) for n in names for service in BREAKER_NAMES}


def airflow_series() -> set[str]:
    """What statsd_exporter makes of Airflow's own StatsD names (the mapping's airflow.* rules)."""
    mapping = yaml.safe_load((MONITORING / "statsd-mapping.yaml").read_text())["mappings"]
    return {m["name"] for m in mapping if m["match"].startswith("airflow.")}


def read_series() -> dict[str, set[str]]:
    """Series named by each alert rule and each dashboard panel."""
    read: dict[str, set[str]] = {}
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            read[f"alert {rule.get('alert') or rule.get('record')}"] = set(SERIES.findall(rule["expr"]))
    for path in (MONITORING / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text()).get("panels", []):
            exprs = " ".join(t.get("expr", "") for t in panel.get("targets", []))
            read[f"{path.stem}: {panel.get('title')}"] = set(SERIES.findall(exprs))
    return read


def base_name(series: str) -> str:
    """A histogram's ``_bucket``/``_sum``/``_count`` series belong to the histogram."""
    return re.sub(r"_(bucket|sum|count)$", "", series)


def test_every_series_a_rule_or_panel_reads_is_emitted_by_some_code_path(pg_url: str) -> None:
    config = load_config(env={"DATABASE_URL": pg_url, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    scraped = set(re.findall(r"^# TYPE (\S+) ", prometheus_text(check_health(config)), re.M))
    emitted = statsd_series_emitted() | scraped | airflow_series()
    emitted_bases = {base_name(s) for s in emitted} | emitted
    missing = {
        reader: sorted(s for s in series if s not in emitted and base_name(s) not in emitted_bases)
        for reader, series in read_series().items()
    }
    assert {reader: series for reader, series in missing.items() if series} == {}
    # The two series the hourly watch and the health check now send, that nothing sent before.
    assert {"fine_tuning_pipeline_cache_hit_rate", "fine_tuning_model_engagement_rate"} <= emitted


def test_the_hourly_watch_sends_the_serving_models_metrics_as_the_champion(
    pg_url: str, redis_db: str, statsd_server
) -> None:
    from datetime import UTC, datetime, timedelta

    import redis

    from fine_tuning import pipeline
    from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
    from fine_tuning.infra import db
    from fine_tuning.manifests import RunContext
    from fine_tuning.routing import Routing, set_routing

    with db.connect(pg_url) as conn:
        db.migrate(conn)
    client = redis.Redis.from_url(redis_db)
    serving = "ft:gpt-3.5-turbo-0125:acme:weekly:serving1"
    set_routing(client, "body", Routing(serving, None, 0.0, "deploy-x:completed"))
    try:
        now = datetime.now(UTC)
        simulate_traffic(pg_url, client, model_type="body", default_model=serving,
                         behaviours={serving: ModelBehaviour(engagement=0.05)}, requests=400,
                         start=now - timedelta(minutes=50), end=now, seed=5)
        config = load_config(env={"DATABASE_URL": pg_url, "REDIS_URL": redis_db,
                                  "STATSD_PORT": str(statsd_server.port)})
        pipeline.watch_rollouts(config, RunContext(dag_id="rollout_monitor", run_id="hourly", window_end=now))
        statsd_server.wait_for("fine_tuning.model.champion.engagement_rate")
        line = next(l for l in statsd_server.lines if l.startswith("fine_tuning.model.champion.engagement_rate:"))
        assert abs(float(line.split(":")[1].split("|")[0]) - 0.05) < 0.01
    finally:
        client.delete("fine_tuning:routing:body")
