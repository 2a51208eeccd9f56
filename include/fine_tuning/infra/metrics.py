"""The pipeline's metrics: every name and label defined once, and a small StatsD emitter.

The ``statsd`` client speaks plain StatsD, which has no tags, so a label travels as one segment
of the dotted name (``fine_tuning.pipeline.examples_rejected.empty_hook``) and the
statsd_exporter mapping (``include/monitoring/statsd-mapping.yaml``) turns it back into a
Prometheus label (``fine_tuning_pipeline_examples_rejected_total{reason="empty_hook"}``).
:data:`METRICS` is the one list of both sides; the monitoring tests hold the mapping, the alert
rules and the dashboards to it.

Emitting never fails the pipeline: StatsD is UDP (nobody listening is not an error), a host that
does not resolve degrades to a no-op emitter with one warning, and send errors are swallowed by
the client.
"""

from __future__ import annotations

import functools
import logging
import re
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from fine_tuning.config import load_config
from fine_tuning.infra import breakers

if TYPE_CHECKING:
    from fine_tuning.config import PipelineConfig
    from fine_tuning.manifests import CollectManifest, JobResult

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "timer"]
BreakerState = Literal["closed", "half_open", "open"]

# The breaker state as one number, as the dashboards and alert rules read it.
BREAKER_STATE_VALUES: dict[str, float] = {"closed": 0.0, "half_open": 0.5, "open": 1.0}


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its StatsD key (below the prefix) and the Prometheus series the mapping makes.

    ``key`` holds ``{label}`` placeholders, one dotted segment each, in the order of ``labels``.
    A ``timer`` is sent in milliseconds; the exporter observes it in seconds.
    """

    key: str
    kind: Kind
    prometheus: str
    labels: tuple[str, ...] = ()
    help: str = ""

    def statsd_name(self, **labels: str) -> str:
        """The key with each label filled in (sanitized to one safe StatsD segment)."""
        missing = set(self.labels) - set(labels)
        if missing:
            raise ValueError(f"metric {self.key!r} needs labels {sorted(missing)}")
        return self.key.format(**{name: label_value(labels[name]) for name in self.labels})


def label_value(raw: object) -> str:
    """A label value as one StatsD segment: dots, colons, pipes and @ would break the line format."""
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", str(raw)).strip("_")
    return text or "unknown"


def _spec(key: str, kind: Kind, prometheus: str, *labels: str, help: str) -> MetricSpec:
    return MetricSpec(key=key, kind=kind, prometheus=prometheus, labels=labels, help=help)


# -- pipeline (the steps) --------------------------------------------------------------------
PIPELINE_EXECUTION_DURATION = _spec(
    "pipeline.execution_duration",
    "timer",
    "fine_tuning_pipeline_execution_duration_seconds",
    help="From the start of collect to the registered candidate",
)
PIPELINE_RUNS = _spec(
    "pipeline.runs.{status}",
    "counter",
    "fine_tuning_pipeline_runs_total",
    "status",
    help="Runs that ended: registered (a candidate) or skipped (too little data)",
)
PIPELINE_MEMORY_PEAK_MB = _spec(
    "pipeline.memory_peak_mb.{step}",
    "gauge",
    "fine_tuning_pipeline_memory_peak_mb",
    "step",
    help="Peak resident memory of the process that ran the step",
)
TRAINING_EXAMPLES = _spec(
    "pipeline.training_examples",
    "counter",
    "fine_tuning_pipeline_training_examples_total",
    help="Examples written to training datasets",
)
EXAMPLES_REJECTED = _spec(
    "pipeline.examples_rejected.{reason}",
    "counter",
    "fine_tuning_pipeline_examples_rejected_total",
    "reason",
    help="Posts not turned into examples, by reason (duplicate included)",
)
POSTS_SCANNED = _spec(
    "pipeline.posts_scanned",
    "counter",
    "fine_tuning_pipeline_posts_scanned_total",
    help="Posts read from PostgreSQL by collect",
)
ESTIMATED_TRAINING_COST = _spec(
    "pipeline.estimated_training_cost_usd",
    "gauge",
    "fine_tuning_pipeline_estimated_training_cost_usd",
    help="The cost guard's estimate for the latest dataset",
)
CACHE_HIT_RATE = _spec(
    "pipeline.cache_hit_rate",
    "gauge",
    "fine_tuning_pipeline_cache_hit_rate",
    help="Hit rate of the Redis cache of evaluation metrics",
)
CACHE_REQUESTS = _spec(
    "cache.requests.{result}",
    "counter",
    "fine_tuning_cache_requests_total",
    "result",
    help="Cache look-ups by result (hit or miss)",
)
STEP_DURATION = _spec(
    "step.duration.{step}",
    "timer",
    "fine_tuning_step_duration_seconds",
    "step",
    help="Wall time of one step",
)
STEP_RUNS = _spec(
    "step.runs.{step}.{outcome}",
    "counter",
    "fine_tuning_step_runs_total",
    "step",
    "outcome",
    help="Step executions by outcome (success, failed, skipped)",
)
TRAINING_JOBS = _spec(
    "training.jobs.{status}",
    "counter",
    "fine_tuning_training_jobs_total",
    "status",
    help="Fine-tuning jobs started (new or reused) and ended (succeeded, failed, cancelled)",
)
TRAINING_JOB_DURATION = _spec(
    "training.job_duration",
    "timer",
    "fine_tuning_training_job_duration_seconds",
    help="Provider-side time from job creation to its end",
)
TRAINED_TOKENS = _spec(
    "training.trained_tokens",
    "counter",
    "fine_tuning_training_trained_tokens_total",
    help="Tokens the provider reports as trained",
)
# -- connections, breakers, health -------------------------------------------------------------
DB_CONNECTIONS_ACTIVE = _spec(
    "db.connections.active",
    "gauge",
    "fine_tuning_db_connections_active",
    help="PostgreSQL sessions of the pipeline's database running a statement",
)
DB_CONNECTIONS_IDLE = _spec(
    "db.connections.idle",
    "gauge",
    "fine_tuning_db_connections_idle",
    help="PostgreSQL sessions of the pipeline's database that are idle",
)
REDIS_CONNECTIONS_ACTIVE = _spec(
    "redis.connections.active",
    "gauge",
    "fine_tuning_redis_connections_active",
    help="Redis clients that ran a command in the last second",
)
REDIS_CONNECTIONS_IDLE = _spec(
    "redis.connections.idle",
    "gauge",
    "fine_tuning_redis_connections_idle",
    help="Redis clients connected but quiet",
)
BREAKER_STATE = _spec(
    "breaker.{service}.state",
    "gauge",
    "fine_tuning_{service}_circuit_breaker_state",
    "service",
    help="Circuit breaker state: 0 closed, 0.5 half-open, 1 open",
)
BREAKER_FAILURES = _spec(
    "breaker.{service}.failures",
    "counter",
    "fine_tuning_{service}_failures_total",
    "service",
    help="Failed calls counted by the service's circuit breaker",
)
COMPONENT_UP = _spec(
    "health.{component}.up",
    "gauge",
    "fine_tuning_component_up",
    "component",
    help="1 when the health check reached the dependency, else 0",
)
# -- business (A/B tests, rollout) -------------------------------------------------------------
MODEL_ENGAGEMENT_RATE = _spec(
    "model.{variant}.engagement_rate",
    "gauge",
    "fine_tuning_model_engagement_rate",
    "variant",
    help="Engagement rate of the posts a model variant made",
)
MODEL_COST_PER_TOKEN = _spec(
    "model.{variant}.cost_per_token",
    "gauge",
    "fine_tuning_model_cost_per_token",
    "variant",
    help="USD per generated token of a model variant",
)
MODEL_QUALITY_SCORE = _spec(
    "model.{variant}.quality_score",
    "gauge",
    "fine_tuning_model_quality_score",
    "variant",
    help="Quality score (0-1) of a model variant",
)
AB_TEST_SUCCESS_RATE = _spec(
    "ab_test.{test_id}.success_rate",
    "gauge",
    "fine_tuning_ab_test_success_rate",
    "test_id",
    help="Success rate of an A/B test's candidate arm",
)
AB_TEST_DECISIONS = _spec(
    "ab_test.decisions.{decision}",
    "counter",
    "fine_tuning_ab_test_decisions_total",
    "decision",
    help="A/B evaluations by decision (promote, reject, wait)",
)
ROLLOUT_TRAFFIC_SHARE = _spec(
    "rollout.traffic_share",
    "gauge",
    "fine_tuning_rollout_traffic_share",
    help="Share of traffic (0-1) the rolled-out candidate serves",
)
ROLLBACKS = _spec(
    "rollout.rollbacks.{trigger}",
    "counter",
    "fine_tuning_rollbacks_total",
    "trigger",
    help="Rollbacks by trigger (engagement_drop, error_rate, latency, manual)",
)
# -- retirements (fine_tuning.retirement) ---------------------------------------------------
MODEL_DAYS_TO_RETIREMENT = _spec(
    "model.days_to_retirement.{role}.{kind}.{model}",
    "gauge",
    "fine_tuning_model_days_to_retirement",
    "role",
    "kind",
    "model",
    help="Days until a model the pipeline depends on stops training/serving (0 once retired)",
)
RETIRED_MODEL_REPLACED = _spec(
    "routing.retired_model_replaced.{model_type}",
    "counter",
    "fine_tuning_routing_retired_model_replaced_total",
    "model_type",
    help="Live routings rewritten because they named a model past its inference retirement",
)

METRICS: tuple[MetricSpec, ...] = tuple(
    value for value in list(globals().values()) if isinstance(value, MetricSpec)
)


P = ParamSpec("P")
R = TypeVar("R")


def peak_memory_mb() -> float:
    """This process's peak resident set size in MB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Metrics:
    """Typed emitters over one StatsD client; each method is one event of the pipeline.

    :param client: a ``statsd.StatsClient`` (or ``None``: every call is then a no-op).
    """

    def __init__(self, client: Any | None) -> None:
        self._client = client

    @property
    def enabled(self) -> bool:
        return self._client is not None

    # -- the three StatsD primitives, by spec ----------------------------------------------------
    def emit(self, spec: MetricSpec, value: float, **labels: str) -> None:
        """Send one value of ``spec`` (a count, a gauge level, or a duration in seconds)."""
        if self._client is None:
            return
        name = spec.statsd_name(**labels)
        try:
            if spec.kind == "counter":
                self._client.incr(name, value)
            elif spec.kind == "gauge":
                # A negative gauge would be read as a delta by StatsD; none of ours can be.
                self._client.gauge(name, max(float(value), 0.0))
            else:
                self._client.timing(name, float(value) * 1000.0)
        except Exception as exc:  # noqa: BLE001 - metrics are never worth failing a step for
            log.debug("metric %s not sent: %s", name, exc)

    # -- steps ----------------------------------------------------------------------------------
    def step_finished(self, step: str, seconds: float, outcome: str) -> None:
        """A step ended: its duration, outcome and the process's peak memory."""
        self.emit(STEP_DURATION, seconds, step=step)
        self.emit(STEP_RUNS, 1, step=step, outcome=outcome)
        self.emit(PIPELINE_MEMORY_PEAK_MB, round(peak_memory_mb(), 1), step=step)

    def collected(self, manifest: CollectManifest) -> None:
        """What collect read, wrote and rejected (duplicates counted as a rejection reason)."""
        self.emit(POSTS_SCANNED, manifest.posts_scanned)
        self.emit(TRAINING_EXAMPLES, manifest.examples_written)
        for reason, count in manifest.rejected.items():
            self.emit(EXAMPLES_REJECTED, count, reason=reason)
        self.emit(EXAMPLES_REJECTED, manifest.duplicates, reason="duplicate")
        if manifest.status != "ready":
            self.emit(PIPELINE_RUNS, 1, status="skipped")

    def training_cost_estimated(self, cost_usd: float) -> None:
        self.emit(ESTIMATED_TRAINING_COST, cost_usd)

    def training_job_started(self, reused: bool) -> None:
        """A job was created, or found again by its idempotency key on a retry."""
        self.emit(TRAINING_JOBS, 1, status="reused" if reused else "started")

    def training_job_finished(self, result: JobResult) -> None:
        """A job reached a terminal state (succeeded, failed, cancelled)."""
        self.emit(TRAINING_JOBS, 1, status=result.status)

    def pipeline_registered(
        self, result: JobResult, collect_manifest: Path | None = None, collect_seconds: float = 0.0
    ) -> None:
        """The run produced a registered candidate: run count, end-to-end and job durations.

        The run's start is where collect began: its manifest's write time less its duration.
        That file is on the run's shared volume in both modes, so no step has to carry a start
        time through XCom (which a retry clears).

        :param collect_manifest: the run's ``collect.json`` (``None`` or missing: no duration).
        :param collect_seconds: how long collect took (its manifest's ``seconds``).
        """
        self.emit(PIPELINE_RUNS, 1, status="registered")
        if collect_manifest is not None and collect_manifest.exists():
            started = collect_manifest.stat().st_mtime - collect_seconds
            self.emit(PIPELINE_EXECUTION_DURATION, max(time.time() - started, 0.0))
        if result.created_at and result.finished_at:
            self.emit(TRAINING_JOB_DURATION, max(result.finished_at - result.created_at, 0))
        if result.trained_tokens:
            self.emit(TRAINED_TOKENS, result.trained_tokens)

    # -- cache, pools, breakers, health ---------------------------------------------------------
    def cache_lookup(self, hit: bool) -> None:
        self.emit(CACHE_REQUESTS, 1, result="hit" if hit else "miss")

    def cache_hit_rate(self, rate: float) -> None:
        self.emit(CACHE_HIT_RATE, rate)

    def pool_stats(
        self, db_active: int | None, db_idle: int | None, redis_active: int | None, redis_idle: int | None
    ) -> None:
        """Connection counts as the health check saw them (``None``: not known, not sent)."""
        for spec, value in (
            (DB_CONNECTIONS_ACTIVE, db_active),
            (DB_CONNECTIONS_IDLE, db_idle),
            (REDIS_CONNECTIONS_ACTIVE, redis_active),
            (REDIS_CONNECTIONS_IDLE, redis_idle),
        ):
            if value is not None:
                self.emit(spec, value)

    def breaker_state(self, service: str, state: str) -> None:
        """The breaker's state as 0 / 0.5 / 1; an unknown state is not sent."""
        value = BREAKER_STATE_VALUES.get(state.lower())
        if value is not None:
            self.emit(BREAKER_STATE, value, service=service)

    def breaker_failure(self, service: str, count: int = 1) -> None:
        self.emit(BREAKER_FAILURES, count, service=service)

    def component_health(self, component: str, up: bool) -> None:
        self.emit(COMPONENT_UP, 1 if up else 0, component=component)

    # -- business: A/B tests and rollout --------------------------------------------------------
    def model_engagement_rate(self, rate: float, variant: str) -> None:
        """:param variant: ``baseline``, ``candidate`` or ``champion`` (not a model id: cardinality)."""
        self.emit(MODEL_ENGAGEMENT_RATE, rate, variant=variant)

    def model_cost_per_token(self, cost_usd: float, variant: str) -> None:
        self.emit(MODEL_COST_PER_TOKEN, cost_usd, variant=variant)

    def model_quality_score(self, score: float, variant: str) -> None:
        self.emit(MODEL_QUALITY_SCORE, score, variant=variant)

    def ab_test_success_rate(self, rate: float, test_id: str) -> None:
        self.emit(AB_TEST_SUCCESS_RATE, rate, test_id=test_id)

    def ab_test_decision(self, decision: str) -> None:
        """:param decision: ``promote``, ``reject`` or ``wait``."""
        self.emit(AB_TEST_DECISIONS, 1, decision=decision)

    def rollout_traffic_share(self, share: float) -> None:
        """:param share: 0-1, the candidate's current share of traffic (0 after a rollback)."""
        self.emit(ROLLOUT_TRAFFIC_SHARE, share)

    def rollback(self, trigger: str) -> None:
        """:param trigger: ``engagement_drop``, ``error_rate``, ``latency``, ``guardrail`` or ``manual``."""
        self.emit(ROLLBACKS, 1, trigger=trigger)

    def days_to_retirement(self, role: str, kind: str, model: str, days: float) -> None:
        """:param role: ``base_model``, ``champion``, ``baseline``, ``candidate``, ``rollback_target``
        or ``fallback``; :param kind: ``training`` or ``inference``."""
        self.emit(MODEL_DAYS_TO_RETIREMENT, days, role=role, kind=kind, model=model)

    def retired_model_replaced(self, model_type: str) -> None:
        self.emit(RETIRED_MODEL_REPLACED, 1, model_type=model_type)


