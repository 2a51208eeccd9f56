"""A/B tests and rollouts on real PostgreSQL and Redis: routing, SQL aggregates, decisions, rollback."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
import redis

from fine_tuning.evaluate import ab
from fine_tuning.infra import db
from fine_tuning.deploy import rollout
from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.routing import Routing, choose_model, get_routing, set_routing
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic

# gpt-4o-mini and its fine-tune, priced by the product's table: the fine-tune's tokens cost twice
# as much, its 100-token prompt (no few-shot examples) makes a post cost about the same.
BASE, CAND = "gpt-4o-mini-2024-07-18", "ft:gpt-4o-mini-2024-07-18:org:weekly:abc"
FINE_TUNED = {"prompt_tokens": 100.0, "completion_tokens": 320.0}
T0 = datetime(2026, 11, 22, 2, tzinfo=UTC)


@pytest.fixture
def redis_client(redis_db: str) -> redis.Redis:
    """Routing keys have fixed names: this test's own Redis database."""
    return redis.Redis.from_url(redis_db)


@pytest.fixture
def config(pg_url: str, redis_db: str) -> PipelineConfig:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    return load_config(
        env={"DATABASE_URL": pg_url, "REDIS_URL": redis_db},
        params={
            "evaluation": {"duration_hours": 24, "power_history_hours": 24},
            "deployment": {"rollout_config": {"initial_traffic": 0.1, "increment_percentage": 0.45,
                                              "increment_interval_hours": 1, "advance_on": "clock"}},
        },
    )


def history(config: PipelineConfig, redis_client: redis.Redis, posts: int = 3000) -> None:
    """A day of baseline-only posts before the test (the power calculation reads them)."""
    simulate_traffic(
        config.services.database_url.get_secret_value(), redis_client, model_type="body", default_model=BASE,
        behaviours={BASE: ModelBehaviour()}, requests=posts, start=T0 - timedelta(hours=24), end=T0, seed=99,
    )


def test_routing_is_deterministic_and_matches_the_split(redis_client: redis.Redis) -> None:
    set_routing(redis_client, "body", Routing(BASE, CAND, 0.1, "ab-x"))
    assert get_routing(redis_client, "body").as_split() == {"baseline": 0.9, "candidate": 0.1}
    picks = [choose_model(redis_client, "body", f"req-{i}", BASE) for i in range(2000)]
    assert picks == [choose_model(redis_client, "body", f"req-{i}", BASE) for i in range(2000)]
    from fine_tuning.routing import arm_for

    routing = get_routing(redis_client, "body")
    # choose_model serves what the routing in Redis says (a mutation run found it unchecked: a
    # choose_model that ignored Redis and always served the default passed).
    assert picks == [CAND if arm_for(routing, f"req-{i}") == "candidate" else BASE for i in range(2000)]
    assert 150 <= picks.count(CAND) <= 250  # ~10% of 2000
    share = np.mean([arm_for(routing, f"request-{i}") == "candidate" for i in range(100_000)])
    assert abs(share - 0.1) <= 0.01
    # Raising the share keeps every request already on the candidate there.
    wider = Routing(BASE, CAND, 0.3, "deploy-x")
    assert all(arm_for(wider, f"req-{i}") == "candidate" for i in range(2000) if picks[i] == CAND)
    assert choose_model(redis_client, "hook", "req-1", "gpt-4o") == "gpt-4o"  # no routing: the default


