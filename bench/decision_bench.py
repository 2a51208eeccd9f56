"""Decisions on simulated A/B tests: how often, how right, how fast; ours against the alternatives.

    python bench/decision_bench.py        # DECISION_BENCH_TESTS tests per true lift (default 1000)

The same simulated streams (:mod:`fine_tuning.dev.decision_sim`: 60 posts/h, 90/10, skewed
bounded per-post engagement around 6.8% with persona-to-persona variation, a week, a look every
hour from the first post) go through four methods, for true lifts -20%, 0, +10%, +20%:

* ``ours``: the pipeline's analysis (:func:`fine_tuning.evaluate.analysis.analyze_look`,
  sequential, minimum sample per arm), variance reduction off;
* ``ours_cuped``: the same with CUPED on the persona's pre-period mean (the default);
* ``fixed_horizon``: one look, at the duration a fixed test needs for 80% power at +20%
  (statsmodels), with the pipeline's fixed method;
* ``gbstats_sequential``: GrowthBook's sequential engine (gbstats 0.8.0,
  ``SequentialTwoSidedTTest``, its default tuning) on the same looks and the same decision
  rule (significant and lift >= the minimum: promote; significant and CI below 0: reject).
  gbstats pins numpy<2 and pandas<2, so it runs in a venv of its own (bench/.venv-gbstats,
  made here on first use), never in the project's requirements.

Then the evidence ramp (:func:`fine_tuning.dev.decision_sim.simulate_ramp`): a candidate as good
as its baseline, every guardrail simulated, from 10% by +10% stages, at several traffic levels.

Writes ``decision.json`` in the issue's shape and ``decision_details.json`` (standard errors,
the measured variance reduction, the ramp's hours to 100%, settings).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness
import numpy as np

from fine_tuning.dev import decision_sim
from fine_tuning.evaluate import analysis, stats

LIFTS = (-0.2, 0.0, 0.1, 0.2)
METHODS = ("ours", "ours_cuped", "fixed_horizon", "gbstats_sequential")
GBSTATS_VENV = _harness.REPO / "bench" / ".venv-gbstats"
GBSTATS_PIN = "gbstats==0.8.0"

# Runs inside the gbstats venv: cumulative per-look sums in, p / lift / CI per look out.
GBSTATS_PROBE = """
import sys
import numpy as np
from gbstats.frequentist.tests import SequentialTwoSidedTTest, SequentialConfig
from gbstats.models.statistics import SampleMeanStatistic

data = np.load(sys.argv[1])
n, s, ss = data["n"], data["s"], data["ss"]  # (tests, 2 arms, looks)
tests, _, looks = n.shape
out = np.full((tests, looks, 4), np.nan)
config = SequentialConfig(alpha=float(sys.argv[3]))
for i in range(tests):
    for k in range(looks):
        if min(n[i, 0, k], n[i, 1, k]) < int(sys.argv[4]):
            continue
        a = SampleMeanStatistic(n=int(n[i, 0, k]), sum=float(s[i, 0, k]), sum_squares=float(ss[i, 0, k]))
        b = SampleMeanStatistic(n=int(n[i, 1, k]), sum=float(s[i, 1, k]), sum_squares=float(ss[i, 1, k]))
        r = SequentialTwoSidedTTest(a, b, config).compute_result()
        out[i, k] = (r.p_value, r.expected, r.ci[0], r.ci[1])
np.save(sys.argv[2], out)
"""


def gbstats_python() -> Path:
    python = GBSTATS_VENV / "bin" / "python"
    if not python.exists():
        print(f"making {GBSTATS_VENV} with {GBSTATS_PIN} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(GBSTATS_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", GBSTATS_PIN],
            check=True,
        )
    return python


def gbstats_looks(all_sums: list[dict[str, np.ndarray]], alpha: float, min_n: int) -> np.ndarray:
    """GrowthBook's sequential p, lift and CI at every look of every test: (tests, looks, 4)."""
    cumulative = {
        k: np.stack([np.cumsum(s[k], axis=1) for s in all_sums]) for k in ("eng_n", "eng_sum", "eng_sumsq")
    }
    with tempfile.TemporaryDirectory() as tmp:
        source, result = Path(tmp) / "in.npz", Path(tmp) / "out.npy"
        np.savez(source, n=cumulative["eng_n"], s=cumulative["eng_sum"], ss=cumulative["eng_sumsq"])
        subprocess.run(
            [str(gbstats_python()), "-c", GBSTATS_PROBE, str(source), str(result), str(alpha), str(min_n)],
            check=True,
        )
        return np.load(result)


