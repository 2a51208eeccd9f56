"""A/B evaluation at scale: the per-arm aggregates in SQL, with and without the shipped indexes.

    python bench/eval_bench.py            # 1M and 10M posts (BENCH_MAX_POSTS caps)

For each size N, a throwaway schema holds N posts over 12 weeks, in insertion order as the agent
writes them: an older model's for 6 weeks, then the baseline's; during the last 7 days, an A/B
test in which 10% of posts are the candidate's (see ``_harness.AB_POSTS_SQL``; some rows are not
scored yet, NaN, without cost or quality, or failed). The table is UNLOGGED, to load it faster;
reading it is the same.

Then, in fresh child processes: ``fine_tuning.evaluate.ab.arm_aggregates`` over the test's window (the one
query per look of the evaluation and of the status API), BENCH_EVAL_REPEATS times (default 5,
the median reported), without any index on posts but its primary key, then with the indexes the
migrations create, then with a covering index in place of (model_id, ts) (not shipped: measured so
that the choice has its figures); the plan of each case (EXPLAIN ANALYZE); the statements sent,
counted by a proxy. Each case is VACUUMed first (all pages all-visible: the best case for an
index-only scan; on a live table only the pages vacuumed since their insert are), and the OS
page cache is warm (the table was just written; nothing drops the caches). Before a time is
reported, each case's aggregates must equal a naive Python pass over the test's rows (counts
exactly, sums and the p95 to 1e-9). Writes ``eval.json``.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import _harness

DEFAULT_SIZES = (1_000_000, 10_000_000)
WINDOW_END = datetime(2026, 11, 1, tzinfo=UTC)
HISTORY_START = WINDOW_END - timedelta(weeks=12)
TEST_START = WINDOW_END - timedelta(days=7)
BASELINE, CANDIDATE = "bench-baseline", "bench-candidate"
REL_TOL = 1e-9
# Not shipped: measured beside the shipped indexes so that the choice has its figures. It would
# replace posts_model_ts_idx (the ts index stays: collection filters on ts alone).
COVERING_NAME = "posts_model_ts_covering_idx"
COVERING_REPLACES = "posts_model_ts_idx"
COVERING_INDEX = (
    f"CREATE INDEX {COVERING_NAME} ON posts (model_id, ts) "
    "INCLUDE (engagement_rate, cost_usd, tokens_used, response_time_ms, quality_score, is_error)"
)
CASES = {
    "none": "none",
    "shipped": "shipped",
    "covering": "covering (not shipped)",
}


def _window() -> dict[str, Any]:
    # The CUPED covariate's pre-period: the evaluate step's default of 28 days before the test.
    return {
        "baseline": BASELINE,
        "candidate": CANDIDATE,
        "start": TEST_START,
        "end": WINDOW_END,
        "covariate_start": TEST_START - timedelta(days=28),
    }


def child_ours(url: str, repeats: int) -> None:
    from fine_tuning.evaluate import ab

    times, aggregates = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        aggregates = ab.arm_aggregates(url, **_window())
        times.append(time.perf_counter() - started)
    print(json.dumps({"times": times, "aggregates": aggregates, "peak_rss_mb": _harness.peak_rss_mib()}))


def child_naive(url: str) -> None:
    """The test's rows streamed into Python, every aggregate computed there."""
    import numpy as np

    from fine_tuning.infra import db
    from fine_tuning.evaluate.ab import ARM_FIELDS

    started = time.perf_counter()
    # The CUPED covariate's sums (x_*) are checked against the rows by the unit test
    # test_covariate_and_p95_sums_in_sql_match_the_rows; here the naive pass leaves them out.
    fields = [f for f in ARM_FIELDS if not f.startswith(("x_", "xy_"))]
    sums = {arm: dict.fromkeys(fields, 0.0) for arm in ("baseline", "candidate")}
    response_times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    engagements: dict[str, list[float]] = {"baseline": [], "candidate": []}
    with db.connect(url) as conn, conn.cursor(name="naive_evaluation") as cursor:
        cursor.execute(
            "SELECT model_id, engagement_rate, cost_usd, tokens_used, response_time_ms, quality_score,"
            " is_error FROM posts WHERE model_id IN (%(baseline)s, %(candidate)s)"
            " AND ts >= %(start)s AND ts < %(end)s",
            _window(),
        )
        for model, engagement, cost, tokens_used, response_time, quality, is_error in cursor:
            arm = "candidate" if model == CANDIDATE else "baseline"
            s = sums[arm]
            s["posts"] += 1
            if engagement is not None and 0 <= engagement <= 1:  # NaN fails both comparisons
                s["eng_n"] += 1
                s["eng_sum"] += engagement
                s["eng_sumsq"] += engagement * engagement
                engagements[arm].append(engagement)
            if cost is not None and tokens_used is not None and tokens_used > 0:
                s["cost_n"] += 1
                s["cost_sum"] += cost
                s["cost_sumsq"] += cost * cost
                s["tok_sum"] += tokens_used
                s["tok_sumsq"] += float(tokens_used) * tokens_used
                s["cost_tok_sum"] += cost * tokens_used
            if response_time is not None:
                s["rt_n"] += 1
                s["rt_sum"] += response_time
                s["rt_sumsq"] += response_time * response_time
                response_times[arm].append(response_time)
            if quality is not None:
                s["q_n"] += 1
                s["q_sum"] += quality
                s["q_sumsq"] += quality * quality
            if is_error:
                s["errors"] += 1
    for arm, values in response_times.items():
        # percentile_cont interpolates linearly between the closest ranks, as numpy's default does.
        sums[arm]["rt_p95"] = float(np.percentile(values, 95)) if values else None
    for arm, values in engagements.items():
        sums[arm]["eng_p95"] = float(np.percentile(values, 95)) if values else None
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "aggregates": sums, "peak_rss_mb": _harness.peak_rss_mib()}))


