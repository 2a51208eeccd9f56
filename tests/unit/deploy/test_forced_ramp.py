"""A forced migration's ramp (the serving model retires): the configured stages, shortened so
that the last lands by 80% of the time left, on the clock; a deadline already past refuses."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from fine_tuning.config import RolloutConfig
from fine_tuning.deploy import rollout

NOW = datetime(2027, 1, 4, 12, tzinfo=UTC)


def test_a_near_deadline_shortens_every_stage_to_land_by_80_percent_of_the_time_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = RolloutConfig(initial_traffic=0.1, increment_percentage=0.1, max_traffic=1.0, increment_interval_hours=24)
    with caplog.at_level(logging.WARNING, logger=rollout.log.name):
        ramp = rollout._ramp_before(config, NOW + timedelta(hours=45), NOW)
    # 10% -> 100% by 10 points: 9 steps; 80% of 45 h is 36 h, 4 h per step.
    assert ramp.increment_interval_hours == pytest.approx(4.0)
    assert ramp.advance_on == "clock"
    assert (ramp.initial_traffic, ramp.increment_percentage, ramp.max_traffic) == (0.1, 0.1, 1.0)
    assert config.increment_interval_hours == 24 and config.advance_on == "evidence"  # not changed in place
    (record,) = [r for r in caplog.records if "forced migration" in r.getMessage()]
    assert record.getMessage() == (
        "forced migration: ramp steps every 4.00 h instead of 24.00 h, to reach 100% before "
        f"{(NOW + timedelta(hours=45)).isoformat()}"
    )


def test_a_far_deadline_keeps_the_configured_pace_and_a_single_step_ramp_counts_one() -> None:
    config = RolloutConfig(initial_traffic=0.2, increment_percentage=0.2, max_traffic=0.8, increment_interval_hours=6)
    far = rollout._ramp_before(config, NOW + timedelta(days=30), NOW)
    assert far.increment_interval_hours == 6 and far.advance_on == "clock"
    # 20% -> 80% by 20 points is 3 steps (a rounding hair must not make it 4): 0.8 * 9 h / 3.
    assert rollout._ramp_before(config, NOW + timedelta(hours=9), NOW).increment_interval_hours == pytest.approx(2.4)
    one = RolloutConfig(initial_traffic=1.0, increment_percentage=0.5, max_traffic=1.0, increment_interval_hours=24)
    assert rollout._ramp_before(one, NOW + timedelta(hours=10), NOW).increment_interval_hours == pytest.approx(8.0)


@pytest.mark.parametrize("hours", [0, -3])
def test_a_deadline_already_past_refuses_and_names_it(hours: int) -> None:
    deadline = NOW + timedelta(hours=hours)
    with pytest.raises(rollout.DeploymentRefused) as refused:
        rollout._ramp_before(RolloutConfig(), deadline, NOW)
    assert str(refused.value) == f"the migration's deadline {deadline.isoformat()} has passed"
