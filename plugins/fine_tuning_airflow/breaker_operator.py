"""An operator base that checks named circuit breakers before doing any work.

When a breaker is open the task fails fast with ``circuit 'openai' open until 14:03:12 UTC ...``
and goes ``up_for_retry`` with a retry delay no shorter than the breaker's remaining open time
(Airflow 3.3's pluggable ``retry_policy`` carries the delay to the scheduler), so the retry is
not spent against a circuit that is still open. The outcome of each external call is recorded
by the library's breakers themselves (``fine_tuning.infra.breakers``), once per call; this base adds
what only the task knows: the check before work and the delay after.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy

if TYPE_CHECKING:
    from airflow.sdk import Context

    from fine_tuning.config import PipelineConfig
    from fine_tuning.infra.breakers import CircuitOpenError


def find_circuit_open(exc: BaseException | None) -> CircuitOpenError | None:
    """The ``CircuitOpenError`` in ``exc``'s cause/context chain, if any."""
    from fine_tuning.infra.breakers import CircuitOpenError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CircuitOpenError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class CircuitOpenRetryPolicy(RetryPolicy):
    """Retry an open-circuit failure only after the circuit's open time (plus a second).

    Other failures are left to ``fallback`` (or Airflow's standard retry with backoff).

    :param min_delay: never retry sooner than this (the task's own ``retry_delay``).
    :param fallback: the policy for every other exception.
    """

    def __init__(self, min_delay: timedelta = timedelta(0), fallback: RetryPolicy | None = None) -> None:
        self.min_delay = min_delay
        self.fallback = fallback

    def evaluate(
        self, exception: BaseException, try_number: int, max_tries: int, context: Context | None = None
    ) -> RetryDecision:
        open_error = find_circuit_open(exception)
        if open_error is None:
            if self.fallback is not None:
                return self.fallback.evaluate(exception, try_number, max_tries, context)
            return RetryDecision.default()
        return RetryDecision.retry(delay=retry_delay_for(open_error, self.min_delay), reason=str(open_error))

    def serialize(self) -> dict[str, Any]:
        return {
            "__type": "CircuitOpenRetryPolicy",
            "min_delay": self.min_delay.total_seconds(),
            "fallback": None if self.fallback is None else self.fallback.serialize(),
        }

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> CircuitOpenRetryPolicy:
        # The fallback is not rebuilt: only the worker evaluates policies, from the DAG file.
        return cls(min_delay=timedelta(seconds=data.get("min_delay", 0)))


def retry_delay_for(open_error: CircuitOpenError, min_delay: timedelta = timedelta(0)) -> timedelta:
    """At least the remaining open time (rounded up, plus a second for clock skew)."""
    return max(timedelta(seconds=open_error.retry_after_seconds), min_delay)


class CircuitBreakerOperator(BaseOperator):
    """Base for operators that call external services guarded by named breakers.

    Subclasses implement :meth:`execute_guarded`; :meth:`execute` first checks each of
    :meth:`breakers_for_task` (the ``breaker_names`` argument by default) and raises
    ``CircuitOpenError`` while one is open. A HALF_OPEN breaker lets the task through: its
    calls are the probes.

    :param breaker_names: breakers to check (``openai``, ``mlflow``).
    """

    breaker_names: Sequence[str] = ()

    def __init__(self, *, breaker_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if breaker_names is not None:
            self.breaker_names = tuple(breaker_names)
        if not isinstance(self.retry_policy, CircuitOpenRetryPolicy):
            self.retry_policy = CircuitOpenRetryPolicy(min_delay=self.retry_delay, fallback=self.retry_policy)

    def breakers_for_task(self, config: PipelineConfig) -> Sequence[str]:
        """The breakers this task's calls go through, for this run's config."""
        return self.breaker_names

    def pipeline_config(self, context: Context) -> PipelineConfig:
        """The run's config (defaults < file < environment < params); subclasses add secrets."""
        from fine_tuning.config import load_config

        return load_config(params=dict(context["params"]))

    def check_breakers(self, config: PipelineConfig) -> None:
        """Raise ``CircuitOpenError`` ("circuit ... open until HH:MM:SS UTC") if one is open."""
        from fine_tuning.infra.breakers import CircuitOpenError, get_breaker

        for name in self.breakers_for_task(config):
            snapshot = get_breaker(name, config).snapshot()
            if snapshot.state == "open" and snapshot.opened_until is not None:
                from datetime import UTC, datetime

                remaining = (snapshot.opened_until - datetime.now(UTC)).total_seconds()
                error = CircuitOpenError(
                    name, "open", snapshot.opened_until, remaining, snapshot.failure_count
                )
                self.log.warning("%s; retrying in %s", error, retry_delay_for(error, self.retry_delay))
                raise error

    def execute(self, context: Context) -> Any:
        config = self.pipeline_config(context)
        self.check_breakers(config)
        try:
            return self.execute_guarded(context, config)
        finally:
            self._log_breakers(config)

    def execute_guarded(self, context: Context, config: PipelineConfig) -> Any:
        raise NotImplementedError

    def _log_breakers(self, config: PipelineConfig) -> None:
        from fine_tuning.infra.breakers import get_breaker

        for name in self.breakers_for_task(config):
            snapshot = get_breaker(name, config).snapshot()
            self.log.info(
                "breaker %s: %s, %d consecutive failures, %d/%d failed in the window%s",
                name,
                snapshot.state,
                snapshot.failure_count,
                snapshot.window_failures,
                snapshot.window_calls,
                "" if snapshot.shared else " (per-process state: Redis unreachable)",
            )
