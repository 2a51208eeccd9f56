"""The deferrable wait: operator defers to the trigger; the trigger ends on every terminal state."""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred
from openai import OpenAI

from fine_tuning_airflow.operators import WaitForFineTuningJobOperator
from fine_tuning_airflow.triggers import FineTuningJobTrigger


@pytest.fixture
def connection(openai_env, monkeypatch: pytest.MonkeyPatch) -> OpenAI:
    """The Airflow connection the operator and trigger read, and a client to set up jobs with."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_OPENAI_DEFAULT",
        json.dumps({"conn_type": "generic", "host": openai_env.base_url, "password": "sk-conn-key"}),
    )
    monkeypatch.delenv("OPENAI_API_KEY")  # the connection alone must be enough
    return OpenAI(base_url=openai_env.base_url, api_key="sk-conn-key")


def start_job(client: OpenAI, examples: int = 12) -> str:
    lines = "".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        + "\n"
        for i in range(examples)
    )
    file = client.files.create(file=("d.jsonl", io.BytesIO(lines.encode())), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model="gpt-3.5-turbo-0125", training_file=file.id).id


def finished_job(client: OpenAI, job_id: str, timeout: float = 30.0) -> object:
    """Poll until the job ends; it must have succeeded (a failed job would loop for ever)."""
    deadline = time.monotonic() + timeout
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout} s"
        time.sleep(0.05)
        job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded", job
    return job


def context() -> dict:
    dag_run = SimpleNamespace(
        dag_id="weekly_fine_tuning", run_id="manual__wait", run_after=datetime(2026, 11, 22, tzinfo=UTC)
    )
    return {"params": {"poll_interval_seconds": 0.1}, "dag_run": dag_run, "data_interval_end": None}


def test_trigger_serializes_ids_not_secrets() -> None:
    trigger = FineTuningJobTrigger(job_id="ftjob-1", openai_conn_id="openai_prod", poll_interval=5)
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    # Tasks already deferred were serialized under this path: it must keep resolving.
    assert classpath == "fine_tuning_airflow.triggers.FineTuningJobTrigger"
    assert "sk-" not in json.dumps(kwargs)


async def test_trigger_yields_success_with_the_model(connection: OpenAI) -> None:
    job_id = start_job(connection)
    event = await asyncio.wait_for(FineTuningJobTrigger(job_id=job_id, poll_interval=0.1).run().__anext__(), timeout=30)
    assert event.payload["status"] == "success"
    assert event.payload["provider"] == "openai" and event.payload["job_status"] == "succeeded"
    assert event.payload["result"]["model_reference"].startswith("ft:")
    assert event.payload["result"]["model_reference"] == connection.fine_tuning.jobs.retrieve(job_id).fine_tuned_model


async def test_trigger_yields_error_for_an_invalid_file(connection: OpenAI) -> None:
    job_id = start_job(connection, examples=5)  # OpenAI needs at least 10 examples
    event = await asyncio.wait_for(FineTuningJobTrigger(job_id=job_id, poll_interval=0.1).run().__anext__(), timeout=30)
    assert event.payload["status"] == "error"
    assert event.payload["job_status"] == "failed"
    assert "10" in event.payload["message"]


async def test_trigger_yields_error_when_cancelled(connection: OpenAI) -> None:
    job_id = start_job(connection)
    connection.fine_tuning.jobs.cancel(job_id)
    event = await asyncio.wait_for(FineTuningJobTrigger(job_id=job_id, poll_interval=0.1).run().__anext__(), timeout=30)
    assert (event.payload["status"], event.payload["job_status"]) == ("error", "cancelled")


async def test_trigger_yields_error_for_an_unknown_job(connection: OpenAI) -> None:
    event = await asyncio.wait_for(FineTuningJobTrigger(job_id="ftjob-missing", poll_interval=0.1).run().__anext__(), timeout=30)
    assert event.payload["status"] == "error" and "not found" in event.payload["message"]


def test_operator_defers_then_completes(connection: OpenAI) -> None:
    job_id = start_job(connection)
    operator = WaitForFineTuningJobOperator(task_id="wait", job_id=job_id)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context())
    assert isinstance(deferred.value.trigger, FineTuningJobTrigger)
    assert deferred.value.method_name == "execute_complete"
    job = finished_job(connection, job_id)
    trigger = deferred.value.trigger
    event = asyncio.run(asyncio.wait_for(trigger.run().__anext__(), timeout=30))  # what the triggerer hands back
    result = operator.execute_complete(context(), event.payload)
    assert result["fine_tuned_model"] == job.fine_tuned_model and result["status"] == "succeeded"
    assert result["provider"] == "openai" and result["trained_tokens"] == job.trained_tokens


def test_operator_finishes_an_event_of_the_old_schema(connection: OpenAI) -> None:
    """A task deferred before the providers shared one event schema resumes with OpenAI's job
    object as ``job``: it still finishes."""
    job_id = start_job(connection)
    job = finished_job(connection, job_id)
    operator = WaitForFineTuningJobOperator(task_id="wait", job_id=job_id)
    result = operator.execute_complete(context(), {"status": "success", "job": job.model_dump(mode="json")})
    assert result["fine_tuned_model"] == job.fine_tuned_model and result["status"] == "succeeded"


def test_operator_refuses_a_malformed_event() -> None:
    operator = WaitForFineTuningJobOperator(task_id="wait", job_id="ftjob-x")
    with pytest.raises(AirflowException, match="malformed trigger event"):
        operator.execute_complete(context(), {"status": "done", "job_id": "ftjob-x", "message": "?"})


def test_operator_fails_with_openais_message() -> None:
    operator = WaitForFineTuningJobOperator(task_id="wait", job_id="ftjob-x")
    with pytest.raises(AirflowException, match="training file has too few examples"):
        operator.execute_complete(
            context(),
            {"status": "error", "job_id": "ftjob-x", "message": "fine-tuning job ftjob-x failed: training file has too few examples"},
        )


def test_on_kill_cancels_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an emulator whose stages last a minute: the job is still live when ``on_kill`` runs,
    so "cancelled" is the kill's doing, never a race with a job that finished first."""
    from openai_emulator.launch import EmulatorProcess

    with EmulatorProcess(stage_seconds=60) as slow:
        monkeypatch.setenv(
            "AIRFLOW_CONN_OPENAI_DEFAULT",
            json.dumps({"conn_type": "generic", "host": slow.base_url, "password": "sk-conn-key"}),
        )
        connection = OpenAI(base_url=slow.base_url, api_key="sk-conn-key")
        job_id = start_job(connection)
        assert connection.fine_tuning.jobs.retrieve(job_id).status not in ("succeeded", "cancelled")
        WaitForFineTuningJobOperator(task_id="wait", job_id=job_id).on_kill()
        assert connection.fine_tuning.jobs.retrieve(job_id).status == "cancelled"


