"""A deterministic traffic simulator: the content agent making posts under the live routing.

For the demo and the tests. Each simulated request asks :func:`fine_tuning.routing.choose_model`
which model to use, exactly as the agent would, and the post it makes gets that model's "true"
engagement rate (plus noise), latency, quality, cost and error rate. Same seed, same posts.

Personas differ the way real authors do: each has a fixed engagement level (a lognormal
multiplier around the model's mean, the same in every call), so a persona's past posts predict
its next ones and variance reduction has something real to find. Cost is the model's tokens at
the product's own price table (:meth:`fine_tuning.config.TrainingConfig.inference_price`): a
fine-tuned model's tokens cost what OpenAI charges for them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING

from fine_tuning.config import TrainingConfig
from fine_tuning.infra import db
from fine_tuning.routing import arm_for, current_routing

if TYPE_CHECKING:
    import redis


@dataclass(frozen=True)
class ModelBehaviour:
    """How a model's posts perform (the ground truth the A/B test should find)."""

    engagement: float = 0.068
    response_time_ms: float = 1200.0
    quality: float = 0.78
    # Mean tokens per post: the prompt (a base model's carries instructions and few-shot
    # examples; a fine-tuned model needs ~100 tokens) and the completion; priced per model by
    # the price table.
    prompt_tokens: float = 1500.0
    completion_tokens: float = 350.0
    error_rate: float = 0.01


PERSONAS = 200
# Between-persona spread of the engagement level (lognormal sigma): with the Beta noise of a
# single post this makes a persona's past mean explain roughly a fifth of a post's variance.
PERSONA_SIGMA = 0.35
# Per-post spread: Beta with the persona's mean and this concentration (sd ~0.045 at 6.8%).
CONCENTRATION = 30.0


@cache
def persona_levels(personas: int = PERSONAS, sigma: float = PERSONA_SIGMA) -> tuple[float, ...]:
    """Each persona's engagement multiplier (mean 1), fixed: the same persona in every call."""
    rng = random.Random(20261203)
    return tuple(rng.lognormvariate(-(sigma**2) / 2, sigma) for _ in range(personas))


def post_engagement(rng: random.Random, mean: float, persona: int) -> float:
    """One post's engagement rate: Beta around the model's mean times the persona's level."""
    level = min(max(mean * persona_levels()[persona], 1e-4), 0.9)
    return rng.betavariate(level * CONCENTRATION, (1 - level) * CONCENTRATION)


def post_cost(price: tuple[float, float], prompt_tokens: int, completion_tokens: int) -> float:
    """USD of one post at (input, output) USD per 1M tokens."""
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000


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
    price_of: Callable[[str], tuple[float, float]] | None = None,
) -> dict[str, int]:
    """Make ``requests`` posts spread over [start, end), routed like the agent; returns posts per model.

    :param price_of: USD per 1M (input, output) tokens of a model id; default the config's table.
    """
    rng = random.Random(seed)
    price_of = price_of or TrainingConfig().inference_price
    # One read of the routing per batch: a batch stands for a short slice of the agent's traffic.
    # Read as the agent's choose_model reads it: while Redis is down, the last routing read.
    routing = current_routing(redis_client, model_type)
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
            persona = rng.randrange(PERSONAS)
            engagement = post_engagement(rng, truth.engagement, persona)
            prompt = max(10, int(rng.gauss(truth.prompt_tokens, truth.prompt_tokens * 0.1)))
            completion = max(20, int(truth.completion_tokens * rng.lognormvariate(-0.02, 0.2)))
            copy.write_row(
                (
                    f"persona_{persona}",
                    f"Simulated hook {i}",
                    f"Simulated body {i} for request {request_id}",
                    engagement,
                    start + timedelta(seconds=span * (i + rng.random()) / requests),
                    prompt + completion,
                    model,
                    max(50.0, rng.gauss(truth.response_time_ms, truth.response_time_ms * 0.15)),
                    min(1.0, max(0.0, rng.gauss(truth.quality, 0.08))),
                    post_cost(price_of(model), prompt, completion),
                    rng.random() < truth.error_rate,
                )
            )
    return counts
