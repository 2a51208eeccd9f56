"""SIGKILL the steps that decide what users are served — ab-create, evaluate, deploy, rollout,
rollback — between two of their external effects, run them again (what clearing the task does),
and look: one test row, one deployment, one alias move, the routing as if the step had run once.

The kill windows come from TCP proxies in front of Redis and MLflow (``FaultyProxy``): a request
held back (or its reply held back, once it has had its effect) while the database already says
the step got further. The proxy is cut before the kill, so a held request is dropped, never
delivered late. No test hooks in the product code. The A/B tests run in the recent past (their
posts made by the traffic simulator under the live routing), so a real-time step decides.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from faulty_proxy import FaultyProxy
from mlflow import MlflowClient
from support import registered_version

from fine_tuning import clock, pipeline
from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.deploy import rollout
from fine_tuning.dev.lifecycle import BASELINE, SIM_CONFIG
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
from fine_tuning.infra import db
from fine_tuning.manifests import ABTestManifest, Manifest, RunContext
from fine_tuning.routing import Routing, get_routing

pytestmark = pytest.mark.slow

DAG_ID = "weekly_fine_tuning"
# A fine-tuned model's short prompt; the better one errs less, so that a rollout's stage can show
# its error rate non-inferior on a few hours of posts.
BETTER = ModelBehaviour(engagement=0.068 * 1.3, prompt_tokens=100.0, completion_tokens=320.0, error_rate=0.002)
EQUAL = ModelBehaviour(prompt_tokens=100.0, completion_tokens=320.0)


@dataclass
class World:
    config: PipelineConfig  # direct to the services: the test's own view and set-up
    env: dict[str, str]  # the step processes': Redis and MLflow through the proxies
    redis: redis.Redis
    redis_proxy: FaultyProxy
    mlflow_proxy: FaultyProxy
    run_dir: Path
    seed: int = 0

    @property
    def database_url(self) -> str:
        return self.config.services.database_url.get_secret_value()

    def sql(self, query: str, *params: object) -> list[tuple]:
        with db.connect(self.database_url) as conn:
            return conn.execute(query, params).fetchall()

    def routing(self) -> Routing | None:
        return get_routing(self.redis, self.config.evaluation.model_type)

    def command(self, step: str, run_id: str, *inputs: str) -> list[str]:
        command = [sys.executable, "-m", "fine_tuning", step, "--dag-id", DAG_ID, "--run-id", run_id,
                   "--window-end", datetime.now(UTC).isoformat()]
        for name in inputs:
            command += ["--input", f"{name}=@{self.run_dir / f'{name}.json'}"]
        return command

    def save(self, name: str, manifest: Manifest) -> None:
        (self.run_dir / f"{name}.json").write_text(manifest.to_json())

    def run(self, command: list[str]) -> dict:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def kill_when(self, command: list[str], ready: Callable[[], bool], timeout: float = 120) -> None:
        """Start the step; once ``ready()`` says the chosen point is reached, cut both proxies
        (what they hold back is dropped) and SIGKILL the process."""
        # The step's log (stdout and stderr) goes to a file: a pipe nobody reads could fill and
        # stall the step, and when the step ends early its log says why (a hold, an error).
        log_path = self.run_dir / f"{command[3]}-killed.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                assert process.poll() is None, f"ended before the kill point: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "kill point not reached"
                time.sleep(0.02)
        finally:
            for proxy in (self.redis_proxy, self.mlflow_proxy):
                proxy.down()
            process.send_signal(signal.SIGKILL)
            process.wait()
            for proxy in (self.redis_proxy, self.mlflow_proxy):
                proxy.delay_seconds = proxy.reply_delay_seconds = 0.0
                proxy.up()
        assert process.returncode == -signal.SIGKILL

    def traffic(
        self, behaviour: ModelBehaviour, candidate: str, start: datetime, end: datetime, per_hour: int
    ) -> None:
        """The agent's posts over [start, end) under the live routing: the same posts every run."""
        self.seed += 1
        simulate_traffic(
            self.database_url, self.redis, model_type=self.config.evaluation.model_type, default_model=BASELINE,
            behaviours={BASELINE: ModelBehaviour(), candidate: behaviour},
            requests=round(per_hour * (end - start).total_seconds() / 3600), start=start, end=end, seed=self.seed,
        )

    def at(self, moment: datetime) -> Any:
        return mock.patch.object(clock, "now_utc", lambda: moment)


def proxied(url: str, proxy: FaultyProxy) -> str:
    return urlunsplit(urlsplit(url)._replace(netloc=f"127.0.0.1:{proxy.port}"))