def test_aggregates_are_one_query_that_matches_the_rows(config: PipelineConfig, redis_client: redis.Redis) -> None:
    url = config.services.database_url.get_secret_value()
    set_routing(redis_client, "body", Routing(BASE, CAND, 0.3, "t"))
    simulate_traffic(url, redis_client, model_type="body", default_model=BASE,
                     behaviours={CAND: ModelBehaviour(engagement=0.08)}, requests=2000, start=T0, end=T0 + timedelta(hours=1))
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE posts SET engagement_rate = 'NaN' WHERE id IN (SELECT id FROM posts LIMIT 3)")
        rows = conn.execute("SELECT model_id, engagement_rate, is_error FROM posts").fetchall()
    aggregates = ab.arm_aggregates(url, BASE, CAND, T0, T0 + timedelta(hours=1))
    for arm, model in (("baseline", BASE), ("candidate", CAND)):
        rates = [r[1] for r in rows if r[0] == model and 0 <= r[1] <= 1]
        assert aggregates[arm]["posts"] == sum(1 for r in rows if r[0] == model)
        assert aggregates[arm]["eng_n"] == len(rates)
        assert aggregates[arm]["eng_sum"] == pytest.approx(sum(rates))
        assert aggregates[arm]["errors"] == sum(1 for r in rows if r[0] == model and r[2])


def test_covariate_and_p95_sums_in_sql_match_the_rows(config: PipelineConfig, redis_client: redis.Redis) -> None:
    """CUPED's covariate is each persona's mean engagement before the test (a persona without
    earlier posts gets the mean of all of them); p95_engagement is percentile_cont's."""
    url = config.services.database_url.get_secret_value()
    simulate_traffic(url, redis_client, model_type="body", default_model=BASE, behaviours={},
                     requests=600, start=T0 - timedelta(days=7), end=T0, seed=5)
    with psycopg.connect(url) as conn:  # a persona with no posts before the test
        conn.execute("DELETE FROM posts WHERE persona_id = 'persona_3' AND ts < %s", (T0,))
    set_routing(redis_client, "body", Routing(BASE, CAND, 0.3, "t"))
    simulate_traffic(url, redis_client, model_type="body", default_model=BASE, behaviours={},
                     requests=1500, start=T0, end=T0 + timedelta(hours=1), seed=6)
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT model_id, persona_id, engagement_rate, ts FROM posts").fetchall()
    pre: dict[str, list[float]] = {}
    for _, persona, rate, ts in rows:
        if ts < T0:
            pre.setdefault(persona, []).append(rate)
    everyone = np.mean([r for rates in pre.values() for r in rates])
    covariate = {p: float(np.mean(v)) for p, v in pre.items()}
    aggregates = ab.arm_aggregates(url, BASE, CAND, T0, T0 + timedelta(hours=1), T0 - timedelta(days=28))
    for arm, model in (("baseline", BASE), ("candidate", CAND)):
        test_rows = [(covariate.get(p, everyone), y) for m, p, y, ts in rows if m == model and ts >= T0]
        x, y = np.array(test_rows).T
        assert aggregates[arm]["x_n"] == len(x)
        assert aggregates[arm]["x_sum"] == pytest.approx(x.sum())
        assert aggregates[arm]["x_sumsq"] == pytest.approx((x * x).sum())
        assert aggregates[arm]["xy_sum"] == pytest.approx((x * y).sum())
        assert aggregates[arm]["eng_p95"] == pytest.approx(np.percentile(y, 95))
    assert ab.summaries(aggregates)["candidate"]["p95_engagement"] == aggregates["candidate"]["eng_p95"]
    without = ab.arm_aggregates(url, BASE, CAND, T0, T0 + timedelta(hours=1))
    assert without["baseline"]["x_n"] == 0  # no pre-period asked for: no covariate


