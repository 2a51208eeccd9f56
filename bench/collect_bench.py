"""Collection at scale: ours against the naive way and against the physical limit.

    python bench/collect_bench.py              # 10k, 100k, 1M and 5M posts (BENCH_MAX_POSTS caps)
    python bench/collect_bench.py 250000       # any sizes

For each size N: seed N synthetic posts (``fine_tuning.dev.seed``) into a throwaway schema, then on
the same data, each in a fresh child process:

* ours: ``collect_training_data`` with ``max_records=N`` (so LIMIT cuts nothing);
* naive: the same function with the query replaced by "fetch every row of posts into Python,
  filter, sort and limit there" (the rows then become examples by the same code);
* the limit: ``COPY (the same SELECT, same parameters) TO STDOUT`` by psql into /dev/null, best
  of three: what PostgreSQL and the socket can deliver with no client work at all.

ours and naive connect through a proxy that counts the statements they send (FETCH continues a
query, so it is counted apart). Before any time is reported, naive and ours must agree on every
count of the manifest and on the examples themselves (the same multiset of JSONL lines).
Writes ``collect.json`` (see _harness for the environment).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _harness

DEFAULT_SIZES = (10_000, 100_000, 1_000_000, 5_000_000)
WINDOW_END = datetime(2026, 11, 1, tzinfo=UTC)
# What must be the same for naive and ours (paths, timing, the run's ids may differ).
COMPARED_FIELDS = ("status", "posts_scanned", "examples_written", "rejected", "duplicates", "tokens", "bytes",
                   "dropped_examples", "pii_found", "self_generated", "validation_examples", "validation_tokens")
PEAK_RSS_GOAL_MB = 150


def _config(url: str, n_posts: int) -> Any:
    from fine_tuning.config import load_config

    return load_config(
        env={},
        params={"max_records": n_posts, "training_data_threshold": 10, "services": {"database_url": url}},
    )


def _fetch_all_then_filter(database_url: str, params: dict[str, Any], chunk_size: int) -> Any:
    """The naive way: every row of posts into Python, then the query's WHERE, ORDER BY and LIMIT
    in Python, with PostgreSQL's semantics (NULL engagement counts as 0, NaN is the greatest).
    Yields the query's columns in chunks, as ``collect._stream_posts`` does."""
    from fine_tuning.infra import db

    with db.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id, persona_id, hook, body, engagement_rate, ts, model_id FROM posts"
        ).fetchall()
        candidates = {model for (model,) in conn.execute("SELECT candidate_model FROM ab_tests")}
    start, end, threshold = params["start"], params["end"], params["threshold"]

    def selected(row: tuple[Any, ...]) -> bool:
        engagement = 0.0 if row[4] is None else row[4]
        return start <= row[5] < end and (math.isnan(engagement) or engagement >= threshold)

    def descending_nulls_last_then_id(row: tuple[Any, ...]) -> tuple[int, float, int]:
        engagement = row[4]
        if engagement is None:
            return (2, 0.0, row[0])
        return (0, 0.0, row[0]) if math.isnan(engagement) else (1, -engagement, row[0])

    kept = sorted((row for row in rows if selected(row)), key=descending_nulls_last_then_id)[: params["max_records"]]
    for at in range(0, len(kept), chunk_size):
        yield [(post_id, persona_id, hook, body, engagement, model_id in candidates)
               for post_id, persona_id, hook, body, engagement, _ts, model_id in kept[at:at + chunk_size]]


def child(mode: str, url: str, out_dir: str, n_posts: int) -> None:
    """In a fresh process: load the tokenizer, then collect (ours or naive) and print figures."""
    from fine_tuning.collect import dataset as collect
    from fine_tuning.collect import tokens
    from fine_tuning.manifests import RunContext

    config = _config(url, n_posts)
    tokens.encoding_for_model(config.training.base_model)  # loaded once per process by any step
    if mode == "naive":
        collect._stream_posts = _fetch_all_then_filter  # type: ignore[assignment]
    baseline_rss_mb = _harness.peak_rss_mib()
    started = time.perf_counter()
    manifest = collect.collect_training_data(
        config, RunContext(dag_id="bench", run_id=f"bench_{mode}_{n_posts}", window_end=WINDOW_END), out_dir
    )
    seconds = time.perf_counter() - started
    print(json.dumps({
        "seconds": seconds,
        "peak_rss_mb": _harness.peak_rss_mib(),
        "rss_before_collect_mb": baseline_rss_mb,
        "manifest": manifest.model_dump(mode="json"),
    }))


