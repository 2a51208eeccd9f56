"""The metrics cache under a status-polling workload: hit rate and read latency, cache vs PostgreSQL.

    python bench/cache_bench.py

The read path is the product's own: the ``GET /pipeline/evaluation/metrics/{ab_test_id}``
endpoint function with its config dependency (A/B test row from PostgreSQL, then per-arm
aggregates and the analysis of ``fine_tuning.evaluate.report``, cached in Redis under a key
holding the test's status (the look count is the entry's version), for ``evaluation.metrics_cache_ttl_seconds``), called
in-process by reader threads (the API server runs such sync endpoints in a thread pool), in
several processes (API server workers), each reader polling a random test, then waiting a think
time. Airflow's access check is left out.

Time is compressed (BENCH_CACHE_SPEEDUP, default 60: a real second is a simulated minute). The
clock the endpoint reads (``fine_tuning.clock.now_utc``) runs at that speed, and so do the TTL (5 min ->
5 s) and the writer, which inserts the agent's new posts into every test every 3 simulated
minutes (the metrics change) and makes an evaluation look every 60 (the key changes). The
readers' think time and the queries' cost stay real, so the hit rate measured is a lower bound
of the real one (entries live 60x fewer reads).

Each mode runs BENCH_CACHE_SECONDS (default 60) with the same workload: ``cache`` (TTL 300 s
simulated) and ``direct`` (TTL 0: every read goes to PostgreSQL). The hit rate is the share of
responses the readers got with ``cached=true``; the one the product counts in Redis (what the
dashboards show) is reported next to it. Checked before reporting: with the clock stopped, for
every test, a hit serves exactly what the miss computed, and a read straight from PostgreSQL
equals it (floats to 1e-9: a parallel plan's float sums differ in the last bits between runs).
Writes ``cache.json``.

The cache serves an expired entry for ``cache.stale_seconds`` more while one reader refreshes it
(BENCH_CACHE_STALE_SIM_SECONDS, default 300 simulated; 0 measures the cache without it). The
look count is the entry's version, not part of its key: after a look, readers get the last
look's report (with its age) until it is refreshed. Each look writes its report through, as the
evaluate step does (BENCH_CACHE_PUBLISH_LOOKS=0: looks that leave the cache alone); the tests'
last look before the bench has done so too.

Environment (besides _harness's): BENCH_CACHE_POSTS (default 1M, capped by BENCH_MAX_POSTS),
BENCH_CACHE_TESTS (4), BENCH_CACHE_READERS (32), BENCH_CACHE_PROCESSES (4),
BENCH_CACHE_THINK_SECONDS (0.5), BENCH_CACHE_SECONDS (60), BENCH_CACHE_SPEEDUP (60).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _harness

SIM_START = datetime(2026, 11, 1, tzinfo=UTC)
TEST_AGE = timedelta(days=6)  # the tests have run six of their seven days when the bench starts
SIM_TTL_SECONDS = 300
CHANGE_EVERY = timedelta(minutes=3)
LOOK_EVERY = timedelta(minutes=60)


def _sim_now(go_wall: float, speedup: float) -> datetime:
    return SIM_START + timedelta(seconds=(time.time() - go_wall) * speedup)


def _load_api() -> Callable[[str], Any]:
    """The plugin API's metrics read, as the API server serves a request: the config dependency
    (read on every request), then the endpoint function; the access check's value is None.
    (Airflow needs a home; the bench gives it a throwaway one.)"""
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="cache-bench-airflow-"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    plugins = str(_harness.REPO / "plugins")
    if plugins not in sys.path:
        sys.path.insert(0, plugins)
    from fine_tuning_airflow.api import deps
    from fine_tuning_airflow.api.routes import evaluation

    def read_metrics(ab_test_id: str) -> Any:
        return evaluation.ab_test_metrics(None, deps.configured(), ab_test_id)

    return read_metrics


def reader_process(test_ids: list[str], threads: int, think_seconds: float, speedup: float) -> None:
    """One API server worker: ``threads`` readers polling until told to stop; prints their reads."""
    import fine_tuning.clock
    from fine_tuning.config import load_config
    from fine_tuning.evaluate import ab, report

    read_metrics = _load_api()
    config = load_config()
    # Import and connect everything the read path uses (scipy for the analysis...) off the clock.
    test = ab.get_ab_test(config, test_ids[0])
    report.compute_metrics(config, test, SIM_START)
    print("ready", flush=True)
    go_wall, stop_wall = (float(x) for x in sys.stdin.readline().split())
    fine_tuning.clock.now_utc = lambda: _sim_now(go_wall, speedup)  # type: ignore[assignment]
    reads: list[list[Any]] = []  # [latency seconds, cached, age of the answer in seconds]
    lock = threading.Lock()

    def poll(seed: int) -> None:
        rng = random.Random(seed)
        time.sleep(rng.uniform(0, think_seconds))  # readers do not arrive in lockstep
        mine = []
        while time.time() < stop_wall:
            started = time.perf_counter()
            response = read_metrics(rng.choice(test_ids))
            mine.append([time.perf_counter() - started, response.cached, response.age_seconds])
            time.sleep(think_seconds)
        with lock:
            reads.extend(mine)

    time.sleep(max(0.0, go_wall - time.time()))
    workers = [threading.Thread(target=poll, args=(os.getpid() * 1000 + i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps({"reads": reads, "peak_rss_mb": _harness.peak_rss_mib()}), flush=True)


def _config_file(directory: Path, mode: str, key_prefix: str, ttl_seconds: int, stale_seconds: int) -> Path:
    path = directory / f"{mode}.json"
    path.write_text(json.dumps({
        "cache": {"key_prefix": key_prefix, "stale_seconds": stale_seconds},
        "evaluation": {"metrics_cache_ttl_seconds": ttl_seconds},
        # StatsD off: tests may listen on loopback for the pipeline's metrics.
        "monitoring": {"statsd_enabled": False},
    }))
    return path


def _create_tests(url: str, n_tests: int, posts_per_test: int) -> list[str]:
    """``n_tests`` running A/B tests, six days old, each with its posts so far."""
    from fine_tuning.infra import db
    from fine_tuning.config import load_config

    evaluation = load_config(env={}).evaluation
    criteria = {
        **evaluation.success_criteria.model_dump(),
        "significance_threshold": evaluation.significance_threshold,
        "method": evaluation.method,
        "srm_alpha": evaluation.srm_alpha,
        "guardrails": evaluation.guardrails.model_dump(),
    }
    started = SIM_START - TEST_AGE
    ids = []
    with db.connect(url, autocommit=True) as conn:
        for k in range(n_tests):
            ab_test_id = f"ab-bench-{k}"
            _harness.insert_ab_posts(
                conn, posts_per_test, baseline=f"bench-base-{k}", candidate=f"bench-cand-{k}",
                start=started, end=SIM_START, window_start=started,
            )
            conn.execute(
                """
                INSERT INTO ab_tests (id, model_type, baseline_model, candidate_model, traffic_split,
                                      started_at, planned_end_at, status, success_criteria, power_plan)
                VALUES (%s, 'body', %s, %s, 0.1, %s, %s, 'running', %s, %s)
                """,
                (ab_test_id, f"bench-base-{k}", f"bench-cand-{k}", started, started + timedelta(days=7),
                 json.dumps(criteria), json.dumps({"adequate": True, "message": "bench"})),
            )
            ids.append(ab_test_id)
        conn.execute("VACUUM ANALYZE posts")
    return ids


class Writer(threading.Thread):
    """The agent and the evaluation DAG in compressed time: every CHANGE_EVERY (simulated) new
    posts arrive in every test; every LOOK_EVERY an evaluation look bumps each test's look count."""

    def __init__(
        self, url: str, test_ids: list[str], posts_per_change: int, go_wall: float, speedup: float,
        config_file: Path, publish: bool,
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.test_ids, self.posts_per_change = url, test_ids, posts_per_change
        self.go_wall, self.speedup = go_wall, speedup
        self.config_file, self.publish = config_file, publish
        self.stop = threading.Event()
        self.changes = self.looks = 0
        self.error: BaseException | None = None

    def _publish(self, ab_test_id: str, now: datetime) -> None:
        """What the evaluate step does after its look: the look's report, written through."""
        from fine_tuning.config import load_config
        from fine_tuning.evaluate import ab, report
        from fine_tuning.infra.cache import MetricsCache

        config = load_config(env={**os.environ, "FINE_TUNING_CONFIG_FILE": str(self.config_file)})
        test = ab.get_ab_test(config, ab_test_id)
        aggregates = ab.test_aggregates(config, test, now)
        report.publish_look(config, MetricsCache.from_config(config), test, aggregates, now)

    def run(self) -> None:
        from fine_tuning.infra import db

        try:
            with db.connect(self.url, autocommit=True) as conn:
                last = SIM_START
                next_look = SIM_START + LOOK_EVERY / 2
                while not self.stop.wait(CHANGE_EVERY.total_seconds() / self.speedup):
                    now = _sim_now(self.go_wall, self.speedup)
                    for k, _ in enumerate(self.test_ids):
                        _harness.insert_ab_posts(
                            conn, self.posts_per_change, baseline=f"bench-base-{k}",
                            candidate=f"bench-cand-{k}", start=last, end=now, window_start=last,
                        )
                    last = now
                    self.changes += 1
                    if now >= next_look:
                        conn.execute(
                            "UPDATE ab_tests SET looks = looks + 1 WHERE id = ANY(%s)", (self.test_ids,)
                        )
                        if self.publish:
                            for ab_test_id in self.test_ids:
                                self._publish(ab_test_id, now)
                        self.looks += 1
                        next_look += LOOK_EVERY
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def _run_mode(mode: str, env: dict[str, str], test_ids: list[str], settings: dict[str, Any], url: str,
              posts_per_change: int) -> dict[str, Any]:
    import numpy as np

    processes = settings["processes"]
    readers = settings["readers"]
    per_process = [readers // processes + (i < readers % processes) for i in range(processes)]
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--reader", json.dumps(test_ids), str(threads),
             str(settings["think_seconds"]), str(settings["speedup"])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for threads in per_process if threads
    ]
    before_ready: list[str] = []  # Airflow's logging prints to stdout too
    try:
        for child in children:
            while (line := child.stdout.readline()) and line.strip() != "ready":  # type: ignore[union-attr]
                before_ready.append(line)
            if not line:
                raise RuntimeError(f"{mode} reader did not start:\n{child.communicate()[1][-4000:]}")
        go_wall = time.time() + 0.5
        stop_wall = go_wall + settings["seconds"]
        writer = Writer(url, test_ids, posts_per_change, go_wall, settings["speedup"],
                        Path(env["FINE_TUNING_CONFIG_FILE"]), settings["publish_looks"])
        if settings["publish_looks"]:  # the tests' last look before the bench, as it left the cache
            for ab_test_id in test_ids:
                writer._publish(ab_test_id, SIM_START)
        for child in children:
            child.stdin.write(f"{go_wall} {stop_wall}\n")  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
        time.sleep(max(0.0, go_wall - time.time()))
        writer.start()
        outputs = [child.communicate(timeout=settings["seconds"] + 600) for child in children]
        writer.stop.set()
        writer.join()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    if writer.error is not None:
        raise RuntimeError(f"the writer failed: {writer.error!r}")
    reads: list[list[Any]] = []
    peak_rss = []
    redis_given_up = 0
    for child, (stdout, stderr) in zip(children, outputs):
        if child.returncode != 0:
            raise RuntimeError(f"{mode} reader failed:\n{stderr[-4000:]}")
        # The cache logs once per process and outage when Redis fails it (a timeout counts).
        redis_given_up += sum("metrics cache: Redis at" in line for line in (stdout + stderr).splitlines())
        result = _harness.child_result(stdout)
        reads += result["reads"]
        peak_rss.append(result["peak_rss_mb"])
    redis_given_up += sum("metrics cache: Redis at" in line for line in before_ready)
    if not reads:
        raise RuntimeError(f"{mode}: no reads completed in {settings['seconds']} s")
    latencies = np.array([r[0] for r in reads]) * 1000
    hits = sum(1 for r in reads if r[1])
    ages = np.array([r[2] for r in reads])
    # The reads the cache answered, apart: a miss waits for the aggregates by nature (a new key:
    # the first read of a test, a new look); a hit should never wait for a recompute.
    hit_latencies = np.array([r[0] for r in reads if r[1]] or [0.0]) * 1000
    return {
        "mode": mode,
        "reads": len(reads),
        "reads_per_s": round(len(reads) / settings["seconds"], 1),
        "hit_rate": round(hits / len(reads), 4),
        "hits": hits,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "max_ms": round(float(latencies.max()), 2),
        "mean_ms": round(float(latencies.mean()), 2),
        "hits_p99_ms": round(float(np.percentile(hit_latencies, 99)), 2),
        "misses": len(reads) - hits,
        # How old the answers were (real seconds; x speedup for simulated): bounded by TTL + stale.
        "answer_age_p99_s": round(float(np.percentile(ages, 99)), 2),
        "answer_age_max_s": round(float(ages.max()), 2),
        "reader_peak_rss_mb": round(max(peak_rss), 1),
        "redis_given_up_logged": redis_given_up,
        "metric_changes": writer.changes,
        "evaluation_looks": writer.looks,
    }


def _check_cached_equals_direct(
    read_metrics: Callable[[str], Any], test_ids: list[str], files: dict[str, Path], cache: Any, at: datetime
) -> dict[str, Any]:
    """With the clock stopped at ``at``: a miss, a hit, and a read straight from PostgreSQL.

    The hit must be the miss exactly (what was computed is what is served). The direct read is a
    second execution of the aggregate query: a parallel plan adds the workers' partial float sums
    in whatever order they finish, so its sums may differ in the last bits; floats are compared to
    1e-9, everything else exactly.
    """
    import fine_tuning.clock

    fine_tuning.clock.now_utc = lambda: at  # type: ignore[assignment]
    _drop_keys(cache)
    largest_difference = 0.0
    for ab_test_id in test_ids:
        os.environ["FINE_TUNING_CONFIG_FILE"] = str(files["cache"])
        miss = read_metrics(ab_test_id)
        hit = read_metrics(ab_test_id)
        os.environ["FINE_TUNING_CONFIG_FILE"] = str(files["direct"])
        direct = read_metrics(ab_test_id)
        if miss.cached or not hit.cached or direct.cached:
            raise AssertionError(f"{ab_test_id}: expected miss, hit, direct; got cached={miss.cached}, "
                                 f"{hit.cached}, {direct.cached}")
        miss_body, hit_body, direct_body = (
            r.model_dump(exclude={"cached", "age_seconds"}) for r in (miss, hit, direct)
        )
        if hit_body != miss_body:
            raise AssertionError(f"{ab_test_id}: the cache served\n{hit_body}\nfor the computed\n{miss_body}")
        largest_difference = max(largest_difference, _relative_difference(hit_body, direct_body, ab_test_id))
    return {
        "tests": len(test_ids),
        "result": "a hit is the miss exactly; the read straight from PostgreSQL equals it (floats to 1e-9)",
        "largest_relative_float_difference": largest_difference,
    }


def _relative_difference(cached: Any, direct: Any, where: str) -> float:
    """The largest relative difference of two responses' floats; anything else must be equal."""
    if isinstance(cached, dict) and isinstance(direct, dict) and cached.keys() == direct.keys():
        return max((_relative_difference(cached[k], direct[k], f"{where}.{k}") for k in cached), default=0.0)
    if isinstance(cached, float) and isinstance(direct, float):
        if not math.isclose(cached, direct, rel_tol=1e-9, abs_tol=1e-300):
            raise AssertionError(f"{where}: cached {cached!r}, straight from PostgreSQL {direct!r}")
        return abs(cached - direct) / max(abs(cached), abs(direct)) if cached != direct else 0.0
    if cached != direct:
        raise AssertionError(f"{where}: cached {cached!r}, straight from PostgreSQL {direct!r}")
    return 0.0


def _drop_keys(cache: Any) -> None:
    from fine_tuning.infra.redis import shared_client as redis_client

    client = redis_client(_harness.REDIS_URL)
    keys = list(client.scan_iter(match=f"{cache.key_prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def main() -> None:
    if sys.argv[1:2] == ["--reader"]:
        reader_process(json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
        return
    _harness.exit_cleanly_on_sigterm()
    from fine_tuning.infra.cache import MetricsCache

    settings = {
        "posts": _harness.bench_sizes([_harness.env_int("BENCH_CACHE_POSTS", 1_000_000)])[0],
        "tests": _harness.env_int("BENCH_CACHE_TESTS", 4),
        "readers": _harness.env_int("BENCH_CACHE_READERS", 32),
        "processes": _harness.env_int("BENCH_CACHE_PROCESSES", 4),
        "think_seconds": _harness.env_float("BENCH_CACHE_THINK_SECONDS", 0.5),
        "seconds": _harness.env_float("BENCH_CACHE_SECONDS", 60.0),
        "speedup": _harness.env_float("BENCH_CACHE_SPEEDUP", 60.0),
    }
    settings["processes"] = min(settings["processes"], settings["readers"])
    ttl = max(1, round(SIM_TTL_SECONDS / settings["speedup"]))
    settings["ttl_real_seconds"] = ttl
    # Stale-while-revalidate window (cache.stale_seconds), simulated; 0 is the cache without it.
    settings["stale_sim_seconds"] = int(os.environ.get("BENCH_CACHE_STALE_SIM_SECONDS", "300"))
    if settings["stale_sim_seconds"] < 0:
        raise SystemExit("BENCH_CACHE_STALE_SIM_SECONDS must be >= 0")
    stale = round(settings["stale_sim_seconds"] / settings["speedup"])
    settings["stale_real_seconds"] = stale
    # 1: each look writes its report through, as the evaluate step does; 0: a look that leaves
    # the cache alone (its readers find the last look's report and one of them refreshes it).
    settings["publish_looks"] = _harness.env_int("BENCH_CACHE_PUBLISH_LOOKS", 1) == 1
    info = _harness.machine()
    print(_harness.machine_line(info))
    posts_per_test = max(1, settings["posts"] // settings["tests"])
    # The agent's rate: a test's posts so far over its six days, per CHANGE_EVERY.
    posts_per_change = max(1, round(posts_per_test * (CHANGE_EVERY / TEST_AGE)))
    workdir = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    with _harness.throwaway_schema() as url:
        key_prefix = f"bench:{os.getpid()}:{int(time.time())}:cache"
        cache = MetricsCache(_harness.REDIS_URL, key_prefix=key_prefix)
        files = {
            "cache": _config_file(workdir, "cache", key_prefix, ttl, stale),
            "direct": _config_file(workdir, "direct", key_prefix, 0, stale),
        }
        os.environ.update({"DATABASE_URL": url, "REDIS_URL": _harness.REDIS_URL})
        try:
            test_ids = _create_tests(url, settings["tests"], posts_per_test)
            rows = []
            for mode in ("cache", "direct"):
                env = {**os.environ, "FINE_TUNING_CONFIG_FILE": str(files[mode]),
                       "AIRFLOW_HOME": str(workdir / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
                before = cache.stats()
                row = _run_mode(mode, env, test_ids, settings, url, posts_per_change)
                after = cache.stats()
                # What the product counts in Redis (the hit rate the dashboards show) next to what
                # the readers got. They differ when Redis answers a lookup after the client's socket
                # timeout: redis-py sends the Lua script again (counted twice), or the process
                # gives up on Redis for a while (its reads are then counted nowhere in Redis).
                hits = (after.shared_hits or 0) - (before.shared_hits or 0)
                misses = (after.shared_misses or 0) - (before.shared_misses or 0)
                row["product_counted_hits_misses"] = [hits, misses]
                row["product_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else None
                rows.append(row)
                print(f"  {mode}: {row['reads']:,} reads, hit rate {row['hit_rate']:.1%}, "
                      f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                      f"p99 of hits {row['hits_p99_ms']:.1f} ms", flush=True)
            os.environ["AIRFLOW_HOME"] = str(workdir / "airflow")
            # The clock of the end of a run (the tests are still running then).
            at = SIM_START + timedelta(seconds=settings["seconds"] * settings["speedup"])
            check = _check_cached_equals_direct(_load_api(), test_ids, files, cache, at)
        finally:
            _drop_keys(cache)
    _harness.print_table(
        f"Metrics cache: status polling of {settings['tests']} A/B tests by {settings['readers']} readers "
        f"({settings['processes']} processes), {settings['seconds']:.0f} s per mode, "
        f"time x{settings['speedup']:.0f} ({info['cores']} cores, {info['memory_gib']} GiB)",
        ["mode", "reads", "reads/s", "hit rate", "p50 ms", "p99 ms", "max ms", "metric changes", "looks",
         "hit rate counted in Redis", "Redis given up"],
        [(r["mode"], r["reads"], r["reads_per_s"], f"{r['hit_rate']:.1%}", r["p50_ms"], r["p99_ms"],
          r["max_ms"], r["metric_changes"], r["evaluation_looks"],
          "-" if r["product_hit_rate"] is None else f"{r['product_hit_rate']:.1%}",
          r["redis_given_up_logged"]) for r in rows],
        notes=[
            f"{settings['posts']:,} posts ({posts_per_test:,} per test, +{posts_per_change} per test every 3 "
            f"simulated minutes); TTL {SIM_TTL_SECONDS} s simulated = {ttl} s real, stale-while-revalidate "
            f"{settings['stale_sim_seconds']} s simulated = {stale} s real (answers' age p99 "
            f"{rows[0]['answer_age_p99_s']} s, max {rows[0]['answer_age_max_s']} s real); "
            f"think time {settings['think_seconds']} s real",
            "a read is the endpoint function: the test's row from PostgreSQL (also on a hit), then Redis, "
            "or on a miss the aggregates and the analysis",
            "hit rate: responses with cached=true, as the readers got them; counted in Redis: the product's "
            "own counter (fine_tuning:cache:stats)",
            "checked: with the clock stopped, a hit is the miss exactly, and equals a read straight from "
            f"PostgreSQL (floats to 1e-9; largest: {check['largest_relative_float_difference']:.1e})",
        ],
    )
    _harness.write_results("cache", {"rows": rows, "settings": settings, "check": check, "machine": info})


if __name__ == "__main__":
    main()