def gbstats_outcome(looks: np.ndarray, criteria: analysis.Criteria) -> decision_sim.Outcome:
    """The pipeline's decision rule on GrowthBook's sequential answers (first decisive look)."""
    ever = False
    for k, (p, lift, _low, high) in enumerate(looks):
        if np.isnan(p):
            continue
        if p < criteria.alpha:
            ever = True
            if lift >= criteria.min_engagement_lift:
                return decision_sim.Outcome("promote", k + 1, ever)
            if high < 0:
                return decision_sim.Outcome("reject", k + 1, ever)
    return decision_sim.Outcome("reject", float(len(looks)), ever)


def fixed_outcome(
    sums: dict[str, np.ndarray], horizon: int, design: decision_sim.StreamDesign, criteria: analysis.Criteria
) -> decision_sim.Outcome:
    cumulative = {name: np.cumsum(values, axis=1) for name, values in sums.items()}
    look = min(horizon, design.hours) - 1
    result = analysis.analyze_look(
        analysis.LookInputs.from_aggregates(
            decision_sim.aggregates_at(cumulative, look), design.candidate_share
        ),
        criteria,
        method="fixed",
        finished=True,
    )
    return decision_sim.Outcome(result.decision, look + 1, result.counted and result.p_value < criteria.alpha)


def row(method: str, lift: float, outcomes: list[decision_sim.Outcome]) -> dict[str, Any]:
    tests = len(outcomes)
    return {
        "method": method,
        "true_lift": lift,
        "tests": tests,
        "promote_rate": sum(o.decision == "promote" for o in outcomes) / tests,
        "reject_rate": sum(o.decision == "reject" for o in outcomes) / tests,
        "ever_significant_rate": sum(o.ever_significant for o in outcomes) / tests,
        "median_hours_to_decision": statistics.median(o.hours for o in outcomes),
    }


def engagement_sd(design: decision_sim.StreamDesign, rng: np.random.Generator) -> float:
    """The per-post engagement standard deviation of the simulated streams (what a planner knows)."""
    sums = decision_sim.hourly_sums(rng, decision_sim.StreamDesign(posts_per_hour=2000, hours=24), 0.0)
    n, s, ss = sums["eng_n"].sum(), sums["eng_sum"].sum(), sums["eng_sumsq"].sum()
    return float(np.sqrt((ss - s * s / n) / (n - 1)))


