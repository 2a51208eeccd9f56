"""The pipeline's one typed configuration.

Built, in this order, from the defaults below, the ConfigMap-style JSON file
(``training_config.json``), environment variables, and the DAG run's params. Every layer is
validated by the same pydantic models, so a bad value fails with its path named
(``data_collection.engagement_threshold``) wherever it came from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo

CONFIG_FILE_ENV = "FINE_TUNING_CONFIG_FILE"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names it."""


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Auto = Literal["auto"]
# Where a model is fine-tuned (and, for a fine-tuned model, who serves it).
ProviderName = Literal["openai", "azure_openai", "selfhosted", "openai_compatible"]


class Hyperparameters(_Section):
    # OpenAI's bounds, as types: the DAG's params and the REST API read them from here.
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = Field("auto", description="'auto' or 1-50")
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = Field("auto", description="'auto' or 1-256")
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0)] = "auto"


PiiKind = Literal["email", "phone", "credit_card", "iban", "ip_address", "handle"]


class PiiConfig(_Section):
    """What collection scrubs from hook and body before anything is written (``collect/pii.py``)."""

    # The kinds detected and replaced by typed placeholders (``<EMAIL>``); an unknown kind is refused.
    kinds: list[PiiKind] = Field(default_factory=lambda: list(get_args(PiiKind)))
    # @handles left as they are (public accounts: the brand, the personas); every other is scrubbed.
    keep_handles: list[Annotated[str, Field(pattern=r"^@?[A-Za-z0-9_]{1,30}$")]] = Field(default_factory=list)
    # Regions whose national phone formats are recognised (numbers written with + always are).
    phone_regions: list[Annotated[str, Field(pattern=r"^[A-Z]{2}$")]] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FR", "IN", "CA", "AU"]
    )
    # A post whose PII covers more than this share of its non-blank characters is left out
    # (``mostly_pii``): what remains after scrubbing is not worth training on.
    max_pii_share: float = Field(0.5, ge=0.0, le=1.0)


class DataCollectionConfig(_Section):
    engagement_threshold: float = Field(0.06, ge=0.0, le=1.0)
    days_back: int = Field(7, ge=1, le=366)
    chunk_size: int = Field(1000, ge=1, le=100_000)
    max_records: int = Field(10_000, ge=1, le=10_000_000)
    # Fewer valid examples than this skips the rest of the run.
    training_data_threshold: int = Field(100, ge=10)
    hook_prompt: str = Field("Create engaging content", min_length=1)
    body_prompt: str = Field("{hook}\n\nWrite a detailed post:", min_length=1)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    # Most share of the written examples that may come from posts written by the pipeline's own
    # fine-tuned models (an A/B candidate's model_id); more are down-sampled by post id.
    self_generated_cap: float = Field(0.5, ge=0.0, le=1.0)
    # Share of posts (chosen by post id) whose examples go to the validation file instead.
    validation_share: float = Field(0.1, ge=0.0, lt=1.0)


class AzureOpenAIConfig(_Section):
    """``training.provider = "azure_openai"``: the same job contract through ``AzureOpenAI``."""

    # https://<resource>.openai.azure.com (the client adds /openai/...?api-version=).
    endpoint: str | None = None
    api_version: str = Field("2024-10-21", min_length=1)
    # Airflow connection with the key in ``password`` (and optionally the endpoint in ``host``);
    # without it, AZURE_OPENAI_API_KEY / AZURE_OPENAI_ENDPOINT.
    conn_id: str = Field("azure_openai_default", min_length=1)
    api_key: SecretStr | None = None
    # The deployment that serves the fine-tuned model (made with Azure's management API after
    # the job); when set it is the model reference the A/B routing calls.
    deployment_name: str | None = None


