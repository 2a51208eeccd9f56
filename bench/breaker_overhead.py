"""Breaker overhead per call: a guarded no-op against the bare no-op, with Redis and without.

    python bench/breaker_overhead.py        # BREAKER_CALLS (default 5000) calls per variant

A guarded call costs two Redis round trips (admit, record: one Lua script each) on the shared
breaker; the per-process fallback costs a lock and a deque. Medians of 5 repetitions; prints
µs per call and writes ``bench/results/breaker_overhead.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "breaker_overhead.json"


def per_call_us(call: Callable[[], object], calls: int, repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(samples)


def main() -> int:
    from fine_tuning.infra.breakers import CircuitBreaker
    from fine_tuning.config import BreakerConfig

    calls = int(os.environ.get("BREAKER_CALLS", "5000"))
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"bench:{uuid.uuid4().hex[:8]}:breaker"
    settings = BreakerConfig()

    def noop() -> None:
        return None

    shared = CircuitBreaker("openai", settings, redis_url, key_prefix=prefix)
    local = CircuitBreaker("openai", settings, None, key_prefix=prefix)
    shared.call(noop)  # load the scripts, open the connection
    bare = per_call_us(noop, calls)
    rows = {
        "bare_call_us": round(bare, 3),
        "redis_breaker_call_us": round(per_call_us(lambda: shared.call(noop), calls), 1),
        "redis_breaker_state_read_us": round(per_call_us(shared.snapshot, calls), 1),
        "per_process_breaker_call_us": round(per_call_us(lambda: local.call(noop), calls), 2),
        "calls": calls,
        "redis_url": redis_url,
    }
    rows["redis_overhead_us"] = round(rows["redis_breaker_call_us"] - bare, 1)
    rows["per_process_overhead_us"] = round(rows["per_process_breaker_call_us"] - bare, 2)
    shared.reset()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2))
    print(f"bare call:                       {rows['bare_call_us']:8.3f} µs")
    print(f"through the Redis breaker:       {rows['redis_breaker_call_us']:8.1f} µs  (overhead {rows['redis_overhead_us']} µs: 2 Lua round trips)")
    print(f"breaker state read (snapshot):   {rows['redis_breaker_state_read_us']:8.1f} µs")
    print(f"per-process fallback:            {rows['per_process_breaker_call_us']:8.2f} µs  (overhead {rows['per_process_overhead_us']} µs)")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
