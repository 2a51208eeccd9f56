"""A deterministic traffic simulator: the content agent making posts under the live routing.

For the demo and the tests. Each simulated request asks :func:`fine_tuning.routing.choose_model`
which model to use, exactly as the agent would, and the post it makes gets that model's "true"
engagement rate (plus noise), latency, quality, cost and error rate. Same seed, same posts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from fine_tuning.infra import db
from fine_tuning.routing import arm_for, get_routing

if TYPE_CHECKING:
    import redis


@dataclass(frozen=True)
class ModelBehaviour:
    """How a model's posts perform (the ground truth the A/B test should find)."""

    engagement: float = 0.068
    response_time_ms: float = 1200.0
    quality: float = 0.78
    cost_per_token: float = 2e-6
    error_rate: float = 0.01


COPY_POSTS = (
    "COPY posts (persona_id, hook, body, engagement_rate, ts, tokens_used, model_id, "
    "response_time_ms, quality_score, cost_usd, is_error) FROM STDIN"
)


def simulate_traffic(
    database_url: str,
    redis_client: redis.Redis,
    *,
    model_type: str,
    default_model: str,
    behaviours: dict[str, ModelBehaviour],
    requests: int,
    start: datetime,
    end: datetime,
    seed: int = 1,
) -> dict[str, int]:
    """Make ``requests`` posts spread over [start, end), routed like the agent; returns posts per model."""
    rng = random.Random(seed)
    # One read of the routing per batch: a batch stands for a short slice of the agent's traffic.
    routing = get_routing(redis_client, model_type)
    counts: dict[str, int] = {}
    span = (end - start).total_seconds()
    with db.connect(database_url) as conn, conn.cursor() as cursor, cursor.copy(COPY_POSTS) as copy:
        for i in range(requests):
            request_id = f"sim-{seed}-{i}"
            if routing is None:
                model = default_model
            elif arm_for(routing, request_id) == "candidate":
                model = routing.candidate_model or default_model
            else:
                model = routing.baseline_model
            truth = behaviours.get(model, ModelBehaviour())
            counts[model] = counts.get(model, 0) + 1
            # Beta with the model's mean and a realistic spread (sd ~ 0.045 at 6.8%).
            concentration = 30.0
            engagement = rng.betavariate(
                truth.engagement * concentration, (1 - truth.engagement) * concentration
            )
            tokens = max(20, int(rng.gauss(350, 80)))
            copy.write_row(
                (
                    f"persona_{i % 5}",
                    f"Simulated hook {i}",
                    f"Simulated body {i} for request {request_id}",
                    engagement,
                    start + timedelta(seconds=span * (i + rng.random()) / requests),
                    tokens,
                    model,
                    max(50.0, rng.gauss(truth.response_time_ms, truth.response_time_ms * 0.15)),
                    min(1.0, max(0.0, rng.gauss(truth.quality, 0.08))),
                    tokens * truth.cost_per_token * rng.lognormvariate(0, 0.1),
                    rng.random() < truth.error_rate,
                )
            )
    return counts
