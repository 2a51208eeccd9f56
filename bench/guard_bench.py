"""Time from a regression's onset to the routing switched back, with the guard and without it.

    python bench/guard_bench.py     # BENCH_GUARD_REPS rollouts per regression kind (default 15),
                                    # BENCH_GUARD_EQUAL_REPS as-good ones (default 30),
                                    # BENCH_GUARD_POSTS_PER_HOUR (default 1500)

Each rollout is :func:`fine_tuning.dev.rollout_sim.simulate_rollout` on real PostgreSQL and
Redis (a throwaway schema): the default evidence ramp from 10%, the agent's traffic in 5-minute
ticks routed by the live Redis routing, the guard after every tick and the hourly health check on
the hour, as ``rollout_monitor`` runs them. The candidate turns ``worse`` (engagement -25%),
``broken`` (30% errors) or ``slow`` (3 s) at an onset drawn uniformly in [1 h, 6 h] after the
start; ``equal`` candidates never change, and any rollback of theirs is a false one (each runs
until it completes or for 48 h). The regression kinds run twice: with the guard, and with the
hourly health check alone (what the pipeline did before).

Writes ``bench/results/guard.json``: per kind and mode, the rollouts rolled back (and by what),
minutes from onset to switch and candidate posts exposed meanwhile (median, mean ± standard
error), and the false-rollback rate of as-good candidates with its standard error.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import _harness
import redis

from fine_tuning.config import load_config
from fine_tuning.dev import rollout_sim
from fine_tuning.infra import db

# Rollouts run 3 days apart from T0 (each lasts at most 48 h: no shared posts); far enough before
# the base model's inference retirement (2027-01-14) that a few hundred fit.
T0 = datetime(2025, 1, 5, tzinfo=UTC)
REGRESSIONS = ("worse", "broken", "slow")
# The routing hash's name is fixed (model_routing:body): a Redis database of this bench's own
# (the tests lease 1-4, 6, 10, 11, 15; the demo uses 5, make serve 7, the REST bench 9).
REDIS_URL = os.environ.get("BENCH_GUARD_REDIS_URL", "redis://127.0.0.1:6379/14")


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "mean": None, "std_error": None}
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "std_error": se}


def main() -> int:
    _harness.exit_cleanly_on_sigterm()
    reps = _harness.env_int("BENCH_GUARD_REPS", 15)
    equal_reps = _harness.env_int("BENCH_GUARD_EQUAL_REPS", 30)
    posts_per_hour = _harness.env_int("BENCH_GUARD_POSTS_PER_HOUR", 1500)
    rng = random.Random(20261203)
    started = time.perf_counter()
    outcomes: dict[str, list[rollout_sim.RolloutOutcome]] = {}
    with _harness.throwaway_schema() as url, tempfile.TemporaryDirectory() as data_dir:
        with db.connect(url) as conn:
            db.migrate(conn)
        # MLflow is not part of this measurement: the rollbacks' alias moves queue in the outbox.
        config = load_config(
            env={"DATABASE_URL": url, "REDIS_URL": REDIS_URL, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                 "FINE_TUNING_DATA_DIR": data_dir},
            params={},
        )
        client = redis.Redis.from_url(REDIS_URL)
        week = 0

        def run(kind: str, use_guard: bool, hours: float, onset_hours: float) -> rollout_sim.RolloutOutcome:
            nonlocal week
            start = T0 + timedelta(days=3 * week)
            week += 1
            return rollout_sim.simulate_rollout(
                config, client, kind=kind, start=start, onset=start + timedelta(hours=onset_hours),
                hours=hours, posts_per_hour=posts_per_hour, use_guard=use_guard, seed=week,
            )

        try:
            for kind in REGRESSIONS:
                onsets = [rng.uniform(1, 6) for _ in range(reps)]
                for mode, use_guard in (("guard", True), ("hourly_only", False)):
                    outcomes[f"{kind}/{mode}"] = [run(kind, use_guard, onset + 30, onset) for onset in onsets]
                    print(f"{kind}/{mode}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            outcomes["equal/guard"] = [run("equal", True, 48, 0) for _ in range(equal_reps)]
        finally:
            client.delete(f"model_routing:{config.evaluation.model_type}")

    rows, results = [], {}
    for key, runs in outcomes.items():
        kind, mode = key.split("/")
        back = [o for o in runs if o.rolled_back_by]
        minutes = [o.onset_to_switch_minutes for o in back if o.onset_to_switch_minutes is not None]
        exposed = [float(o.candidate_posts_exposed) for o in back if o.candidate_posts_exposed is not None]
        share = len(back) / len(runs)
        share_se = math.sqrt(share * (1 - share) / len(runs))
        by_guard = sum(o.rolled_back_by == "guard" for o in back)
        results[key] = {
            "kind": kind, "mode": mode, "rollouts": len(runs), "rolled_back": len(back),
            "rolled_back_share": share, "rolled_back_share_se": share_se, "by_guard": by_guard,
            "onset_to_switch_minutes": summary(minutes), "candidate_posts_exposed": summary(exposed),
            "completed": sum(o.status == "completed" for o in runs),
            "runs": [o.to_dict() for o in runs],
        }
        m, e = results[key]["onset_to_switch_minutes"], results[key]["candidate_posts_exposed"]
        rows.append((
            kind, mode, len(runs), f"{share:.2f} ± {share_se:.2f}", by_guard,
            "-" if m["median"] is None else f"{m['median']:.0f}",
            "-" if m["mean"] is None else f"{m['mean']:.0f} ± {m['std_error'] or 0:.0f}",
            "-" if e["median"] is None else f"{e['median']:.0f}",
        ))
    _harness.print_table(
        f"Rollback after a regression's onset ({posts_per_hour} posts/h, guard every 5 min on 60 min)",
        ("kind", "mode", "rollouts", "rolled back", "by guard", "median min", "mean min", "median exposed"),
        rows,
        ["equal: every rollback is a false one; the others: minutes from onset to the routing switched."],
    )
    _harness.write_results("guard", {
        "machine": _harness.machine(), "posts_per_hour": posts_per_hour, "reps": reps, "equal_reps": equal_reps,
        "seconds": time.perf_counter() - started, "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
