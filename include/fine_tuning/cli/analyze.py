"""``python -m fine_tuning analyze``: the A/B analysis on per-arm aggregates given as JSON.

The same function as the evaluate step and the API
(:func:`fine_tuning.evaluate.analysis.analyze_look`), so the same rules hold: a minimum sample
per arm, one statistic per method, and missing criteria reported (blocking unless optional).

Input (FILE or stdin)::

    {"baseline": {"n": 4500, "mean": 0.068, "variance": 0.0009,
                  "cost_per_post": {"n": 4500, "mean": 0.0009, "variance": 1e-8},
                  "response_time_ms": {...}, "quality_score": {...}, "posts": 4500, "errors": 40},
     "candidate": {...},
     "traffic_split": 0.1,
     "criteria": {"min_engagement_lift": 0.15, "alpha": 0.05, "min_samples_per_arm": 50,
                  "cost_rule": "non_inferiority", "max_cost_increase": 0.1,
                  "optional": ["quality_score"]},
     "guardrails": [{"name": "tone", "baseline": {...}, "candidate": {...},
                     "relative_margin": 0.05, "higher_is_worse": false}],
     "previous_p_value": 1.0, "previous_ci": [-0.2, 0.4], "finished": false}
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, TextIO

from fine_tuning.evaluate import analysis, stats


def _arm(data: dict[str, Any], name: str) -> stats.ArmSummary:
    arm = data.get(name)
    if not isinstance(arm, dict):
        raise stats.AnalysisInputError(f"{name}: missing (an object with n, mean, variance)")
    for field in ("n", "mean", "variance"):
        value = arm.get(field)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise stats.AnalysisInputError(f"{name}.{field}: a finite number is required, got {value!r}")
    return stats.ArmSummary(int(arm["n"]), float(arm["mean"]), float(arm["variance"])).check(name)


def _optional_arm(data: dict[str, Any], name: str, metric: str) -> stats.ArmSummary | None:
    return _arm(data[name], f"{name}.{metric}") if metric in data[name] else None


def _count(data: dict[str, Any], name: str, field: str) -> int | None:
    value = data[name].get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise stats.AnalysisInputError(f"{name}.{field}: a count (integer >= 0) is required, got {value!r}")
    return value


def _inputs(data: dict[str, Any], name: str) -> analysis.ArmInputs:
    return analysis.ArmInputs(
        engagement=_arm(data, name),
        cost_per_post=_optional_arm(data, name, "cost_per_post"),
        response_time_ms=_optional_arm(data, name, "response_time_ms"),
        quality_score=_optional_arm(data, name, "quality_score"),
        posts=_count(data, name, "posts"),
        errors=_count(data, name, "errors"),
    )


def analyze_json(data: Any, method: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise stats.AnalysisInputError("input must be a JSON object")
    baseline, candidate = _inputs(data, "baseline"), _inputs(data, "candidate")
    if baseline.engagement is not None and baseline.engagement.mean == 0:
        raise stats.AnalysisInputError("baseline.mean: must not be 0 (a relative lift is undefined)")
    split = data.get("traffic_split", 0.1)
    if not isinstance(split, int | float) or not 0 < split < 1:
        raise stats.AnalysisInputError(f"traffic_split: must be between 0 and 1, got {split!r}")
    criteria = data.get("criteria", {})
    if not isinstance(criteria, dict):
        raise stats.AnalysisInputError("criteria: must be an object")
    known = set(analysis.Criteria.__dataclass_fields__)
    unknown = sorted(set(criteria) - known)
    if unknown:
        raise stats.AnalysisInputError(f"criteria: unknown fields {unknown} (known: {sorted(known)})")
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
    previous_ci = data.get("previous_ci") or [None, None]
    state = analysis.LookState(
        float(data.get("previous_p_value", 1.0)),
        -math.inf if previous_ci[0] is None else float(previous_ci[0]),
        math.inf if previous_ci[1] is None else float(previous_ci[1]),
    )
    result = analysis.analyze_look(
        analysis.LookInputs(baseline, candidate, float(split)),
        analysis.Criteria(**criteria),
        method=method,  # type: ignore[arg-type]
        state=state,
        finished=bool(data.get("finished", False)),
        extra_guardrails=guardrails,
    )
    return result.to_dict()


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
