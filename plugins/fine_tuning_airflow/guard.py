"""The continuous rollout guard in Airflow: ``rollout_monitor``'s ``guard`` task.

After the hourly health check, the task looks once in the worker (rolling back what regressed),
then defers: :class:`RolloutGuardTrigger` judges every active rollout every
``rollback_triggers.guard_interval_minutes`` in the triggerer (reads only: two SQL queries per
rollout, :func:`fine_tuning.deploy.guard.judge_all`) until shortly before the next hourly run.
On a confirmed regression it wakes the task, which judges again and rolls back in the worker
(:func:`fine_tuning.deploy.guard.check`: the same atomic switch and record as every rollback),
then defers again for the rest of its watch. No worker slot is held while it watches.

Detection lives in the triggerer and the decision in the worker: a triggerer restart only
re-runs a look, and a rollback is written once, by a task that Airflow records and retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from fine_tuning_airflow.operators import resolve_config
from fine_tuning_airflow.triggers import trigger_config

if TYPE_CHECKING:
    from airflow.sdk import Context

GUARD_TRIGGER_CLASSPATH = "fine_tuning_airflow.guard.RolloutGuardTrigger"


class RolloutGuardTrigger(BaseTrigger):
    """Judge every active rollout every ``interval_seconds`` until ``until``; yield one event:

    * ``{"status": "regression", "deployments": [...], "fired": {...}}`` on the first look where
      a rollout's trigger is confirmed;
    * ``{"status": "done", "message": ...}`` at ``until`` or once no rollout is active;
    * ``{"status": "error", "message": ...}`` after ``max_consecutive_errors`` failed looks in a
      row (the posts database unreachable): the task fails and is retried, loudly.

    :param config: the run's non-secret settings (``trigger_config``); services (the posts
        database) are the triggerer's own, with the Airflow connections applied.
    """

    def __init__(
        self,
        until: str,
        interval_seconds: float = 300.0,
        max_consecutive_errors: int = 3,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.until = until
        self.interval_seconds = interval_seconds
        self.max_consecutive_errors = max_consecutive_errors
        self.config = config

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            GUARD_TRIGGER_CLASSPATH,
            {
                "until": self.until,
                "interval_seconds": self.interval_seconds,
                "max_consecutive_errors": self.max_consecutive_errors,
                "config": self.config,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from fine_tuning.config import load_config
        from fine_tuning.deploy import guard
        from fine_tuning_airflow.hooks import ServiceConnectionsHook

        until = datetime.fromisoformat(self.until)
        try:
            config = await ServiceConnectionsHook().aapply_to(load_config(params=self.config or {}))
        except Exception as exc:  # noqa: BLE001 - the event says why; the task fails with it
            yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
            return
        errors = 0
        while True:
            # The task looked just before deferring (and after every wake-up): wait first.
            left = (until - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(min(self.interval_seconds, left), 0.0))
            now = datetime.now(UTC)
            if now >= until:
                yield TriggerEvent({"status": "done", "message": f"watched until {self.until}"})
                return
            try:
                # psycopg is blocking: the look runs in a thread, never on the triggerer's loop.
                looks = await asyncio.to_thread(guard.judge_all, config, now)
            except Exception as exc:  # noqa: BLE001 - a few failed looks in a row end the watch
                errors += 1
                self.log.warning("guard look failed (%d in a row): %s", errors, exc)
                if errors >= self.max_consecutive_errors:
                    yield TriggerEvent(
                        {"status": "error", "message": f"{errors} guard looks failed in a row: {exc}"}
                    )
                    return
                continue
            errors = 0
            if not looks:
                yield TriggerEvent({"status": "done", "message": "no active rollout"})
                return
            regressed = [look for look in looks if look.fired]
            if regressed:
                yield TriggerEvent(
                    {
                        "status": "regression",
                        "deployments": [look.deployment_id for look in regressed],
                        "fired": {look.deployment_id: look.fired for look in regressed},
                    }
                )
                return
            self.log.info(
                "guard: %s healthy",
                "; ".join(f"{look.deployment_id} since {look.window_start.isoformat()}" for look in looks),
            )


class RolloutGuardOperator(BaseOperator):
    """Watch the active rollouts continuously until ``watch_minutes`` after the run's data
    interval ended (the next hourly run takes over), rolling back each confirmed regression.

    ``deployment.guard_watch_minutes`` (55) sets the watch; 0 is one look in the worker (the demo,
    ``airflow dags test``). Returns ``{"rolled_back": [ids], "watched_until": iso}``.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#fdecea"

    def __init__(self, *, openai_conn_id: str = "openai_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.openai_conn_id = openai_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        config = resolve_config(context, self.openai_conn_id)
        watch = config.deployment.guard_watch_minutes
        start = context.get("data_interval_end") or datetime.now(UTC)
        until = start + timedelta(minutes=watch) if watch else datetime.now(UTC)
        return self._look(context, until, rolled_back=[])

    def execute_complete(
        self,
        context: Context,
        event: dict[str, Any],
        until: str = "",
        rolled_back: list[str] | None = None,
    ) -> dict[str, Any]:
        if event.get("status") == "error":
            raise RuntimeError(f"the rollout guard stopped watching: {event.get('message')}")
        if event.get("status") == "regression":
            self.log.warning("guard: the triggerer saw a regression: %s", event.get("fired"))
        return self._look(context, datetime.fromisoformat(until), list(rolled_back or []))

    def _look(self, context: Context, until: datetime, rolled_back: list[str]) -> dict[str, Any]:
        from fine_tuning.deploy import guard
        from fine_tuning.infra.redis import redis_client

        config = resolve_config(context, self.openai_conn_id)
        now = datetime.now(UTC)
        client = redis_client(config)
        active = []
        for look in guard.check_all(config, client, now):
            if look.fired:
                rolled_back.append(look.deployment_id)
            else:
                active.append(look.deployment_id)
        result = {"rolled_back": rolled_back, "watched_until": until.isoformat()}
        if not active or now >= until:
            return result
        interval = config.deployment.rollback_triggers.guard_interval_minutes * 60
        self.log.info(
            "guard: watching %s until %s, every %.0f s", ", ".join(active), until.isoformat(), interval
        )
        self.defer(
            trigger=RolloutGuardTrigger(
                until=until.isoformat(), interval_seconds=interval, config=trigger_config(config)
            ),
            method_name="execute_complete",
            kwargs={"until": until.isoformat(), "rolled_back": rolled_back},
        )
