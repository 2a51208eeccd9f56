"""The async wait for a fine-tuning job, run by Airflow's triggerer (no worker slot held)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

TERMINAL = {"succeeded": "success", "failed": "error", "cancelled": "error"}


class FineTuningJobTrigger(BaseTrigger):
    """Poll an OpenAI fine-tuning job until it succeeds, fails or is cancelled; yield one event.

    Serialized state is the job id, the connection id and the timings: never a secret.

    :param job_id: the fine-tuning job (``ftjob-...``).
    :param openai_conn_id: the Airflow connection holding the API key.
    :param poll_interval: seconds between polls.
    :param max_consecutive_errors: polls that may fail in a row (the API being briefly down
        does not mean the job failed) before the trigger gives up with an error event.

    Polls go through the shared ``openai`` circuit breaker (thresholds and Redis from the
    triggerer's environment): while it is open the trigger sleeps until the open time ends
    instead of polling, and that does not count as an error.
    """

    def __init__(
        self,
        job_id: str,
        openai_conn_id: str = "openai_default",
        poll_interval: float = 60.0,
        max_consecutive_errors: int = 10,
        provider: str = "openai",
    ) -> None:
        super().__init__()
        self.provider = provider
        self.job_id = job_id
        self.openai_conn_id = openai_conn_id
        self.poll_interval = poll_interval
        self.max_consecutive_errors = max_consecutive_errors

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "openai_conn_id": self.openai_conn_id,
                "poll_interval": self.poll_interval,
                "max_consecutive_errors": self.max_consecutive_errors,
                "provider": self.provider,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        if self.provider != "openai":
            async for event in self._run_provider():
                yield event
            return
        import openai
        from fine_tuning.breakers import CircuitOpenError, get_breaker
        from fine_tuning.config import load_config

        from fine_tuning_airflow.hooks import OpenAIFineTuningHook

        try:
            client = await OpenAIFineTuningHook(self.openai_conn_id).aget_client()
            breaker = get_breaker("openai", load_config())
        except Exception as exc:  # a missing connection or a bad config must end the wait, not hang it
            yield TriggerEvent({"status": "error", "job_id": self.job_id, "message": str(exc)})
            return
        errors = 0
        async with client:
            while True:
                try:
                    job = await breaker.acall(client.fine_tuning.jobs.retrieve, self.job_id)
                except CircuitOpenError as exc:
                    self.log.warning("%s; polling %s again after that", exc, self.job_id)
                    await asyncio.sleep(max(exc.remaining_seconds, self.poll_interval))
                    continue
                except openai.NotFoundError as exc:
                    yield TriggerEvent(
                        {"status": "error", "job_id": self.job_id, "message": f"job not found: {exc.message}"}
                    )
                    return
                except openai.APIError as exc:
                    errors += 1
                    self.log.warning("polling %s failed (%d in a row): %s", self.job_id, errors, exc)
                    if errors >= self.max_consecutive_errors:
                        yield TriggerEvent(
                            {
                                "status": "error",
                                "job_id": self.job_id,
                                "message": f"gave up polling after {errors} errors in a row: {exc}",
                            }
                        )
                        return
                    await asyncio.sleep(self.poll_interval)
                    continue
                errors = 0
                if job.status in TERMINAL:
                    message = f"fine-tuning job {job.id} {job.status}"
                    if job.error is not None and job.error.message:
                        message += f": {job.error.message} (code={job.error.code})"
                    yield TriggerEvent(
                        {
                            "status": TERMINAL[job.status],
                            "job_id": job.id,
                            "job_status": job.status,
                            "message": message,
                            "job": job.model_dump(mode="json"),
                        }
                    )
                    return
                self.log.info("fine-tuning job %s is %s", job.id, job.status)
                await asyncio.sleep(self.poll_interval)

    async def _run_provider(self) -> AsyncIterator[TriggerEvent]:
        """Poll any other provider through its ``astatus`` (``azure_openai``: the async client;
        ``selfhosted``: the job's status file). The event carries the provider-neutral status."""
        from fine_tuning.config import load_config
        from fine_tuning.providers import get_provider

        try:
            provider = get_provider(load_config(), self.provider)
        except Exception as exc:  # an unknown provider or a bad config ends the wait
            yield TriggerEvent({"status": "error", "job_id": self.job_id, "message": str(exc)})
            return
        errors = 0
        while True:
            try:
                status = await provider.astatus(self.job_id)
            except (FileNotFoundError, ValueError) as exc:  # no such job: waiting cannot help
                yield TriggerEvent({"status": "error", "job_id": self.job_id, "message": str(exc)})
                return
            except Exception as exc:
                errors += 1
                self.log.warning("polling %s failed (%d in a row): %s", self.job_id, errors, exc)
                if errors >= self.max_consecutive_errors:
                    yield TriggerEvent({
                        "status": "error",
                        "job_id": self.job_id,
                        "message": f"gave up polling after {errors} errors in a row: {exc}",
                    })
                    return
                await asyncio.sleep(self.poll_interval)
                continue
            errors = 0
            if status.terminal:
                message = f"{self.provider} job {status.job_id} {status.status}"
                if status.error:
                    message += f": {status.error}"
                yield TriggerEvent({
                    "status": TERMINAL[status.status],
                    "job_id": status.job_id,
                    "job_status": status.status,
                    "provider": self.provider,
                    "message": message,
                    "result": status.as_dict(),
                })
                return
            self.log.info("%s job %s is %s %s", self.provider, status.job_id, status.status, status.details)
            await asyncio.sleep(self.poll_interval)