def _run_child(mode: str, url: str, n_posts: int, proxy: _harness.CountingProxy) -> dict[str, Any]:
    """Run one child through the counting proxy; add its statements and its dataset's fingerprint."""
    out_dir = tempfile.mkdtemp(prefix=f"collect_bench_{mode}_")
    try:
        proxy.take()
        done = subprocess.run(
            [sys.executable, __file__, "--child", mode, proxy.conninfo(url), out_dir, str(n_posts)],
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{mode} collect of {n_posts} posts failed:\n{done.stderr[-4000:]}")
        result = _harness.child_result(done.stdout)
        result["statements"] = dict(proxy.take())
        result["examples"] = _fingerprint(Path(out_dir) / "dataset.jsonl")
        return result
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _fingerprint(dataset: Path) -> dict[str, Any]:
    """Lines and an order-free digest of them: the sha256 of each line, summed mod 2^256 (two
    files agree iff they hold the same lines the same number of times, barring a collision)."""
    lines, total = 0, 0
    if dataset.exists():
        with dataset.open("rb") as handle:
            for line in handle:
                total += int.from_bytes(hashlib.sha256(line).digest(), "big")
                lines += 1
    return {"lines": lines, "multiset_sha256": f"{total % 2**256:064x}"}


def _query_params(url: str, n_posts: int) -> dict[str, Any]:
    """The parameters collect_training_data gives COLLECT_QUERY for the bench's run."""
    settings = _config(url, n_posts).data_collection
    return {
        "start": WINDOW_END - timedelta(days=settings.days_back),
        "end": WINDOW_END,
        "threshold": settings.engagement_threshold,
        "max_records": settings.max_records,
    }


def _copy_limit(url: str, n_posts: int) -> dict[str, Any]:
    """``COPY (the collect SELECT) TO STDOUT`` into /dev/null, best of three, by psql (libpq in C)
    when it is installed, else by psycopg; psql's own start (best of three ``SELECT 1``) is taken off."""
    import psycopg

    from fine_tuning.infra import db
    from fine_tuning.collect.dataset import COLLECT_QUERY

    with db.connect(url) as conn:
        select = psycopg.ClientCursor(conn).mogrify(COLLECT_QUERY, _query_params(url, n_posts))
    psql = shutil.which("psql")

    def best_of_three(statement: str) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            if psql:
                subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", statement],
                               stdout=subprocess.DEVNULL, check=True)
            else:
                with db.connect(url) as conn, conn.cursor().copy(statement) as copy:
                    with open(os.devnull, "wb") as sink:
                        for block in copy:
                            sink.write(block)
            times.append(time.perf_counter() - started)
        return min(times)

    copy_seconds = best_of_three(f"COPY ({select.strip()}) TO STDOUT")
    start_seconds = best_of_three("COPY (SELECT 1) TO STDOUT")
    return {
        "seconds": max(copy_seconds - start_seconds, 1e-3),
        "copy_seconds_best": round(copy_seconds, 3),
        "client_start_seconds": round(start_seconds, 3),
        "client": "psql" if psql else "psycopg",
    }