def main() -> None:
    _harness.exit_cleanly_on_sigterm()
    tests = _harness.env_int("DECISION_BENCH_TESTS", 1000)
    design = decision_sim.StreamDesign()
    plain = decision_sim.engagement_criteria(variance_reduction="off")
    cuped = decision_sim.engagement_criteria(variance_reduction="auto")
    sd = engagement_sd(design, np.random.default_rng(1))
    mean = decision_sim.BASE_ENGAGEMENT
    horizons: dict[str, float | None] = {}
    for lift in LIFTS:
        if lift == 0:
            horizons[str(lift)] = None
            continue
        plan = stats.power_plan(
            mean, sd, design.posts_per_hour, design.candidate_share, design.hours, abs(lift), plain.alpha, 0.8
        )
        horizons[str(lift)] = round(plan.hours_needed, 2)
    horizon = int(np.ceil(horizons["0.2"] or design.hours))

    rows, details = [], {"rho2": [], "variance_reduction": [], "effective_sample_size_ratio": []}
    started = time.perf_counter()
    for index, lift in enumerate(LIFTS):
        rng = np.random.default_rng(1000 + index)
        streams = [decision_sim.hourly_sums(rng, design, lift) for _ in range(tests)]
        outcomes: dict[str, list[decision_sim.Outcome]] = {m: [] for m in METHODS}
        for sums in streams:
            outcomes["ours"].append(decision_sim.run_test(sums, design, plain))
            outcomes["ours_cuped"].append(decision_sim.run_test(sums, design, cuped))
            outcomes["fixed_horizon"].append(fixed_outcome(sums, horizon, design, plain))
        for looks in gbstats_looks(streams, plain.alpha, plain.min_samples_per_arm):
            outcomes["gbstats_sequential"].append(gbstats_outcome(looks, plain))
        if lift == 0.0:  # the variance reduction CUPED measures at the end of a week of A/A
            for sums in streams[:200]:
                cumulative = {k: np.cumsum(v, axis=1) for k, v in sums.items()}
                inputs = analysis.LookInputs.from_aggregates(
                    decision_sim.aggregates_at(cumulative, design.hours - 1), design.candidate_share
                )
                reduction = analysis.analyze_look(inputs, cuped).variance_reduction
                details["rho2"].append(reduction["rho2"])
                details["variance_reduction"].append(reduction["variance_reduction"])
                details["effective_sample_size_ratio"].append(
                    reduction["effective_sample_size"] / reduction["sample_size"]
                )
        rows += [row(method, lift, outcomes[method]) for method in METHODS]
        print(
            f"true lift {lift:+.0%}: {tests} tests, {time.perf_counter() - started:.0f} s so far", flush=True
        )

    _harness.print_table(
        f"Decisions over {tests} simulated tests per lift (60 posts/h, 90/10, hourly looks, a week)",
        ["method", "true lift", "promote", "reject", "ever significant", "median h to decision"],
        [
            [
                r["method"],
                r["true_lift"],
                r["promote_rate"],
                r["reject_rate"],
                r["ever_significant_rate"],
                r["median_hours_to_decision"],
            ]
            for r in rows
        ],
        [f"fixed horizon (80% power): {horizons} hours; the fixed_horizon rows look once at {horizon} h"],
    )
    ramps: dict[str, Any] = {}
    ramp_tests = _harness.env_int("DECISION_BENCH_RAMPS", 20)
    clock_hours = 24 * 9  # the seed's ramp: 10% then +10% every 24 h
    for posts_per_hour in (600, 6000, 432_000):  # 432k/h: the demo's simulator (120 posts/s)
        ramp_design = decision_sim.RampDesign(posts_per_hour=posts_per_hour)
        rng = np.random.default_rng(posts_per_hour)
        results = [
            decision_sim.simulate_ramp(rng, ramp_design, analysis.Criteria()) for _ in range(ramp_tests)
        ]
        ramps[str(posts_per_hour)] = {
            "ramps": ramp_tests,
            "completed_rate": sum(r == "completed" for r, _ in results) / ramp_tests,
            "rolled_back_rate": sum(r == "rolled_back" for r, _ in results) / ramp_tests,
            "median_hours_to_100": statistics.median(h for _, h in results),
            "clock_hours_to_100": clock_hours,
        }
    _harness.print_table(
        f"Evidence ramp of an as-good candidate to 100% ({ramp_tests} rollouts per traffic; 2 h dwell)",
        ["posts/h", "completed", "rolled back", "median h to 100%", "clock h"],
        [
            [
                int(k),
                v["completed_rate"],
                v["rolled_back_rate"],
                v["median_hours_to_100"],
                v["clock_hours_to_100"],
            ]
            for k, v in ramps.items()
        ],
    )
    aa = {r["method"]: r["ever_significant_rate"] for r in rows if r["true_lift"] == 0.0}
    summary = {
        "tests_per_lift": tests,
        "alpha": plain.alpha,
        "min_samples_per_arm": plain.min_samples_per_arm,
        "aa_ever_significant": {
            m: {"rate": rate, "standard_error": decision_sim.standard_error(rate, tests)}
            for m, rate in aa.items()
        },
        "cuped_at_one_week": {k: float(np.mean(v)) for k, v in details.items()},
        "evidence_ramp": ramps,
        "engagement_sd": sd,
        "design": design.__dict__,
        "machine": _harness.machine(),
        "seconds": time.perf_counter() - started,
    }
    print(
        json.dumps(
            {"aa_ever_significant": summary["aa_ever_significant"], "cuped": summary["cuped_at_one_week"]}
        )
    )
    _harness.write_results("decision", {"rows": rows, "fixed_horizon_hours": horizons})
    _harness.write_results("decision_details", summary)


if __name__ == "__main__":
    main()
