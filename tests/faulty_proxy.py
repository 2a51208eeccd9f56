"""The tests' name for :mod:`fine_tuning.dev.faulty_proxy` (the lifecycle simulation uses it too)."""

from fine_tuning.dev.faulty_proxy import FaultyProxy

__all__ = ["FaultyProxy"]
