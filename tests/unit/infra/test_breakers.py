"""Circuit breakers on a real Redis (and the per-process fallback): the state machine, two
processes sharing one breaker, Redis down, the operator's fail-fast and retry delay, the trigger."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import openai
import pytest
import redis
from airflow.sdk.definitions.retry_policy import RetryAction
from support import TEST_REDIS_URL

from fine_tuning.infra.breakers import (
    BREAKER_NAMES,
    BreakerListener,
    CircuitBreaker,
    CircuitOpenError,
    get_breaker,
    is_breaker_failure,
)
from fine_tuning.config import BreakerConfig, load_config
from fine_tuning_airflow.breaker_operator import CircuitOpenRetryPolicy
from fine_tuning_airflow.operators import FineTuningStepOperator, WaitForFineTuningJobOperator

REDIS_URL = TEST_REDIS_URL
# Nothing listens on port 1. A URL of this module's own: "unreachable" is logged once per URL
# per process, and TEST_REDIS_URL may itself point at a dead port.
DEAD_REDIS_URL = f"redis://fallback-{uuid.uuid4().hex[:8]}@127.0.0.1:1/0"


def settings(**overrides: object) -> BreakerConfig:
    base = {"failure_threshold": 3, "recovery_timeout_seconds": 120.0, "minimum_calls": 10}
    return BreakerConfig(**{**base, **overrides})


def make_breaker(redis_url: str | None, **overrides: object) -> CircuitBreaker:
    return CircuitBreaker("openai", settings(**overrides), redis_url, key_prefix=f"test:{uuid.uuid4().hex[:10]}:b")


def fail(breaker: CircuitBreaker, exc: Exception | None = None) -> None:
    def boom() -> None:
        raise exc or ConnectionError("connection refused")

    with pytest.raises(type(exc) if exc else ConnectionError):
        breaker.call(boom)


@pytest.fixture(params=["redis", "per-process"])
def storage(request: pytest.FixtureRequest) -> str | None:
    """The same rules, in Redis (Lua) and in the per-process fallback."""
    return REDIS_URL if request.param == "redis" else None


def stored(breaker: CircuitBreaker) -> dict[str, str]:
    """The breaker's hash as Redis holds it (empty when it is not there)."""
    raw = redis.Redis.from_url(REDIS_URL).hgetall(breaker.keys[0])
    return {k.decode(): v.decode() for k, v in raw.items()}


def assert_kept_where_claimed(breaker: CircuitBreaker, storage: str | None, state: str) -> None:
    """The ``[redis]`` cases claim that every process sees this state: Redis must hold it (the
    breaker falls back to per-process state when Redis is unreachable, with the same rules, so
    without this check the ``[redis]`` cases would pass with Redis down). The per-process cases
    say they are not shared (and so pass with Redis down)."""
    snapshot = breaker.snapshot()
    if storage is None:
        assert not snapshot.shared and not breaker.shared
        return
    assert snapshot.shared, "the breaker fell back to per-process state: Redis did not hold it"
    assert stored(breaker)["state"] == state, stored(breaker)


def test_consecutive_failures_open_it_and_say_until_when(storage: str | None) -> None:
    breaker = make_breaker(storage)
    fail(breaker)
    fail(breaker)
    assert breaker.state == "closed" and breaker.failure_count == 2
    fail(breaker)
    assert breaker.state == "open"
    assert breaker.opened_until is not None and breaker.opened_until > datetime.now(UTC) + timedelta(seconds=100)
    with pytest.raises(CircuitOpenError, match=r"circuit 'openai' open until \d\d:\d\d:\d\d UTC") as raised:
        breaker.call(lambda: "never called")
    assert 100 < raised.value.remaining_seconds <= 120
    assert_kept_where_claimed(breaker, storage, "open")
    if storage:
        assert stored(breaker)["failures"] == "3" and stored(breaker)["openings"] == "1"