def _run_child(args: list[str], proxy: _harness.CountingProxy | None = None) -> dict[str, Any]:
    if proxy is not None:
        proxy.take()
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{done.stderr[-4000:]}")
    result = _harness.child_result(done.stdout)
    if proxy is not None:
        result["statements"] = dict(proxy.take())
    return result


def _check(
    case: str, n_posts: int, actual: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]
) -> None:
    for arm, fields in expected.items():
        for field, want in fields.items():
            got = actual[arm][field]
            if want is None or got is None:
                ok = want is None and got is None
            else:
                ok = math.isclose(got, want, rel_tol=REL_TOL, abs_tol=1e-12)
            if not ok:
                raise AssertionError(
                    f"{n_posts} posts, {case}: {arm}.{field} is {got!r} in SQL, {want!r} naively"
                )


def _plan(url: str) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the aggregate query: its scans, its sort, the blocks it read."""
    from fine_tuning.evaluate import ab
    from fine_tuning.infra import db

    with db.connect(url) as conn:
        explained = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + ab.AGGREGATE_QUERY, _window())
        plan = explained.fetchone()[0][0]
    scans, sorts = [], []

    def walk(node: dict[str, Any]) -> None:
        if "Scan" in node["Node Type"] and not node["Node Type"].startswith("Bitmap Index"):
            parallel = "Parallel " if node.get("Parallel Aware") else ""
            index = f" ({node['Index Name']})" if node.get("Index Name") else ""
            scans.append(f"{parallel}{node['Node Type']}{index}")
        if node["Node Type"] == "Bitmap Heap Scan":
            used = [p["Index Name"] for p in node.get("Plans", []) if p.get("Index Name")]
            scans[-1] += f" ({', '.join(used)})"
        if node.get("Sort Method"):
            space = f"{node['Sort Space Used']} kB {node['Sort Space Type'].lower()}"
            sorts.append(f"{node['Sort Method']} {space}")
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    top = plan["Plan"]
    return {
        "scan": ", ".join(dict.fromkeys(scans)),
        "sort": "; ".join(dict.fromkeys(sorts)) or None,
        "execution_ms": round(plan["Execution Time"], 1),
        "shared_blocks_hit": top.get("Shared Hit Blocks"),
        "shared_blocks_read": top.get("Shared Read Blocks"),
        "temp_blocks_written": top.get("Temp Written Blocks"),
    }


def _build_index(conn: Any, name: str, definition: str) -> dict[str, Any]:
    started = time.perf_counter()
    conn.execute(definition)
    seconds = time.perf_counter() - started
    size = conn.execute("SELECT pg_relation_size(%s::regclass)", (name,)).fetchone()[0]
    return {"definition": definition, "build_seconds": round(seconds, 2), "size_mb": round(size / 2**20, 1)}


def bench(
    n_posts: int, repeats: int, proxy: _harness.CountingProxy
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from fine_tuning.infra import db

    rows: list[dict[str, Any]] = []
    with _harness.throwaway_schema() as url:
        with db.connect(url, autocommit=True) as conn:
            shipped = conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                "AND tablename = 'posts' AND indexname <> 'posts_pkey' ORDER BY indexname"
            ).fetchall()
            for name, _ in shipped:
                conn.execute(f'DROP INDEX "{name}"')
            conn.execute("ALTER TABLE posts SET UNLOGGED")
            started = time.perf_counter()
            _harness.insert_ab_posts(
                conn, n_posts, baseline=BASELINE, candidate=CANDIDATE, start=HISTORY_START, end=WINDOW_END,
                window_start=TEST_START, older_until=HISTORY_START + (WINDOW_END - HISTORY_START) / 2,
            )
            load_seconds = time.perf_counter() - started
            conn.execute("VACUUM ANALYZE posts")
            table_mb = conn.execute("SELECT pg_total_relation_size('posts')").fetchone()[0] / 2**20
            window_posts = conn.execute(
                "SELECT count(*) FROM posts WHERE model_id IN (%(baseline)s, %(candidate)s) "
                "AND ts >= %(start)s AND ts < %(end)s", _window(),
            ).fetchone()[0]

        naive = _run_child(["naive", url])
        indexes: dict[str, Any] = {}
        for case in ("none", "shipped", "covering"):
            with db.connect(url, autocommit=True) as conn:
                if case == "shipped":
                    for name, definition in shipped:
                        indexes[name] = _build_index(conn, name, definition)
                elif case == "covering":
                    conn.execute(f'DROP INDEX "{COVERING_REPLACES}"')
                    indexes[COVERING_NAME] = _build_index(conn, COVERING_NAME, COVERING_INDEX)
                # Statistics, and the visibility map: every page all-visible, the best case for an
                # index-only scan (on a live table only pages vacuumed since their insert are).
                conn.execute("VACUUM ANALYZE posts")
                in_use = [row[0] for row in conn.execute(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                    "AND tablename = 'posts' AND indexname <> 'posts_pkey' ORDER BY indexname").fetchall()]
            plan = _plan(url)
            ours = _run_child(["ours", proxy.conninfo(url), str(repeats)], proxy)
            _check(case, n_posts, ours["aggregates"], naive["aggregates"])
            rows.append({
                "posts": n_posts,
                "window_posts": window_posts,
                "index": CASES[case],
                "indexes": in_use,
                "seconds": round(statistics.median(ours["times"]), 4),
                "seconds_first": round(ours["times"][0], 4),
                "peak_rss_mb": round(ours["peak_rss_mb"], 1),
                # The aggregate query starts with WITH (the CUPED pre-period CTE) or SELECT.
                "queries_per_evaluation": (ours["statements"].get("SELECT", 0) + ours["statements"].get("WITH", 0))
                / repeats,
                "statements": ours["statements"],
                "plan": plan,
                "naive_seconds": round(naive["seconds"], 3),
                "naive_peak_rss_mb": round(naive["peak_rss_mb"], 1),
                "check": "equal to the naive Python pass",
            })
        print(f"  {n_posts:,} posts: checked (aggregates equal the naive pass); "
              + ", ".join(f"{r['index']} {r['seconds']:.3f}s" for r in rows), flush=True)
    data = {"posts": n_posts, "window_posts": window_posts, "load_seconds": round(load_seconds, 1),
            "table_mb": round(table_mb, 1), "indexes": indexes}
    return rows, data


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        if argv[1] == "ours":
            child_ours(argv[2], int(argv[3]))
        else:
            child_naive(argv[2])
        return
    _harness.exit_cleanly_on_sigterm()
    sizes = sorted(int(arg.replace("_", "")) for arg in argv) or _harness.bench_sizes(DEFAULT_SIZES)
    repeats = _harness.env_int("BENCH_EVAL_REPEATS", 5)
    info = _harness.machine()
    print(_harness.machine_line(info))
    rows, data = [], []
    with _harness.CountingProxy.for_url(_harness.BASE_URL) as proxy:
        for n_posts in sizes:
            size_rows, size_data = bench(n_posts, repeats, proxy)
            rows += size_rows
            data.append(size_data)
    _harness.print_table(
        f"A/B evaluation: arm_aggregates over the 7-day test window (median of {repeats}, warm cache; "
        f"{info['cores']} cores, {info['memory_gib']} GiB)",
        ["posts", "window posts", "index", "seconds", "1st call s", "peak RSS MiB", "queries", "scan", "sort",
         "naive s", "naive RSS MiB"],
        [
            (r["posts"], r["window_posts"], r["index"], r["seconds"], r["seconds_first"],
             r["peak_rss_mb"], r["queries_per_evaluation"], r["plan"]["scan"], r["plan"]["sort"],
             r["naive_seconds"], r["naive_peak_rss_mb"])
            for r in rows
        ],
        notes=[
            "queries: SELECTs per evaluation, counted at the socket "
            f"({_harness.statements_summary(Counter(rows[-1]['statements']))} for {repeats} evaluations)",
            "indexes: " + "; ".join(f"{name} {d['size_mb']:,.0f} MiB, built in {d['build_seconds']:.1f}s"
                                    for name, d in data[-1]["indexes"].items())
            + f" (at {data[-1]['posts']:,} posts, table {data[-1]['table_mb']:,.0f} MiB); covering = "
            f"{COVERING_REPLACES} replaced by ({COVERING_INDEX.split('(', 1)[1]}",
            "peak RSS is the evaluating client's; PostgreSQL's sort memory is in 'sort' (work_mem "
            f"{info['postgresql_settings'].get('work_mem', '?')})",
            "checked: every case's aggregates equal a naive Python pass over the test's rows",
        ],
    )
    _harness.write_results("eval", {"rows": rows, "machine": info, "data": data})


if __name__ == "__main__":
    main(sys.argv[1:])
