"""Names of a random sample of mutmut's mutants, for `make mutation MUTMUT_SAMPLE=n`.

All of the four modules' ~3,600 mutants take hours on two cores; n mutants per module drawn at
random (a fixed seed, so a before/after comparison checks the same mutants) give each module's
score with a standard error of at most 0.5/sqrt(n). Reads the mutant names mutmut generated
(mutants/**/*.py.meta, in the current directory); optional patterns (fnmatch, as mutmut takes
them) restrict the draw.

    python bench/mutation_sample.py N [PATTERN ...]
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import sys
from pathlib import Path


def sample(n: int, patterns: list[str], seed: int) -> list[str]:
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        raise SystemExit("no mutmut results under ./mutants: mutmut has not generated the mutants")
    rng = random.Random(seed)
    names: list[str] = []
    for meta in metas:
        keys = sorted(json.loads(meta.read_text())["exit_code_by_key"])
        if patterns:
            keys = [k for k in keys if any(fnmatch.fnmatch(k, p) for p in patterns)]
        names += rng.sample(keys, min(n, len(keys)))
    if not names:
        raise SystemExit(f"no mutant matches {patterns}")
    return names


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        raise SystemExit(
            f"usage: {sys.argv[0]} N [PATTERN ...] (N mutants per module, N >= 1), got {sys.argv[1:]}"
        )
    print(" ".join(sample(int(sys.argv[1]), sys.argv[2:], int(os.environ.get("MUTMUT_SEED", "20261204")))))


if __name__ == "__main__":
    main()