class SelfHostedConfig(_Section):
    """``training.provider = "selfhosted"``: LoRA SFT of an open-weights model (transformers+peft+trl)."""

    # A local directory (a volume in kubernetes) with the base model and its tokenizer: never a
    # hub download at run time.
    base_model_path: str | None = None
    # Where jobs keep status, adapter and metrics; relative paths are under ``data_dir``.
    output_dir: str = "_selfhosted"
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # -1: train ``epochs`` epochs; otherwise stop after this many optimizer steps.
    max_steps: int = Field(-1, ge=-1)
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1, le=1024)
    # Tokens per example the trainer takes; collection leaves out posts with a longer example.
    max_length: int = Field(1024, ge=16)
    seed: int = 42
    # Own GPUs cost nothing per token for the cost guard unless a price is set.
    price_per_million_tokens: float = Field(0.0, ge=0)
    # Kubernetes mode: the train pod's GPU, placement and base-model volume.
    gpu_resource: str = Field("nvidia.com/gpu", min_length=1)
    gpu_count: int = Field(1, ge=0)
    cpu: str = "8"
    memory: str = "32Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    base_model_pvc: str = Field("base-models", min_length=1)
    base_model_mount: str = Field("/models", min_length=1)
    # The trainer image (built from ``Dockerfile.trainer``); None: FINE_TUNING_TRAINER_IMAGE, else
    # the step image.
    trainer_image: str | None = None
    # Token counting at collection uses the base model's own tokenizer and chat template (under
    # base_model_path, applied by ``transformers``; in kubernetes mode the collect pod runs in
    # the trainer image with the model mounted). Where that cannot be read (a local worker
    # without the selfhosted extra, a missing model directory), this tiktoken encoding
    # approximates the count, and the collect manifest says so. Only these two work offline.
    token_encoding: Literal["o200k_base", "cl100k_base"] = "o200k_base"
    # A vLLM OpenAI-compatible server (``--enable-lora``, runtime LoRA updating allowed) that the
    # A/B step loads the candidate adapter into before routing traffic to it, and the deploy again
    # (``POST /v1/load_lora_adapter``). None: the adapters are served by other means.
    serving_base_url: str | None = None
    # vLLM's ``--api-key``, when it has one.
    serving_api_key: SecretStr | None = None
    # The jobs directory (``{data_dir}/{output_dir}``) as the vLLM server sees it (a shared
    # volume); the adapter of job J is ``{serving_adapter_root}/J/adapter``. None: the same path
    # as here (one machine).
    serving_adapter_root: str | None = None


class InferencePrice(_Section):
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    ft_input: float = Field(ge=0)
    ft_output: float = Field(ge=0)


class OpenAICompatibleConfig(_Section):
    """``training.provider = "openai_compatible"``: a gateway or host that speaks OpenAI's files
    and fine-tuning jobs API at its own base URL (the same idempotent upload and job creation)."""

    # e.g. https://gateway.example.com/v1; the key in FINE_TUNING_OPENAI_COMPATIBLE_API_KEY or the
    # Airflow connection's password.
    base_url: str | None = None
    api_key: SecretStr | None = None
    # USD per 1M training tokens of the base model at this host (its own price, not OpenAI's).
    price_per_million_training_tokens: dict[str, float] = Field(default_factory=dict)


class LossGateConfig(_Section):
    """Before any traffic: reject a candidate whose validation loss rises at the end or ends high."""

    enabled: bool = True
    # The last share of the reported steps where a rise means over-fitting.
    window_share: float = Field(0.25, gt=0.0, le=1.0)
    # A fitted rise over that window above this share of the loss's level there rejects...
    max_relative_rise: float = Field(0.05, ge=0.0)
    # ...when the slope is positive with this significance (noise alone is not a rise).
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    max_final_valid_loss: float | None = Field(None, gt=0.0)
    # Fewest validation losses the gate judges; fewer (with a validation file) rejects.
    min_points: int = Field(3, ge=1)


