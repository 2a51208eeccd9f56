"""A picture of each A/B look, logged to the pipeline run's MLflow run.

Left: each arm's mean engagement with its 95% confidence interval. Right: the relative lift at
every look so far with its always-valid confidence sequence, and the minimum lift to promote.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

from fine_tuning.config import PipelineConfig
from fine_tuning.track.registry import log_run_artifact

log = logging.getLogger(__name__)


def evaluation_figure(
    test: dict[str, Any], aggregates: dict[str, dict[str, float]], history: list[dict[str, Any]]
):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from scipy.stats import norm

    z = float(norm.ppf(0.975))
    figure = Figure(figsize=(10, 4))
    arms_ax, lift_ax = figure.subplots(1, 2)
    names, means, errors = [], [], []
    for arm in ("baseline", "candidate"):
        a = aggregates[arm]
        n = a["eng_n"]
        mean = a["eng_sum"] / n if n else 0.0
        var = max(a["eng_sumsq"] - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        names.append(f"{arm}\n(n={int(n)})")
        means.append(mean)
        errors.append(z * math.sqrt(var / n) if n > 1 else 0.0)
    arms_ax.bar(names, means, yerr=errors, capsize=8, color=["#8da0cb", "#66c2a5"])
    arms_ax.set_ylabel("engagement rate")
    arms_ax.set_title("per-arm engagement, 95% CI")

    looks = range(1, len(history) + 1)
    lifts = [h["lift"] for h in history]
    lift_ax.plot(looks, lifts, marker="o", label="relative lift")
    lift_ax.fill_between(
        looks,
        [h["ci_lower"] for h in history],
        [h["ci_upper"] for h in history],
        alpha=0.25,
        label="always-valid 95% CS",
    )
    lift_ax.axhline(0.0, color="grey", linewidth=1)
    lift_ax.axhline(
        test["success_criteria"]["min_engagement_lift"],
        color="red",
        linestyle="--",
        label="min lift to promote",
    )
    lift_ax.set_xlabel("look")
    lift_ax.set_title("lift over time")
    lift_ax.legend(loc="best", fontsize=8)
    figure.suptitle(
        f"A/B test {test['id']}: {test['candidate_model']} vs {test['baseline_model']}", fontsize=9
    )
    figure.tight_layout()
    return figure


def evaluation_png(
    test: dict[str, Any], aggregates: dict[str, dict[str, float]], history: list[dict[str, Any]]
) -> bytes:
    """The figure as PNG bytes: what the Airflow UI's A/B test page shows."""
    buffer = io.BytesIO()
    # savefig's defaults, as MLflow's log_figure uses them: the same picture, byte for byte.
    evaluation_figure(test, aggregates, history).savefig(buffer, format="png")
    return buffer.getvalue()


def log_evaluation_plot(
    config: PipelineConfig,
    test: dict[str, Any],
    aggregates: dict[str, dict[str, float]],
    history: list[dict[str, Any]],
) -> str | None:
    """Log the figure to the MLflow run of the pipeline run that made the candidate; returns its path.

    Through the outbox: while MLflow is down the look's figure is queued and logged when MLflow
    is back (each look's once, in order, so the run ends with the latest). A figure MLflow
    refuses, or one that cannot be drawn, is logged and skipped: the decision stands without it.
    """
    if not test.get("dag_id") or not test.get("run_id") or not history:
        return None
    path = f"ab_tests/{test['id']}/evaluation.png"
    try:
        png = evaluation_png(test, aggregates, history)
        # The look's number names this version: a re-run of a killed look queues nothing twice.
        key = f"{test['id']}:look{int(test.get('looks') or 0) + 1}"
        logged = log_run_artifact(config, test["dag_id"], test["run_id"], path, png, key)
    except Exception as exc:  # noqa: BLE001 - the plot is a nicety; the decision stands without it
        log.warning("could not log the A/B plot of %s to MLflow: %s", test["id"], exc)
        return None
    if logged.buffered:
        log.warning("the A/B plot of %s is queued until MLflow is back (%s)", test["id"], logged.reason)
    return path
