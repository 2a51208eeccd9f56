"""The loss gate: a finished job's validation loss is judged before its model gets any traffic.

A candidate is rejected when its validation loss rises over the last part of training (it
started to learn the training set by heart: over-fitting), or ends above a configured bound.
"Rises" is a least-squares slope over the last ``window_share`` of the steps that is both
positive with significance (scipy's ``linregress``, one-sided p < ``alpha``: a noisy but
flat curve is not a rise) and large (the fitted rise over the window above
``max_relative_rise`` of the curve's level there).
"""

from __future__ import annotations

from dataclasses import dataclass

from fine_tuning.config import PipelineConfig


@dataclass(frozen=True)
class LossVerdict:
    passed: bool
    reason: str
    final_valid_loss: float | None = None
    relative_rise: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "final_valid_loss": self.final_valid_loss,
            "relative_rise": self.relative_rise,
        }


def judge(config: PipelineConfig, curves: list[dict[str, float]], has_validation_file: bool) -> LossVerdict:
    """The gate's verdict on a job's losses (``loss_curves``), with the reason in words."""
    from scipy import stats

    gate = config.training.loss_gate
    if not gate.enabled:
        return LossVerdict(True, "training.loss_gate.enabled is false: not judged")
    if not has_validation_file:
        return LossVerdict(
            True, "no validation file (data_collection.validation_share is 0): validation loss not judged"
        )
    points = [(p["step"], p["valid_loss"]) for p in curves if p.get("valid_loss") is not None]
    if len(points) < gate.min_points:
        return LossVerdict(
            False,
            f"the job reported {len(points)} validation losses for a validation file; the gate needs "
            f"at least {gate.min_points} (training.loss_gate.min_points) to judge it",
        )
    final = points[-1][1]
    first_step, last_step = points[0][0], points[-1][0]
    window_start = last_step - gate.window_share * (last_step - first_step)
    window = [(step, loss) for step, loss in points if step >= window_start]
    relative_rise = None
    if len(window) >= 3:
        fit = stats.linregress([s for s, _ in window], [v for _, v in window])
        level = sum(v for _, v in window) / len(window)
        relative_rise = float(fit.slope * (window[-1][0] - window[0][0]) / level) if level > 0 else 0.0
        one_sided_p = fit.pvalue / 2 if fit.slope > 0 else 1.0
        if relative_rise > gate.max_relative_rise and one_sided_p < gate.alpha:
            return LossVerdict(
                False,
                f"validation loss rises over the last {gate.window_share:.0%} of training (steps "
                f"{window[0][0]:.0f}-{window[-1][0]:.0f}: +{relative_rise:.1%}, p={one_sided_p:.2g}): "
                f"over-fitting (training.loss_gate.max_relative_rise {gate.max_relative_rise:.0%})",
                final,
                relative_rise,
            )
    if gate.max_final_valid_loss is not None and final > gate.max_final_valid_loss:
        return LossVerdict(
            False,
            f"final validation loss {final:.4f} is above training.loss_gate.max_final_valid_loss "
            f"{gate.max_final_valid_loss}",
            final,
            relative_rise,
        )
    return LossVerdict(True, f"validation loss {final:.4f} at the end, not rising", final, relative_rise)
