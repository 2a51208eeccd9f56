"""Circuit breakers whose state every worker and pod shares through Redis.

One breaker per remote service (:data:`BREAKER_NAMES`). State (``closed`` / ``open`` /
``half_open``), the consecutive-failure count, the sliding window of recent outcomes and the
open-until time live in Redis and change only inside Lua scripts, timed by the Redis server's
clock: two processes can never disagree about the state, and a race cannot let a flood through
(HALF_OPEN admits exactly ``half_open_max_calls`` probes across the whole cluster).

Why not a library: pybreaker's ``CircuitRedisState`` reads and writes fields one by one (no
atomic transition, lost increments under concurrency), lets every process through in HALF_OPEN,
and counts only consecutive failures, so 50% failures interleaved across two workers never
open it; purgatory's redis extra pins ``redis<6`` (we run 8.1); aiobreaker has been unmaintained
since 2021. So the storage is written here as atomic scripts, and the API stays familiar:
pybreaker's states, ``call()`` and listeners (``before_call``, ``state_change``, ``failure``,
``success``), plus resilience4j's failure-rate and slow-call thresholds over a time window.

When Redis is unreachable a breaker falls back to per-process state (same rules, local clock),
logs that once, and tries Redis again after ``breakers.redis_retry_seconds``: the pipeline never
blocks or fails on Redis.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fine_tuning.config import BreakerConfig, PipelineConfig
from fine_tuning.infra.redis import mark_redis_down, mark_redis_up, redis_available, shared_client

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["closed", "open", "half_open"]
BREAKER_NAMES: tuple[str, ...] = ("openai", "mlflow", "vllm")
# While HALF_OPEN has no free probe slot, callers are told to come back after this long.
HALF_OPEN_BUSY_RETRY_SECONDS = 5.0


class CircuitOpenError(RuntimeError):
    """The named circuit is open (or its half-open probes are taken): the call was not made.

    :ivar remaining_seconds: how long until the breaker lets a call through again.
    """

    def __init__(
        self,
        name: str,
        state: State,
        opened_until: datetime | None,
        remaining_seconds: float,
        failure_count: int,
    ) -> None:
        self.name = name
        self.state = state
        self.opened_until = opened_until
        self.remaining_seconds = max(remaining_seconds, 0.0)
        self.failure_count = failure_count
        if opened_until is not None and state == "open":
            message = (
                f"circuit {name!r} open until {opened_until:%H:%M:%S} UTC "
                f"({math.ceil(self.remaining_seconds)} s left; {failure_count} consecutive failures): "
                "call not made"
            )
        else:
            message = (
                f"circuit {name!r} half-open and its probe calls are taken by other workers: "
                f"call not made, retry in {self.remaining_seconds:.0f} s"
            )
        super().__init__(message)

    @property
    def retry_after_seconds(self) -> int:
        """When to try again: the remaining open time rounded up, plus a second for clock skew."""
        return math.ceil(self.remaining_seconds) + 1


class BreakerListener:
    """pybreaker-style listener; subclass and override what you need (e.g. to emit metrics).

    States are passed as strings (``"closed"``, ``"open"``, ``"half_open"``). Only the process
    that performed a transition sees its ``state_change``, so counting openings there counts
    each opening once for the whole cluster.
    """

    def before_call(self, cb: CircuitBreaker, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Called before each guarded call is attempted."""

    def state_change(self, cb: CircuitBreaker, old_state: str, new_state: str) -> None:
        """Called after this process moved the breaker from ``old_state`` to ``new_state``."""

    def failure(self, cb: CircuitBreaker, exc: BaseException) -> None:
        """Called when a guarded call failed in a way that counts against the breaker."""

    def success(self, cb: CircuitBreaker) -> None:
        """Called when a guarded call succeeded (or failed in a way that does not count)."""


