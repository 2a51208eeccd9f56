"""``make lifecycle``: many simulated weeks of the loop, unattended, with faults, checked every hour.

    python -m fine_tuning.dev.lifecycle --weeks 8     # writes bench/results/lifecycle.json

The weekly run's steps (collect, upload, train, wait, register, ab-create, evaluate, deploy) and
the monitor's (the hourly ``watch_rollouts`` and the guard every 5 minutes) are the library's own
functions, called as the DAGs call them, on real PostgreSQL, Redis and MLflow and on the OpenAI
emulator, with a clock this simulation moves (``fine_tuning.clock``). The content agent is the
traffic simulator: it routes each batch by the live Redis routing (as ``choose_model`` does: the
last routing read while Redis is down) and gives each post its model's true quality.

Each week's candidate has a known true quality against the champion it is tested against:
``better`` (+30% engagement), ``equal``, ``worse`` (-20%) or ``broken`` (30% errors); a candidate
may also *regress* once rolled out (from ``regress_after_hours`` after its deploy it behaves as
``worse``, ``broken`` or ``slow``), which the guard must catch. Faults, by week: MLflow down for a
whole week, Redis down for hours, a step killed just after an external effect (then re-run, as
clearing the task does), OpenAI 5xx bursts. MLflow and Redis go down for real: the pipeline
reaches them through TCP proxies that stop listening.

The weekly DAG's policy is simulated as Airflow runs it: ``max_active_runs=2`` (a week's run
starts on its Sunday unless two runs are still active), each step retried twice (a step still
failing fails the run), ``ab-create`` waiting (deferred) while another test or a rollout owns the
routing, and a waiting candidate superseded when a newer week's candidate joins the queue (one
week's rollout dwells long enough to hold the routing over two Sundays).

Every simulated hour the invariants are checked from outside the code under test (Redis, SQL
and MLflow's own client, pointed at the real server):

- the routing has at most one owner, and its split is that owner's;
- the routing names only the base model and candidates the emulator trained;
- with no rollout live, the model at 100% is the last completed rollout's, and MLflow's
  ``champion`` is that model (once MLflow is up and the outbox has drained);
- a worse or broken candidate never gets more than its A/B split;
- at most one candidate waits for the routing, and a superseded one never gets traffic or a
  test (and, once MLflow is up, its version is tagged ``superseded`` without an alias);
- every regressing rollout is rolled back, and never completes;
- no post is lost or doubled (the agent's count equals the table's); at the end, one MLflow run
  and one model version per registered candidate.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from mlflow import MlflowClient

from fine_tuning import clock, pipeline
from fine_tuning import routing as routing_module
from fine_tuning.config import ConfigError, PipelineConfig, load_config
from fine_tuning.deploy import guard, rollout
from fine_tuning.dev.demo import with_search_path
from fine_tuning.dev.devstack import local_stack
from fine_tuning.dev.faulty_proxy import FaultyProxy
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
from fine_tuning.evaluate import ab
from fine_tuning.infra import db
from fine_tuning.manifests import Manifest, RunContext
from fine_tuning.routing import get_routing
from fine_tuning.track import outbox, registry

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
DAG_ID = "weekly_fine_tuning"
BASELINE = "gpt-4o-mini-2024-07-18"
# A Sunday 02:00 UTC (the weekly schedule), far enough before the base model's retirement.
T0 = datetime(2025, 3, 2, 2, tzinfo=UTC)
TICK = timedelta(minutes=5)
STEPS = ("collect", "upload", "train", "wait", "register", "ab-create", "evaluate", "deploy")
STEP_TRIES = 3  # the weekly DAG's retries=2
MAX_ACTIVE_RUNS = 2  # the weekly DAG's
FINE_TUNED = {"prompt_tokens": 100.0, "completion_tokens": 320.0}
REGRESSIONS = ("worse", "broken", "slow")

# The simulation's settings: the product's defaults, shortened where a week must fit in minutes.
SIM_CONFIG: dict[str, Any] = {
    "body_model": BASELINE,
    "training": {"base_model": BASELINE, "poll_interval_seconds": 0.05},
    # Once a fine-tuned champion serves everyone, every post is the pipeline's own: the default
    # cap (half the examples) would starve every later week of data in this closed world.
    "data_collection": {"max_records": 400, "training_data_threshold": 50, "self_generated_cap": 1.0},
    "evaluation": {"traffic_split": 0.2, "duration_hours": 72, "power_history_hours": 24},
    "deployment": {
        "rollout_config": {"initial_traffic": 0.2, "increment_percentage": 0.4, "min_dwell_hours": 2},
    },
    "mlflow": {"request_max_retries": 0, "request_timeout_seconds": 2},
    "breakers": {"mlflow": {"recovery_timeout_seconds": 2}, "openai": {"recovery_timeout_seconds": 2}},
}


@dataclass(frozen=True)
class CandidatePlan:
    kind: str  # better / equal / worse / broken, against the champion it is tested against
    regression: str | None = None  # worse / broken / slow once rolled out
    # During the rollout's first stage: a regression after it completed is the champion's
    # (ModelPerformanceDegradation's), not the rollout guard's.
    regress_after_hours: float = 1.0
    faults: tuple[str, ...] = ()  # mlflow_down, redis_down, kill_ab_create, kill_rollout, openai_5xx
    # The rollout's dwell per stage (the run's deployment settings), when not the simulation's:
    # a long one holds the routing over the next two Sundays, so a waiting candidate is superseded.
    dwell_hours: float | None = None


# Nine weeks that hold every candidate kind, regression and fault at least once, and a candidate
# superseded while it waits: week 0's rollout (2 stages of 175 h) owns the routing past day 14,
# so week 1's candidate is still waiting when week 2's, trained on newer data, joins the queue.
SCHEDULE = (
    CandidatePlan("better", faults=("openai_5xx",), dwell_hours=175),
    CandidatePlan("worse"),  # superseded by week 2's: never tested, never served
    CandidatePlan("equal", faults=("kill_ab_create",)),
    CandidatePlan("better", regression="broken", faults=("redis_down",)),
    CandidatePlan("worse"),
    CandidatePlan("better", faults=("mlflow_down",)),
    CandidatePlan("broken", faults=("openai_5xx",)),
    CandidatePlan("better", regression="worse", faults=("kill_rollout",)),
    CandidatePlan("better", regression="slow", faults=("redis_down",)),
)
# ``make test``'s short version: two weeks, a regression, and four kinds of fault. Redis goes
# down in both weeks: week 1's outage needs its A/B test, which never starts when week 0's
# candidate was rejected (no completed rollout, so with MLflow down no champion is known and
# ab-create rightly fails); week 0's A/B test always runs.
SHORT_SCHEDULE = (
    CandidatePlan("better", faults=("openai_5xx", "kill_ab_create", "redis_down")),
    CandidatePlan("better", regression="broken", faults=("redis_down", "mlflow_down")),
)


class SimulatedKill(BaseException):
    """The step's process dies here (a BaseException, so that no ``except Exception`` sees it)."""


