"""``python -m fine_tuning analyze``: the A/B statistics on per-arm aggregates given as JSON.

Input (FILE or stdin)::

    {"baseline": {"n": 4500, "mean": 0.068, "variance": 0.0009},
     "candidate": {"n": 500, "mean": 0.082, "variance": 0.0009},
     "traffic_split": 0.1,
     "criteria": {"min_engagement_lift": 0.15, "min_cost_efficiency_gain": 0.10, "alpha": 0.05},
     "guardrails": [{"name": "quality_score", "baseline": {...}, "candidate": {...},
                     "relative_margin": 0.05, "higher_is_worse": false}],
     "previous_p_value": 1.0, "finished": false}
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, TextIO

from fine_tuning.evaluate import stats


def _arm(data: dict[str, Any], name: str) -> stats.ArmSummary:
    arm = data.get(name)
    if not isinstance(arm, dict):
        raise stats.AnalysisInputError(f"{name}: missing (an object with n, mean, variance)")
    for field in ("n", "mean", "variance"):
        value = arm.get(field)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise stats.AnalysisInputError(f"{name}.{field}: a finite number is required, got {value!r}")
    return stats.ArmSummary(int(arm["n"]), float(arm["mean"]), float(arm["variance"])).check(name)


def analyze_json(data: Any, method: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise stats.AnalysisInputError("input must be a JSON object")
    baseline, candidate = _arm(data, "baseline"), _arm(data, "candidate")
    if baseline.mean == 0:
        raise stats.AnalysisInputError("baseline.mean: must not be 0 (a relative lift is undefined)")
    split = data.get("traffic_split", 0.1)
    if not isinstance(split, int | float) or not 0 < split < 1:
        raise stats.AnalysisInputError(f"traffic_split: must be between 0 and 1, got {split!r}")
    criteria = stats.Criteria(**data.get("criteria", {}))
    guardrails = []
    for i, g in enumerate(data.get("guardrails", [])):
        guardrails.append(
            stats.guardrail_mean(
                str(g.get("name", f"guardrail_{i}")),
                _arm(g, "baseline"),
                _arm(g, "candidate"),
                float(g.get("relative_margin", 0.05)),
                bool(g.get("higher_is_worse", False)),
            )
        )
    analysis = stats.analyze(
        baseline,
        candidate,
        float(split),
        criteria,
        method=method,  # type: ignore[arg-type]
        guardrails=guardrails,
        previous_p_value=float(data.get("previous_p_value", 1.0)),
        finished=bool(data.get("finished", False)),
    )
    return analysis.to_dict()


def main(method: str, source: TextIO) -> int:
    try:
        data = json.load(source)
    except json.JSONDecodeError as exc:
        print(f"error: input is not JSON: {exc}", file=sys.stderr)
        return 2
    try:
        result = analyze_json(data, method)
    except (stats.AnalysisInputError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