async def test_a_user_kill_of_the_deferred_wait_cancels_the_job_and_cleanup_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Airflow 3.3 calls the trigger's ``on_kill`` when a person marks the deferred task failed
    or clears it (never on a triggerer restart, which only ends ``run`` and calls ``cleanup``)."""
    from openai_emulator.launch import EmulatorProcess

    with EmulatorProcess(stage_seconds=60) as slow:  # the job stays live for the whole test
        monkeypatch.setenv(
            "AIRFLOW_CONN_OPENAI_DEFAULT",
            json.dumps({"conn_type": "generic", "host": slow.base_url, "password": "sk-conn-key"}),
        )
        await _kill_then_restart(OpenAI(base_url=slow.base_url, api_key="sk-conn-key"))


async def _kill_then_restart(connection: OpenAI) -> None:
    job_id = start_job(connection)
    trigger = FineTuningJobTrigger(job_id=job_id, poll_interval=0.1)
    polling = asyncio.ensure_future(trigger.run().__anext__())
    await asyncio.sleep(0.3)
    # A triggerer restart: the run is cancelled and cleaned up; the job goes on.
    polling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await polling
    await trigger.cleanup()
    assert connection.fine_tuning.jobs.retrieve(job_id).status == "validating_files"
    # A person marks it failed: the trigger cancels the job at the provider.
    await trigger.on_kill()
    assert connection.fine_tuning.jobs.retrieve(job_id).status == "cancelled"
