"""The async wait for a fine-tuning job, run by Airflow's triggerer (no worker slot held).

The trigger polls every provider the same way, through its ``astatus``, and yields one event of
one schema (:class:`JobEvent`), which the operator validates when it resumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

from airflow.triggers.base import BaseTrigger, TriggerEvent
from pydantic import BaseModel, ConfigDict, model_validator

# The path the triggerer imports the trigger from. Written out, not derived from the class:
# moving the class must not strand the ``wait`` tasks already deferred under this path.
TRIGGER_CLASSPATH = "fine_tuning_airflow.triggers.FineTuningJobTrigger"


class JobEvent(BaseModel):
    """The trigger's one event: ``success`` (the job succeeded) or ``error`` (it failed, was
    cancelled, does not exist, or could not be polled), with the job's terminal status as
    ``JobStatus.as_dict()`` in ``result`` whenever the job ended."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["success", "error"]
    job_id: str
    message: str
    provider: str | None = None
    job_status: str | None = None
    result: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_openai_event(cls, data: Any) -> Any:
        """An event yielded before the providers shared one schema carried OpenAI's job object
        as ``job``: a task that resumes with one after an upgrade still finishes."""
        if isinstance(data, dict) and "job" in data:
            data = dict(data)
            job = data.pop("job") or {}
            error = job.get("error") or {}
            state = {"paused": "queued"}.get(job.get("status") or "", job.get("status"))
            data.setdefault("job_id", job.get("id"))
            data.setdefault("message", f"fine-tuning job {job.get('id')} {job.get('status')}")
            data.setdefault("provider", "openai")
            data.setdefault("job_status", state)
            data["result"] = {
                "job_id": job.get("id"),
                "status": state,
                "model_reference": job.get("fine_tuned_model"),
                "trained_tokens": job.get("trained_tokens"),
                "error": None
                if state == "succeeded"
                else (
                    f"fine-tuning job {job.get('id')} {job.get('status')}: {error.get('message')} "
                    f"(code={error.get('code')}, param={error.get('param')})"
                    if error
                    else None
                ),
                "created_at": job.get("created_at"),
                "finished_at": job.get("finished_at"),
            }
        return data


def trigger_config(config: Any) -> dict[str, Any]:
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
    result: dict[str, Any] = to_jsonable_python(public(data))
    return result


class FineTuningJobTrigger(BaseTrigger):
    """Poll a fine-tuning job until it succeeds, fails or is cancelled; yield one :class:`JobEvent`.

    Serialized state is the job id, the connection id, the timings and the run's non-secret
    settings (``trigger_config``): never a secret.

    :param job_id: the fine-tuning job (``ftjob-...``, or the provider's id).
    :param openai_conn_id: the Airflow connection holding the OpenAI key and URL.
    :param poll_interval: seconds between polls.
    :param max_consecutive_errors: polls that may fail in a row (the API being briefly down
        does not mean the job failed) before the trigger gives up with an error event.
    :param provider: the ``training.provider`` that runs the job (polled through its ``astatus``).
    :param config: the run's settings from ``trigger_config``; None reads only the triggerer's
        environment.

    A provider with a breaker polls through it (its thresholds from ``config``): while it is
    open the trigger sleeps until the open time ends instead of polling, and that does not count
    as an error.
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
            TRIGGER_CLASSPATH,
            {
                "job_id": self.job_id,
                "openai_conn_id": self.openai_conn_id,
                "poll_interval": self.poll_interval,
                "max_consecutive_errors": self.max_consecutive_errors,
                "provider": self.provider,
                "config": self.config,
            },
        )

    async def on_kill(self) -> None:
        """A person marked the deferred ``wait`` failed or success, or cleared it: cancel the job.

        Airflow calls ``on_kill`` of a deferred task's trigger on user actions only (3.3+: not on
        a triggerer restart, a redistribution or the trigger's timeout; the worker-side
        ``on_kill`` never runs for a deferred task), so a job is never cancelled because the
        triggerer moved. ``cleanup`` runs on every exit and cancels nothing.
        """
        from fine_tuning.config import load_config
        from fine_tuning.train.providers import get_provider
        from fine_tuning_airflow.hooks import OpenAIFineTuningHook

        try:
            config = await OpenAIFineTuningHook(self.openai_conn_id).aapply_to(
                load_config(params=self.config or {})
            )
            provider = get_provider(config, self.provider)
            state = await asyncio.to_thread(provider.cancel, self.job_id)
        except Exception as exc:  # noqa: BLE001 - logged loudly: the job may still be running
            self.log.error(
                "the wait was killed, but cancelling %s job %s failed: %s", self.provider, self.job_id, exc
            )
            return
        self.log.warning(
            "the wait was killed by a user: %s job %s is now %s", self.provider, self.job_id, state
        )

    def _event(self, status: Literal["success", "error"], message: str, **fields: Any) -> TriggerEvent:
        event = JobEvent(status=status, job_id=self.job_id, message=message, provider=self.provider, **fields)
        return TriggerEvent(event.model_dump(mode="json"))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from fine_tuning.config import load_config
        from fine_tuning.infra.breakers import CircuitOpenError
        from fine_tuning.train.providers import JobNotFound, get_provider
        from fine_tuning_airflow.hooks import OpenAIFineTuningHook

        try:  # a missing connection, an unknown provider or a bad config ends the wait
            config = await OpenAIFineTuningHook(self.openai_conn_id).aapply_to(
                load_config(params=self.config or {})
            )
            provider = get_provider(config, self.provider)
        except Exception as exc:  # noqa: BLE001 - the event says why; the task fails with it
            yield self._event("error", str(exc))
            return
        errors = 0
        while True:
            try:
                status = await provider.astatus(self.job_id)
            except JobNotFound as exc:  # no such job: waiting cannot help
                yield self._event("error", str(exc))
                return
            except CircuitOpenError as exc:
                self.log.warning("%s; polling %s again after that", exc, self.job_id)
                await asyncio.sleep(max(exc.remaining_seconds, self.poll_interval))
                continue
            except Exception as exc:  # noqa: BLE001 - the API briefly down is not the job failing
                errors += 1
                self.log.warning("polling %s failed (%d in a row): %s", self.job_id, errors, exc)
                if errors >= self.max_consecutive_errors:
                    yield self._event("error", f"gave up polling after {errors} errors in a row: {exc}")
                    return
                await asyncio.sleep(self.poll_interval)
                continue
            errors = 0
            if status.terminal:
                message = f"{self.provider} job {status.job_id} {status.status}"
                if status.error:
                    message += f": {status.error}"
                yield self._event(
                    "success" if status.status == "succeeded" else "error",
                    message,
                    job_status=status.status,
                    result=status.as_dict(),
                )
                return
            self.log.info("%s job %s is %s %s", self.provider, status.job_id, status.status, status.details)
            await asyncio.sleep(self.poll_interval)