def test_reset_closes_it_for_every_process_and_forgets_its_counts(storage: str | None) -> None:
    """The operators' escape hatch: after ``reset`` on one instance, another instance of the
    same breaker (another process) sees it closed with no failures — and Redis holds nothing."""
    prefix = f"test:{uuid.uuid4().hex[:10]}:b"
    here, there = (CircuitBreaker("openai", settings(), storage, key_prefix=prefix) for _ in range(2))
    for _ in range(3):
        fail(here)
    assert here.state == "open"
    if storage:
        assert there.state == "open" and redis.Redis.from_url(REDIS_URL).exists(*here.keys) > 0
    here.reset()
    if storage:
        assert redis.Redis.from_url(REDIS_URL).exists(*here.keys) == 0
        assert (there.state, there.failure_count) == ("closed", 0)
        assert there.snapshot().shared
    assert (here.state, here.failure_count, here.opened_until) == ("closed", 0, None)
    assert here.call(lambda: "called") == "called"


def test_a_success_resets_the_consecutive_count(storage: str | None) -> None:
    breaker = make_breaker(storage)
    fail(breaker)
    fail(breaker)
    assert breaker.call(lambda: 42) == 42
    fail(breaker)
    fail(breaker)
    assert breaker.state == "closed"
    assert_kept_where_claimed(breaker, storage, "closed")
    if storage:
        assert stored(breaker)["failures"] == "2" and stored(breaker)["win_n"] == "5"


def test_interleaved_failures_open_it_by_rate(storage: str | None) -> None:
    """50% failures, never 3 in a row: consecutive counting alone would never open it."""
    breaker = make_breaker(storage, minimum_calls=10, failure_rate_threshold=0.5)
    for _ in range(4):
        fail(breaker)
        breaker.call(lambda: None)
    assert breaker.state == "closed"  # 8 calls: below the minimum
    fail(breaker)
    breaker.call(lambda: None)  # the 10th call: 5/10 failed
    assert breaker.state == "open"
    assert_kept_where_claimed(breaker, storage, "open")
    if storage:
        assert stored(breaker)["failures"] == "0"  # the rate opened it, not a run of failures


def test_slow_calls_open_it(storage: str | None) -> None:
    breaker = make_breaker(storage, slow_call_duration_seconds=0.01, slow_call_rate_threshold=1.0, minimum_calls=3)
    for _ in range(3):
        breaker.call(time.sleep, 0.02)
    assert breaker.state == "open"
    assert_kept_where_claimed(breaker, storage, "open")


def test_half_open_probe_closes_or_reopens(storage: str | None) -> None:
    breaker = make_breaker(storage, recovery_timeout_seconds=0.2, half_open_max_calls=2)
    for _ in range(3):
        fail(breaker)
    time.sleep(0.3)
    assert breaker.state == "half_open"
    first, second = breaker.acquire(), breaker.acquire()
    assert first.probe and second.probe
    with pytest.raises(CircuitOpenError, match="half-open"):
        breaker.acquire()  # exactly two probes
    breaker.record_success(first)
    assert breaker.state == "half_open"
    breaker.record_success(second)
    assert breaker.state == "closed" and breaker.failure_count == 0

    for _ in range(3):
        fail(breaker)
    time.sleep(0.3)
    fail(breaker)  # the probe fails
    assert breaker.state == "open"
    assert_kept_where_claimed(breaker, storage, "open")
    if storage:
        assert stored(breaker)["openings"] == "3"  # opened, closed by its probes, opened, reopened by one


def test_a_probe_whose_process_died_frees_its_slot_after_the_lease(storage: str | None) -> None:
    breaker = make_breaker(storage, recovery_timeout_seconds=0.1, probe_lease_seconds=0.2)
    for _ in range(3):
        fail(breaker)
    time.sleep(0.15)
    breaker.acquire()  # taken, never returned (the process was killed)
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    time.sleep(0.25)
    assert breaker.acquire().probe
    assert_kept_where_claimed(breaker, storage, "half_open")
    if storage:
        assert stored(breaker)["probes"] == "1"  # the dead probe's slot was freed, then retaken