def behaviour_for(kind: str, champion: ModelBehaviour) -> ModelBehaviour:
    if kind == "better":
        return ModelBehaviour(engagement=champion.engagement * 1.3, **FINE_TUNED)
    if kind == "equal":
        return ModelBehaviour(engagement=champion.engagement, **FINE_TUNED)
    if kind == "worse":
        return ModelBehaviour(engagement=champion.engagement * 0.8, **FINE_TUNED)
    if kind == "broken":
        return ModelBehaviour(engagement=champion.engagement, error_rate=0.30, **FINE_TUNED)
    if kind == "slow":
        return ModelBehaviour(engagement=champion.engagement, response_time_ms=3000.0, **FINE_TUNED)
    raise ValueError(f"unknown candidate kind {kind!r}")


@dataclass
class WeekRun:
    index: int
    plan: CandidatePlan
    scheduled: datetime
    run_id: str
    started: datetime | None = None
    next_step: int = 0
    manifests: dict[str, Any] = field(default_factory=dict)
    ended: str | None = None  # deployed / rejected / skipped / superseded / failed: ...
    candidate: str | None = None
    baseline: str | None = None  # the A/B test's baseline: the model the candidate is judged against
    deployment_id: str | None = None
    deployed_at: datetime | None = None
    killed: bool = False