def test_create_warns_when_underpowered_and_strict_refuses(
    config: PipelineConfig, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    history(config, redis_client, posts=300)
    with caplog.at_level(logging.WARNING):
        test = ab.create_ab_test(config, redis_client, baseline_model=BASE, candidate_model=CAND, now=T0,
                                 dag_id="d", run_id="r1")
    assert "UNDERPOWERED" in caplog.text
    assert test["status"] == "running" and test["traffic_allocation"] == {"baseline": 0.9, "candidate": 0.1}
    assert get_routing(redis_client, "body").candidate_model == CAND
    again = ab.create_ab_test(config, redis_client, baseline_model=BASE, candidate_model=CAND, now=T0,
                              dag_id="d", run_id="r1")
    assert again["id"] == test["id"]  # a retried task gets the same test
    config.evaluation.strict_power = True
    with pytest.raises(ab.ABTestError, match="strict_power"):
        ab.create_ab_test(config, redis_client, baseline_model=BASE, candidate_model=CAND, now=T0,
                          dag_id="d", run_id="r2")


def run_test(config: PipelineConfig, redis_client: redis.Redis, candidate: ModelBehaviour, hours: int = 6) -> dict:
    """Create a test, then simulate and look every hour until it decides."""
    url = config.services.database_url.get_secret_value()
    config.evaluation.traffic_split = 0.5
    test = ab.create_ab_test(config, redis_client, baseline_model=BASE, candidate_model=CAND, now=T0)
    result: dict = {}
    for hour in range(hours):
        start = T0 + timedelta(hours=hour)
        simulate_traffic(url, redis_client, model_type="body", default_model=BASE,
                         behaviours={BASE: ModelBehaviour(), CAND: candidate}, requests=1500, start=start,
                         end=start + timedelta(hours=1), seed=hour)
        result = ab.evaluate_ab_test(config, redis_client, test["id"], start + timedelta(hours=1))
        if result["final"]:
            break
    return result


def test_a_clear_winner_is_promoted_early_and_deployed_gradually(config: PipelineConfig, redis_client: redis.Redis) -> None:
    history(config, redis_client)
    winner = ModelBehaviour(engagement=0.095, **FINE_TUNED)
    result = run_test(config, redis_client, winner)
    assert result["decision"] == "promote", result["analysis"]["reasons"]
    record = ab.get_ab_test(config, result["ab_test_id"])
    assert record["ended_at"] < record["planned_end_at"]  # a clear winner ends the test early
    assert record["looks"] >= 1 and record["min_sequential_p"] < 0.05

    url = config.services.database_url.get_secret_value()
    now = record["ended_at"]
    deployment = rollout.deploy(config, redis_client, result["ab_test_id"], now)
    assert deployment["current_traffic"] == 0.1 and get_routing(redis_client, "body").candidate_share == 0.1
    assert rollout.deploy(config, redis_client, result["ab_test_id"], now)["id"] == deployment["id"]
    shares = []
    for step in range(1, 4):
        start = now + timedelta(hours=step - 1)
        simulate_traffic(url, redis_client, model_type="body", default_model=BASE,
                         behaviours={BASE: ModelBehaviour(), CAND: winner}, requests=800, start=start,
                         end=start + timedelta(hours=1), seed=100 + step)
        state = rollout.watch(config, redis_client, deployment["id"], start + timedelta(hours=1))
        shares.append(state["current_traffic"])
        if state["status"] == "completed":
            break
    assert shares == [0.55, 1.0]
    assert state["status"] == "completed"
    routing = get_routing(redis_client, "body")
    assert routing.baseline_model == CAND and routing.candidate_share == 0.0
    assert [e["kind"] for e in state["events"]] == ["started", "advanced", "advanced", "completed"]


def test_a_loser_is_rejected_and_taken_out_of_the_routing(config: PipelineConfig, redis_client: redis.Redis) -> None:
    history(config, redis_client)
    result = run_test(config, redis_client, ModelBehaviour(engagement=0.045, **FINE_TUNED))
    assert result["decision"] == "reject"
    assert get_routing(redis_client, "body").candidate_share == 0.0
    with pytest.raises(rollout.DeploymentRefused, match="not 'promote'"):
        rollout.deploy(config, redis_client, result["ab_test_id"], T0 + timedelta(days=1))


def test_the_evidence_ramp_holds_advances_on_non_inferiority_and_rolls_back_on_a_guardrail(
    config: PipelineConfig, redis_client: redis.Redis
) -> None:
    url = config.services.database_url.get_secret_value()
    ramp = config.deployment.rollout_config
    ramp.advance_on, ramp.min_dwell_hours = "evidence", 2
    insert_promoted_test(url, "ab-ramp", BASE)
    deployment = rollout.deploy(config, redis_client, "ab-ramp", T0)
    same = ModelBehaviour(**FINE_TUNED)  # as engaging as the base model, cheaper per post

    def traffic(behaviour: ModelBehaviour, requests: int, start: datetime, hours: float, seed: int) -> None:
        simulate_traffic(url, redis_client, model_type="body", default_model=BASE,
                         behaviours={BASE: ModelBehaviour(), CAND: behaviour}, requests=requests, start=start,
                         end=start + timedelta(hours=hours), seed=seed)

    traffic(same, 100, T0, 1, 1)
    state = rollout.watch(config, redis_client, deployment["id"], T0 + timedelta(hours=1))
    assert [e["kind"] for e in state["events"]] == ["started"]  # the minimum dwell has not passed
    state = rollout.watch(config, redis_client, deployment["id"], T0 + timedelta(hours=2))
    held = state["events"][-1]
    assert held["kind"] == "held" and "not yet shown non-inferior" in held["detail"]["reason"]
    assert state["current_traffic"] == 0.1

    traffic(same, 12_000, T0 + timedelta(hours=2), 2, 2)
    state = rollout.watch(config, redis_client, deployment["id"], T0 + timedelta(hours=4))
    assert state["current_traffic"] == 0.55 and state["events"][-1]["kind"] == "advanced"
    evidence = state["events"][-1]["detail"]["evidence"]
    assert evidence["verdict"] == "advance"
    assert {g["name"] for g in evidence["guardrails"]} == {
        "engagement_rate", "cost_per_post", "response_time_ms", "quality_score", "error_rate"}
    assert all(g["status"] == "pass" for g in evidence["guardrails"])

    traffic(ModelBehaviour(quality=0.6, **FINE_TUNED), 3000, T0 + timedelta(hours=4), 2, 3)
    state = rollout.watch(config, redis_client, deployment["id"], T0 + timedelta(hours=6))
    assert state["status"] == "rolled_back"
    assert state["rollback_reason"].startswith("automatic: guardrail quality_score is significantly worse")
    assert get_routing(redis_client, "body").candidate_share == 0.0


def insert_promoted_test(url: str, ab_test_id: str, baseline: str) -> None:
    """An A/B test of CAND against ``baseline`` as the evaluation leaves a winner: promoted, SRM clean."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ab_tests (id, model_type, baseline_model, candidate_model, traffic_split, started_at,"
            " planned_end_at, status, success_criteria, power_plan, last_analysis)"
            " VALUES (%s, 'body', %s, %s, 0.1, %s, %s, 'promote', '{}', '{}', '{\"srm_ok\": true}')",
            (ab_test_id, baseline, CAND, T0, T0),
        )


@pytest.mark.parametrize(
    ("behaviour", "fired"),
    [
        (ModelBehaviour(engagement=0.04), "engagement_rate_drop"),
        (ModelBehaviour(error_rate=0.2), "error_rate"),
        (ModelBehaviour(response_time_ms=2600), "p95_response_time"),
    ],
)
def test_each_trigger_rolls_back(
    config: PipelineConfig, redis_client: redis.Redis, behaviour: ModelBehaviour, fired: str
) -> None:
    url = config.services.database_url.get_secret_value()
    insert_promoted_test(url, "ab-1", BASE)
    deployment = rollout.deploy(config, redis_client, "ab-1", T0)
    simulate_traffic(url, redis_client, model_type="body", default_model=BASE,
                     behaviours={BASE: ModelBehaviour(), CAND: behaviour}, requests=3000, start=T0,
                     end=T0 + timedelta(minutes=30), seed=7)
    # The monitor runs on its DAG's schedule (dags/rollout_monitor.py): its first run after the
    # last bad post must be the one that switches the routing back.
    from airflow.dag_processing.dagbag import DagBag
    from croniter import croniter

    from support import REPO

    schedule = DagBag(str(REPO / "dags" / "rollout_monitor.py")).dags["rollout_monitor"].timetable.expression
    with psycopg.connect(url) as conn:
        last_bad = conn.execute("SELECT max(ts) FROM posts WHERE model_id = %s", (CAND,)).fetchone()[0]
    first_run = croniter(schedule, last_bad).get_next(datetime)
    state = rollout.watch(config, redis_client, deployment["id"], first_run)
    assert state["status"] == "rolled_back" and fired in state["rollback_reason"]
    routing = get_routing(redis_client, "body")
    assert routing.baseline_model == BASE and routing.candidate_share == 0.0
    assert routing.source == f"{deployment['id']}:rolled_back"
    detail = state["events"][-1]["detail"]
    # Each trigger's verdict is recorded with the rollback: the one that fired, the others passed.
    verdicts = {g["gate"]: g["verdict"] for g in detail["gates"]}
    assert verdicts == {name: "fired" if name == fired else "pass" for name in rollout.ROLLBACK_TRIGGER_NAMES}
    # The switch is inside the measured trigger-to-switch time; from the last bad post to the
    # switch is the wait for the monitor's run plus that (the schedule, not Redis, dominates).
    assert 0 < detail["routing_switch_seconds"] <= detail["trigger_to_switch_seconds"]
    exposure = (first_run - last_bad).total_seconds() + detail["trigger_to_switch_seconds"]
    interval = (croniter(schedule, first_run).get_next(datetime) - first_run).total_seconds()
    assert exposure <= interval + detail["trigger_to_switch_seconds"], (schedule, exposure)


def test_manual_rollback_needs_a_reason_and_is_recorded(config: PipelineConfig, redis_client: redis.Redis) -> None:
    url = config.services.database_url.get_secret_value()
    insert_promoted_test(url, "ab-2", BASE)
    deployment = rollout.deploy(config, redis_client, "ab-2", T0)
    with pytest.raises(ValueError, match="reason"):
        rollout.rollback(config, redis_client, deployment["id"], " ", T0)
    state = rollout.rollback(config, redis_client, deployment["id"], "on-call: complaints about tone", T0)
    assert state["status"] == "rolled_back" and state["rollback_reason"] == "on-call: complaints about tone"
    with pytest.raises(rollout.UnknownDeployment):
        rollout.rollback(config, redis_client, "deploy-missing", "x", T0)


def test_each_look_logs_a_plot_to_the_pipeline_runs_mlflow_run(
    config: PipelineConfig, redis_client: redis.Redis, mlflow_uri: str
) -> None:
    from mlflow import MlflowClient

    from fine_tuning.track.registry import get_or_create_run

    config.mlflow.tracking_uri = mlflow_uri
    config.mlflow.experiment_name = "ab_plots"
    url = config.services.database_url.get_secret_value()
    test = ab.create_ab_test(config, redis_client, baseline_model=BASE, candidate_model=CAND, now=T0,
                             dag_id="weekly_fine_tuning", run_id="plot_run")
    simulate_traffic(url, redis_client, model_type="body", default_model=BASE, behaviours={}, requests=600,
                     start=T0, end=T0 + timedelta(hours=1))
    result = ab.evaluate_ab_test(config, redis_client, test["id"], T0 + timedelta(hours=1))
    path = result["analysis"]["plot"]
    assert path == f"ab_tests/{test['id']}/evaluation.png"
    run = get_or_create_run(config, "weekly_fine_tuning", "plot_run")
    logged = [a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id, f"ab_tests/{test['id']}")]
    assert logged == [path]


def test_the_evaluation_operator_defers_between_looks_and_returns_the_decision(
    config: PipelineConfig, redis_client: redis.Redis, pg_url: str, redis_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from airflow.providers.standard.triggers.temporal import DateTimeTrigger
    from airflow.sdk.exceptions import TaskDeferred

    from fine_tuning.clock import now_utc
    from fine_tuning_airflow.ab_operators import ABTestEvaluationOperator

    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("REDIS_URL", redis_db)
    config.evaluation.duration_hours = 0.0005  # ~2 s
    test = ab.create_ab_test(config, redis_client, baseline_model=BASE, candidate_model=CAND, now=now_utc())
    manifest = {
        "ab_test_id": test["id"], "model_type": "body", "baseline_model": BASE, "candidate_model": CAND,
        "candidate_version": None, "traffic_split": 0.1, "started_at": test["started_at"].isoformat(),
        "planned_end_at": test["planned_end_at"].isoformat(), "power_adequate": False, "power_message": "",
    }

    def context(interval_minutes: float) -> dict:
        return {
            "params": {"evaluation_interval_minutes": interval_minutes, "data_dir": str(config.data_dir)},
            "ti": SimpleNamespace(xcom_pull=lambda task_ids: manifest),
            "dag_run": SimpleNamespace(dag_id="weekly_fine_tuning", run_id="op_test", run_after=now_utc()),
            "data_interval_end": None,
        }

    operator = ABTestEvaluationOperator(task_id="evaluate")
    # The planned end is 2 s away: a look, a short wait in the worker, and the last look decides.
    result = operator.execute(context(60))
    assert result["decision"] == "reject" and result["final"] and result["looks"] == 2

    config.evaluation.duration_hours = 24
    longer = ab.create_ab_test(config, redis_client, baseline_model=BASE, candidate_model=CAND, now=now_utc())
    manifest.update(ab_test_id=longer["id"], planned_end_at=longer["planned_end_at"].isoformat())
    simulate_traffic(pg_url, redis_client, model_type="body", default_model=BASE, behaviours={}, requests=400,
                     start=longer["started_at"], end=now_utc())
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context(60))
    assert isinstance(deferred.value.trigger, DateTimeTrigger)
    assert deferred.value.method_name == "execute_complete"

    # The look wrote its report through CachedMetricsHook's cache: the API's read of this look
    # is a hit, computes nothing, and equals what a read straight from PostgreSQL computes.
    from fine_tuning.evaluate import report

    looked = ab.get_ab_test(config, longer["id"])
    assert looked["looks"] == 1
    monkeypatch.setattr(report, "compute_metrics", lambda *a: pytest.fail("the look's report was recomputed"))
    served = report.metrics_report(config, longer["id"])
    monkeypatch.undo()
    assert served.cached and served.age_seconds < 60
    fresh = report.compute_metrics(config, looked, now_utc())
    assert served.metrics["candidate"]["sample_size"] == fresh["metrics"]["candidate"]["sample_size"] > 0
    assert served.metrics == fresh["metrics"]
    assert served.statistical_analysis["decision"] == looked["last_analysis"]["decision"] == "continue"


def test_deploy_refuses_when_a_fine_tuned_baseline_is_not_registered(
    config: PipelineConfig, redis_client: redis.Redis, mlflow_uri: str
) -> None:
    """A rollback must be able to restore the baseline: an unregistered fine-tune cannot be."""
    config.mlflow.tracking_uri = mlflow_uri
    config.mlflow.registered_model_name = f"baseline_check_{uuid.uuid4().hex[:8]}"
    url = config.services.database_url.get_secret_value()
    insert_promoted_test(url, "ab-3", "ft:gpt-3.5-turbo-0125:org:weekly:gone")
    with pytest.raises(rollout.DeploymentRefused, match="not registered"):
        rollout.deploy(config, redis_client, "ab-3", T0)
    assert get_routing(redis_client, "body") is None  # nothing was switched
