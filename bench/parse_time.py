"""DAG parse time: DagBag over dags/ minus the bare ``import airflow``, median of fresh processes.

    python bench/parse_time.py [REPEATS]     # default 7, or BENCH_PARSE_REPEATS

Each repeat is a new interpreter (nothing cached in memory; the OS page cache is warm, as on a
running scheduler): it times ``import airflow`` (with the DagBag class), then ``DagBag(dags/)``,
fails on any import error, and lists the heavy modules the DAG files pulled in. Writes
``parse_time.json``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

import _harness

GOAL_MS = 100
PROBE = """
import time
t0 = time.perf_counter()
import airflow
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag({dags!r})
t2 = time.perf_counter()
assert not bag.import_errors, bag.import_errors
import sys
heavy = [m for m in ("openai", "mlflow", "scipy", "pandas", "psycopg", "kubernetes") if m in sys.modules]
print(t1 - t0, t2 - t1, len(bag.dags), ",".join(heavy))
"""


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else _harness.env_int("BENCH_PARSE_REPEATS", 7)
    dags = str(_harness.REPO / "dags")
    env = {
        **os.environ,
        "AIRFLOW_HOME": tempfile.mkdtemp(prefix="parse-bench-"),
        "AIRFLOW__CORE__DAGS_FOLDER": dags,
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(_harness.REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    info = _harness.machine()
    print(_harness.machine_line(info))
    imports, parses, heavy, n_dags = [], [], "", 0
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(dags=dags)],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1].split(" ")
        imports.append(float(out[0]))
        parses.append(float(out[1]))
        n_dags = int(out[2])
        heavy = out[3] if len(out) > 3 else ""
    parse_ms = statistics.median(parses) * 1000
    result = {
        "repeats": repeats,
        "dags": n_dags,
        "import_airflow_s_median": round(statistics.median(imports), 3),
        "dagbag_parse_ms_median": round(parse_ms, 1),
        "dagbag_parse_ms_max": round(max(parses) * 1000, 1),
        "heavy_modules_imported_at_parse": heavy.split(",") if heavy else [],
        "goal_ms": GOAL_MS,
        "goal_met": parse_ms < GOAL_MS,
        "machine": info,
    }
    _harness.print_table(
        f"DAG parse time: DagBag(dags/) beyond a bare `import airflow`, {repeats} fresh processes "
        f"({info['cores']} cores, {info['memory_gib']} GiB)",
        ["DAGs", "import airflow s (median)", "DagBag ms (median)", "DagBag ms (max)",
         "heavy modules at parse", f"goal < {GOAL_MS} ms"],
        [(n_dags, result["import_airflow_s_median"], result["dagbag_parse_ms_median"],
          result["dagbag_parse_ms_max"], ", ".join(result["heavy_modules_imported_at_parse"]) or "none",
          result["goal_met"])],
    )
    _harness.write_results("parse_time", result)


if __name__ == "__main__":
    main()