def _tokenizer_limit(url: str, n_posts: int) -> dict[str, Any]:
    """Seconds that tiktoken alone (Rust, one core: the GIL serializes the calls) needs for the
    texts collection must count exactly: each valid post's hook, body and body prompt. Rows are
    read and filtered as collection does, outside the clock. No exact collection in one
    process can be faster than this."""
    from fine_tuning.collect import dataset as collect
    from fine_tuning.infra import db
    from fine_tuning.collect import tokens

    config = _config(url, n_posts)
    encode = tokens.encoding_for_model(config.training.base_model).encode_ordinary
    body_prompt, limit = config.data_collection.body_prompt, config.training.context_limit()
    seconds, texts_counted = 0.0, 0
    with db.connect(url) as conn, conn.transaction(), conn.cursor(name="tokenizer_limit") as cursor:
        cursor.execute(collect.COLLECT_QUERY, _query_params(url, n_posts))
        while rows := cursor.fetchmany(5_000):
            texts = [
                text
                for _id, persona_id, hook, body, engagement, _self_generated in rows
                if collect._rejection(persona_id, hook, body, engagement) is None
                and not (collect._surely_over(hook, limit) or collect._surely_over(body, limit))
                for text in (hook, body, body_prompt.format(hook=hook))
            ]
            started = time.perf_counter()
            for text in texts:
                encode(text)
            seconds += time.perf_counter() - started
            texts_counted += len(texts)
    return {"seconds": seconds, "texts": texts_counted}


def _check(n_posts: int, ours: dict[str, Any], naive: dict[str, Any]) -> None:
    """Naive and ours must have made the same dataset before any of their times is reported."""
    for field in COMPARED_FIELDS:
        if ours["manifest"][field] != naive["manifest"][field]:
            raise AssertionError(
                f"{n_posts} posts: ours and naive differ in {field}: {ours['manifest'][field]!r} != "
                f"{naive['manifest'][field]!r}"
            )
    if ours["examples"] != naive["examples"]:
        raise AssertionError(f"{n_posts} posts: ours and naive wrote different examples: "
                             f"{ours['examples']} != {naive['examples']}")
    if ours["examples"]["lines"] != ours["manifest"]["examples_written"]:
        raise AssertionError(f"{n_posts} posts: the dataset has {ours['examples']['lines']} lines, "
                             f"the manifest says {ours['manifest']['examples_written']} examples")
    if ours["examples"]["lines"] == 0:
        raise AssertionError(f"{n_posts} posts: no examples at all; nothing was compared")


def _queries(statements: dict[str, int]) -> int:
    """Statements sent, a FETCH aside (it continues the query its cursor was declared for)."""
    return sum(n for kind, n in statements.items() if kind != "FETCH")