@dataclass(frozen=True)
class BreakerSnapshot:
    """The breaker as seen now (state is effective: an expired OPEN reads as ``half_open``)."""

    name: str
    state: State
    failure_count: int
    opened_until: datetime | None
    window_calls: int
    window_failures: int
    window_slow_calls: int
    openings: int
    shared: bool  # False: per-process fallback (Redis unreachable) or breakers disabled


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; hand it back with the outcome."""

    probe: bool
    local: bool
    started: float


def is_breaker_failure(exc: BaseException) -> bool:
    """Whether an exception says the remote service is unhealthy (and so counts against it).

    Counted: connection errors, timeouts, HTTP 408/429/5xx (OpenAI, MLflow, or an httpx/requests
    ``raise_for_status``, e.g. vLLM's). Not counted: a 4xx for a bad request (a 400 for a bad
    file, 404, 409...), a refusal, our own bugs: the service answered, it is up.
    """
    if isinstance(exc, CircuitOpenError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    try:
        import openai
    except ImportError:  # pragma: no cover - openai is a dependency
        openai = None  # type: ignore[assignment]
    if openai is not None:
        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            return True
        if isinstance(exc, openai.APIStatusError):
            return exc.status_code in (408, 429) or exc.status_code >= 500
    module = type(exc).__module__
    if module.startswith("mlflow"):
        status = getattr(exc, "get_http_status_code", lambda: 500)()
        return status in (408, 429) or status >= 500
    if module.startswith(("requests", "urllib3", "httpx")):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int):  # raise_for_status(): the service answered with this status
            return status in (408, 429) or status >= 500
        return any(word in type(exc).__name__ for word in ("Connect", "Timeout", "Protocol"))
    return False


# --------------------------------------------------------------------------------- Lua storage
# Hash ``{prefix}:{name}`` fields: state, failures (consecutive), opened_at, open_until (ms on the
# server's clock), probes / probe_ok (HALF_OPEN slots taken / succeeded), half_open_at,
# win_n / win_f / win_s (calls / failures / slow calls in the sliding window), openings.
# Sorted set ``{prefix}:{name}:calls``: one member per recent outcome ("f1:<id>"), scored by
# time, so the window's counters are kept exactly as members leave it (O(1) amortised).
# Keys carry a hash tag so both land in one Redis Cluster slot.

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

ACQUIRE_LUA = (
    _NOW
    + """
local half_open_max = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local ttl_ms = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'open_until', 'probes', 'half_open_at')
local state = h[1] or 'closed'
local old = state
local failures = tonumber(h[2] or '0')
local open_until = tonumber(h[3] or '0')
if state == 'closed' then
  return {1, state, old, 0, failures, now}
end
if state == 'open' then
  if now < open_until then
    return {0, state, old, open_until, failures, now}
  end
  state = 'half_open'
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probes', 0, 'probe_ok', 0, 'half_open_at', now)
  h[4] = '0'
  h[5] = tostring(now)
end
local probes = tonumber(h[4] or '0')
if probes >= half_open_max and now - tonumber(h[5] or '0') >= lease_ms then
  -- the probes' processes died (or hang): free their slots
  probes = 0
  redis.call('HSET', KEYS[1], 'probes', 0, 'probe_ok', 0, 'half_open_at', now)
end
redis.call('PEXPIRE', KEYS[1], ttl_ms)
if probes < half_open_max then
  redis.call('HINCRBY', KEYS[1], 'probes', 1)
  return {2, state, old, 0, failures, now}
end
return {0, state, old, 0, failures, now}
"""
)

# KEYS[3] names this outcome (ARGV[12]): redis-py sends a script again when Redis answered after
# the socket timeout, and the second delivery must not count the failure twice.
RECORD_LUA = (
    _NOW
    + """
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', 60000) then
  local seen = redis.call('HMGET', KEYS[1], 'state', 'failures', 'open_until')
  local current = seen[1] or 'closed'
  return {current, current, tonumber(seen[2] or '0'), tonumber(seen[3] or '0'), now}
end
local failed = ARGV[1] == 'f'
local slow = ARGV[2] == '1'
local probe = ARGV[3] == '1'
local threshold = tonumber(ARGV[4])
local open_ms = tonumber(ARGV[5])
local window_ms = tonumber(ARGV[6])
local min_calls = tonumber(ARGV[7])
local failure_rate = tonumber(ARGV[8])
local slow_rate = tonumber(ARGV[9])
local half_open_max = tonumber(ARGV[10])
local ttl_ms = tonumber(ARGV[11])
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'open_until')
local state = h[1] or 'closed'
local old = state
local failures = tonumber(h[2] or '0')
local open_until = tonumber(h[3] or '0')

