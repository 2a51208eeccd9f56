"""``make demo``: the weekly DAG end to end on local services, then a summary of what happened.

Starts what is missing (PostgreSQL/Redis fallbacks, an MLflow server, the OpenAI emulator),
seeds a ``posts`` table in its own schema, and runs two weeks with ``airflow dags test``:

1. week 1: collect, train, register, an A/B test (minutes, not a week, by config) against the
   base model while a traffic simulator plays the content agent, promote, then the hourly
   ``rollout_monitor`` DAG advances the rollout step by step to 100% (the new champion);
2. week 2: a new candidate wins its A/B test against that champion, then degrades once rolled
   out (errors), and ``rollout_monitor`` rolls it back automatically.

It prints what each run did and stops what it started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import psycopg
import redis

from fine_tuning.dev.devstack import Stack, airflow_metadata_url, local_stack
from fine_tuning.dev.seed import seed_posts
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
from fine_tuning.infra import db
from fine_tuning.routing import get_routing

REPO = Path(__file__).resolve().parents[3]
DAG_ID = "weekly_fine_tuning"
DEMO_SCHEMA = "fine_tuning_demo"
# The agent's body model and what is fine-tuned from it. Costs are true prices (the product's
# table): the fine-tune's tokens cost twice the base model's, but it needs no few-shot prompt.
BASELINE = "gpt-4o-mini-2024-07-18"
FINE_TUNED_TOKENS = {"prompt_tokens": 100.0, "completion_tokens": 320.0}
DEMO_REDIS_DB = 5


def active_rollout(database_url: str) -> bool:
    with psycopg.connect(database_url) as conn:
        (active,) = db.one_row(conn.execute("SELECT count(*) FROM deployments WHERE status = 'rolling_out'"))
        return bool(active > 0)


def current_baseline(redis_url: str) -> str:
    routing = get_routing(redis.Redis.from_url(redis_url), "body")
    return routing.baseline_model if routing else BASELINE


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


def airflow_env(
    stack: Stack, database_url: str, airflow_home: Path, data_dir: Path, metadata_url: str | None = None
) -> dict[str, str]:
    """The environment of a local Airflow pointed at the repo's DAGs, plugins and the local services.

    :param metadata_url: Airflow's metadata database (``airflow_metadata_url``); None keeps
        Airflow's SQLite in ``airflow_home`` (the tests' throwaway homes).
    """
    venv_bin = str(Path(sys.executable).parent)
    connection = {"conn_type": "generic", "host": stack.openai_base_url, "password": "sk-demo-local"}
    metadata: dict[str, str] = {}
    if metadata_url:
        metadata = {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            # Airflow 3.3's API server checks a JWT's revocation with a synchronous query on its
            # event loop (apache/airflow#73422, open): once more requests are in flight than its
            # pool holds (5 + 10 overflow), the loop waits for a connection that only the loop
            # can give back, and every request stalls for the pool's 30 s timeout. 16 clients
            # polling a run did that twice in 40 s (bench/airflow_rest_bench.py); a pool larger
            # than the concurrency keeps it from happening. Connections open only when used.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "40",
        }
    return {
        **metadata,
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(connection),
        "FINE_TUNING_MODE": "local",
        "FINE_TUNING_DATA_DIR": str(data_dir),
        "FINE_TUNING_POLL_INTERVAL_SECONDS": "1",
        "DATABASE_URL": database_url,
        "REDIS_URL": stack.redis_url,
        "MLFLOW_TRACKING_URI": stack.mlflow_uri,
        "OPENAI_BASE_URL": stack.openai_base_url,
        "OPENAI_API_KEY": "sk-demo-local",
        # The emulator's retirement schedule (it keeps training): see emulated-retirements.json.
        "FINE_TUNING_RETIREMENT_TABLE": str(Path(__file__).with_name("emulated-retirements.json")),
    }


# Demo timings: an A/B test of minutes with a look every 10 s; each rollout stage advances once
# its guardrails are shown non-inferior on that stage's posts (the evidence ramp), after a dwell
# of seconds. With seconds of traffic per stage the error-rate margin is 3 points, not 1.
DEMO_CONFIG = {
    "body_model": BASELINE,
    "training": {"base_model": BASELINE},
    "evaluation": {
        "traffic_split": 0.3,
        "duration_hours": 0.1,
        "evaluation_interval_minutes": 0.15,
        "power_history_hours": 0.01,  # the simulator's last 36 s: the traffic the test will see
        "guardrails": {"error_rate_absolute_margin": 0.03},
    },
    "deployment": {
        "rollout_config": {
            "initial_traffic": 0.2,
            "increment_percentage": 0.4,
            "advance_on": "evidence",
            "min_dwell_hours": 0.001,
        },
        "rollback_triggers": {"min_posts": 30},
        # `airflow dags test` runs the monitor once: its guard looks once instead of watching.
        "guard_watch_minutes": 0,
    },
}


def run_airflow_dag_test(env: dict[str, str], dag_id: str = DAG_ID, quiet: bool = False) -> int:
    airflow = [sys.executable, "-m", "airflow"]
    output = subprocess.DEVNULL if quiet else None
    return subprocess.run(
        [*airflow, "dags", "test", dag_id], env=env, stdout=output, stderr=output, check=False
    ).returncode


class TrafficSimulator(threading.Thread):
    """The content agent in the background: posts every second under the live routing."""

    def __init__(self, database_url: str, redis_url: str, posts_per_second: int = 120) -> None:
        super().__init__(daemon=True)
        self.database_url = database_url
        self.redis_url = redis_url
        self.posts_per_second = posts_per_second
        self.behaviours: dict[str, ModelBehaviour] = {}
        self.fine_tune_behaviour = ModelBehaviour(engagement=0.095, **FINE_TUNED_TOKENS)
        self.stopping = threading.Event()

    def behaviour(self, model: str) -> ModelBehaviour:
        if model in self.behaviours:
            return self.behaviours[model]
        return self.fine_tune_behaviour if model.startswith("ft:") else ModelBehaviour()

    def run(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        tick = 0
        while not self.stopping.wait(1.0):
            routing = get_routing(client, "body")
            models = [routing.baseline_model, routing.candidate_model] if routing else [BASELINE]
            end = datetime.now(UTC)
            simulate_traffic(
                self.database_url,
                client,
                model_type="body",
                default_model=BASELINE,
                behaviours={m: self.behaviour(m) for m in models if m},
                requests=self.posts_per_second,
                start=end - timedelta(seconds=1),
                end=end,
                seed=tick,
            )
            tick += 1


def rollout_summary(database_url: str) -> str:
    lines = []
    with psycopg.connect(database_url) as conn:
        for dep_id, status, _traffic, reason in conn.execute(
            "SELECT id, status, current_traffic, rollback_reason FROM deployments ORDER BY started_at"
        ):
            steps = conn.execute(
                "SELECT kind, traffic, detail FROM deployment_events WHERE deployment_id = %s ORDER BY id",
                (dep_id,),
            ).fetchall()
            path = " -> ".join(f"{kind} {t:.0%}" for kind, t, _ in steps)
            lines.append(f"deployment {dep_id}: {status}; {path}" + (f"; reason: {reason}" if reason else ""))
            if status == "rolled_back":
                switch = steps[-1][2].get("trigger_to_switch_seconds")
                lines.append(
                    f"  rollback: trigger to routing switched in {switch * 1000:.1f} ms (goal < 30 s)"
                )
    return "\n".join(lines)


def cost_summary(database_url: str) -> str:
    """The latest A/B test's cost per post and per token (true prices) and its cost guardrail."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT id, last_analysis FROM ab_tests ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
    if row is None or not row[1] or "metrics" not in row[1]:
        return "cost:              no A/B analysis recorded"
    ab_test_id, body = row
    arms = body["metrics"]
    guard = next((r for r in body.get("reasons", []) if r["criterion"] == "guardrail:cost_per_post"), None)
    verdict = (
        f"guardrail {guard['status']} (at most +{guard['threshold'] / guard['baseline']:.0%})"
        if guard
        else "-"
    )

    def arm(name: str) -> str:
        a = arms[name]
        if a["cost_per_post"] is None:
            return f"{name} -"
        return f"{name} ${a['cost_per_post'] * 1000:.3f}/1k posts, ${a['cost_per_token'] * 1e6:.2f}/1M tokens"

    return f"cost per post:     {arm('baseline')}; {arm('candidate')}; {verdict} ({ab_test_id})"


