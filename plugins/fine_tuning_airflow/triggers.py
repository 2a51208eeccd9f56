"""The async wait for a fine-tuning job, run by Airflow's triggerer (no worker slot held)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from fine_tuning.config import PipelineConfig

TERMINAL = {"succeeded": "success", "failed": "error", "cancelled": "error"}


def trigger_config(config: PipelineConfig) -> dict[str, Any]:
    """The run's own settings that the wait needs (breaker thresholds, the provider's section,
    the data directory), without secrets: the triggerer is another process with its own
    environment, and a run that overrode a threshold in its params must be polled under it.
    Services (URLs, keys) stay the triggerer's own."""
    from pydantic import SecretStr
    from pydantic_core import to_jsonable_python

    def public(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: public(item) for key, item in value.items() if not isinstance(item, SecretStr)}
        return value

    data = config.model_dump(include={"data_dir", "training", "breakers"})
    return to_jsonable_python(public(data))


class FineTuningJobTrigger(BaseTrigger):
    """Poll a fine-tuning job until it succeeds, fails or is cancelled; yield one event.

    Serialized state is the job id, the connection id, the timings and the run's non-secret
    settings (``trigger_config``): never a secret.

    :param job_id: the fine-tuning job (``ftjob-...``, or the provider's id).
    :param openai_conn_id: the Airflow connection holding the API key.
    :param poll_interval: seconds between polls.
    :param max_consecutive_errors: polls that may fail in a row (the API being briefly down
        does not mean the job failed) before the trigger gives up with an error event.
    :param provider: ``openai`` (the async client from the connection) or another
        ``training.provider`` (polled through its ``astatus``).
    :param config: the run's settings from ``trigger_config``; None reads only the triggerer's
        environment.

    OpenAI polls go through the shared ``openai`` circuit breaker (its thresholds from
    ``config``): while it is open the trigger sleeps until the open time ends instead of
    polling, and that does not count as an error.
    """

    def __init__(
        self,
        job_id: str,
        openai_conn_id: str = "openai_default",
        poll_interval: float = 60.0,
        max_consecutive_errors: int = 10,
        provider: str = "openai",
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.provider = provider
        self.job_id = job_id
        self.openai_conn_id = openai_conn_id
        self.poll_interval = poll_interval
        self.max_consecutive_errors = max_consecutive_errors
        self.config = config

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "openai_conn_id": self.openai_conn_id,
                "poll_interval": self.poll_interval,
                "max_consecutive_errors": self.max_consecutive_errors,
                "provider": self.provider,
                "config": self.config,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from fine_tuning.config import load_config

        async with contextlib.AsyncExitStack() as stack:
            try:  # a missing connection, an unknown provider or a bad config ends the wait
                config = load_config(params=self.config or {})
                if self.provider == "openai":
                    poll = await self._openai_poll(config, stack)
                else:
                    poll = self._provider_poll(config)
            except Exception as exc:
                yield TriggerEvent({"status": "error", "job_id": self.job_id, "message": str(exc)})
                return
            async for event in self._until_done(poll):
                yield event

    async def _until_done(self, poll: Callable[[], Awaitable[TriggerEvent | None]]) -> AsyncIterator[TriggerEvent]:
        errors = 0
        while True:
            try:
                event = await poll()
            except _Gone as exc:  # no such job: waiting cannot help
                yield TriggerEvent({"status": "error", "job_id": self.job_id, "message": str(exc)})
                return
            except _Paused as exc:
                self.log.warning("%s; polling %s again after that", exc, self.job_id)
                await asyncio.sleep(max(exc.seconds, self.poll_interval))
                continue
            except Exception as exc:
                errors += 1
                self.log.warning("polling %s failed (%d in a row): %s", self.job_id, errors, exc)
                if errors >= self.max_consecutive_errors:
                    message = f"gave up polling after {errors} errors in a row: {exc}"
                    yield TriggerEvent({"status": "error", "job_id": self.job_id, "message": message})
                    return
                await asyncio.sleep(self.poll_interval)
                continue
            errors = 0
            if event is not None:
                yield event
                return
            await asyncio.sleep(self.poll_interval)

    async def _openai_poll(
        self, config: PipelineConfig, stack: contextlib.AsyncExitStack
    ) -> Callable[[], Awaitable[TriggerEvent | None]]:
        """One poll of an OpenAI job through the breaker: the final event, or None while it runs."""
        import openai
        from fine_tuning.breakers import CircuitOpenError, get_breaker

        from fine_tuning_airflow.hooks import OpenAIFineTuningHook

        client = await stack.enter_async_context(await OpenAIFineTuningHook(self.openai_conn_id).aget_client())
        breaker = get_breaker("openai", config)

        async def poll() -> TriggerEvent | None:
            try:
                job = await breaker.acall(client.fine_tuning.jobs.retrieve, self.job_id)
            except CircuitOpenError as exc:
                raise _Paused(str(exc), exc.remaining_seconds) from exc
            except openai.NotFoundError as exc:
                raise _Gone(f"job not found: {exc.message}") from exc
            if job.status not in TERMINAL:
                self.log.info("fine-tuning job %s is %s", job.id, job.status)
                return None
            message = f"fine-tuning job {job.id} {job.status}"
            if job.error is not None and job.error.message:
                message += f": {job.error.message} (code={job.error.code})"
            return TriggerEvent({
                "status": TERMINAL[job.status],
                "job_id": job.id,
                "job_status": job.status,
                "message": message,
                "job": job.model_dump(mode="json"),
            })

        return poll

    def _provider_poll(self, config: PipelineConfig) -> Callable[[], Awaitable[TriggerEvent | None]]:
        """One poll of any other provider through its ``astatus`` (``azure_openai``: the async
        client; ``selfhosted``: the job's status file); the event carries the provider-neutral
        status."""
        from fine_tuning.providers import get_provider

        provider = get_provider(config, self.provider)

        async def poll() -> TriggerEvent | None:
            try:
                status = await provider.astatus(self.job_id)
            except (FileNotFoundError, ValueError) as exc:
                raise _Gone(str(exc)) from exc
            if not status.terminal:
                self.log.info("%s job %s is %s %s", self.provider, status.job_id, status.status, status.details)
                return None
            message = f"{self.provider} job {status.job_id} {status.status}"
            if status.error:
                message += f": {status.error}"
            return TriggerEvent({
                "status": TERMINAL[status.status],
                "job_id": status.job_id,
                "job_status": status.status,
                "provider": self.provider,
                "message": message,
                "result": status.as_dict(),
            })

        return poll


class _Gone(Exception):
    """The job does not exist (any more): end the wait with an error."""


class _Paused(Exception):
    """Do not poll for ``seconds`` (the breaker is open); not an error."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds
