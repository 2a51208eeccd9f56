"""Sample ratio mismatch at every hourly look: false alarms on sound splits, and real ones found.

    python bench/srm_bench.py     # BENCH_SRM_TESTS sound-split tests per design (default 2000),
                                  # BENCH_SRM_MISMATCH_TESTS broken-split ones (default 500)

Each test is a week of :mod:`fine_tuning.dev.decision_sim` streams through the evaluate step's
whole path (per-post random assignment, the SQL aggregates' shape, ``analyze_look`` every hour
from the first post, stopping at its decision), with the pipeline's SRM test: the always-valid
beta-binomial one (``stats.srm_p_value``). On the same looks, the chi-square it replaced is
computed from the arms' post counts once both have ``min_samples_per_arm`` posts, up to the
test's decision: what the pipeline flagged before.

Designs: 60 posts/h at 90/10 (the decision bench's) and 600 posts/h at 80/20 (the lifecycle's).
Sound splits assign the planned share; broken ones serve the candidate 80% of it (a fifth of its
posts lost). Writes ``bench/results/srm.json``: the share of tests flagged (± standard error)
and, for broken splits, the median hour of detection.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import _harness
import numpy as np
from scipy.stats import chisquare

from fine_tuning.dev import decision_sim

DESIGNS = ((60.0, 0.1), (600.0, 0.2))


def chi_square_flagged(sums: dict[str, np.ndarray], design: decision_sim.StreamDesign, until_hour: float,
                       srm_alpha: float, min_n: int) -> bool:
    n = np.cumsum(sums["eng_n"], axis=1)[:, : int(until_hour)]
    observed = n[:, (n >= min_n).all(axis=0)]  # the looks that count, one column each
    if observed.shape[1] == 0:
        return False
    share = design.candidate_share
    expected = observed.sum(axis=0) * np.array([[1 - share], [share]])
    return bool((chisquare(observed, expected, axis=0).pvalue < srm_alpha).any())


def share_row(label: str, flags: list[bool]) -> dict[str, Any]:
    share = sum(flags) / len(flags)
    return {"design": label, "tests": len(flags), "flagged": sum(flags), "share": share,
            "standard_error": decision_sim.standard_error(share, len(flags))}


def main() -> None:
    _harness.exit_cleanly_on_sigterm()
    tests = _harness.env_int("BENCH_SRM_TESTS", 2000)
    mismatch_tests = _harness.env_int("BENCH_SRM_MISMATCH_TESTS", 500)
    criteria = decision_sim.engagement_criteria(variance_reduction="off")
    rng = np.random.default_rng(2026)
    started = time.perf_counter()
    sound, broken = [], []
    for posts_per_hour, share in DESIGNS:
        label = f"{posts_per_hour:.0f} posts/h, {share:.0%} candidate"
        design = decision_sim.StreamDesign(posts_per_hour=posts_per_hour, candidate_share=share)
        ours, old = [], []
        for _ in range(tests):
            sums = decision_sim.hourly_sums(rng, design, 0.0)
            outcome = decision_sim.run_test(sums, design, criteria)
            ours.append(outcome.srm_hour is not None)
            old.append(chi_square_flagged(sums, design, outcome.hours, criteria.srm_alpha,
                                          criteria.min_samples_per_arm))
        sound.append({"always_valid": share_row(label, ours), "chi_square": share_row(label, old)})
        lossy = decision_sim.StreamDesign(posts_per_hour=posts_per_hour, candidate_share=share,
                                          assigned_share=0.8 * share)
        hours = []
        for _ in range(mismatch_tests):
            outcome = decision_sim.run_test(decision_sim.hourly_sums(rng, lossy, 0.0), lossy, criteria)
            hours.append(outcome.srm_hour)
        found = [h for h in hours if h is not None]
        broken.append({**share_row(label, [h is not None for h in hours]),
                       "median_hour_found": statistics.median(found) if found else None})
    seconds = round(time.perf_counter() - started, 1)

    _harness.print_table(
        f"sound splits, a look every hour for a week ({tests} tests each, srm_alpha {criteria.srm_alpha})",
        ["design", "always-valid flagged", "± se", "chi-square flagged", "± se"],
        [[s["always_valid"]["design"], s["always_valid"]["share"], s["always_valid"]["standard_error"],
          s["chi_square"]["share"], s["chi_square"]["standard_error"]] for s in sound],
    )
    _harness.print_table(
        f"the candidate served 80% of its planned share ({mismatch_tests} tests each)",
        ["design", "found within the week", "± se", "median hour found"],
        [[b["design"], b["share"], b["standard_error"], b["median_hour_found"]] for b in broken],
        [f"{seconds} s"],
    )
    _harness.write_results("srm", {
        "machine": _harness.machine(), "srm_alpha": criteria.srm_alpha, "sound_splits": sound,
        "broken_splits": broken, "seconds": seconds,
    })


if __name__ == "__main__":
    main()