local function open_circuit()
  open_until = now + open_ms
  redis.call('HSET', KEYS[1], 'state', 'open', 'failures', failures, 'opened_at', now,
             'open_until', open_until, 'probes', 0, 'probe_ok', 0, 'win_n', 0, 'win_f', 0, 'win_s', 0)
  redis.call('HINCRBY', KEYS[1], 'openings', 1)
  redis.call('DEL', KEYS[2])
  state = 'open'
end

if state == 'half_open' then
  -- only probes decide; a call admitted before the circuit opened has no say
  if probe then
    if failed then
      failures = failures + 1
      open_circuit()
    else
      local ok = redis.call('HINCRBY', KEYS[1], 'probe_ok', 1)
      if ok >= half_open_max then
        failures = 0
        redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probes', 0, 'probe_ok', 0,
                   'win_n', 0, 'win_f', 0, 'win_s', 0)
        redis.call('DEL', KEYS[2])
        state = 'closed'
      end
    end
  end
elseif state == 'closed' then
  local cutoff = now - window_ms
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  local dn, df, ds = 0, 0, 0
  for _, member in ipairs(gone) do
    dn = dn + 1
    if string.sub(member, 1, 1) == 'f' then df = df + 1 end
    if string.sub(member, 2, 2) == '1' then ds = ds + 1 end
  end
  if dn > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff) end
  local tag = (failed and 'f' or 's') .. (slow and '1' or '0') .. ':' .. ARGV[12]
  redis.call('ZADD', KEYS[2], now, tag)
  local n = redis.call('HINCRBY', KEYS[1], 'win_n', 1 - dn)
  local nf = redis.call('HINCRBY', KEYS[1], 'win_f', (failed and 1 or 0) - df)
  local ns = redis.call('HINCRBY', KEYS[1], 'win_s', (slow and 1 or 0) - ds)
  if failed then failures = failures + 1 else failures = 0 end
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', failures)
  if failures >= threshold or (n >= min_calls and (nf / n >= failure_rate or ns / n >= slow_rate)) then
    open_circuit()
  end
end
-- state 'open': the late outcome of a call admitted before the circuit opened; ignored
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('PEXPIRE', KEYS[2], ttl_ms)
return {state, old, failures, open_until, now}
"""
)

STATUS_LUA = (
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'open_until',
                     'win_n', 'win_f', 'win_s', 'openings')
return {h[1] or 'closed', tonumber(h[2] or '0'), tonumber(h[3] or '0'), now,
        tonumber(h[4] or '0'), tonumber(h[5] or '0'), tonumber(h[6] or '0'), tonumber(h[7] or '0')}
"""
)


