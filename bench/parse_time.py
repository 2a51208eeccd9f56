"""DAG parse time: DagBag over dags/ minus the bare `import airflow`, median of fresh processes.

Usage: python bench/parse_time.py [REPEATS]
Writes bench/results/parse_time.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
print(t1 - t0, t2 - t1, ",".join(heavy))
"""


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    env = {
        **os.environ,
        "AIRFLOW_HOME": tempfile.mkdtemp(prefix="parse-bench-"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    imports, parses, heavy = [], [], ""
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(dags=str(REPO / "dags"))],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1].split(" ")
        imports.append(float(out[0]))
        parses.append(float(out[1]))
        heavy = out[2] if len(out) > 2 else ""
    result = {
        "repeats": repeats,
        "import_airflow_s_median": statistics.median(imports),
        "dagbag_parse_ms_median": statistics.median(parses) * 1000,
        "dagbag_parse_ms_max": max(parses) * 1000,
        "heavy_modules_imported_at_parse": heavy.split(",") if heavy else [],
    }
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "parse_time.json").write_text(json.dumps(result, indent=2))
    print(f"import airflow (median of {repeats}): {result['import_airflow_s_median']:.2f} s")
    print(f"DagBag parse of dags/ beyond it:  {result['dagbag_parse_ms_median']:.1f} ms median, "
          f"{result['dagbag_parse_ms_max']:.1f} ms max")
    print(f"heavy modules imported at parse: {result['heavy_modules_imported_at_parse'] or 'none'}")


if __name__ == "__main__":
    main()
