"""The bench scripts (`make bench`) keep working: each runs at a tiny size, checks its own result
and writes its JSON; and the compact digest set that keeps collection's memory flat."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fine_tuning.collect import dataset as collect

from support import REPO
TINY = {
    "BENCH_MAX_POSTS": "3000",
    "BENCH_EVAL_REPEATS": "2",
    "BENCH_CACHE_SECONDS": "3",
    "BENCH_CACHE_READERS": "4",
    "BENCH_CACHE_PROCESSES": "2",
    "BENCH_PARSE_REPEATS": "2",
}


def run_bench(script: str, results: Path, **sizes: str) -> dict[str, Any]:
    env = {**os.environ, **TINY, **sizes, "BENCH_RESULTS_DIR": str(results)}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    name = script.removesuffix("_bench.py").removesuffix(".py")
    return json.loads((results / f"{name}.json").read_text())


@pytest.mark.slow
def test_collect_bench(tmp_path: Path) -> None:
    result = run_bench("collect_bench.py", tmp_path)
    (row,) = result["rows"]  # every default size is capped to 3000
    assert set(row) == {"posts", "seconds", "posts_per_s", "peak_rss_mb", "queries", "copy_limit_posts_per_s",
                        "naive_posts_per_s", "naive_peak_rss_mb"}
    assert row["posts"] == 3000 and row["seconds"] > 0 and row["peak_rss_mb"] > 0
    (detail,) = result["details"]
    # One SELECT, through a cursor: DECLARE ... FETCH ... CLOSE in one read-only transaction.
    assert detail["statements"]["DECLARE"] == 1 and detail["statements"]["FETCH"] >= 1
    assert row["queries"] == sum(n for kind, n in detail["statements"].items() if kind != "FETCH")
    # The naive pass reads every post, and the models that are our own (ab_tests' candidates).
    assert detail["naive_statements"].get("SELECT") == 2
    assert detail["examples_fingerprint"]["lines"] == detail["examples_written"] > 0
    # The bound on exact collection: tiktoken alone on the texts it counts (3 per valid post).
    assert detail["tokenizer_posts_per_s"] > 0 and 0 < detail["tokenizer_texts"] <= 3 * detail["rows_selected"]
    assert "tokenizing_only_at_least_half_of_copy" in result["goals"]
    assert result["machine"]["cores"] >= 1


@pytest.mark.slow
def test_eval_bench(tmp_path: Path) -> None:
    result = run_bench("eval_bench.py", tmp_path)
    assert [r["index"] for r in result["rows"]] == ["none", "shipped", "covering (not shipped)"]
    for row in result["rows"]:
        assert row["posts"] == 3000 and 0 < row["window_posts"] < 3000
        assert row["queries_per_evaluation"] == 1  # one query per evaluation of a test
        assert row["check"] == "equal to the naive Python pass"
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0 and row["plan"]["scan"]
    assert result["rows"][0]["indexes"] == []
    assert {"posts_ts_idx", "posts_model_ts_idx"} <= set(result["rows"][1]["indexes"])


@pytest.mark.slow
def test_cache_bench(tmp_path: Path) -> None:
    result = run_bench("cache_bench.py", tmp_path)
    cache, direct = result["rows"]
    assert (cache["mode"], direct["mode"]) == ("cache", "direct")
    for row in (cache, direct):
        # Every read is a hit or a miss, as the readers saw it (cached=true or not).
        assert row["reads"] > 0 and row["hits"] + row["misses"] == row["reads"]
    # Bounded staleness: no answer is older than the TTL plus the stale window (the entry's whole
    # life in Redis), with a second for the read itself on a busy machine.
    settings = result["settings"]
    assert 0 < cache["answer_age_max_s"] <= settings["ttl_real_seconds"] + settings["stale_real_seconds"] + 1
    assert direct["hit_rate"] == 0 and cache["hit_rate"] > 0
    assert sum(cache["product_counted_hits_misses"]) > 0  # the product counted its lookups in Redis
    assert result["check"]["tests"] == 4


@pytest.mark.slow
def test_parse_time(tmp_path: Path) -> None:
    result = run_bench("parse_time.py", tmp_path)
    assert result["repeats"] == 2 and result["dags"] >= 1
    assert result["dagbag_parse_ms_median"] > 0
    assert result["heavy_modules_imported_at_parse"] == []


@pytest.mark.slow
def test_decision_bench(tmp_path: Path) -> None:
    env = {**os.environ, "DECISION_BENCH_TESTS": "4", "DECISION_BENCH_RAMPS": "1", "BENCH_RESULTS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "decision_bench.py")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "decision.json").read_text())
    assert {(r["method"], r["true_lift"]) for r in result["rows"]} == {
        (m, lift) for m in ("ours", "ours_cuped", "fixed_horizon", "gbstats_sequential") for lift in (-0.2, 0.0, 0.1, 0.2)
    }
    keys = {"method", "true_lift", "tests", "promote_rate", "reject_rate", "ever_significant_rate",
            "median_hours_to_decision"}
    assert all(set(r) == keys and r["tests"] == 4 for r in result["rows"])
    assert set(result["fixed_horizon_hours"]) == {"-0.2", "0.0", "0.1", "0.2"}


def test_digest_set_is_a_set_across_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collect._DigestSet, "_MERGE_AT", 64)  # many merges into the sorted buckets
    rng = random.Random(7)
    added = {0, 1, 2**56 - 1, 2**56, 2**63, 2**64 - 1} | {rng.getrandbits(64) for _ in range(5000)}
    others = {rng.getrandbits(64) for _ in range(5000)} - added
    digests = collect._DigestSet()
    for value in added:
        assert value not in digests
        digests.add(value)
    assert all(value in digests for value in added)
    assert not any(value in digests for value in others)


@pytest.mark.slow
def test_guard_bench(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_GUARD_REPS": "1", "BENCH_GUARD_EQUAL_REPS": "1", "BENCH_RESULTS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "guard_bench.py")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "guard.json").read_text())["results"]
    assert set(results) == {f"{k}/{m}" for k in ("worse", "broken", "slow") for m in ("guard", "hourly_only")} | {
        "equal/guard"
    }
    # A 30% error rate is rolled back by the guard when it watches, by the hourly check alone when not.
    assert (results["broken/guard"]["rolled_back"], results["broken/guard"]["by_guard"]) == (1, 1)
    assert (results["broken/hourly_only"]["rolled_back"], results["broken/hourly_only"]["by_guard"]) == (1, 0)


def test_srm_bench(tmp_path: Path) -> None:
    result = run_bench("srm_bench.py", tmp_path, BENCH_SRM_TESTS="20", BENCH_SRM_MISMATCH_TESTS="10")
    assert [s["always_valid"]["tests"] for s in result["sound_splits"]] == [20, 20]
    assert all(s["always_valid"]["flagged"] == 0 for s in result["sound_splits"])  # 0.1% at most: none of 20
    # A fifth of the candidate's posts lost is found at 600 posts/h within hours.
    assert result["broken_splits"][1]["flagged"] >= 9 and result["broken_splits"][1]["median_hour_found"] <= 24
