"""The rollout guard in Airflow, on real PostgreSQL and Redis: the task looks, then defers on a
trigger that serializes without secrets; the trigger (what the triggerer runs between the task's
looks) wakes the task on a regression without rolling back itself, ends when nothing is rolling
out or its watch is over, and fails loudly when it cannot read the posts; the woken task rolls
back."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime, timedelta

import pytest
import redis
from airflow.sdk.exceptions import TaskDeferred

from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.deploy import rollout
from fine_tuning.dev import rollout_sim
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
from fine_tuning.infra import db
from fine_tuning.routing import get_routing
from fine_tuning_airflow.guard import RolloutGuardOperator, RolloutGuardTrigger
from fine_tuning_airflow.triggers import trigger_config


@pytest.fixture
def config(pg_url: str, redis_db: str) -> PipelineConfig:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    return load_config(
        env={"DATABASE_URL": pg_url, "REDIS_URL": redis_db, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
             "FINE_TUNING_DATA_DIR": tempfile.mkdtemp(prefix="guard-")},
        params={},
    )


@pytest.fixture
def client(redis_db: str) -> redis.Redis:
    return redis.Redis.from_url(redis_db)


def _trigger(config: PipelineConfig, until: datetime, interval: float = 0.2, **kwargs):
    return RolloutGuardTrigger(until=until.isoformat(), interval_seconds=interval, config=trigger_config(config),
                               **kwargs)


async def _first_event(trigger) -> dict:
    event = await asyncio.wait_for(trigger.run().__anext__(), timeout=60)
    return event.payload


def test_the_triggers_look_wakes_the_task_on_a_regression_and_ends_without_rollouts(
    config: PipelineConfig, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The triggerer's own environment (no Airflow connections here): the test's database.
    monkeypatch.setenv("DATABASE_URL", config.services.database_url.get_secret_value())
    until = datetime.now(UTC) + timedelta(minutes=5)
    assert asyncio.run(_first_event(_trigger(config, until))) == {"status": "done", "message": "no active rollout"}

    # A rollout whose candidate fails a third of its posts up to now (the trigger looks at "now").
    now = datetime.now(UTC)
    candidate = "ft:gpt-4o-mini-2024-07-18:org:trigger:1"
    deployment = rollout.deploy(config, client, rollout_sim.promoted_test(config, candidate, now - timedelta(hours=2)),
                                now - timedelta(hours=2))
    simulate_traffic(config.services.database_url.get_secret_value(), client, model_type="body",
                     default_model=rollout_sim.BASELINE,
                     behaviours={rollout_sim.BASELINE: ModelBehaviour(), candidate: ModelBehaviour(error_rate=0.35)},
                     requests=3000, start=now - timedelta(hours=1), end=now - timedelta(seconds=1), seed=9)
    event = asyncio.run(_first_event(_trigger(config, until)))
    assert event["status"] == "regression" and event["deployments"] == [deployment["id"]]
    assert "error_rate" in event["fired"][deployment["id"]][0]
    # The trigger only looked: the rollout is still live until the task rolls it back.
    assert rollout.get_deployment(config, deployment["id"])["status"] == "rolling_out"
    assert get_routing(client, "body").candidate_share == 0.1

    # Its watch over, the trigger ends without looking again.
    past = asyncio.run(_first_event(_trigger(config, datetime.now(UTC) + timedelta(seconds=0.3), interval=5)))
    assert past["status"] == "done" and past["message"].startswith("watched until")


def test_the_triggers_look_fails_loudly_when_the_posts_cannot_be_read(
    config: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:9/test?connect_timeout=1")
    event = asyncio.run(_first_event(_trigger(config, datetime.now(UTC) + timedelta(minutes=5), max_consecutive_errors=2)))
    assert event["status"] == "error" and "2 guard looks failed in a row" in event["message"]


def test_the_task_defers_while_a_healthy_rollout_is_live_and_rolls_back_once_woken(
    config: PipelineConfig, client: redis.Redis, monkeypatch: pytest.MonkeyPatch, redis_db: str
) -> None:
    url = config.services.database_url.get_secret_value()
    for name, value in (("DATABASE_URL", url), ("REDIS_URL", redis_db),
                        ("FINE_TUNING_DATA_DIR", str(config.data_dir)), ("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")):
        monkeypatch.setenv(name, value)
    now = datetime.now(UTC)
    candidate = "ft:gpt-4o-mini-2024-07-18:org:operator:1"
    deployment = rollout.deploy(config, client, rollout_sim.promoted_test(config, candidate, now - timedelta(hours=2)),
                                now - timedelta(hours=2))
    behaviours = {rollout_sim.BASELINE: ModelBehaviour(), candidate: ModelBehaviour()}
    simulate_traffic(url, client, model_type="body", default_model=rollout_sim.BASELINE, behaviours=behaviours,
                     requests=2000, start=now - timedelta(hours=1), end=now - timedelta(seconds=1), seed=10)
    operator = RolloutGuardOperator(task_id="guard")
    context = {"params": {}, "data_interval_end": now}
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context)
    trigger = deferred.value.trigger
    classpath, kwargs = trigger.serialize()
    assert classpath == "fine_tuning_airflow.guard.RolloutGuardTrigger"
    assert kwargs["interval_seconds"] == 300 and "postgresql://" not in str(kwargs)
    assert datetime.fromisoformat(kwargs["until"]) == now + timedelta(minutes=55)
    assert deferred.value.method_name == "execute_complete"

    # The candidate turns bad; the trigger's event wakes the task, which judges again and rolls back.
    later = datetime.now(UTC)
    behaviours[candidate] = ModelBehaviour(error_rate=0.4)
    simulate_traffic(url, client, model_type="body", default_model=rollout_sim.BASELINE, behaviours=behaviours,
                     requests=1500, start=later - timedelta(minutes=30), end=later - timedelta(seconds=1), seed=11)
    event = {"status": "regression", "deployments": [deployment["id"]], "fired": {}}
    result = operator.execute_complete(context, event, **deferred.value.kwargs)
    assert result["rolled_back"] == [deployment["id"]]
    record = rollout.get_deployment(config, deployment["id"])
    assert record["status"] == "rolled_back" and record["rollback_reason"].startswith("automatic (guard): error_rate")
    assert get_routing(client, "body").candidate_share == 0.0

    # An error event fails the task (retried by Airflow), naming why the watch stopped.
    with pytest.raises(RuntimeError, match="stopped watching: 3 guard looks failed"):
        operator.execute_complete(context, {"status": "error", "message": "3 guard looks failed in a row"},
                                  **deferred.value.kwargs)
