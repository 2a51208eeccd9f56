"""The A/B test's long wait: look at the results, then sleep in the triggerer until the next look.

A test runs for days. Between looks the task is deferred on Airflow's own ``DateTimeTrigger``,
so no worker slot or pod is held; each look (one SQL query and the statistics) runs in the
worker and takes well under a second. The sequential test makes frequent looks safe.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from fine_tuning_airflow.operators import resolve_config, run_context

if TYPE_CHECKING:
    from airflow.sdk import Context

# Shorter waits between looks happen in the worker (demo and test timings), longer ones defer.
MIN_DEFERRAL_SECONDS = 30.0


class ABTestEvaluationOperator(BaseOperator):
    """Evaluate the A/B test every ``evaluation.evaluation_interval_minutes`` until it decides.

    Returns the final evaluation manifest (``promote`` or ``reject`` with its reasons) as XCom.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#eaf7e4"

    def __init__(
        self, *, ab_task_id: str = "ab_create", openai_conn_id: str = "openai_default", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.ab_task_id = ab_task_id
        self.openai_conn_id = openai_conn_id

    def execute(self, context: Context) -> dict[str, Any] | None:
        return self._look(context)

    def execute_complete(self, context: Context, event: Any = None) -> dict[str, Any] | None:
        return self._look(context)

    def _look(self, context: Context) -> dict[str, Any] | None:
        from airflow.providers.standard.triggers.temporal import DateTimeTrigger

        from fine_tuning.manifests import ABTestManifest, EvaluationManifest
        from fine_tuning.pipeline import run_step
        from fine_tuning_airflow.cache_hook import CachedMetricsHook

        config = resolve_config(context, self.openai_conn_id)
        test = ABTestManifest.from_json(context["ti"].xcom_pull(task_ids=self.ab_task_id))
        # Each look's report is written through the hook's cache: the API reads this look's.
        cache = CachedMetricsHook(config=config).get_cache()
        while True:
            manifest = run_step(
                "evaluate",
                config,
                run_context(context),
                {"ab-create": test.model_dump(mode="json")},
                metrics_cache=cache,
            )
            assert isinstance(manifest, EvaluationManifest)  # the evaluate step's
            if manifest.final:
                self.log.info(
                    "A/B test %s decided %s after %d looks",
                    test.ab_test_id,
                    manifest.decision,
                    manifest.looks,
                )
                return manifest.model_dump(mode="json")
            now = datetime.now(UTC)
            next_look = now + timedelta(minutes=config.evaluation.evaluation_interval_minutes)
            # Never sleep past the planned end by more than a second: the last look decides.
            next_look = min(next_look, max(test.planned_end_at, now) + timedelta(seconds=1))
            self.log.info(
                "A/B test %s: %s after look %d (lift %s); next look at %s",
                test.ab_test_id,
                manifest.decision,
                manifest.looks,
                manifest.relative_lift,
                next_look.isoformat(),
            )
            wait = (next_look - now).total_seconds()
            if wait >= MIN_DEFERRAL_SECONDS:
                self.defer(trigger=DateTimeTrigger(moment=next_look), method_name="execute_complete")
            # A wait of seconds is cheaper in the worker than a round trip through the triggerer,
            # and a trigger that fires before the executor has reported the deferral makes the
            # scheduler fail the task ("finished with state success, but the TI is queued").
            time.sleep(wait)
