"""Collection throughput and memory at scale.

    python bench/collect_bench.py            # 100k and 1M posts
    python bench/collect_bench.py 250000     # any sizes

For each size: seed N synthetic posts into a throwaway schema (COPY), run collect with
max_records=N in a child process, print posts/s and the child's peak RSS, drop the schema.
The database is $TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import quote

DEFAULT_SIZES = (100_000, 1_000_000)
BASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
WINDOW_END = datetime(2026, 11, 1, tzinfo=UTC)


def _child(url: str, out_dir: str, max_records: int) -> None:
    """Run in the child: load the tokenizer, note RSS, collect, print the manifest's figures."""
    import psutil

    from fine_tuning import tokens
    from fine_tuning.collect import collect_training_data
    from fine_tuning.config import load_config
    from fine_tuning.manifests import RunContext

    config = load_config(env={}, params={"max_records": max_records, "services": {"database_url": url}})
    tokens.encoding_for_model(config.training.base_model)
    baseline_rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    manifest = collect_training_data(
        config, RunContext(dag_id="bench", run_id=f"bench_{max_records}", window_end=WINDOW_END), out_dir
    )
    seconds = time.perf_counter() - started
    print(json.dumps({"baseline_rss": baseline_rss, "seconds": seconds, **manifest.model_dump(mode="json")}))


def bench(n_posts: int) -> None:
    """Seed, collect in a child process, report, and drop the schema whatever happens."""
    from fine_tuning import db
    from fine_tuning.seed import seed_posts

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in BASE_URL else "?"
    url = f"{BASE_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    with db.connect(BASE_URL, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        with db.connect(url, autocommit=True) as conn:
            db.migrate(conn)
            started = time.perf_counter()
            seed_posts(conn, n_posts, end=WINDOW_END)
            seed_seconds = time.perf_counter() - started
            conn.execute("VACUUM ANALYZE posts")
        with tempfile.TemporaryDirectory(prefix="collect_bench_") as out_dir:
            done = subprocess.run(
                [sys.executable, __file__, "--child", url, out_dir, str(n_posts)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"collect child failed for {n_posts} posts:\n{done.stderr}")
            # The only child waited for so far in this process is this one per size, and
            # ru_maxrss of RUSAGE_CHILDREN is the largest of them: sizes run in ascending order.
            peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        with db.connect(BASE_URL, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')

    seconds = result["seconds"]
    print(
        f"{n_posts:>9,} posts seeded in {seed_seconds:5.1f}s ({n_posts / seed_seconds:,.0f} rows/s) | "
        f"collect {seconds:5.1f}s: {result['posts_scanned']:,} posts scanned "
        f"({result['posts_scanned'] / seconds:,.0f} posts/s, {n_posts / seconds:,.0f} table rows/s), "
        f"{result['examples_written']:,} examples, {result['bytes'] / 2**20:,.1f} MiB, "
        f"{result['tokens']:,} tokens | peak RSS {peak_rss_mb:,.0f} MiB "
        f"(after imports and tokenizer {result['baseline_rss'] / 2**20:,.0f} MiB)"
    )
    print(f"{'':>9}  rejected {result['rejected']}, duplicates {result['duplicates']}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2], int(argv[3]))
        return
    sizes = sorted(int(arg.replace("_", "")) for arg in argv) or list(DEFAULT_SIZES)
    for n_posts in sizes:
        bench(n_posts)


if __name__ == "__main__":
    main(sys.argv[1:])