class BreakerMetricsListener:
    """A breaker listener (duck-typed to ``fine_tuning.infra.breakers.BreakerListener``) that sends
    each state change as the 0 / 0.5 / 1 gauge and each counted failure to the failures counter."""

    def __init__(self, emitter: Metrics) -> None:
        self.emitter = emitter

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def state_change(self, cb: Any, old_state: str, new_state: str) -> None:
        self.emitter.breaker_state(cb.name, new_state)

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.emitter.breaker_failure(cb.name)

    def success(self, cb: Any) -> None:
        pass


_emitters: dict[tuple[str, int, str], Metrics] = {}
_lock = threading.Lock()


def _listen_to_breakers(emitter: Metrics) -> None:
    """Hook the emitter into every breaker of this process (once per emitter)."""
    breakers.add_global_listener(BreakerMetricsListener(emitter))  # type: ignore[arg-type]


def get_metrics(config: PipelineConfig | None = None) -> Metrics:
    """The emitter for ``config.monitoring`` (cached per host/port/prefix; a no-op when disabled).

    :param config: the pipeline's config; ``None`` loads it from the environment.
    """
    if config is None:
        config = load_config()
    settings = config.monitoring
    if not settings.statsd_enabled:
        return Metrics(None)
    key = (settings.statsd_host, settings.statsd_port, settings.statsd_prefix)
    with _lock:
        if key not in _emitters:
            _emitters[key] = Metrics(_make_client(*key))
            if _emitters[key].enabled:
                _listen_to_breakers(_emitters[key])
        return _emitters[key]


def _make_client(host: str, port: int, prefix: str) -> Any | None:
    import statsd

    try:
        # The client resolves the host once, here; a name that does not resolve (a cluster
        # service seen from a laptop) must not fail the step, so it becomes a no-op.
        return statsd.StatsClient(host, port, prefix=prefix or None)
    except OSError as exc:
        log.warning("StatsD at %s:%s unusable (%s): metrics are off for this process", host, port, exc)
        return None


def timed_step(step: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a step function (``config`` first) to emit its duration, outcome and peak memory.

    Too little data is a skip, not a failure, as in Airflow: it counts as ``skipped``.
    """

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            config = args[0] if args else kwargs.get("config")
            # Made before the step runs so that its breakers report through it from the first call.
            try:
                emitter = get_metrics(config)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - a broken metrics setup must not fail the step
                log.debug("no metrics for step %s: %s", step, exc)
                emitter = Metrics(None)
            started = time.monotonic()
            outcome = "failed"
            try:
                result = func(*args, **kwargs)
                outcome = "success"
                return result
            except Exception as exc:
                if type(exc).__name__ == "InsufficientDataError":
                    outcome = "skipped"
                raise
            finally:
                emitter.step_finished(step, time.monotonic() - started, outcome)

        return wrapper

    return decorate
