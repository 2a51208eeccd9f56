"""``make lifecycle``'s short version: two simulated weeks of the loop with faults, on the real
services, checked every simulated hour (see :mod:`fine_tuning.dev.lifecycle`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from mlflow import MlflowClient

from fine_tuning.dev import lifecycle
from fine_tuning.infra import db
from fine_tuning.routing import get_routing

pytestmark = pytest.mark.slow


def story(report: dict) -> str:
    """What a failed check prints: the summary and the simulation's events, hour by hour."""
    return "\n".join([lifecycle.summary(report), *report["events"]])


def test_two_weeks_with_faults_keep_every_invariant(
    pg_url: str, redis_db: str, mlflow_uri: str, openai_env, tmp_path: Path
) -> None:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    report = lifecycle.simulate(
        weeks=2, schedule=lifecycle.SHORT_SCHEDULE, database_url=pg_url, redis_url=redis_db,
        mlflow_uri=mlflow_uri, openai_base_url=openai_env.base_url, emulator_admin_url=openai_env.admin_url,
        data_dir=tmp_path / "data",
    )
    assert report["violations"] == [], lifecycle.summary(report)
    # Every hour of the two weeks was checked, and every fault of the short schedule happened.
    assert report["invariant_checks"] >= 2 * 7 * 24
    assert {name: report["faults"].get(name, 0) >= 1 for name in ("openai_5xx", "kill", "mlflow_down", "redis_down")} \
        == dict.fromkeys(("openai_5xx", "kill", "mlflow_down", "redis_down"), True), story(report)
    # What the simulation saw, seen again from outside it: the emulator trained one job per week
    # that reached training, the first week's too (the 5xx burst did not stop it); the routing
    # ends with one model at 100%, a registered one.
    assert all(report["weeks_ended"].values()), story(report)
    jobs = openai_env.state()["jobs"]
    emulated = {job["id"] for job in (jobs.values() if isinstance(jobs, dict) else jobs)}
    assert emulated == set(report["jobs"].values()) and 0 in report["jobs"], (emulated, report["jobs"])
    routing = get_routing(redis.Redis.from_url(redis_db), "body")
    assert routing is not None and routing.candidate_share == 0
    models = {v.tags.get("fine_tuned_model") for v in MlflowClient(mlflow_uri).search_model_versions()}
    assert routing.baseline_model == lifecycle.BASELINE or routing.baseline_model in models
    for rollback in report["rollbacks"]:  # a regression is switched back within the hour
        assert rollback["onset_to_switch_minutes"] <= 60, rollback