@pytest.fixture
def world(pg_url: str, redis_db: str, mlflow_uri: str, tmp_path: Path, isolated_breakers: str) -> Iterator[World]:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    params = json.loads(json.dumps(SIM_CONFIG))
    suffix = uuid.uuid4().hex[:8]
    params["mlflow"].update({"registered_model_name": f"kill-decisions-{suffix}",
                             "experiment_name": f"kill-decisions-{suffix}"})
    config_file = tmp_path / "training_config.json"
    config_file.write_text(json.dumps(params))
    direct = {
        "DATABASE_URL": pg_url, "REDIS_URL": redis_db, "MLFLOW_TRACKING_URI": mlflow_uri,
        "FINE_TUNING_DATA_DIR": str(tmp_path / "data"), "FINE_TUNING_CONFIG_FILE": str(config_file),
        "FINE_TUNING_BREAKER_KEY_PREFIX": isolated_breakers, "OPENAI_API_KEY": "sk-test-key",
    }
    redis_target, mlflow_target = urlsplit(redis_db), urlsplit(mlflow_uri)
    with (
        FaultyProxy(redis_target.hostname or "127.0.0.1", redis_target.port or 6379) as redis_proxy,
        FaultyProxy(mlflow_target.hostname or "127.0.0.1", mlflow_target.port or 80) as mlflow_proxy,
    ):
        env = {**os.environ, **direct, "REDIS_URL": proxied(redis_db, redis_proxy),
               "MLFLOW_TRACKING_URI": mlflow_proxy.url}
        run_dir = tmp_path / "manifests"
        run_dir.mkdir()
        client = redis.Redis.from_url(redis_db)
        yield World(load_config(env=direct), env, client, redis_proxy, mlflow_proxy, run_dir)
        client.close()


def a_test_that_ran(world: World, behaviour: ModelBehaviour, hours: float = 73) -> ABTestManifest:
    """A candidate whose A/B test started ``hours`` ago (longer than the simulation's 72 h), with
    its posts: the next look is its final one."""
    started = datetime.now(UTC) - timedelta(hours=hours)
    candidate = f"ft:{BASELINE}:kill:{uuid.uuid4().hex[:8]}"
    ctx = RunContext(dag_id=DAG_ID, run_id=f"scheduled__{uuid.uuid4().hex[:6]}", window_end=started)
    with world.at(started):
        test = pipeline.ab_create(world.config, ctx, registered_version(world.config, candidate))
    world.traffic(behaviour, candidate, started, datetime.now(UTC), per_hour=150)
    world.save("ab-create", test)
    return test


def a_live_rollout(world: World, hours: float = 4) -> dict:
    """A promoted candidate deployed ``hours`` ago (past its 2 h dwell), its stage's posts made."""
    test = a_test_that_ran(world, BETTER, hours=73 + hours)
    deployed = datetime.now(UTC) - timedelta(hours=hours)
    ctx = RunContext(dag_id=DAG_ID, run_id="scheduled__deployed", window_end=deployed)
    with world.at(deployed):
        evaluation = pipeline.evaluate(world.config, ctx, test)
        assert evaluation.decision == "promote", evaluation.reasons
        deployment = pipeline.deploy(world.config, ctx, evaluation)
    world.traffic(BETTER, test.candidate_model, deployed, datetime.now(UTC), per_hour=600)
    return rollout.get_deployment(world.config, deployment.deployment_id)


def events(world: World, deployment_id: str, kind: str) -> int:
    return len(world.sql("SELECT 1 FROM deployment_events WHERE deployment_id = %s AND kind = %s",
                         deployment_id, kind))


def test_ab_create_killed_after_its_routing_write_before_its_commit(world: World) -> None:
    candidate = f"ft:{BASELINE}:kill:{uuid.uuid4().hex[:8]}"
    world.save("register", registered_version(world.config, candidate))
    command = world.command("ab-create", "scheduled__ab", "register")
    # The routing's SET reaches Redis; its reply is held: the transaction that records the test
    # is still open when the process dies.
    world.redis_proxy.reply_delay_seconds = 0.5

    def routed() -> bool:
        live = world.routing()
        return live is not None and live.candidate_model == candidate

    world.kill_when(command, ready=routed)
    assert world.sql("SELECT id FROM ab_tests") == []  # killed before the commit
    assert world.routing().candidate_model == candidate  # ... and after the routing's write

    again = world.run(command)
    assert [row[0] for row in world.sql("SELECT id FROM ab_tests")] == [again["ab_test_id"]]
    live = world.routing()
    assert (live.source, live.candidate_model, live.candidate_share) == (
        again["ab_test_id"], candidate, world.config.evaluation.traffic_split)
    assert world.sql("SELECT status, ab_test_id FROM candidate_queue") == [("started", again["ab_test_id"])]
    assert world.run(command)["ab_test_id"] == again["ab_test_id"]  # and once more: the same test


