"""Life after OpenAI fine-tuning, on real PostgreSQL, Redis, MLflow and two emulators.

- A run past OpenAI's training closure fails before uploading, naming the date and the fallback.
- Azure's Models API dates are read from the endpoint (the emulator serves them).
- ``openai_compatible`` trains at a second base URL, once per key.
- With the champion two weeks from its inference retirement, a run trains on the fallback
  provider, a non-inferiority A/B test promotes an equal replacement, and the champion moves
  before the deadline (tagged as a migration in MLflow).
- Past the date with no replacement, the routing names the fallback and never the retired id.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from mlflow import MlflowClient

from fine_tuning import clock, pipeline, retirement
from fine_tuning.config import ConfigError, PipelineConfig, load_config
from fine_tuning.dev.simulator import ModelBehaviour, simulate_traffic
from fine_tuning.infra import db
from fine_tuning.manifests import CollectManifest, RunContext
from fine_tuning.routing import get_routing
from fine_tuning.train.providers import TrainingRefusedError

CHAMPION = "ft:gpt-4o-mini-2024-07-18:acme:weekly:champ001"
FALLBACK = "gpt-3.5-turbo-0125"


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """The pipeline's clock, moved by the test (``now[0] = ...``)."""
    current = [datetime(2026, 12, 3, tzinfo=UTC)]
    monkeypatch.setattr(clock, "now_utc", lambda: current[0])
    return current


@pytest.fixture(scope="module")
def gateway() -> Iterator[object]:
    """A second OpenAI-compatible server (a gateway's), whose fine-tuned ids name their owner."""
    from openai_emulator.launch import EmulatorProcess

    with EmulatorProcess(stage_seconds=0.1, model_owner="gateway") as process:
        yield process


@pytest.fixture
def routing_redis(redis_db: str) -> redis.Redis:
    """A Redis database of this test's own (the routing keys of both model types)."""
    return redis.Redis.from_url(redis_db)