def latest_run_dir(data_dir: Path) -> Path | None:
    runs = sorted((data_dir / DAG_ID).glob("*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def _counts(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((counts or {}).items())) or "none"


def _share(share: dict[str, float] | None) -> str:
    if not share:
        return "not measured"
    return (
        f"{share['share_before_cap']:.1%} of examples before the cap, {share['share_written']:.1%} "
        f"written (cap {share['cap']:.0%})"
    )


def summary(run_dir: Path | None, mlflow_uri: str) -> str:
    if run_dir is None:
        return "no run directory was written: see the Airflow output above"

    def load(name: str) -> dict:
        path = run_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    collect, upload, train, wait, register = (
        load(n) for n in ("collect", "upload", "train", "wait", "register")
    )
    ab_test, evaluation = load("ab-create"), load("evaluate")
    lines = ["", "=== weekly_fine_tuning: what happened ==="]
    if collect:
        rejected = ", ".join(f"{k}={v}" for k, v in sorted(collect["rejected"].items())) or "none"
        lines += [
            f"window:            {collect['window_start']} .. {collect['window_end']}",
            f"posts scanned:     {collect['posts_scanned']}",
            (
                f"examples written:  {collect['examples_written']} ({collect['tokens']} tokens, "
                f"sha256 {str(collect['sha256'])[:12]})"
            ),
            f"rejected:          {rejected}; duplicates dropped: {collect['duplicates']}",
            f"examples dropped:  {_counts(collect.get('dropped_examples'))}",
            f"PII replaced:      {_counts(collect.get('pii_found'))}",
            (
                f"self-generated:    {_share(collect.get('self_generated'))}; validation examples: "
                f"{collect.get('validation_examples', 0)}"
            ),
        ]
        if collect["status"] != "ready":
            lines.append(f"skipped:           {collect['reason']}")
    if upload:
        lines.append(
            f"uploaded file:     {upload['file_id']} (estimated cost ${upload['estimated_cost_usd']:.2f}, "
            f"{upload['estimated_epochs']} epochs)"
        )
    if train:
        lines.append(f"fine-tuning job:   {train['job_id']} ({train['base_model']})")
    if wait:
        lines.append(f"job final state:   {wait['status']}, trained tokens {wait['trained_tokens']}")
        lines.append(f"fine-tuned model:  {wait['fine_tuned_model']}")
    if register:
        lines.append(
            f"MLflow:            run {register['mlflow_run_id']} -> {mlflow_uri}/#/experiments/"
            f"{register['experiment_id']}/runs/{register['mlflow_run_id']}"
        )
        lines.append(
            f"model version:     {register['model_name']} v{register['model_version']} "
            f"(alias {register['alias']})"
        )
    if ab_test:
        lines.append(
            f"A/B test:          {ab_test['ab_test_id']} "
            f"{ab_test['baseline_model']} vs {ab_test['candidate_model']} "
            f"at {ab_test['traffic_split']:.0%}; power: {ab_test['power_message']}"
        )
    if evaluation and evaluation["relative_lift"] is None:
        lines.append(
            f"A/B decision:      {evaluation['decision']} after {evaluation['looks']} looks (too few posts)"
        )
    elif evaluation:
        lines.append(
            f"A/B decision:      {evaluation['decision']} after {evaluation['looks']} looks: lift "
            f"{evaluation['relative_lift']:+.1%} (always-valid CI {evaluation['ci_lower']:+.1%} .. "
            f"{evaluation['ci_upper']:+.1%}), p={evaluation['p_value']:.2g}, "
            f"SRM p={evaluation['srm_p_value']:.2g}"
        )
        if register:
            lines.append(
                f"A/B plot:          MLflow run {register['mlflow_run_id']}, artifact "
                f"ab_tests/{evaluation['ab_test_id']}/evaluation.png"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posts", type=int, default=5000, help="posts to seed (default 5000)")
    parser.add_argument("--stage-seconds", type=float, default=2.0, help="emulator time per job stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.monotonic()
    workdir = REPO / ".local" / "demo"
    data_dir = workdir / "data"
    with local_stack(workdir, stage_seconds=args.stage_seconds) as stack:
        database_url = with_search_path(stack.database_url, DEMO_SCHEMA)
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{DEMO_SCHEMA}" CASCADE')
            conn.execute(f'CREATE SCHEMA "{DEMO_SCHEMA}"')
        now = datetime.now(UTC).replace(microsecond=0)
        with db.connect(database_url) as conn:
            db.migrate(conn)
            inserted = seed_posts(conn, args.posts, end=now, days=7)
        print(f"seeded {inserted} posts into {DEMO_SCHEMA}.posts", flush=True)

        config_file = workdir / "training_config.json"
        config_file.write_text(json.dumps(DEMO_CONFIG, indent=2))
        # The demo's own Redis database, emptied first: no routing left from an earlier demo.
        stack.redis_url = stack.redis_url.rsplit("/", 1)[0] + f"/{DEMO_REDIS_DB}"
        redis.Redis.from_url(stack.redis_url).flushdb()
        metadata_url = airflow_metadata_url(stack.database_url, "demo")
        env = airflow_env(stack, database_url, workdir / "airflow", data_dir, metadata_url)
        env["FINE_TUNING_CONFIG_FILE"] = str(config_file)
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL
        )
        simulator = TrafficSimulator(database_url, stack.redis_url)
        simulator.start()
        try:
            print("\n=== week 1: train a candidate, A/B test it, roll it out ===", flush=True)
            code = run_airflow_dag_test(env)
            print(summary(latest_run_dir(data_dir), stack.mlflow_uri), flush=True)
            print(cost_summary(database_url), flush=True)
            for _ in range(6):
                if not active_rollout(database_url):
                    break
                time.sleep(4)
                code = code or run_airflow_dag_test(env, "rollout_monitor", quiet=True)
            print(rollout_summary(database_url), flush=True)

            print(
                "\n=== week 2: a better candidate wins its A/B test, then degrades in production ===",
                flush=True,
            )
            simulator.fine_tune_behaviour = ModelBehaviour(engagement=0.13, **FINE_TUNED_TOKENS)
            champion = current_baseline(stack.redis_url)
            simulator.behaviours[champion] = ModelBehaviour(engagement=0.095, **FINE_TUNED_TOKENS)
            code = code or run_airflow_dag_test(env, quiet=True)
            print(summary(latest_run_dir(data_dir), stack.mlflow_uri), flush=True)
            print(cost_summary(database_url), flush=True)
            # After the deploy, the new model starts failing 25% of its requests.
            simulator.fine_tune_behaviour = ModelBehaviour(
                engagement=0.13, error_rate=0.25, **FINE_TUNED_TOKENS
            )
            time.sleep(6)
            code = code or run_airflow_dag_test(env, "rollout_monitor", quiet=True)
            print(rollout_summary(database_url), flush=True)
        finally:
            simulator.stopping.set()
            simulator.join()
    print(
        f"the services are stopped; to browse the MLflow run again: {sys.executable} -m mlflow ui "
        f"--backend-store-uri sqlite:///{workdir / 'mlflow' / 'mlflow.db'} "
        f"--artifacts-destination {workdir / 'mlflow' / 'artifacts'}"
    )
    print(f"demo wall time: {time.monotonic() - started:.1f} s; airflow dags test exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