def test_evaluate_killed_after_recording_its_reject_before_the_routing_write(world: World) -> None:
    test = a_test_that_ran(world, EQUAL)
    command = world.command("evaluate", "scheduled__ev", "ab-create")
    world.redis_proxy.delay_seconds = 0.5  # the routing write is held, then dropped

    def decided() -> bool:
        return world.sql("SELECT status FROM ab_tests WHERE id = %s", test.ab_test_id) != [("running",)]

    world.kill_when(command, ready=decided)
    assert world.sql("SELECT status, looks FROM ab_tests") == [("reject", 1)]
    assert world.routing().candidate_share == world.config.evaluation.traffic_split  # not yet written

    again = world.run(command)
    assert (again["decision"], again["final"]) == ("reject", True)
    live = world.routing()
    assert (live.baseline_model, live.candidate_share, live.source) == (BASELINE, 0.0, f"{test.ab_test_id}:rejected")
    assert world.sql("SELECT status, looks FROM ab_tests") == [("reject", 1)]  # decided once


def test_deploy_killed_after_its_row_before_its_routing(world: World) -> None:
    test = a_test_that_ran(world, BETTER)
    ctx = RunContext(dag_id=DAG_ID, run_id="scheduled__dep", window_end=datetime.now(UTC))
    world.save("evaluate", pipeline.evaluate(world.config, ctx, test))
    command = world.command("deploy", "scheduled__dep", "evaluate")
    world.redis_proxy.delay_seconds = 0.5

    world.kill_when(command, ready=lambda: bool(world.sql("SELECT 1 FROM deployments")))
    assert world.routing().source == test.ab_test_id  # the A/B test's split still

    again = world.run(command)
    assert [row[0] for row in world.sql("SELECT id FROM deployments")] == [again["deployment_id"]]
    live = world.routing()
    initial = world.config.deployment.rollout_config.initial_traffic
    assert (live.source, live.candidate_model, live.candidate_share) == (
        again["deployment_id"], test.candidate_model, initial)
    assert events(world, again["deployment_id"], "started") == 1


def test_rollout_killed_after_recording_its_step_before_the_routing_write(world: World) -> None:
    record = a_live_rollout(world)
    initial = record["current_traffic"]
    # The step advances only once the stage shows every guardrail non-inferior; which posts the
    # candidate serves depends on its (random) name, so a fixed count of posts is sometimes not
    # enough (the step then holds, rightly, and the kill point never comes). The stage gets more
    # posts until the evidence the step will judge says advance.
    for _ in range(4):
        now = datetime.now(UTC)
        aggregates = rollout.health(world.config, record, now)["aggregates"]
        evidence = rollout.stage_evidence(world.config, record, aggregates)
        if evidence.verdict == "advance":
            break
        world.traffic(BETTER, record["candidate_model"], record["last_step_at"], now, per_hour=600)
    assert evidence.verdict == "advance", evidence.reasons
    command = world.command("rollout", "scheduled__watch")
    world.redis_proxy.delay_seconds = 0.5

    def stepped() -> bool:
        return world.sql("SELECT current_traffic FROM deployments")[0][0] > initial

    world.kill_when(command, ready=stepped)
    (stepped_to,) = world.sql("SELECT current_traffic FROM deployments")[0]
    assert world.routing().candidate_share == initial  # the step's routing was never written

    world.run(command)  # the next health check (a cleared task, the next hour)
    live = world.routing()
    assert (live.source, live.candidate_share) == (record["id"], stepped_to)
    assert events(world, record["id"], "advanced") == 1  # stepped once
    assert world.sql("SELECT current_traffic, status FROM deployments") == [(stepped_to, "rolling_out")]


def test_rollback_killed_after_its_record_before_the_alias_move(world: World) -> None:
    record = a_live_rollout(world)
    name = world.config.mlflow.registered_model_name
    mlflow = MlflowClient(world.config.mlflow.tracking_uri)
    version = record["candidate_version"]
    command = [sys.executable, "-m", "fine_tuning", "rollback", "--deployment-id", record["id"],
               "--reason", "manual: the kill test"]
    world.mlflow_proxy.delay_seconds = 0.5  # the demotion's MLflow calls are held, then dropped

    def recorded() -> bool:
        return world.sql("SELECT status FROM deployments") == [("rolled_back",)]

    world.kill_when(command, ready=recorded)
    assert mlflow.get_model_version_by_alias(name, "challenger").version == version  # not yet demoted
    live = world.routing()
    assert (live.baseline_model, live.candidate_share) == (BASELINE, 0.0)

    world.run(command)
    tags = mlflow.get_model_version(name, version).tags
    assert (tags["deployment_status"], tags["rollback_reason"]) == ("rolled_back", "manual: the kill test")
    assert "challenger" not in mlflow.get_model_version(name, version).aliases
    assert events(world, record["id"], "rolled_back") == 1
    live = world.routing()
    assert (live.baseline_model, live.candidate_share, live.source) == (BASELINE, 0.0, f"{record['id']}:rolled_back")