@pytest.fixture
def config(
    pg_url: str, mlflow_uri: str, openai_env, gateway, redis_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> PipelineConfig:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    name = f"retire-{uuid.uuid4().hex[:8]}"
    gateway.reset()  # type: ignore[attr-defined]
    return load_config(
        env={
            "DATABASE_URL": pg_url,
            "REDIS_URL": redis_db,
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "MLFLOW_EXPERIMENT_NAME": name,
            "OPENAI_BASE_URL": openai_env.base_url,
            "OPENAI_API_KEY": "sk-test-key",
            "FINE_TUNING_DATA_DIR": str(tmp_path / "data"),
            "FINE_TUNING_OPENAI_COMPATIBLE_BASE_URL": gateway.base_url,  # type: ignore[attr-defined]
            "FINE_TUNING_OPENAI_COMPATIBLE_API_KEY": "sk-gateway-key",
        },
        params={
            "poll_interval_seconds": 0.1,
            "timeout_seconds": 60,
            "training": {
                "base_model": "gpt-4o-mini-2024-07-18",
                "openai_compatible": {"price_per_million_training_tokens": {"gpt-4o-mini-2024-07-18": 2.0}},
            },
            "mlflow": {"registered_model_name": name},
            "retirement": {
                "serving_fallback": {"body": FALLBACK},
                "model_providers": {"ft:*:gateway:*": "openai_compatible"},
            },
        },
    )


def collected_week(config: PipelineConfig, ctx: RunContext, n: int = 30) -> CollectManifest:
    path = pipeline.run_dir(config, ctx) / "dataset.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for i in range(n):
            messages = [
                {"role": "system", "content": "You write social posts as persona p1."},
                {"role": "user", "content": "Create engaging content"},
                {"role": "assistant", "content": f"Post number {i}: what a week of shipping taught us"},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    data = path.read_bytes()
    return CollectManifest(
        status="ready", dag_id=ctx.dag_id, run_id=ctx.run_id, window_start=ctx.window_end - timedelta(days=7),
        window_end=ctx.window_end, dataset_path=str(path), sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
        posts_scanned=n, examples_written=n, rejected={}, duplicates=0, tokens=900, min_examples=10, seconds=0.1,
    )


def context(now: datetime, name: str) -> RunContext:
    return RunContext(dag_id="weekly_fine_tuning", run_id=f"scheduled__{name}", window_end=now)


def register_champion(config: PipelineConfig, model: str) -> str:
    client = MlflowClient(config.mlflow.tracking_uri, config.mlflow.tracking_uri)
    name = config.mlflow.registered_model_name
    client.create_registered_model(name)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    version = client.create_model_version(
        name, source=f"runs:/{run.info.run_id}/fine_tuned_model", run_id=run.info.run_id,
        tags={"fine_tuned_model": model},
    )
    client.set_registered_model_alias(name, "champion", version.version)
    return str(version.version)


def test_retire_past_training_closure_fails_before_uploading(config: PipelineConfig, now, openai_env) -> None:
    config.training.base_model = "gpt-3.5-turbo-0125"
    config.training.fallback_provider = "openai_compatible"
    now[0] = datetime(2027, 1, 7, tzinfo=UTC)
    openai_env.set_clock(now=now[0].timestamp())
    ctx = context(now[0], "closed")
    with pytest.raises(retirement.TrainingRetiredError) as refused:
        pipeline.upload(config, ctx, collected_week(config, ctx))
    message = str(refused.value)
    assert "2027-01-06" in message and "openai_compatible" in message and "deprecations page" in message
    assert openai_env.state()["files"] == []
    # The operator fails it without retrying (a TrainingRefusedError in all but name).
    import airflow.sdk  # noqa: F401 - importing Airflow puts plugins/ on sys.path
    from fine_tuning_airflow.operators import _fail_fast

    assert type(_fail_fast(refused.value)).__name__ == "AirflowFailException"


def test_retire_refusal_by_the_api_is_recognised_by_its_code(config: PipelineConfig, now, openai_env) -> None:
    config.training.base_model = "gpt-3.5-turbo-0125"
    ctx = context(now[0], "refused")
    uploaded = pipeline.upload(config, ctx, collected_week(config, ctx))
    # A refusal whose text matches nothing we look for: the code alone says it.
    openai_env.refuse_jobs(True, message="Request denied.")
    with pytest.raises(TrainingRefusedError, match="Request denied"):
        pipeline.train(config, ctx, uploaded)
    assert [j for j in openai_env.state()["jobs"]] == []


def test_retire_azure_dates_come_from_its_models_api(config: PipelineConfig, openai_env) -> None:
    config.training.provider = "azure_openai"
    config.training.azure.endpoint = openai_env.root_url
    config.training.azure.api_key = "azure-test-key"  # type: ignore[assignment]
    openai_env.set_deprecation(
        "gpt-4o-mini-2024-07-18",
        fine_tune=int(datetime(2027, 3, 20, tzinfo=UTC).timestamp()),
        inference=int(datetime(2027, 9, 1, tzinfo=UTC).timestamp()),
    )
    found = pipeline.retirement_table(config).lookup("gpt-4o-mini-2024-07-18", "azure_openai")
    assert str(found.training_retires) == "2027-03-20" and str(found.inference_retires) == "2027-09-01"
    assert "Azure OpenAI Models API" in (found.source or "")
    models_calls = openai_env.requests(method="GET", path="/v1/models")
    assert models_calls and models_calls[-1]["azure"]


def test_retire_openai_compatible_trains_once_at_its_own_base_url(config: PipelineConfig, now, openai_env, gateway) -> None:
    config.training.provider = "openai_compatible"
    ctx = context(now[0], "gateway")
    collected = collected_week(config, ctx)
    first = pipeline.upload(config, ctx, collected)
    again = pipeline.upload(config, ctx, collected)
    assert first.provider == "openai_compatible" and again.file_id == first.file_id and again.reused_file
    assert first.estimated_cost_usd == pytest.approx(900 * first.estimated_epochs * 2.0 / 1e6, rel=1e-3)
    job = pipeline.train(config, ctx, first)
    job_again = pipeline.train(config, ctx, again)
    assert job_again.job_id == job.job_id and job_again.reused_job
    state = gateway.state()  # type: ignore[attr-defined]
    assert len(state["files"]) == 1 and len(state["jobs"]) == 1
    assert openai_env.state()["files"] == [] and openai_env.state()["jobs"] == []
    result = pipeline.wait(config, ctx, job)
    assert result.provider == "openai_compatible" and result.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:gateway:")


def test_retire_champion_two_weeks_out_is_replaced_before_the_date(
    config: PipelineConfig, now, openai_env, gateway, routing_redis: redis.Redis
) -> None:
    url = config.services.database_url.get_secret_value()
    config.training.fallback_provider = "openai_compatible"
    config.evaluation.traffic_split = 0.5
    config.deployment.rollout_config.initial_traffic = 0.5
    config.deployment.rollout_config.increment_percentage = 0.25
    config.deployment.rollout_config.increment_interval_hours = 200  # would end after the date
    version = register_champion(config, CHAMPION)
    start = datetime(2027, 1, 1, tzinfo=UTC)  # 13 days before gpt-4o-mini's fine-tunes stop
    now[0] = start
    # A week of the champion's posts (the power calculation reads them).
    simulate_traffic(url, routing_redis, model_type="body", default_model=CHAMPION,
                     behaviours={CHAMPION: ModelBehaviour()}, requests=3000,
                     start=start - timedelta(days=7), end=start, seed=7)

    health = pipeline.health(config)
    assert health.status == "degraded"
    assert health.models["champion"]["model"] == CHAMPION
    assert health.models["champion"]["inference"] == "retiring"
    assert health.models["champion"]["days_to_inference_retirement"] == 13.0
    # The agent's hook model (gpt-4o, configured) retires with it, and says so too.
    assert health.models["hook_model"]["model"] == "gpt-4o" and health.models["hook_model"]["inference"] == "retiring"

    ctx = context(start, "migration")
    uploaded = pipeline.upload(config, ctx, collected_week(config, ctx))
    assert uploaded.provider == "openai_compatible" and uploaded.migration is not None
    assert uploaded.migration["from_model"] == CHAMPION
    assert uploaded.migration["deadline"] == "2027-01-12T00:00:00+00:00"
    assert openai_env.state()["files"] == []  # nothing went to the retiring provider
    trained = pipeline.train(config, ctx, uploaded)
    result = pipeline.wait(config, ctx, trained)
    collected = collected_week(config, ctx)
    registered = pipeline.register(config, ctx, collected, trained, result)
    assert registered.migration == uploaded.migration
    mlflow = MlflowClient(config.mlflow.tracking_uri)
    tags = mlflow.get_model_version(config.mlflow.registered_model_name, registered.model_version).tags
    assert tags["migration.from_model"] == CHAMPION and tags["migration.to_provider"] == "openai_compatible"

    test = pipeline.ab_create(config, ctx, registered)
    record = pipeline.ab.get_ab_test(config, test.ab_test_id)
    assert record["success_criteria"]["rule"] == "non_inferiority"
    assert test.baseline_model == CHAMPION
    assert test.planned_end_at <= start + timedelta(days=5.5, minutes=1)  # half the time to the deadline

    replacement = registered.fine_tuned_model
    equal = {CHAMPION: ModelBehaviour(), replacement: ModelBehaviour()}
    decision = None
    for hour in range(1, 25):
        simulate_traffic(url, routing_redis, model_type="body", default_model=CHAMPION, behaviours=equal,
                         requests=3000, start=now[0], end=now[0] + timedelta(hours=1), seed=100 + hour)
        now[0] = now[0] + timedelta(hours=1)
        decision = pipeline.evaluate(config, ctx, test)
        if decision.final:
            break
    assert decision is not None and decision.decision == "promote", decision.reasons
    assert any(r["criterion"] == "engagement_non_inferiority" and r["ok"] for r in decision.reasons)

    deployment = pipeline.deploy(config, ctx, decision)
    interval = pipeline.rollout.get_deployment(config, deployment.deployment_id)["rollout_config"][
        "increment_interval_hours"
    ]
    assert interval < 200
    while deployment.status == "rolling_out":
        simulate_traffic(url, routing_redis, model_type="body", default_model=CHAMPION, behaviours=equal,
                         requests=600, start=now[0], end=now[0] + timedelta(hours=1), seed=int(now[0].timestamp()))
        now[0] = now[0] + timedelta(hours=interval)
        watched = pipeline.watch_rollouts(config, ctx).deployments
        deployment = next(d for d in watched if d.deployment_id == deployment.deployment_id) if watched else (
            pipeline.deployment_manifest(pipeline.rollout.get_deployment(config, deployment.deployment_id))
        )
        assert now[0] < datetime(2027, 1, 14, tzinfo=UTC), "the ramp ran past the retirement"
    assert deployment.status == "completed"
    finished = pipeline.rollout.get_deployment(config, deployment.deployment_id)["finished_at"]
    assert finished <= datetime(2027, 1, 12, tzinfo=UTC)
    champion = mlflow.get_model_version_by_alias(config.mlflow.registered_model_name, "champion")
    assert champion.version == registered.model_version and champion.version != version
    routing = get_routing(routing_redis, "body")
    assert routing is not None and routing.baseline_model == replacement and routing.candidate_model is None
    # The new champion is the gateway's: not OpenAI's to retire, so next week is no migration.
    assert pipeline.plan_migration(config, pipeline.retirement_table(config), now[0]) is None


def test_retire_past_the_date_without_replacement_routes_to_the_fallback(
    config: PipelineConfig, now, routing_redis: redis.Redis, statsd_server
) -> None:
    config.monitoring.statsd_host = "127.0.0.1"
    config.monitoring.statsd_port = statsd_server.port
    register_champion(config, CHAMPION)
    now[0] = datetime(2027, 1, 10, tzinfo=UTC)
    retirement.write_routing(
        config, routing_redis, "body", pipeline.Routing(CHAMPION, None, 0.0, "deploy-old:completed"), now[0]
    )
    assert get_routing(routing_redis, "body").baseline_model == CHAMPION  # type: ignore[union-attr]
    now[0] = datetime(2027, 1, 15, tzinfo=UTC)
    # The agent's hook model (gpt-4o) retired too, and has no fallback: the body routing is
    # fixed all the same, and the task fails naming what is left.
    with pytest.raises(ConfigError, match=r"hook: 'gpt-4o' is past its inference retirement"):
        pipeline.watch_rollouts(config, context(now[0], "hourly"))
    routing = get_routing(routing_redis, "body")
    assert routing is not None and routing.baseline_model == FALLBACK
    assert CHAMPION not in (routing.baseline_model, routing.candidate_model, routing.fallback_model)
    statsd_server.wait_for("fine_tuning.routing.retired_model_replaced.body")
    # And next week's A/B test is against the fallback, not the dead champion.
    assert pipeline.baseline_model(config, now=now[0]) == FALLBACK