@dataclass
class Faults:
    mlflow: FaultyProxy
    redis: FaultyProxy
    emulator_admin: str
    counts: Counter[str] = field(default_factory=Counter)
    mlflow_is_down: bool = False
    redis_down_until: datetime | None = None
    redis_back_at: datetime | None = None

    def mlflow_down(self) -> None:
        if not self.mlflow_is_down:
            self.mlflow.down()
            self.mlflow_is_down = True
            self.counts["mlflow_down"] += 1

    def mlflow_up(self) -> None:
        if self.mlflow_is_down:
            self.mlflow.up()
            self.mlflow_is_down = False

    def redis_outage(self, until: datetime) -> None:
        self.redis.down()
        self.redis_down_until = until
        self.counts["redis_down"] += 1

    def tick(self, now: datetime) -> None:
        if self.redis_down_until is not None and now >= self.redis_down_until:
            self.redis.up()
            self.redis_down_until = None
            self.redis_back_at = now

    def redis_settling(self, now: datetime) -> bool:
        """Redis is down, or came back less than an hour ago: no step could write the routing
        yet (the next hourly health check writes the owner's)."""
        if self.redis_down_until is not None:
            return True
        return self.redis_back_at is not None and now - self.redis_back_at <= timedelta(hours=1)

    def openai_5xx_burst(self, count: int = 4) -> None:
        """The next ``count`` requests to files and jobs answer 500 or 503 (half after the effect)."""
        import httpx

        for i in range(count):
            spec = {
                "method": "*",
                "path": r"/v1/(files|fine_tuning/jobs)(/.*)?",
                "count": 1,
                "status": 500 if i % 2 else 503,
                "after_effect": bool(i % 2),
            }
            httpx.post(f"{self.emulator_admin}/faults", json=spec, timeout=5).raise_for_status()
        self.counts["openai_5xx"] += 1


@contextmanager
def kill_after(target: Any, name: str) -> Iterator[list[bool]]:
    """The next call of ``target.name`` has its effect, then the process 'dies' (SimulatedKill)."""
    real = getattr(target, name)
    fired: list[bool] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if not fired:
            fired.append(True)
            raise SimulatedKill(f"killed after {name}")
        return result

    with mock.patch.object(target, name, wrapper):
        yield fired


