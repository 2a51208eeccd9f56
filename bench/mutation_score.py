"""The mutation score of `make mutation`: per mutated module, how many of mutmut's mutants the
tests killed, from mutmut's own result files (mutants/**/*.meta), in the current directory.

Killed: a test failed (or the mutant hung past mutmut's timeout). Not counted in the score:
mutants mutmut did not check (an interrupted run) and those no selected test reaches, which
are listed on their own: a function no test reaches is a gap of its own. After a sampled run
(MUTMUT_SAMPLE) the checked mutants are a random sample: the score is an estimate, with its
standard error sqrt(p(1-p)/checked).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "timeout", "caught by type check"}


def main() -> None:
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        raise SystemExit("no mutmut results under ./mutants: run `make mutation` first")
    print(f"{'module':45} {'mutants':>8} {'checked':>8} {'killed':>7} {'survived':>9} {'no tests':>9} "
          f"{'score':>6} {'± se':>6}")
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        statuses = Counter(status_by_exit_code[code] for code in codes.values())
        checked = sum(n for status, n in statuses.items() if status not in ("not checked", "no tests"))
        killed = sum(statuses[s] for s in KILLED)
        p = killed / checked if checked else None
        score = "-" if p is None else f"{p:.0%}"
        se = "-" if p is None else f"{math.sqrt(p * (1 - p) / checked):.0%}"
        module = str(meta.relative_to("mutants")).removesuffix(".py.meta").removeprefix("src/").replace("/", ".")
        print(f"{module:45} {len(codes):>8} {checked:>8} {killed:>7} {statuses['survived']:>9} "
              f"{statuses['no tests']:>9} {score:>6} {se:>6}")


if __name__ == "__main__":
    main()