def bench(n_posts: int, proxy: _harness.CountingProxy) -> tuple[dict[str, Any], dict[str, Any]]:
    from fine_tuning.infra import db
    from fine_tuning.dev.seed import seed_posts

    with _harness.throwaway_schema() as url:
        with db.connect(url, autocommit=True) as conn:
            started = time.perf_counter()
            seed_posts(conn, n_posts, end=WINDOW_END)
            seed_seconds = time.perf_counter() - started
            conn.execute("VACUUM ANALYZE posts")
            table_mb = conn.execute("SELECT pg_total_relation_size('posts')").fetchone()[0] / 2**20
        copy = _copy_limit(url, n_posts)
        tokenizer = _tokenizer_limit(url, n_posts)
        ours = _run_child("ours", url, n_posts, proxy)
        naive = _run_child("naive", url, n_posts, proxy)
    _check(n_posts, ours, naive)
    row = {
        "posts": n_posts,
        "seconds": round(ours["seconds"], 3),
        "posts_per_s": round(n_posts / ours["seconds"], 1),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "queries": _queries(ours["statements"]),
        "copy_limit_posts_per_s": round(n_posts / copy["seconds"], 1),
        "naive_posts_per_s": round(n_posts / naive["seconds"], 1),
        "naive_peak_rss_mb": round(naive["peak_rss_mb"], 1),
    }
    detail = {
        "posts": n_posts,
        "seed_seconds": round(seed_seconds, 2),
        "table_mb": round(table_mb, 1),
        "rows_selected": ours["manifest"]["posts_scanned"],
        "examples_written": ours["manifest"]["examples_written"],
        "dataset_bytes": ours["manifest"]["bytes"],
        "rss_before_collect_mb": round(ours["rss_before_collect_mb"], 1),
        "statements": ours["statements"],
        "naive_statements": naive["statements"],
        "naive_seconds": round(naive["seconds"], 3),
        "copy_seconds": round(copy["seconds"], 3),
        "copy_seconds_best_with_client_start": copy["copy_seconds_best"],
        "copy_client_start_seconds": copy["client_start_seconds"],
        "copy_client": copy["client"],
        "tokenizer_seconds": round(tokenizer["seconds"], 3),
        "tokenizer_posts_per_s": round(n_posts / tokenizer["seconds"], 1),
        "tokenizer_texts": tokenizer["texts"],
        "check": "naive and ours: same manifest counts and the same multiset of example lines",
        "examples_fingerprint": ours["examples"],
        "dataset_sha256_equal": ours["manifest"]["sha256"] == naive["manifest"]["sha256"],
    }
    return row, detail


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], argv[3], int(argv[4]))
        return
    _harness.exit_cleanly_on_sigterm()
    sizes = sorted(int(arg.replace("_", "")) for arg in argv) or _harness.bench_sizes(DEFAULT_SIZES)
    info = _harness.machine()
    print(_harness.machine_line(info))
    rows, details = [], []
    with _harness.CountingProxy.for_url(_harness.BASE_URL) as proxy:
        for n_posts in sizes:
            row, detail = bench(n_posts, proxy)
            rows.append(row)
            details.append(detail)
            print(f"  {n_posts:,} posts: checked ({detail['examples_written']:,} examples, same as naive), "
                  f"ours {row['seconds']:.1f}s, naive {detail['naive_seconds']:.1f}s", flush=True)

    largest, smallest = rows[-1], rows[0]
    goals = {
        "peak_rss_under_150_mb_at_largest": largest["peak_rss_mb"] < PEAK_RSS_GOAL_MB,
        "peak_rss_growth_smallest_to_largest_mb": round(largest["peak_rss_mb"] - smallest["peak_rss_mb"], 1),
        "throughput_at_least_half_of_copy": all(
            r["posts_per_s"] >= 0.5 * r["copy_limit_posts_per_s"] for r in rows
        ),
        "queries_independent_of_n": len({r["queries"] for r in rows}) == 1,
        # Whether the throughput goal can be met at all while every text is tokenized exactly.
        "tokenizing_only_at_least_half_of_copy": all(
            d["tokenizer_posts_per_s"] >= 0.5 * r["copy_limit_posts_per_s"] for r, d in zip(rows, details)
        ),
    }
    _harness.print_table(
        f"Collection (posts/s = table posts / wall time of collect; "
        f"{info['cores']} cores, {info['memory_gib']} GiB)",
        ["posts", "seconds", "posts/s", "peak RSS MiB", "queries", "FETCHes", "COPY limit posts/s",
         "ours/COPY", "tokenizing only posts/s", "naive posts/s", "naive peak RSS MiB"],
        [
            (r["posts"], r["seconds"], r["posts_per_s"], r["peak_rss_mb"], r["queries"],
             d["statements"].get("FETCH", 0), r["copy_limit_posts_per_s"],
             f"{r['posts_per_s'] / r['copy_limit_posts_per_s']:.1%}", d["tokenizer_posts_per_s"],
             r["naive_posts_per_s"], r["naive_peak_rss_mb"])
            for r, d in zip(rows, details)
        ],
        notes=[
            "queries: statements sent apart from FETCH "
            f"({_harness.statements_summary(Counter(details[-1]['statements']))} "
            f"at {largest['posts']:,}); "
            f"naive: {_harness.statements_summary(Counter(details[-1]['naive_statements']))}",
            "peak RSS of the collecting process, with "
            f"{details[0]['rss_before_collect_mb']:.0f} MiB of imports and tokenizer before it starts",
            "checked: naive and ours wrote the same examples (same manifest counts, same multiset of JSONL "
            "lines)",
            "tokenizing only: tiktoken alone on the texts collection counts (hook, body, body prompt), one "
            "core; exact collection in one process cannot be faster",
            f"goals: peak RSS < {PEAK_RSS_GOAL_MB} MiB at the largest size: "
            f"{goals['peak_rss_under_150_mb_at_largest']}; "
            f">= half of COPY: {goals['throughput_at_least_half_of_copy']}; "
            f"queries independent of N: {goals['queries_independent_of_n']}",
        ],
    )
    _harness.write_results("collect", {"rows": rows, "machine": info, "goals": goals, "details": details})


if __name__ == "__main__":
    main(sys.argv[1:])