class Lifecycle:
    """The simulated world: services, clock, agent, weekly runs and the checks."""

    def __init__(
        self,
        config: PipelineConfig,
        observer: redis.Redis,
        mlflow_uri: str,
        faults: Faults,
        schedule: tuple[CandidatePlan, ...],
        posts_per_hour: int,
        seed: int,
    ) -> None:
        self.config = config
        self.observer = observer  # the real Redis (not through the proxy): the checks' view
        self.agent_redis = redis.Redis.from_url(
            config.services.redis_url.get_secret_value(), socket_timeout=2, socket_connect_timeout=2
        )
        self.mlflow_observer = MlflowClient(mlflow_uri)
        self.faults = faults
        self.schedule = schedule
        self.posts_per_hour = posts_per_hour
        self.rng = random.Random(seed)
        self.now = T0
        self.truth: dict[str, ModelBehaviour] = {BASELINE: ModelBehaviour()}
        self.kind_of: dict[str, CandidatePlan] = {}
        self.split_of: dict[str, float] = {}
        self.posts_made = 0
        self.tick_seed = 0
        self.weeks: list[WeekRun] = []
        self.checks = 0
        self.violations: list[dict[str, Any]] = []
        self.rollbacks: list[dict[str, Any]] = []
        self.false_rollbacks: list[dict[str, Any]] = []  # candidates that did not regress
        self.step_failures: Counter[str] = Counter()
        self.events: list[str] = []
        self.database_url = config.services.database_url.get_secret_value()

    # --- the world -------------------------------------------------------------------------------
    def violation(self, invariant: str, detail: str) -> None:
        entry = {"at": self.now.isoformat(), "invariant": invariant, "detail": detail}
        log.error("VIOLATION %s", entry)
        self.violations.append(entry)

    def note(self, text: str) -> None:
        self.events.append(f"{self.now.isoformat()} {text}")
        log.warning("lifecycle: %s", text)

    def traffic(self, span: timedelta) -> None:
        requests = max(1, round(self.posts_per_hour * span.total_seconds() / 3600))
        behaviours = dict(self.truth)
        for model, plan in self.kind_of.items():
            week = next(w for w in self.weeks if w.candidate == model)
            if (
                plan.regression
                and week.deployed_at
                and self.now >= week.deployed_at + timedelta(hours=plan.regress_after_hours)
            ):
                # Worse, broken or slow than the model it replaces (the A/B test's baseline).
                behaviours[model] = behaviour_for(plan.regression, self.truth[week.baseline or BASELINE])
        self.tick_seed += 1
        counts = simulate_traffic(
            self.database_url,
            self.agent_redis,
            model_type="body",
            default_model=BASELINE,
            behaviours=behaviours,
            requests=requests,
            start=self.now,
            end=self.now + span,
            seed=self.tick_seed,
        )
        self.posts_made += sum(counts.values())

    def ctx(self, week: WeekRun) -> RunContext:
        return RunContext(dag_id=DAG_ID, run_id=week.run_id, window_end=week.started or week.scheduled)

    # --- the weekly run --------------------------------------------------------------------------
    def week_config(self, week: WeekRun) -> PipelineConfig:
        """The run's settings: the simulation's, with the week's own rollout dwell (as a run's
        params would set it)."""
        if week.plan.dwell_hours is None:
            return self.config
        ramp = self.config.deployment.rollout_config.model_copy(
            update={"min_dwell_hours": week.plan.dwell_hours}
        )
        deployment = self.config.deployment.model_copy(update={"rollout_config": ramp})
        return self.config.model_copy(update={"deployment": deployment})

    def run_step(self, week: WeekRun, name: str) -> Manifest:
        ctx, m = self.ctx(week), week.manifests
        if name == "collect":
            return pipeline.collect(self.config, ctx)
        if name == "upload":
            return pipeline.upload(self.config, ctx, m["collect"])
        if name == "train":
            return pipeline.train(self.config, ctx, m["upload"])
        if name == "wait":
            return pipeline.wait(self.config, ctx, m["train"])
        if name == "register":
            return pipeline.register(self.config, ctx, m["collect"], m["train"], m["wait"])
        if name == "ab-create":
            if "kill_ab_create" in week.plan.faults and not week.killed:
                # Killed after its routing write: not while it only waits for the routing.
                with kill_after(ab, "set_routing") as fired:
                    try:
                        return pipeline.ab_create(self.config, ctx, m["register"])
                    finally:
                        if fired:
                            week.killed = True
                            self.faults.counts["kill"] += 1
            return pipeline.ab_create(self.config, ctx, m["register"])
        if name == "evaluate":
            return pipeline.evaluate(self.config, ctx, m["ab-create"])
        if name == "deploy":
            return pipeline.deploy(self.week_config(week), ctx, m["evaluate"])
        raise ValueError(name)

    def advance_week(self, week: WeekRun) -> None:
        """Run the week's steps as far as they go this hour (Airflow's retries inside it)."""
        while week.ended is None:
            name = STEPS[week.next_step]
            for attempt in range(STEP_TRIES):
                try:
                    manifest = self.run_step(week, name)
                    break
                except SimulatedKill as kill:
                    self.note(f"week {week.index}: {name} {kill}; the task is cleared and runs again")
                except ab.RoutingOwned as owned:
                    log.info("week %d: ab-create waits: %s", week.index, owned)
                    return  # deferred: looks again later
                except ab.CandidateSuperseded as exc:
                    week.ended = "superseded"
                    self.note(f"week {week.index}: {exc}")
                    return
                except (pipeline.InsufficientDataError, pipeline.CandidateRejected) as exc:
                    week.ended = "rejected" if isinstance(exc, pipeline.CandidateRejected) else "skipped"
                    self.note(f"week {week.index}: {name}: {week.ended}: {exc}")
                    return
                except ConfigError as exc:  # fail-fast: no retry
                    week.ended = f"failed: {name}: {exc}"
                    self.note(f"week {week.index}: {week.ended}")
                    return
                except Exception as exc:  # noqa: BLE001 - Airflow's retries, then the run fails
                    self.step_failures[f"{name}: {type(exc).__name__}"] += 1
                    log.warning(
                        "week %d: %s attempt %d failed: %s: %s",
                        week.index,
                        name,
                        attempt + 1,
                        type(exc).__name__,
                        exc,
                    )
            else:
                week.ended = f"failed: {name}"
                self.note(f"week {week.index}: {name} failed {STEP_TRIES} times: the run fails")
                return
            week.manifests[name] = manifest
            if name == "wait":
                week.candidate = manifest.fine_tuned_model  # type: ignore[attr-defined]
            if name == "ab-create":
                # Its true quality is against the champion it is tested against, known only now:
                # with two active runs, it may have been trained while another rollout ran.
                model = week.candidate or ""
                week.baseline = manifest.baseline_model  # type: ignore[attr-defined]
                self.truth[model] = behaviour_for(week.plan.kind, self.truth[week.baseline])
                self.kind_of[model] = week.plan
                self.split_of[model] = float(manifest.traffic_split)  # type: ignore[attr-defined]
            if name == "evaluate" and manifest.decision == "continue":  # type: ignore[attr-defined]
                return  # the operator defers until the next look
            if name == "deploy":
                week.deployment_id = manifest.deployment_id  # type: ignore[attr-defined]
                week.deployed_at = self.now
                week.ended = "deployed"
                self.note(f"week {week.index}: deployed {week.candidate} ({week.plan.kind})")
                return
            week.next_step += 1

    def serving_model(self) -> str:
        routing = get_routing(self.observer, "body")
        return routing.baseline_model if routing else BASELINE

    # --- the monitor -----------------------------------------------------------------------------
    def guard_tick(self) -> None:
        with suppress(Exception):  # a failed look is the trigger's error event; the next one looks again
            guard.check_all(self.config, self.agent_redis, self.now)

    def hourly_monitor(self) -> None:
        ctx = RunContext(dag_id="rollout_monitor", run_id=f"sim_{self.now:%Y%m%dT%H}", window_end=self.now)
        for attempt in range(STEP_TRIES):
            try:
                pipeline.watch_rollouts(self.config, ctx)
                return
            except Exception as exc:  # noqa: BLE001 - the monitor's task fails; the next hour runs again
                log.warning("rollout_monitor attempt %d failed: %s: %s", attempt + 1, type(exc).__name__, exc)

    # --- the checks ------------------------------------------------------------------------------
    def owners(self) -> list[str]:
        with db.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT id FROM ab_tests WHERE model_type = 'body' AND status = 'running'"
                " UNION ALL SELECT id FROM deployments WHERE model_type = 'body'"
                " AND status IN ('rolling_out', 'awaiting_approval')"
            ).fetchall()
        return [r[0] for r in rows]

    def check_queue(self, routing: Any) -> None:
        """At most one candidate waits; a superseded one has no test and no traffic."""
        with db.connect(self.database_url) as conn:
            waiting = conn.execute(
                "SELECT candidate_model FROM candidate_queue WHERE model_type = 'body' AND status = 'waiting'"
            ).fetchall()
            tested = conn.execute(
                "SELECT q.candidate_model FROM candidate_queue q JOIN ab_tests t"
                " ON t.candidate_model = q.candidate_model WHERE q.status = 'superseded'"
            ).fetchall()
        if len(waiting) > 1:
            self.violation("one_waiting", f"{len(waiting)} candidates wait for the routing: {waiting}")
        if tested:
            self.violation("superseded_untested", f"superseded candidates with an A/B test: {tested}")
        superseded = {w.candidate for w in self.weeks if w.ended == "superseded"}
        if routing is not None and routing.candidate_model in superseded and routing.candidate_share > 0:
            self.violation("superseded_unserved", f"superseded {routing.candidate_model} gets traffic")
        if routing is not None and routing.baseline_model in superseded:
            self.violation("superseded_unserved", f"superseded {routing.baseline_model} is the baseline")

    def check(self) -> None:
        self.checks += 1
        routing = get_routing(self.observer, "body")
        owners = self.owners()
        if len(owners) > 1:
            self.violation("one_owner", f"the routing has {len(owners)} owners: {owners}")
        self.check_queue(routing)
        if routing is None:
            return
        models = [routing.baseline_model] + ([routing.candidate_model] if routing.candidate_model else [])
        for model in models:
            if model != BASELINE and model not in self.truth:
                self.violation("served_models", f"the routing names {model}, which no job trained")
        if routing.candidate_model and routing.candidate_share > 0:
            source = routing.source.split(":")[0]
            if owners and source != owners[0] and not self.faults.redis_settling(self.now):
                self.violation("one_owner", f"the split is {routing.source}'s, the owner is {owners[0]}")
            plan = self.kind_of.get(routing.candidate_model)
            split = self.split_of.get(routing.candidate_model, 0.0)
            if plan and plan.kind in ("worse", "broken") and routing.candidate_share > split + 1e-9:
                self.violation(
                    "bad_candidate_capped",
                    f"{plan.kind} candidate {routing.candidate_model} at {routing.candidate_share:.0%}",
                )
        if (
            routing.candidate_model
            and routing.candidate_share > 0
            and not owners
            and not self.faults.redis_settling(self.now)
        ):
            self.violation(
                "one_owner", f"{routing.candidate_model} gets {routing.candidate_share:.0%} with no owner"
            )
        if not owners:
            recorded = rollout.serving_model(self.config, "body") or BASELINE
            if routing.candidate_share == 0 and routing.baseline_model != recorded:
                self.violation(
                    "champion_at_100",
                    f"{routing.baseline_model} serves 100%, the last completed rollout's is {recorded}",
                )
            if not self.faults.mlflow_is_down and not outbox.pending_operations(self.config):
                champion = self.mlflow_champion()
                if champion != (recorded if recorded != BASELINE else None):
                    self.violation(
                        "champion_alias", f"MLflow's champion is {champion}, the model at 100% {recorded}"
                    )

    def mlflow_champion(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            version = self.mlflow_observer.get_model_version_by_alias(
                self.config.mlflow.registered_model_name, registry.CHAMPION_ALIAS
            )
        except MlflowException:
            return None
        return version.tags.get("fine_tuned_model")

    def check_rollouts(self) -> None:
        """Each deployment that ended: a regressing one rolled back, and how fast."""
        for week in self.weeks:
            if week.deployment_id is None and "ab-create" in week.manifests:
                # A deploy whose task failed after its row was committed (Redis down): the rollout
                # is live all the same, under the monitor.
                found = rollout.deployment_of_test(self.config, week.manifests["ab-create"].ab_test_id)
                if found:
                    week.deployment_id = found
                    week.deployed_at = rollout.get_deployment(self.config, found)["started_at"]
                    self.note(f"week {week.index}: its deploy task failed, its rollout {found} is live")
            if not week.deployment_id or week.index in self._judged:
                continue
            record = rollout.get_deployment(self.config, week.deployment_id)
            if record["status"] in rollout.ACTIVE_STATUSES:
                continue
            self._judged.add(week.index)
            plan = week.plan
            if plan.regression is None:
                if record["status"] == "rolled_back":
                    reason = record["rollback_reason"]
                    self.false_rollbacks.append({"week": week.index, "kind": plan.kind, "reason": reason})
                    self.note(f"week {week.index}: a {plan.kind} candidate was rolled back: {reason}")
                continue
            if record["status"] != "rolled_back":
                self.violation(
                    "regression_rolled_back",
                    f"week {week.index}: {plan.regression} candidate ended {record['status']}",
                )
                continue
            onset = (week.deployed_at or self.now) + timedelta(hours=plan.regress_after_hours)
            switched = record["finished_at"]
            with db.connect(self.database_url) as conn:
                (exposed,) = db.one_row(
                    conn.execute(
                        "SELECT count(*) FROM posts WHERE model_id = %s AND ts >= %s AND ts < %s",
                        (week.candidate, onset, switched),
                    )
                )
            self.rollbacks.append(
                {
                    "kind": plan.regression,
                    "onset_to_switch_minutes": round((switched - onset).total_seconds() / 60, 1),
                    "candidate_posts_exposed": int(exposed),
                    "by": "guard"
                    if (record["rollback_reason"] or "").startswith("automatic (guard)")
                    else "hourly",
                    "week": week.index,
                }
            )

    def final_checks(self) -> None:
        with db.connect(self.database_url) as conn:
            (stored,) = db.one_row(conn.execute("SELECT count(*) FROM posts"))
        if stored != self.posts_made + self._seeded:
            self.violation(
                "posts", f"the agent made {self.posts_made + self._seeded} posts, the table has {stored}"
            )
        name = self.config.mlflow.registered_model_name
        versions = self.mlflow_observer.search_model_versions(f"name = '{name}'")
        by_model = Counter(v.tags.get("fine_tuned_model") for v in versions)
        registered = [w for w in self.weeks if "register" in w.manifests]
        experiment = self.mlflow_observer.get_experiment_by_name(self.config.mlflow.experiment_name)
        experiments = [experiment.experiment_id] if experiment else []
        for week in registered:
            if by_model[week.candidate] != 1:
                self.violation("mlflow_versions", f"{week.candidate}: {by_model[week.candidate]} versions")
            runs = self.mlflow_observer.search_runs(experiments, f"tags.airflow_run_id = '{week.run_id}'")
            if len(runs) != 1:
                self.violation("mlflow_runs", f"week {week.index}: {len(runs)} MLflow runs")
        if outbox.pending_operations(self.config):
            self.violation(
                "outbox", f"{len(outbox.pending_operations(self.config))} operations never replayed"
            )
        superseded = {w.candidate: w.index for w in self.weeks if w.ended == "superseded"}
        for version in self.mlflow_observer.search_model_versions(f"name = '{name}'"):
            index = superseded.get(version.tags.get("fine_tuned_model"))
            if index is None:
                continue
            if version.tags.get("deployment_status") != "superseded" or not version.tags.get("superseded_by"):
                self.violation("superseded_tagged", f"week {index}: version {version.version} {version.tags}")
            if version.aliases:
                self.violation(
                    "superseded_tagged", f"week {index}: version {version.version} {version.aliases}"
                )

    # --- the loop --------------------------------------------------------------------------------
    def schedule_faults(self, week: WeekRun) -> None:
        if "openai_5xx" in week.plan.faults:
            self.faults.openai_5xx_burst()
        if "mlflow_down" in week.plan.faults:
            self.faults.mlflow_down()
            self.note(f"week {week.index}: MLflow down for the week")

    def hour(self) -> None:
        self.faults.tick(self.now)
        # The week's run starts on its Sunday unless two runs are still active (max_active_runs=2).
        active = [w for w in self.weeks if w.ended is None]
        if len(active) < MAX_ACTIVE_RUNS and len(self.weeks) < len(self.schedule):
            scheduled = T0 + timedelta(weeks=len(self.weeks))
            if self.now >= scheduled:
                if self.weeks and self.faults.mlflow_is_down:
                    self.faults.mlflow_up()
                    self.note("MLflow is back")
                index = len(self.weeks)
                week = WeekRun(
                    index,
                    self.schedule[index],
                    scheduled,
                    f"scheduled__{scheduled:%Y-%m-%dT%H:%M:%S}",
                    started=self.now,
                )
                self.weeks.append(week)
                active.append(week)
                self.schedule_faults(week)
        for week in active:  # oldest first, as the scheduler queues their tasks
            self.advance_week(week)
            test = week.manifests.get("ab-create")
            # Redis goes down for 3 hours from the A/B test's second hour (the agent has read the
            # split): the looks, the decision's routing write and a deploy may fall in it.
            if (
                "redis_down" in week.plan.faults
                and test is not None
                and self.now >= test.started_at + timedelta(hours=1)
                and not any(e.endswith(f"week {week.index}: Redis down") for e in self.events)
            ):
                self.faults.redis_outage(self.now + timedelta(hours=3))
                self.note(f"week {week.index}: Redis down")
        live = rollout.active_deployments(self.config)
        if live:  # the guard looks every 5 minutes while a rollout is live
            for _ in range(int(timedelta(hours=1) / TICK)):
                self.traffic(TICK)
                self.now += TICK
                self.faults.tick(self.now)
                self.guard_tick()
        else:
            self.traffic(timedelta(hours=1))
            self.now += timedelta(hours=1)
        kill_rollout = any(
            "kill_rollout" in w.plan.faults and not w.killed and w.deployment_id in live for w in self.weeks
        )
        if kill_rollout:
            week = next(w for w in self.weeks if "kill_rollout" in w.plan.faults and w.deployment_id in live)
            week.killed = True
            self.faults.counts["kill"] += 1
            try:
                with kill_after(rollout, "write_routing"):
                    self.hourly_monitor()
            except SimulatedKill as kill:
                self.note(f"rollout_monitor {kill}; the task runs again")
        self.hourly_monitor()
        self.check()
        self.check_rollouts()

    def run(self, weeks: int) -> None:
        self._judged: set[int] = set()
        self._seeded = 0
        self.seed_history()
        end = T0 + timedelta(weeks=weeks)
        while self.now < end:
            self.hour()
        # The end: MLflow back, the outbox drained by the next MLflow call, the last looks.
        self.faults.mlflow_up()
        if self.faults.redis_down_until:
            self.faults.redis.up()
        time.sleep(self.config.breakers.mlflow.recovery_timeout_seconds)
        self.hourly_monitor()
        self.check()
        self.final_checks()

    def seed_history(self) -> None:
        """The week before T0: the base model alone, the history the first collection reads."""
        start = self.now
        self.now = T0 - timedelta(days=7)
        while self.now < T0:
            self.traffic(timedelta(hours=1))
            self.now += timedelta(hours=1)
        self._seeded, self.posts_made = self.posts_made, 0
        self.now = start


def proxied(url: str, proxy: FaultyProxy) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}"))