def test_an_outcome_that_reaches_redis_twice_counts_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """When Redis answers after the client's socket timeout, redis-py sends the script again and
    Redis runs it twice. Each failure must still count once: two real failures of three must not
    open the breaker."""
    breaker = make_breaker(REDIS_URL)
    register = breaker._script
    deliveries: list[list[Any]] = []

    def delivered_twice(client: Any, name: str, source: str) -> Any:
        script = register(client, name, source)
        if name != "record":
            return script

        def resent(keys: list[str], args: list[Any]) -> Any:
            deliveries.append(args)
            script(keys=keys, args=args)  # the delivery whose reply came too late
            return script(keys=keys, args=args)

        return resent

    monkeypatch.setattr(breaker, "_script", delivered_twice)
    fail(breaker)
    fail(breaker)
    assert (breaker.state, breaker.failure_count) == ("closed", 2)
    assert stored(breaker)["failures"] == "2" and stored(breaker)["win_n"] == "2"  # twice delivered, once counted
    fail(breaker)
    assert breaker.state == "open"
    # Every outcome went through the doubled script (a breaker that fell back to per-process
    # state would never call it, and the test would prove nothing), each with its own id.
    assert len(deliveries) == 3 and len({tuple(args) for args in deliveries}) == 3
    assert_kept_where_claimed(breaker, REDIS_URL, "open")