def _ms_to_datetime(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _ttl_ms(settings: BreakerConfig) -> int:
    # Long enough to outlive an opening and a window; short enough that an abandoned breaker
    # (renamed, prefix changed) does not stay in Redis forever.
    longest = max(
        settings.recovery_timeout_seconds, settings.sliding_window_seconds, settings.probe_lease_seconds
    )
    return int(max(3 * longest, 3600) * 1000)


class _LocalStore:
    """The same state machine as the Lua scripts, in this process only (Redis fallback)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: State = "closed"
        self.failures = 0
        self.open_until = 0.0
        self.probes = 0
        self.probe_ok = 0
        self.half_open_at = 0.0
        self.openings = 0
        self.window: deque[tuple[float, bool, bool]] = deque()
        # Running counts of the window (kept as entries come and go, like the Lua hash fields).
        self.window_failures = 0
        self.window_slow = 0

    def _clear_window(self) -> None:
        self.window.clear()
        self.window_failures = self.window_slow = 0

    def acquire(self, s: BreakerConfig) -> tuple[int, State, State, float, int, float]:
        with self.lock:
            now = time.time()
            old = self.state
            if self.state == "closed":
                return 1, "closed", old, 0.0, self.failures, now
            if self.state == "open":
                if now < self.open_until:
                    return 0, "open", old, self.open_until, self.failures, now
                self.state, self.probes, self.probe_ok, self.half_open_at = "half_open", 0, 0, now
            if self.probes >= s.half_open_max_calls and now - self.half_open_at >= s.probe_lease_seconds:
                self.probes, self.probe_ok, self.half_open_at = 0, 0, now
            if self.probes < s.half_open_max_calls:
                self.probes += 1
                return 2, "half_open", old, 0.0, self.failures, now
            return 0, "half_open", old, 0.0, self.failures, now

    def _open(self, s: BreakerConfig, now: float) -> None:
        self.state, self.open_until = "open", now + s.recovery_timeout_seconds
        self.probes = self.probe_ok = 0
        self._clear_window()
        self.openings += 1

    def record(
        self, s: BreakerConfig, failed: bool, slow: bool, probe: bool
    ) -> tuple[State, State, int, float]:
        with self.lock:
            now = time.time()
            old = self.state
            if self.state == "half_open" and probe:
                if failed:
                    self.failures += 1
                    self._open(s, now)
                else:
                    self.probe_ok += 1
                    if self.probe_ok >= s.half_open_max_calls:
                        self.state, self.failures, self.probes, self.probe_ok = "closed", 0, 0, 0
                        self._clear_window()
            elif self.state == "closed":
                cutoff = now - s.sliding_window_seconds
                while self.window and self.window[0][0] <= cutoff:
                    _, gone_failed, gone_slow = self.window.popleft()
                    self.window_failures -= gone_failed
                    self.window_slow -= gone_slow
                self.window.append((now, failed, slow))
                self.window_failures += failed
                self.window_slow += slow
                self.failures = self.failures + 1 if failed else 0
                n, nf, ns = len(self.window), self.window_failures, self.window_slow
                if self.failures >= s.failure_threshold or (
                    n >= s.minimum_calls
                    and (nf / n >= s.failure_rate_threshold or ns / n >= s.slow_call_rate_threshold)
                ):
                    self._open(s, now)
            return self.state, old, self.failures, self.open_until

    def status(self) -> tuple[State, int, float, float, int, int, int, int]:
        with self.lock:
            return (
                self.state,
                self.failures,
                self.open_until,
                time.time(),
                len(self.window),
                self.window_failures,
                self.window_slow,
                self.openings,
            )


class CircuitBreaker:
    """A named breaker whose state lives in Redis (see the module docstring).

    :param name: the service (``openai``, ``mlflow``); also the Redis key's suffix.
    :param settings: thresholds (``config.breakers.<name>``).
    :param redis_url: where the shared state lives; None keeps state per process.
    :param key_prefix: Redis key prefix (tests use their own to stay apart).
    :param is_failure: which exceptions count against the breaker (default
        :func:`is_breaker_failure`); the others propagate but count as the service answering.
    """

    def __init__(
        self,
        name: str,
        settings: BreakerConfig,
        redis_url: str | None,
        *,
        key_prefix: str = "fine_tuning:breaker",
        redis_retry_seconds: float = 15.0,
        enabled: bool = True,
        is_failure: Callable[[BaseException], bool] = is_breaker_failure,
        listeners: tuple[BreakerListener, ...] = (),
    ) -> None:
        self.name = name
        self.settings = settings
        self.redis_url = redis_url
        self.enabled = enabled
        self.redis_retry_seconds = redis_retry_seconds
        self.is_failure = is_failure
        self._listeners: list[BreakerListener] = list(listeners)
        self._local = _LocalStore()
        self.keys = [f"{key_prefix}:{{{name}}}", f"{key_prefix}:{{{name}}}:calls"]
        self._scripts: dict[str, Any] = {}
        self._ttl_ms = _ttl_ms(settings)

    # ----------------------------------------------------------------------------- listeners

    @property
    def listeners(self) -> tuple[BreakerListener, ...]:
        return tuple(self._listeners) + tuple(_GLOBAL_LISTENERS)

    def add_listener(self, listener: BreakerListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: BreakerListener) -> None:
        self._listeners.remove(listener)

    def _notify(self, event: str, *args: Any, **kwargs: Any) -> None:
        listeners = self.listeners
        if not listeners:
            return
        for listener in listeners:
            try:
                getattr(listener, event)(self, *args, **kwargs)
            except Exception:  # a broken metrics hook must not break the pipeline
                log.exception("breaker %s: listener %r failed in %s", self.name, listener, event)

    # ------------------------------------------------------------------------------- storage

    def _redis(self) -> redis.Redis | None:
        if self.redis_url is None or not redis_available(self.redis_url):
            return None
        return shared_client(self.redis_url)

    def _script(self, client: redis.Redis, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = client.register_script(source)
        return script

    def _shared(
        self, name: str, source: str, args: list[Any], extra_keys: tuple[str, ...] = ()
    ) -> list[Any] | None:
        """Run a script in Redis; None (and the fallback) when Redis does not answer."""
        from redis.exceptions import RedisError

        client = self._redis()
        if client is None:
            return None
        try:
            result = self._script(client, name, source)(keys=[*self.keys, *extra_keys], args=args)
        except RedisError as exc:
            mark_redis_down(self.redis_url or "", exc, self.redis_retry_seconds, f"breaker {self.name!r}")
            return None
        mark_redis_up(self.redis_url or "", f"breaker {self.name!r}")
        return [item.decode() if isinstance(item, bytes) else item for item in result]

    @property
    def shared(self) -> bool:
        """Whether the state in use is Redis's (False while falling back to this process's)."""
        return self.enabled and self.redis_url is not None and redis_available(self.redis_url)

    # ------------------------------------------------------------------------------ the API

    def snapshot(self) -> BreakerSnapshot:
        """The breaker's current state, counts and open-until time (one Redis round trip)."""
        result = self._shared("status", STATUS_LUA, []) if self.enabled else None
        shared = result is not None
        state, failures, open_until, now, n, nf, ns, openings = (
            result if result is not None else self._local.status()
        )
        if shared:  # milliseconds on the Redis clock
            open_until, now = open_until / 1000, now / 1000
        effective: State = state
        if state == "open" and now >= open_until:
            effective = "half_open"  # the next call will be a probe
        return BreakerSnapshot(
            name=self.name,
            state=effective,
            failure_count=int(failures),
            opened_until=_ms_to_datetime(open_until * 1000) if effective == "open" else None,
            window_calls=int(n),
            window_failures=int(nf),
            window_slow_calls=int(ns),
            openings=int(openings),
            shared=shared,
        )

    @property
    def state(self) -> State:
        return self.snapshot().state

    @property
    def failure_count(self) -> int:
        return self.snapshot().failure_count

    @property
    def opened_until(self) -> datetime | None:
        return self.snapshot().opened_until

    def acquire(self) -> Permit:
        """Leave for one call, or :class:`CircuitOpenError` when the circuit does not allow it."""
        started = time.monotonic()
        if not self.enabled:
            return Permit(probe=False, local=True, started=started)
        s = self.settings
        result = self._shared(
            "acquire", ACQUIRE_LUA, [s.half_open_max_calls, int(s.probe_lease_seconds * 1000), self._ttl_ms]
        )
        local = result is None
        if local:
            admitted, state, old, open_until, failures, now = self._local.acquire(s)
        else:
            admitted, state, old, open_until, failures, now = result  # type: ignore[misc]
            open_until, now = open_until / 1000, now / 1000
        if old != state:
            self._notify("state_change", old, state)
        if not admitted:
            if state == "open":
                raise CircuitOpenError(
                    self.name, "open", _ms_to_datetime(open_until * 1000), open_until - now, int(failures)
                )
            raise CircuitOpenError(self.name, "half_open", None, HALF_OPEN_BUSY_RETRY_SECONDS, int(failures))
        return Permit(probe=int(admitted) == 2, local=local, started=started)

    def _record(self, permit: Permit, failed: bool) -> None:
        if not self.enabled:
            return
        s = self.settings
        slow = time.monotonic() - permit.started >= s.slow_call_duration_seconds
        result = None
        if not permit.local:
            outcome = uuid.uuid4().hex[:12]
            result = self._shared(
                "record",
                RECORD_LUA,
                [
                    "f" if failed else "s",
                    int(slow),
                    int(permit.probe),
                    s.failure_threshold,
                    int(s.recovery_timeout_seconds * 1000),
                    int(s.sliding_window_seconds * 1000),
                    s.minimum_calls,
                    s.failure_rate_threshold,
                    s.slow_call_rate_threshold,
                    s.half_open_max_calls,
                    self._ttl_ms,
                    outcome,
                ],
                extra_keys=(f"{self.keys[0]}:outcome:{outcome}",),
            )
        if result is None:
            state, old, _failures, _until = self._local.record(s, failed, slow, permit.probe)
        else:
            state, old = result[0], result[1]
        if old != state:
            level = logging.WARNING if state == "open" else logging.INFO
            log.log(level, "breaker %s: %s -> %s", self.name, old, state)
            self._notify("state_change", old, state)

    def record_success(self, permit: Permit) -> None:
        # As in pybreaker: the listener hears the outcome first, then any state change it caused.
        self._notify("success")
        self._record(permit, failed=False)

    def record_failure(self, permit: Permit, exc: BaseException) -> None:
        """Record ``exc``: against the breaker if :attr:`is_failure` says so, else as an answer."""
        if self.is_failure(exc):
            self._notify("failure", exc)
            self._record(permit, failed=True)
        else:
            self.record_success(permit)

    @contextmanager
    def guard(self) -> Iterator[Permit]:
        """``with breaker.guard(): call()`` — acquire, run the block, record its outcome."""
        permit = self.acquire()
        try:
            yield permit
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.record_failure(permit, exc)
            else:  # KeyboardInterrupt, SystemExit, cancellation: says nothing about the service
                self._release(permit)
            raise
        self.record_success(permit)

    def _release(self, permit: Permit) -> None:
        # An interrupted probe gives its slot back only through the lease: simpler and safe.
        return None

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """pybreaker's ``call``: run ``func`` through the breaker."""
        self._notify("before_call", func, *args, **kwargs)
        with self.guard():
            return func(*args, **kwargs)

    async def acall(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """``call`` for coroutines (the triggerer); Redis round trips run off the event loop."""
        self._notify("before_call", func, *args, **kwargs)
        permit = await asyncio.to_thread(self.acquire)
        try:
            result = await func(*args, **kwargs)
        except Exception as exc:
            await asyncio.to_thread(self.record_failure, permit, exc)
            raise
        await asyncio.to_thread(self.record_success, permit)
        return result

    def reset(self) -> None:
        """Close the breaker and forget its counts, everywhere (operators' escape hatch, tests)."""
        from redis.exceptions import RedisError

        self._local = _LocalStore()
        client = self._redis()
        if client is not None:
            try:
                client.delete(*self.keys)
            except RedisError as exc:
                mark_redis_down(self.redis_url or "", exc, self.redis_retry_seconds, f"breaker {self.name!r}")

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, redis={self.redis_url is not None})"