def simulate(
    *,
    weeks: int,
    schedule: tuple[CandidatePlan, ...],
    database_url: str,
    redis_url: str,
    mlflow_uri: str,
    openai_base_url: str,
    emulator_admin_url: str,
    data_dir: Path,
    posts_per_hour: int = 600,
    seed: int = 1,
) -> dict[str, Any]:
    """Run ``weeks`` simulated weeks on the given services (a fresh schema, Redis db and MLflow
    model name are the caller's); returns the report ``bench/results/lifecycle.json`` holds."""
    redis_parts = urlsplit(redis_url)
    mlflow_parts = urlsplit(mlflow_uri)
    started = time.perf_counter()
    with (
        FaultyProxy(redis_parts.hostname or "127.0.0.1", redis_parts.port or 6379) as redis_proxy,
        FaultyProxy(mlflow_parts.hostname or "127.0.0.1", mlflow_parts.port or 5000) as mlflow_proxy,
    ):
        suffix = uuid.uuid4().hex[:8]
        params = json.loads(json.dumps(SIM_CONFIG))
        params["mlflow"].update(
            {"experiment_name": f"lifecycle-{suffix}", "registered_model_name": f"lifecycle-{suffix}"}
        )
        params["breakers"]["key_prefix"] = f"lifecycle:{suffix}:breaker"
        config = load_config(
            env={
                "DATABASE_URL": database_url,
                "REDIS_URL": proxied(redis_url, redis_proxy),
                "MLFLOW_TRACKING_URI": mlflow_proxy.url,
                "OPENAI_BASE_URL": openai_base_url,
                "OPENAI_API_KEY": "sk-lifecycle",
                "FINE_TUNING_DATA_DIR": str(data_dir),
            },
            params=params,
        )
        faults = Faults(mlflow=mlflow_proxy, redis=redis_proxy, emulator_admin=emulator_admin_url)
        world = Lifecycle(
            config, redis.Redis.from_url(redis_url), mlflow_uri, faults, schedule, posts_per_hour, seed
        )
        # The agent looks at Redis again on every batch (a 5-minute or hourly slice) after an
        # outage; its real-time back-off would be days of simulated time.
        with (
            mock.patch.object(clock, "now_utc", lambda: world.now),
            mock.patch.object(routing_module, "REDIS_RETRY_SECONDS", 0),
        ):
            world.run(weeks)
    # The kinds of the candidates that were A/B tested (a superseded one never was).
    kinds = Counter(w.plan.kind for w in world.weeks if "ab-create" in w.manifests)
    return {
        "weeks": weeks,
        "invariant_checks": world.checks,
        "violations": world.violations,
        "faults": dict(faults.counts),
        "candidates": {k: kinds.get(k, 0) for k in ("better", "equal", "worse", "broken")},
        "superseded": sum(w.ended == "superseded" for w in world.weeks),
        "regressions": dict(Counter(w.plan.regression for w in world.weeks if w.plan.regression)),
        "rollbacks": world.rollbacks,
        "false_rollbacks": world.false_rollbacks,
        "weeks_ended": {w.index: w.ended for w in world.weeks},
        "deployments": {
            w.index: rollout.get_deployment(config, w.deployment_id)["status"]
            for w in world.weeks
            if w.deployment_id
        },
        "step_failures": dict(world.step_failures),
        "jobs": {w.index: w.manifests["train"].job_id for w in world.weeks if "train" in w.manifests},
        "posts": world.posts_made,
        "events": world.events,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weeks", type=int, default=len(SCHEDULE))
    parser.add_argument("--posts-per-hour", type=int, default=600)
    parser.add_argument("--redis-db", type=int, default=13, help="a Redis database of its own (emptied)")
    parser.add_argument("--keep-schema", action="store_true", help="leave the simulation's tables to look at")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "lifecycle.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    schedule = SCHEDULE if args.weeks >= len(SCHEDULE) else SHORT_SCHEDULE
    with (
        tempfile.TemporaryDirectory(prefix="lifecycle-") as tmp,
        local_stack(Path(tmp), stage_seconds=0.05) as stack,
    ):
        schema = f"lifecycle_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        database_url = with_search_path(stack.database_url, schema)
        redis_url = stack.redis_url.rsplit("/", 1)[0] + f"/{args.redis_db}"
        redis.Redis.from_url(redis_url).flushdb()
        try:
            with db.connect(database_url) as conn:
                db.migrate(conn)
            report = simulate(
                weeks=args.weeks,
                schedule=schedule,
                database_url=database_url,
                redis_url=redis_url,
                mlflow_uri=stack.mlflow_uri,
                openai_base_url=stack.openai_base_url,
                emulator_admin_url=stack.emulator_admin_url,
                data_dir=Path(tmp) / "data",
                posts_per_hour=args.posts_per_hour,
            )
        finally:
            if args.keep_schema:
                print(f"the simulation's tables are in schema {schema}", file=sys.stderr)
            else:
                with psycopg.connect(stack.database_url, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print(summary(report))
    return 1 if report["violations"] else 0


def summary(report: dict[str, Any]) -> str:
    lines = [
        (
            f"{report['weeks']} weeks, {report['invariant_checks']} invariant checks, "
            f"{len(report['violations'])} violations ({report['seconds']} s)"
        ),
        (
            f"candidates tested {report['candidates']}, superseded {report['superseded']},"
            f" regressions {report['regressions']}, faults {report['faults']}"
        ),
        f"weeks: {report['weeks_ended']}",
    ]
    lines += [f"  rollback {r}" for r in report["rollbacks"]]
    lines += [f"  false rollback {r}" for r in report["false_rollbacks"]]
    lines += [f"  VIOLATION {v}" for v in report["violations"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