class TrainingConfig(_Section):
    provider: ProviderName = "openai"
    # Where to train instead when the champion's provider retires it (a forced migration, see
    # fine_tuning.retirement); None: a retiring champion is reported, and no replacement trained.
    fallback_provider: ProviderName | None = None
    openai_compatible: OpenAICompatibleConfig = Field(default_factory=OpenAICompatibleConfig)
    azure: AzureOpenAIConfig = Field(default_factory=AzureOpenAIConfig)
    selfhosted: SelfHostedConfig = Field(default_factory=SelfHostedConfig)
    # The OpenAI model to fine-tune (openai, azure_openai). The selfhosted provider trains
    # ``selfhosted.base_model_path`` and counts tokens with its tokenizer: this is not read then.
    base_model: str = Field("gpt-3.5-turbo-0125", min_length=1, max_length=200)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    loss_gate: LossGateConfig = Field(default_factory=LossGateConfig)
    suffix: str = Field("weekly", min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")
    seed: int | None = None
    # The design's ConfigMap says 1800 s; a real OpenAI job often queues longer than that, so
    # this is the wait's deadline and is set per deployment.
    timeout_seconds: int = Field(86_400, ge=60)
    poll_interval_seconds: float = Field(60.0, gt=0)
    max_training_cost_usd: float = Field(50.0, ge=0)
    # USD per 1M training tokens (OpenAI's published fine-tuning prices).
    price_per_million_training_tokens: dict[str, float] = Field(
        default_factory=lambda: {
            "gpt-3.5-turbo-0125": 8.0,
            "gpt-4o-mini-2024-07-18": 3.0,
            "gpt-4o-2024-08-06": 25.0,
            "gpt-4.1-nano-2025-04-14": 1.5,
            "gpt-4.1-mini-2025-04-14": 5.0,
            "gpt-4.1-2025-04-14": 25.0,
        }
    )
    # Training context per base model; longer examples are rejected at collection.
    max_example_tokens: dict[str, int] = Field(
        default_factory=lambda: {
            "gpt-3.5-turbo-0125": 16_385,
            "gpt-4o-mini-2024-07-18": 65_536,
            "gpt-4o-2024-08-06": 65_536,
            "gpt-4.1-nano-2025-04-14": 65_536,
            "gpt-4.1-mini-2025-04-14": 65_536,
            "gpt-4.1-2025-04-14": 65_536,
        }
    )

    # USD per 1M tokens served (input, output) by OpenAI's price list, for a base model and for
    # a model fine-tuned from it ("ft:<base>:..."): what the A/B test's cost per post is made of.
    price_per_million_inference_tokens: dict[str, InferencePrice] = Field(
        default_factory=lambda: {
            "gpt-3.5-turbo-0125": InferencePrice(input=0.50, output=1.50, ft_input=3.00, ft_output=6.00),
            "gpt-4o-mini-2024-07-18": InferencePrice(input=0.15, output=0.60, ft_input=0.30, ft_output=1.20),
            "gpt-4o-2024-08-06": InferencePrice(input=2.50, output=10.00, ft_input=3.75, ft_output=15.00),
            "gpt-4.1-nano-2025-04-14": InferencePrice(input=0.10, output=0.40, ft_input=0.20, ft_output=0.80),
            "gpt-4.1-mini-2025-04-14": InferencePrice(input=0.40, output=1.60, ft_input=0.80, ft_output=3.20),
            "gpt-4.1-2025-04-14": InferencePrice(input=2.00, output=8.00, ft_input=3.00, ft_output=12.00),
        }
    )

    def inference_price(self, model_id: str) -> tuple[float, float]:
        """USD per 1M (input, output) tokens of a served model: a base model or ``ft:<base>:...``."""
        fine_tuned = model_id.startswith("ft:")
        base = model_id.split(":")[1] if fine_tuned else model_id
        price = self.price_per_million_inference_tokens.get(base)
        if price is None:
            raise ConfigError(
                f"model {model_id!r}: no price for {base!r} in training.price_per_million_inference_tokens"
            )
        return (price.ft_input, price.ft_output) if fine_tuned else (price.input, price.output)

    def price_per_million(self) -> float:
        if self.provider == "openai_compatible":
            prices, where = self.openai_compatible.price_per_million_training_tokens, "openai_compatible."
        else:
            prices, where = self.price_per_million_training_tokens, ""
        try:
            return prices[self.base_model]
        except KeyError:
            raise ConfigError(
                f"training.base_model {self.base_model!r} has no price in "
                f"training.{where}price_per_million_training_tokens; add one so the cost guard can work"
            ) from None

    def trained_model(self) -> str:
        """What is fine-tuned: the OpenAI model id, or the self-hosted base model's directory
        (recorded in the upload manifest and on the MLflow run and version)."""
        if self.provider == "selfhosted":
            return self.selfhosted.base_model_path or "(training.selfhosted.base_model_path not set)"
        return self.base_model

    def context_limit(self) -> int:
        """The most tokens one example may have; collection leaves out a post with a longer one
        rather than have the trainer cut it short. An OpenAI model's training context
        (``max_example_tokens``), or the self-hosted trainer's ``selfhosted.max_length``."""
        if self.provider == "selfhosted":
            return self.selfhosted.max_length
        return self.max_example_tokens.get(self.base_model, 16_385)


class SuccessCriteria(_Section):
    min_engagement_lift: float = Field(0.15, gt=0)
    # Cost per post: by default a non-inferiority guardrail (the candidate may cost at most
    # ``max_cost_increase`` more per post); "min_gain" asks it to cost min_cost_efficiency_gain less.
    cost_rule: Literal["non_inferiority", "min_gain"] = "non_inferiority"
    max_cost_increase: float = Field(0.10, ge=0)
    min_cost_efficiency_gain: float = Field(0.10, ge=0)
    # Criteria whose data may be missing without blocking promotion: cost, quality_score,
    # response_time_ms. Missing data is always reported.
    optional: list[Literal["cost", "quality_score", "response_time_ms"]] = Field(default_factory=list)


class GuardrailConfig(_Section):
    # Non-inferiority margins: how much worse the candidate may be and still pass.
    response_time_relative_margin: float = Field(0.10, ge=0.0)
    quality_score_relative_margin: float = Field(0.05, ge=0.0)
    error_rate_absolute_margin: float = Field(0.01, ge=0.0, le=1.0)


class EvaluationConfig(_Section):
    traffic_split: float = Field(0.1, gt=0.0, lt=1.0)
    # Hours; fractions allowed so that a demo's A/B test lasts minutes.
    duration_hours: float = Field(168, gt=0)
    significance_threshold: float = Field(0.05, gt=0.0, lt=1.0)
    success_criteria: SuccessCriteria = Field(default_factory=SuccessCriteria)
    guardrails: GuardrailConfig = Field(default_factory=GuardrailConfig)
    method: Literal["sequential", "fixed"] = "sequential"
    srm_alpha: float = Field(0.001, gt=0.0, lt=1.0)
    # Which of the agent's model types the candidate competes for (its baseline is that model).
    model_type: Literal["hook", "body"] = "body"
    # Look at the results this often (the sequential test makes frequent looks safe).
    evaluation_interval_minutes: float = Field(60.0, gt=0)
    # Refuse to start an A/B test that cannot detect min_engagement_lift (else: a loud warning).
    strict_power: bool = False
    power: float = Field(0.8, gt=0.0, lt=1.0)
    # Hours of baseline history used for the power calculation.
    power_history_hours: float = Field(168, gt=0)
    metrics_cache_ttl_seconds: int = Field(300, ge=0)
    # Posts per arm before a look counts: the estimated variances of the first posts are too
    # noisy for any test (A/A with hourly looks from the first post: ~12% false positives).
    min_samples_per_arm: int = Field(50, ge=2)
    # Regression adjustment (CUPED) on the persona's mean engagement over the days before the
    # test; "auto" uses it whenever that covariate exists.
    variance_reduction: Literal["auto", "off"] = "auto"
    covariate_days: float = Field(28, gt=0)


class RolloutConfig(_Section):
    initial_traffic: float = Field(0.1, gt=0.0, le=1.0)
    # "evidence": a stage advances once every guardrail is shown non-inferior (always-valid
    # tests) on that stage's posts and min_dwell_hours have passed; "clock": every
    # increment_interval_hours, whatever the evidence says (the seed's 24 h).
    advance_on: Literal["evidence", "clock"] = "evidence"
    min_dwell_hours: float = Field(2.0, gt=0)
    # Engagement may be at most this share below the previous model's for a stage to pass.
    engagement_margin: float = Field(0.10, gt=0.0, lt=1.0)
    # Hours; fractions allowed so that a demo's rollout lasts minutes.
    increment_interval_hours: float = Field(24, gt=0)
    increment_percentage: float = Field(0.1, gt=0.0, le=1.0)
    max_traffic: float = Field(1.0, gt=0.0, le=1.0)


class RollbackTriggers(_Section):
    engagement_drop: float = Field(0.15, gt=0.0, le=1.0)
    error_rate: float = Field(0.05, gt=0.0, le=1.0)
    p95_response_time_ms: float = Field(2000.0, gt=0.0)
    # Fewest candidate posts in the watch window before the triggers are judged at all.
    min_posts: int = Field(30, ge=1)
    # The continuous guard (rollout_monitor's ``guard`` task, deferred in the triggerer): every
    # ``guard_interval_minutes`` it judges the same three triggers on the most recent
    # ``guard_window_minutes`` of posts (widened back until each arm has ``min_posts``), and rolls
    # back once a trigger's value is past its threshold AND the candidate is significantly worse
    # than the previous model by an always-valid test at ``guard_alpha`` (Bonferroni over the
    # three triggers). Recorded with each deployment, like the thresholds.
    guard_interval_minutes: float = Field(5.0, gt=0, le=60)
    guard_window_minutes: float = Field(60.0, gt=0, le=24 * 60)
    guard_alpha: float = Field(0.01, gt=0, lt=0.5)
    # Posts of each arm the guard's window holds at least. The harm tests of a proportion rest on
    # a normal approximation that needs events to count: at the 5% error trigger, 200 posts
    # expect 10. With min_posts (30) a window of 3 errors in 35 posts passed for "significant"
    # (bench/guard_bench.py: 2 of 30 as-good candidates rolled back by the guard).
    guard_min_posts: int = Field(200, ge=1)


class DeploymentConfig(_Section):
    strategy: Literal["gradual_rollout", "immediate"] = "gradual_rollout"
    rollout_config: RolloutConfig = Field(default_factory=RolloutConfig)
    rollback_triggers: RollbackTriggers = Field(default_factory=RollbackTriggers)
    # The step to max_traffic waits for a person (the rollout_approval DAG's ApprovalOperator);
    # the rollout holds its traffic meanwhile, and no answer within the timeout is a Reject.
    require_approval: bool = False
    approval_timeout_hours: float = Field(24.0, gt=0, le=24 * 30)
    # How long each hourly rollout_monitor run's guard keeps watching after its data interval
    # ended (deferred in the triggerer), so that the next run takes over; 0: one look, no watch.
    guard_watch_minutes: float = Field(55.0, ge=0, lt=60)


class MLflowConfig(_Section):
    tracking_uri: str = "http://127.0.0.1:5000"
    experiment_name: str = "fine_tuning_pipeline"
    registered_model_name: str = "content-agent"
    candidate_alias: str = "challenger"
    # MLflow's own HTTP retries default to 7 with a doubling backoff (minutes of waiting while
    # the server is down). The breaker and the outage buffer handle outages, so keep these short.
    request_max_retries: int = Field(2, ge=0, le=10)
    request_timeout_seconds: float = Field(10.0, gt=0)
    # Tracking calls made while MLflow is down wait here (one JSON file per logical operation)
    # and are replayed in order; relative paths are under ``data_dir``.
    outbox_dir: str = "_mlflow_outbox"


class BreakerConfig(_Section):
    """One circuit breaker's thresholds (the shape of resilience4j's, shared through Redis)."""

    # Consecutive failures (in the order Redis sees them, across all workers) that open it.
    failure_threshold: int = Field(3, ge=1)
    # How long it stays open before letting probe calls through.
    recovery_timeout_seconds: float = Field(120.0, gt=0)
    # Also open when, over the sliding window and with at least ``minimum_calls`` calls, the
    # share of failures (or of slow calls) reaches its threshold.
    failure_rate_threshold: float = Field(0.5, gt=0.0, le=1.0)
    slow_call_rate_threshold: float = Field(1.0, gt=0.0, le=1.0)
    slow_call_duration_seconds: float = Field(60.0, gt=0)
    sliding_window_seconds: float = Field(60.0, gt=0)
    minimum_calls: int = Field(10, ge=1)
    # Probe calls admitted in HALF_OPEN across the whole cluster; all must succeed to close.
    half_open_max_calls: int = Field(1, ge=1)
    # A probe whose process died (SIGKILL) frees its slot after this long.
    probe_lease_seconds: float = Field(60.0, gt=0)


class BreakersConfig(_Section):
    enabled: bool = True
    # Redis keys are ``{key_prefix}:{name}``; every key has a TTL.
    key_prefix: str = Field("fine_tuning:breaker", min_length=1)
    # Seconds between attempts to reach Redis again after it was found down.
    redis_retry_seconds: float = Field(15.0, gt=0)
    openai: BreakerConfig = Field(
        default_factory=lambda: BreakerConfig(failure_threshold=3, recovery_timeout_seconds=120.0)
    )
    mlflow: BreakerConfig = Field(
        default_factory=lambda: BreakerConfig(failure_threshold=5, recovery_timeout_seconds=60.0)
    )
    # The vLLM server that loads self-hosted adapters (training.selfhosted.serving_base_url).
    vllm: BreakerConfig = Field(
        default_factory=lambda: BreakerConfig(failure_threshold=3, recovery_timeout_seconds=60.0)
    )


class CacheConfig(_Section):
    enabled: bool = True
    ttl_seconds: int = Field(300, ge=1)
    # After its TTL an entry is still served, at most this long, while one caller refreshes it
    # in the background (stale-while-revalidate): a reader never waits for a recompute of an
    # entry it has. 0: an expired entry is a miss. An answer is at most TTL + this old.
    stale_seconds: int = Field(300, ge=0)
    key_prefix: str = Field("fine_tuning:cache", min_length=1)


Component = Literal["database", "redis", "mlflow", "openai"]
DEFAULT_REQUIRED: tuple[Component, ...] = ("database", "mlflow")


class MonitoringConfig(_Section):
    """Where the pipeline's StatsD metrics go, and what the health check requires."""

    statsd_enabled: bool = True
    # The official chart's statsd_exporter listens on ``<release>-statsd:9125``; locally, UDP to
    # a port nobody listens on is harmless.
    statsd_host: str = Field("127.0.0.1", min_length=1)
    statsd_port: int = Field(8125, ge=1, le=65535)
    statsd_prefix: str = Field("fine_tuning", pattern=r"^[A-Za-z0-9_]*$")
    # Per-dependency timeout of the health check (a probe must answer in seconds).
    health_timeout_seconds: float = Field(3.0, gt=0, le=60)
    # The dependency probes' results are reused this long by /pipeline/health and /metrics
    # (one scrape in this window probes; the others read its answer, which says its age): a
    # scrape every few seconds must not make an authenticated OpenAI call each time. 0: every call.
    health_cache_seconds: float = Field(10.0, ge=0, le=300)
    # Dependencies whose failure makes the check unhealthy (503); the others only degrade it:
    # breakers fall back to per-process state without Redis, OpenAI is guarded by its breaker.
    required_components: list[Component] = Field(default_factory=lambda: list(DEFAULT_REQUIRED))


class ServicesConfig(_Section):
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/test")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_timeout_seconds: float = Field(30.0, gt=0)
    openai_max_retries: int = Field(3, ge=0, le=10)


class RetirementRow(_Section):
    """One row of the retirement table (``fine_tuning/retirements.json``, or an override)."""

    provider: ProviderName
    # fnmatch patterns over the base model id; "*" is every model of the provider.
    models: list[str] = Field(min_length=1)
    training_retires: date | None = None
    inference_retires: date | None = None
    # Fine-tuned models built on a matching base stop serving on the same day.
    fine_tunes_share_inference_date: bool = True
    source: str = Field(min_length=1)
    checked: date


class RetirementConfig(_Section):
    # A served model this close to its inference retirement makes health degraded, and the
    # weekly run starts replacing the champion (with training.fallback_provider).
    horizon_days: float = Field(30, ge=0)
    # A JSON file ({"rows": [...]}, the shipped file's shape) used instead of the shipped table:
    # a table the deployment maintains itself (a mounted ConfigMap), or a test's.
    table_file: str | None = None
    # Rows that replace the table's for the models they match.
    overrides: list[RetirementRow] = Field(default_factory=list)
    # Who serves a plain model id (a base model such as hook_model / body_model).
    serving_provider: ProviderName = "openai"
    # Who serves model ids that do not say it themselves (fnmatch pattern -> provider), e.g. the
    # ``ft:`` models of an openai_compatible gateway ({"ft:*:gateway-org:*": "openai_compatible"}).
    # The Azure deployment in training.azure.deployment_name is azure_openai's without saying.
    model_providers: dict[str, ProviderName] = Field(default_factory=dict)
    # The model routed instead of one past its inference retirement, per model type.
    serving_fallback: dict[Literal["hook", "body"], str] = Field(default_factory=dict)
    # Read the provider's own dates where it reports them (Azure's Models API).
    read_provider_dates: bool = True
    # A forced migration's A/B test: the replacement is promoted when its engagement is shown
    # not worse than the champion's by more than this relative margin (always-valid).
    non_inferiority_margin: float = Field(0.05, gt=0.0, lt=1.0)
    # The replacement must be the champion this many days before the retirement.
    migration_lead_days: float = Field(2, ge=0)


class PipelineConfig(_Section):
    fine_tuning_enabled: bool = True
    weekly_schedule: str = "0 2 * * 0"
    # The content agent's current models (the A/B baselines).
    hook_model: str = "gpt-4o"
    body_model: str = "gpt-3.5-turbo-0125"
    data_dir: str = "/tmp/fine_tuning"
    data_collection: DataCollectionConfig = Field(default_factory=DataCollectionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    breakers: BreakersConfig = Field(default_factory=BreakersConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    retirement: RetirementConfig = Field(default_factory=RetirementConfig)

    def loggable(self) -> dict[str, Any]:
        """The config without secrets, flattened to dotted keys (for MLflow params and logs)."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            # A mapping keyed by patterns (retirement.model_providers) stays one JSON value:
            # MLflow refuses '*' and other characters in a param's name.
            if isinstance(value, dict) and not all(re.fullmatch(r"[\w\-. :/]+", str(k)) for k in value):
                flat[prefix] = json.dumps(value, sort_keys=True)
            elif isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            else:
                flat[prefix] = value

        data = self.model_dump(mode="json", exclude={"services"})
        data["services"] = {
            "database_url": redact_url(self.services.database_url.get_secret_value()),
            "redis_url": redact_url(self.services.redis_url.get_secret_value()),
            "openai_base_url": self.services.openai_base_url,
        }
        walk("", data)
        return flat


@dataclass(frozen=True)
class RunParam:
    """A setting a run may override: where it lives in the config, and what it means."""

    path: tuple[str, ...]
    description: str


# The settings a run overrides, in the order the trigger form shows them. The DAG's ``Param``s
# and the REST API's start body are made from this and the fields' own types and bounds
# (``run_param_schemas``, ``run_params_model``): a bound changes in the config field alone.
RUN_PARAMS: dict[str, RunParam] = {
    "engagement_threshold": RunParam(
        ("data_collection", "engagement_threshold"), "Minimum engagement rate of a post."
    ),
    "days_back": RunParam(
        ("data_collection", "days_back"), "Days of posts before the run's data interval end."
    ),
    "max_records": RunParam(("data_collection", "max_records"), "Most posts to read."),
    "training_data_threshold": RunParam(
        ("data_collection", "training_data_threshold"),
        "Fewest valid examples to train on; fewer skips the run.",
    ),
    "training_provider": RunParam(("training", "provider"), "Where the model is fine-tuned."),
    "base_model": RunParam(("training", "base_model"), "OpenAI model to fine-tune (openai, azure_openai)."),
    "n_epochs": RunParam(("training", "hyperparameters", "n_epochs"), "'auto' or 1-50."),
    "max_training_cost_usd": RunParam(
        ("training", "max_training_cost_usd"), "Refuse to start a job whose estimated cost is higher."
    ),
    "traffic_split": RunParam(
        ("evaluation", "traffic_split"), "Share of requests the candidate gets during the A/B test."
    ),
    "a_b_test_duration_hours": RunParam(("evaluation", "duration_hours"), "Planned A/B test length."),
    "evaluation_interval_minutes": RunParam(
        ("evaluation", "evaluation_interval_minutes"), "Minutes between A/B looks."
    ),
    "strict_power": RunParam(
        ("evaluation", "strict_power"), "Refuse an A/B test that cannot detect the lift."
    ),
    "deployment_strategy": RunParam(("deployment", "strategy"), "How a promoted candidate is rolled out."),
}

# Flat names accepted from environment variables and DAG run params, and where they go: the run
# params, and a few more that only a config file or the CLI's ``--params`` usually sets.
FLAT_KEYS: dict[str, tuple[str, ...]] = {
    **{name: param.path for name, param in RUN_PARAMS.items()},
    "min_examples": ("data_collection", "training_data_threshold"),
    "chunk_size": ("data_collection", "chunk_size"),
    "batch_size": ("training", "hyperparameters", "batch_size"),
    "learning_rate_multiplier": ("training", "hyperparameters", "learning_rate_multiplier"),
    "suffix": ("training", "suffix"),
    "timeout_seconds": ("training", "timeout_seconds"),
    "poll_interval_seconds": ("training", "poll_interval_seconds"),
    "evaluation_method": ("evaluation", "method"),
    "weekly_schedule": ("weekly_schedule",),
    "hook_model": ("hook_model",),
    "body_model": ("body_model",),
    "data_dir": ("data_dir",),
}


def config_field(path: tuple[str, ...]) -> FieldInfo:
    """The pydantic field of ``PipelineConfig`` at a dotted path (``("training", "base_model")``)."""
    model: type[BaseModel] = PipelineConfig
    for part in path[:-1]:
        annotation = model.model_fields[part].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), path
        model = annotation
    return model.model_fields[path[-1]]


def _field_type(field: FieldInfo) -> Any:
    """The field's type with its constraints (``ge``, ``le``, ``max_length``...) attached."""
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def _param_description(name: str) -> str:
    param = RUN_PARAMS[name]
    default = config_field(param.path).get_default(call_default_factory=True)
    return f"{param.description} Empty keeps the configured value (default {default})."


def _flatten_any_of(schema: dict[str, Any]) -> dict[str, Any]:
    """``anyOf`` of one branch per JSON type, as one schema with a list of types (what Airflow's
    trigger form renders as a field): each keyword of a numeric or string branch applies only to
    that type, and a string constant becomes a ``pattern``. Anything else keeps its ``anyOf``."""
    branches = schema.get("anyOf")
    if not branches:
        return schema
    flat: dict[str, Any] = {"type": []}
    # One type besides null: an ``enum`` (a drop-down in the form) is safe, with null in it.
    typed = [b for b in branches if b.get("type") != "null"]
    if len(typed) == 1 and "enum" in typed[0] and len(branches) == 2:
        return {
            **typed[0],
            "type": [typed[0].get("type", "string"), "null"],
            "enum": [*typed[0]["enum"], None],
        }
    for branch in branches:
        kind = branch.get("type")
        if kind is None and "const" in branch and isinstance(branch["const"], str):
            kind = "string"
        if not isinstance(kind, str) or kind in flat["type"]:
            return schema
        flat["type"].append(kind)
        extra = {key: value for key, value in branch.items() if key != "type"}
        if kind == "string" and ("const" in extra or "enum" in extra):
            values = [extra.pop("const")] if "const" in extra else extra.pop("enum")
            extra["pattern"] = "^(" + "|".join(re.escape(str(v)) for v in values) + ")$"
        if any(key in flat for key in extra):  # two branches constrain the same keyword
            return schema
        flat.update(extra)
    return flat


@cache
def run_param_schemas() -> dict[str, dict[str, Any]]:
    """Each run param's JSON schema: the config field's type and bounds, ``null`` allowed (empty
    keeps the configured value). The DAG's ``Param``s are these."""
    schemas: dict[str, dict[str, Any]] = {}
    for name, param in RUN_PARAMS.items():
        # A type built at run time: mypy cannot check it, pydantic does.
        field_type: Any = _field_type(config_field(param.path))
        schema = TypeAdapter(Optional[field_type]).json_schema()  # noqa: UP045
        schema = _flatten_any_of(schema)
        schema["description"] = _param_description(name)
        schemas[name] = schema
    return schemas


@cache
def run_params_model() -> type[BaseModel]:
    """The run params as a pydantic model (the REST API's start body): every field optional,
    typed and bounded as in the config, unknown keys refused."""
    fields: dict[str, Any] = {
        name: (
            Optional[_field_type(config_field(param.path))],  # noqa: UP045 - a type made at run time
            Field(None, description=_param_description(name)),
        )
        for name, param in RUN_PARAMS.items()
    }
    model: type[BaseModel] = create_model("RunParams", __config__=ConfigDict(extra="forbid"), **fields)
    return model


ENV_KEYS: dict[str, tuple[str, ...]] = {
    "FINE_TUNING_ENABLED": ("fine_tuning_enabled",),
    "FINE_TUNING_MIN_EXAMPLES": ("data_collection", "training_data_threshold"),
    "FINE_TUNING_ENGAGEMENT_THRESHOLD": ("data_collection", "engagement_threshold"),
    "FINE_TUNING_SCHEDULE": ("weekly_schedule",),
    "FINE_TUNING_BASE_MODEL": ("training", "base_model"),
    "FINE_TUNING_MAX_TRAINING_COST_USD": ("training", "max_training_cost_usd"),
    "FINE_TUNING_DATA_DIR": ("data_dir",),
    "FINE_TUNING_POLL_INTERVAL_SECONDS": ("training", "poll_interval_seconds"),
    "HOOK_MODEL": ("hook_model",),
    "BODY_MODEL": ("body_model",),
    "DATABASE_URL": ("services", "database_url"),
    "REDIS_URL": ("services", "redis_url"),
    "OPENAI_API_KEY": ("services", "openai_api_key"),
    "OPENAI_BASE_URL": ("services", "openai_base_url"),
    "FINE_TUNING_TRAINING_PROVIDER": ("training", "provider"),
    "AZURE_OPENAI_API_KEY": ("training", "azure", "api_key"),
    "AZURE_OPENAI_ENDPOINT": ("training", "azure", "endpoint"),
    "FINE_TUNING_OPENAI_COMPATIBLE_BASE_URL": ("training", "openai_compatible", "base_url"),
    "FINE_TUNING_OPENAI_COMPATIBLE_API_KEY": ("training", "openai_compatible", "api_key"),
    "FINE_TUNING_FALLBACK_PROVIDER": ("training", "fallback_provider"),
    "FINE_TUNING_RETIREMENT_TABLE": ("retirement", "table_file"),
    "FINE_TUNING_BASE_MODEL_PATH": ("training", "selfhosted", "base_model_path"),
    "FINE_TUNING_SERVING_BASE_URL": ("training", "selfhosted", "serving_base_url"),
    "VLLM_API_KEY": ("training", "selfhosted", "serving_api_key"),
    "MLFLOW_TRACKING_URI": ("mlflow", "tracking_uri"),
    "MLFLOW_EXPERIMENT_NAME": ("mlflow", "experiment_name"),
    "STATSD_HOST": ("monitoring", "statsd_host"),
    "STATSD_PORT": ("monitoring", "statsd_port"),
    "STATSD_PREFIX": ("monitoring", "statsd_prefix"),
    "FINE_TUNING_BREAKERS_ENABLED": ("breakers", "enabled"),
    "FINE_TUNING_BREAKER_KEY_PREFIX": ("breakers", "key_prefix"),
    "FINE_TUNING_CACHE_TTL_SECONDS": ("cache", "ttl_seconds"),
    "FINE_TUNING_CACHE_STALE_SECONDS": ("cache", "stale_seconds"),
}


def redact_url(url: str) -> str:
    """``scheme://user:secret@host/db`` -> ``scheme://user:***@host/db``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _set_path(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{'.'.join(path)}: {key!r} is not a section")
    target[path[-1]] = value


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _unflatten(overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Accept flat names (``engagement_threshold``), dotted paths and nested sections."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue  # an unset param means "keep the layer below"
        if key in FLAT_KEYS:
            _set_path(nested, FLAT_KEYS[key], value)
        elif "." in key:
            _set_path(nested, tuple(key.split(".")), value)
        elif key in PipelineConfig.model_fields:
            nested = _deep_merge(nested, {key: value})
        else:
            raise ConfigError(f"unknown configuration key {key!r} in {source}")
    return nested


def _coerce_env(path: tuple[str, ...], raw: str) -> Any:
    # Numbers and booleans arrive as strings; pydantic coerces them, but "auto" stays a string.
    if path[-1] in {"n_epochs", "batch_size"} and raw.isdigit():
        return int(raw)
    return raw


def _validate(data: Mapping[str, Any], source: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            if "input" in err and not isinstance(err.get("input"), dict)
            else f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration from {source}: {problems}") from None


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
) -> PipelineConfig:
    """Build the config: defaults < JSON file < environment < DAG run params.

    :param config_file: the ConfigMap's ``training_config.json``; defaults to
        ``$FINE_TUNING_CONFIG_FILE`` when set.
    :param env: environment to read (defaults to ``os.environ``).
    :param params: the DAG run's params / conf (flat names or nested sections).
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    sources = ["defaults"]

    path = config_file or env.get(CONFIG_FILE_ENV)
    if path:
        try:
            file_data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        data = _deep_merge(data, _unflatten(file_data, f"config file {path}"))
        sources.append(str(path))
    _validate(data, " + ".join(sources))

    env_layer: dict[str, Any] = {}
    for name, target in ENV_KEYS.items():
        if env.get(name):
            _set_path(env_layer, target, _coerce_env(target, env[name]))
    data = _deep_merge(data, env_layer)
    sources.append("environment")
    _validate(data, " + ".join(sources))

    if params:
        data = _deep_merge(data, _unflatten(params, "DAG run params"))
        sources.append("DAG run params")
    return _validate(data, " + ".join(sources))