_GLOBAL_LISTENERS: list[BreakerListener] = []
_BREAKERS: dict[tuple[str, str | None, str, str], CircuitBreaker] = {}
_BREAKERS_LOCK = threading.Lock()


def add_global_listener(listener: BreakerListener) -> None:
    """A listener for every breaker of this process, present and future (metrics, health)."""
    if listener not in _GLOBAL_LISTENERS:
        _GLOBAL_LISTENERS.append(listener)


def remove_global_listener(listener: BreakerListener) -> None:
    if listener in _GLOBAL_LISTENERS:
        _GLOBAL_LISTENERS.remove(listener)


def get_breaker(name: str, config: PipelineConfig) -> CircuitBreaker:
    """The process's breaker for ``name`` with ``config``'s thresholds, shared through its Redis.

    One object per (name, Redis URL, key prefix, settings) per process, so listeners added to it
    stay, and the per-process fallback state survives between calls.
    """
    if name not in BREAKER_NAMES:
        raise ValueError(f"unknown circuit breaker {name!r}; known: {', '.join(BREAKER_NAMES)}")
    settings: BreakerConfig = getattr(config.breakers, name)
    redis_url = config.services.redis_url.get_secret_value() or None
    key = (
        name,
        redis_url,
        config.breakers.key_prefix,
        settings.model_dump_json() + str(config.breakers.enabled),
    )
    with _BREAKERS_LOCK:
        breaker = _BREAKERS.get(key)
        if breaker is None:
            breaker = _BREAKERS[key] = CircuitBreaker(
                name,
                settings,
                redis_url,
                key_prefix=config.breakers.key_prefix,
                redis_retry_seconds=config.breakers.redis_retry_seconds,
                enabled=config.breakers.enabled,
            )
        return breaker
