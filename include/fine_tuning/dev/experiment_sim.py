"""A short simulated experiment through the library's own path: a day of baseline history, an A/B
test with hourly looks on simulated traffic (the SQL aggregates, the sequential analysis, the
plot logged to MLflow), the rollout of a promoted candidate, and its hourly health checks.

For the Experiments view's tests (the TestClient pages and the real browser): the pages then
show a test and a rollout that the pipeline's own functions made, hours of simulated time in
seconds of wall time. Nothing is written that the pipeline would not write itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from fine_tuning.config import PipelineConfig
from fine_tuning.deploy import rollout
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
from fine_tuning.evaluate import ab

if TYPE_CHECKING:
    import redis

BASELINE = "gpt-4o-mini-2024-07-18"
CANDIDATE = "ft:gpt-4o-mini-2024-07-18:org:weekly:sim"
# The fine-tune needs no few-shot prompt: its posts cost about the same at twice the token price.
CANDIDATE_BEHAVIOUR = ModelBehaviour(engagement=0.09, prompt_tokens=100.0, completion_tokens=320.0)
# The settings the simulation is made for: a 4-hour test looked at hourly, a clock-driven ramp of
# hourly steps from 20%, judged on at least 30 posts.
SIM_PARAMS = {
    "evaluation": {"duration_hours": 4, "evaluation_interval_minutes": 60, "power_history_hours": 24},
    "deployment": {
        "rollout_config": {
            "initial_traffic": 0.2,
            "increment_percentage": 0.3,
            "increment_interval_hours": 1,
            "advance_on": "clock",
        },
        "rollback_triggers": {"min_posts": 30},
    },
}


@dataclass
class SimulatedExperiment:
    ab_test_id: str
    decision: str
    deployment_id: str | None
    deployment_status: str | None
    now: datetime


def simulate_experiment(
    config: PipelineConfig,
    redis_client: redis.Redis,
    start: datetime,
    *,
    dag_id: str | None = None,
    run_id: str | None = None,
    candidate: str = CANDIDATE,
    candidate_behaviour: ModelBehaviour = CANDIDATE_BEHAVIOUR,
    rollout_behaviour: ModelBehaviour | None = None,
    posts_per_hour: int = 1500,
    rollout_hours: int = 1,
    seed: int = 1,
) -> SimulatedExperiment:
    """Run one experiment from ``start`` (simulated time; ``config`` made with :data:`SIM_PARAMS`).

    The test looks hourly until it decides (or its duration ends); a promoted candidate is
    deployed and watched for ``rollout_hours`` hours of traffic, so the rollout is left in
    whatever state its health checks put it (still rolling out, completed, or rolled back).
    ``rollout_behaviour``: how the candidate behaves once deployed (default: as in its test), for
    a candidate that degrades in production.
    """
    url = config.services.database_url.get_secret_value()
    model_type = config.evaluation.model_type

    def traffic(behaviours: dict[str, ModelBehaviour], hours: int, since: datetime, seed: int) -> None:
        simulate_traffic(
            url, redis_client, model_type=model_type, default_model=BASELINE, behaviours=behaviours,
            requests=posts_per_hour * hours, start=since, end=since + timedelta(hours=hours), seed=seed,
        )  # fmt: skip

    traffic({BASELINE: ModelBehaviour()}, 24, start - timedelta(hours=24), seed)
    test = ab.create_ab_test(
        config, redis_client, baseline_model=BASELINE, candidate_model=candidate, now=start,
        dag_id=dag_id, run_id=run_id,
    )  # fmt: skip
    behaviours = {BASELINE: ModelBehaviour(), candidate: candidate_behaviour}
    now, decision, hour = test["started_at"], "continue", 0
    while decision == "continue":
        hour += 1
        traffic(behaviours, 1, now, seed + hour)
        now += timedelta(hours=1)
        decision = ab.evaluate_ab_test(config, redis_client, test["id"], now)["decision"]
    if decision != "promote":
        return SimulatedExperiment(test["id"], decision, None, None, now)
    deployment = rollout.deploy(config, redis_client, test["id"], now)
    behaviours[candidate] = rollout_behaviour or candidate_behaviour
    for step in range(rollout_hours):
        traffic(behaviours, 1, now, seed + 100 + step)
        now += timedelta(hours=1)
        deployment = rollout.watch(config, redis_client, deployment["id"], now)
    return SimulatedExperiment(test["id"], decision, deployment["id"], deployment["status"], now)