def test_what_counts_as_a_failure() -> None:
    request = SimpleNamespace(method="POST", url="http://x")
    response = lambda status: SimpleNamespace(status_code=status, headers={}, request=request)  # noqa: E731
    bad_file = openai.BadRequestError("bad file", response=response(400), body=None)  # type: ignore[arg-type]
    assert not is_breaker_failure(bad_file)
    assert is_breaker_failure(openai.RateLimitError("slow down", response=response(429), body=None))  # type: ignore[arg-type]
    assert is_breaker_failure(openai.InternalServerError("oops", response=response(503), body=None))  # type: ignore[arg-type]
    assert is_breaker_failure(openai.APITimeoutError(request=request))  # type: ignore[arg-type]
    assert is_breaker_failure(ConnectionRefusedError())

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_ALREADY_EXISTS, TEMPORARILY_UNAVAILABLE

    assert is_breaker_failure(MlflowException("API request failed", error_code=INTERNAL_ERROR))
    assert is_breaker_failure(MlflowException("503", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_breaker_failure(MlflowException("exists", error_code=RESOURCE_ALREADY_EXISTS))

    # vLLM through httpx: raise_for_status() on a 5xx counts; a 4xx is the server's answer.
    import httpx

    vllm = httpx.Request("POST", "http://vllm:8000/v1/load_lora_adapter")
    for status, counted in ((503, True), (500, True), (429, True), (404, False), (400, False)):
        error = httpx.HTTPStatusError("x", request=vllm, response=httpx.Response(status, request=vllm))
        assert is_breaker_failure(error) is counted, status
    assert is_breaker_failure(httpx.ConnectError("refused", request=vllm))
    assert is_breaker_failure(httpx.ReadTimeout("slow", request=vllm))

    breaker = make_breaker(REDIS_URL)
    for _ in range(5):
        fail(breaker, bad_file)
    assert breaker.state == "closed" and breaker.failure_count == 0
    # The five answers were recorded as successes in the shared window, not lost.
    assert_kept_where_claimed(breaker, REDIS_URL, "closed")
    assert (stored(breaker)["win_n"], stored(breaker)["win_f"]) == ("5", "0")


def test_listeners_hear_transitions_failures_and_successes() -> None:
    events: list[tuple] = []

    class Recorder(BreakerListener):
        def state_change(self, cb: CircuitBreaker, old_state: str, new_state: str) -> None:
            events.append(("state", old_state, new_state))

        def failure(self, cb: CircuitBreaker, exc: BaseException) -> None:
            events.append(("failure", type(exc).__name__))

        def success(self, cb: CircuitBreaker) -> None:
            events.append(("success",))

    breaker = make_breaker(REDIS_URL, recovery_timeout_seconds=0.1)
    breaker.add_listener(Recorder())
    breaker.call(lambda: None)
    for _ in range(3):
        fail(breaker)
    time.sleep(0.15)
    breaker.call(lambda: None)
    assert events == [
        ("success",), ("failure", "ConnectionError"), ("failure", "ConnectionError"),
        ("failure", "ConnectionError"), ("state", "closed", "open"), ("state", "open", "half_open"),
        ("success",), ("state", "half_open", "closed"),
    ]
    # The transitions the listener heard are the ones Redis made (one opening, closed again).
    assert_kept_where_claimed(breaker, REDIS_URL, "closed")
    assert stored(breaker)["openings"] == "1"


def test_every_key_has_a_ttl() -> None:
    breaker = make_breaker(REDIS_URL)
    fail(breaker)
    client = redis.Redis.from_url(REDIS_URL)
    for key in breaker.keys:
        assert client.pttl(key) > 0, key


def test_get_breaker_interface_and_defaults() -> None:
    config = load_config(env={})
    assert BREAKER_NAMES == ("openai", "mlflow", "vllm")
    openai_breaker, mlflow_breaker, vllm_breaker = (get_breaker(name, config) for name in BREAKER_NAMES)
    assert (openai_breaker.settings.failure_threshold, openai_breaker.settings.recovery_timeout_seconds) == (3, 120)
    assert (mlflow_breaker.settings.failure_threshold, mlflow_breaker.settings.recovery_timeout_seconds) == (5, 60)
    vllm_settings = vllm_breaker.settings
    assert (vllm_settings.failure_threshold, vllm_settings.recovery_timeout_seconds) == (3, 60)
    assert get_breaker("openai", config) is openai_breaker
    assert openai_breaker.name == "openai" and isinstance(openai_breaker.failure_count, int)
    with pytest.raises(ValueError, match="unknown circuit breaker 'redis'"):
        get_breaker("redis", config)


CHILD = textwrap.dedent(
    """
    import json, sys
    from fine_tuning.infra.breakers import CircuitBreaker, CircuitOpenError
    from fine_tuning.config import BreakerConfig
    prefix, action, redis_url = sys.argv[1], sys.argv[2], sys.argv[4]
    breaker = CircuitBreaker("openai", BreakerConfig(**json.loads(sys.argv[3])), redis_url, key_prefix=prefix)
    def boom():
        raise ConnectionError("down")
    if action == "fail-then-succeed":
        for _ in range(int(sys.argv[5])):
            for call in (boom, lambda: None):
                try:
                    breaker.call(call)
                except (ConnectionError, CircuitOpenError):
                    pass
        print(json.dumps({"state": breaker.state, "shared": breaker.shared}))
    else:  # try to get a probe slot
        try:
            print(json.dumps({"probe": breaker.acquire().probe}))
        except CircuitOpenError:
            print(json.dumps({"probe": False}))
    """
)


def run_children(prefix: str, action: str, config: dict, *extra: str, count: int = 1) -> list[dict]:
    processes = [
        subprocess.Popen([sys.executable, "-c", CHILD, prefix, action, json.dumps(config), REDIS_URL, *extra],
                         stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    return [json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in processes]


def test_two_processes_share_one_breaker() -> None:
    """Failures interleaved with successes in two processes open the one shared breaker, and
    once it is half-open, exactly one probe is admitted among eight processes."""
    prefix = f"test:{uuid.uuid4().hex[:10]}:b"
    # Open for 10 s: long enough that the breaker is still open when the slowest child on a loaded
    # machine (a mutation run) has finished; the probe phase waits for the time Redis says.
    config = {"failure_threshold": 3, "minimum_calls": 10, "recovery_timeout_seconds": 10.0, "half_open_max_calls": 1}
    here = CircuitBreaker("openai", BreakerConfig(**config), REDIS_URL, key_prefix=prefix)
    # Two processes, each alternating fail/success 3 times: 12 calls, half failed.
    results = run_children(prefix, "fail-then-succeed", config, "3", count=2)
    assert all(result["shared"] for result in results), results
    assert here.state == "open", results
    snapshot = here.snapshot()
    assert snapshot.shared and snapshot.openings == 1  # one opening for the cluster, not one per process

    assert snapshot.opened_until is not None
    time.sleep(max((snapshot.opened_until - datetime.now(UTC)).total_seconds(), 0) + 0.1)
    probes = run_children(prefix, "probe", config, count=8)
    assert sum(result["probe"] for result in probes) == 1, probes


def test_redis_down_falls_back_to_per_process_state_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    breaker = make_breaker(DEAD_REDIS_URL)
    with caplog.at_level(logging.WARNING, logger="fine_tuning.infra.redis"):
        assert breaker.call(lambda: "still works") == "still works"
        fail(breaker)
        fail(breaker)
        fail(breaker)
        snapshot = breaker.snapshot()
    assert snapshot.state == "open" and not snapshot.shared and not breaker.shared
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]


# ------------------------------------------------------------------------------- the plugin


def step_context(params: dict | None = None) -> dict:
    dag_run = SimpleNamespace(dag_id="weekly_fine_tuning", run_id="manual__breaker", run_after=datetime(2026, 11, 22, tzinfo=UTC))
    return {"params": params or {}, "dag_run": dag_run, "data_interval_end": None}


def open_breaker(name: str = "openai") -> CircuitBreaker:
    """Another worker opens the breaker: a breaker of its own on the environment's Redis and key
    prefix, not the process's (``get_breaker``), so only Redis can tell the operator."""
    config = load_config()
    breaker = CircuitBreaker(name, getattr(config.breakers, name), config.services.redis_url.get_secret_value(),
                             key_prefix=config.breakers.key_prefix)
    for _ in range(breaker.settings.failure_threshold):
        fail(breaker)
    assert breaker.state == "open" and breaker.shared
    return breaker


def test_operator_fails_fast_and_retries_after_the_open_time(openai_env) -> None:
    breaker = open_breaker()
    operator = FineTuningStepOperator(task_id="train", step="train", retry_delay=timedelta(seconds=30))
    with pytest.raises(CircuitOpenError, match=r"circuit 'openai' open until \d\d:\d\d:\d\d UTC") as raised:
        operator.execute(step_context())
    assert openai_env.requests() == []  # no call was made

    decision = operator.retry_policy.evaluate(raised.value, try_number=1, max_tries=3)
    remaining = (breaker.opened_until - datetime.now(UTC)).total_seconds()
    assert decision.action == RetryAction.RETRY
    assert decision.retry_delay >= timedelta(seconds=remaining) and decision.retry_delay > timedelta(seconds=100)
    assert "open until" in decision.reason

    # A short open time never retries sooner than the task's own delay; other errors keep the default.
    short = CircuitOpenError("openai", "open", datetime.now(UTC), 2.0, 3)
    assert CircuitOpenRetryPolicy(min_delay=timedelta(seconds=30)).evaluate(short, 1, 3).retry_delay == timedelta(seconds=30)
    assert operator.retry_policy.evaluate(ValueError("x"), 1, 3).action == RetryAction.DEFAULT


def test_register_does_not_fail_fast_on_an_open_mlflow_breaker() -> None:
    config = load_config()
    assert FineTuningStepOperator(task_id="register", step="register").breakers_for_task(config) == ()
    assert FineTuningStepOperator(task_id="train", step="train").breakers_for_task(config) == ("openai",)
    assert WaitForFineTuningJobOperator(task_id="wait", job_id="ftjob-1").breakers_for_task(config) == ("openai",)


def test_a_provider_without_a_remote_api_checks_no_breaker() -> None:
    """Self-hosted training never calls OpenAI: an open OpenAI breaker must not stop it."""
    config = load_config(params={"training_provider": "selfhosted"})
    assert FineTuningStepOperator(task_id="train", step="train").breakers_for_task(config) == ()
    assert WaitForFineTuningJobOperator(task_id="wait", job_id="selfhosted-x-1").breakers_for_task(config) == ()


async def test_trigger_opens_and_waits_out_the_breaker_under_the_runs_thresholds(
    openai_env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The run's params open the breaker after one failure, for 1 s; the triggerer's environment
    knows neither (3 failures, 120 s): the deferred trigger carries them. One failed poll opens
    it, the trigger waits out the open second instead of polling, and the probe finishes."""
    import importlib

    from airflow.sdk.exceptions import TaskDeferred
    from openai import OpenAI

    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "generic", "host": openai_env.base_url, "password": "sk-conn-key"}))
    client = OpenAI(base_url=openai_env.base_url, api_key="sk-test")
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}) + "\n" for i in range(12))
    file = client.files.create(file=("d.jsonl", lines.encode()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="gpt-3.5-turbo-0125", training_file=file.id)

    params = {
        "poll_interval_seconds": 0.1,
        "breakers": {"openai": {"failure_threshold": 1, "recovery_timeout_seconds": 1.0}},
    }
    with pytest.raises(TaskDeferred) as deferred:
        WaitForFineTuningJobOperator(task_id="wait", job_id=job.id).execute(step_context(params))
    openai_env.inject_fault(
        method="GET", path=f"/v1/fine_tuning/jobs/{job.id}", status=500, count=1, should_retry=False
    )

    classpath, kwargs = deferred.value.trigger.serialize()  # what the triggerer process gets
    assert "sk-" not in json.dumps(kwargs)
    module, name = classpath.rsplit(".", 1)
    trigger = getattr(importlib.import_module(module), name)(**kwargs)
    with caplog.at_level(logging.WARNING):
        event = await asyncio.wait_for(trigger.run().__anext__(), timeout=30)
    assert event.payload["status"] == "success"
    assert any("openai: closed -> open" in r.getMessage() for r in caplog.records), caplog.text
    # What another worker reads from Redis: opened once by the failed poll, closed by the probe.
    run_config = load_config(params=params)
    seen = CircuitBreaker("openai", run_config.breakers.openai, run_config.services.redis_url.get_secret_value(),
                          key_prefix=run_config.breakers.key_prefix).snapshot()
    assert (seen.shared, seen.state, seen.openings) == (True, "closed", 1)
    # The emulator's request log: the failed poll, then nothing for the open second (0.1 s polls
    # would have made ~10), then the probe that found the job done.
    polls = openai_env.requests("GET", f"/v1/fine_tuning/jobs/{job.id}")
    failed = [i for i, r in enumerate(polls) if r["fault"]]
    assert len(failed) == 1 and polls[failed[0]]["status"] == 500, polls
    after = polls[failed[0] + 1 :]
    assert after and after[-1]["status"] == 200, polls
    assert after[0]["at"] - polls[failed[0]]["at"] >= 0.95, polls  # waited out the 1 s, not polled



def test_an_open_openai_breaker_does_not_stop_selfhosted_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from fine_tuning.infra.breakers import get_breaker
    from fine_tuning.config import load_config
    from fine_tuning_airflow.operators import FineTuningStepOperator

    monkeypatch.setenv("FINE_TUNING_BREAKER_KEY_PREFIX", f"test:selfhosted:{uuid.uuid4().hex[:8]}")
    openai_config = load_config()
    breaker = get_breaker("openai", openai_config)
    for _ in range(openai_config.breakers.openai.failure_threshold):
        breaker.record_failure(breaker.acquire(), ConnectionError("connection refused"))
    assert breaker.state == "open"
    operator = FineTuningStepOperator(task_id="train", step="train")
    from fine_tuning.infra.breakers import CircuitOpenError

    with pytest.raises(CircuitOpenError):
        operator.check_breakers(openai_config)
    operator.check_breakers(load_config(params={"training": {"provider": "selfhosted"}}))  # no raise
