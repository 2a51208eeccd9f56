"""Training providers: the interface, Azure OpenAI against the emulator's Azure URL shape, and
self-hosted LoRA training of a tiny model on the CPU (real transformers + peft + trl)."""

from __future__ import annotations

import hashlib
import importlib
import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import airflow.sdk  # noqa: F401 - importing Airflow puts plugins/ on sys.path
import httpx
import pytest

from fine_tuning import pipeline
from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.manifests import CollectManifest, RunContext
from fine_tuning.train.providers import TrainingRefusedError
from fine_tuning.train.providers import JOB_STATES, UnknownProviderError, get_provider, provider_class

WINDOW_END = datetime(2026, 11, 22, 2, tzinfo=UTC)
WORDS = (
    "the secret of growth is consistency nobody tells you this about writing posts people share "
    "every morning coffee habit small wins compound"
).split()


def write_dataset(directory: Path, n: int = 40) -> Path:
    import random

    rng = random.Random(7)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dataset.jsonl"
    with path.open("w") as handle:
        for _ in range(n):
            messages = [
                {"role": "system", "content": "You write social posts as persona p1."},
                {"role": "user", "content": "Create engaging content"},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(12))},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def collected_manifest(path: Path, ctx: RunContext) -> CollectManifest:
    data = path.read_bytes()
    return CollectManifest(
        status="ready", dag_id=ctx.dag_id, run_id=ctx.run_id, window_start=WINDOW_END - timedelta(days=7),
        window_end=WINDOW_END, dataset_path=str(path), sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
        posts_scanned=40, examples_written=40, rejected={}, duplicates=0, tokens=1200, min_examples=10, seconds=0.1,
    )


@pytest.fixture
def ctx(request: pytest.FixtureRequest) -> RunContext:
    return RunContext(dag_id="weekly_fine_tuning", run_id=f"test__{request.node.name}", window_end=WINDOW_END)


# ------------------------------------------------------------------------------- the interface


def test_provider_is_chosen_by_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("openai", "azure_openai", "selfhosted"):
        monkeypatch.setenv("FINE_TUNING_TRAINING_PROVIDER", name)
        assert get_provider(load_config()).name == name
    with pytest.raises(UnknownProviderError, match="'vertex'"):
        provider_class("vertex")
    assert JOB_STATES == ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


# ---------------------------------------------------------------------------------- Azure OpenAI


@pytest.fixture
def azure_config(openai_env, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PipelineConfig:
    monkeypatch.delenv("OPENAI_API_KEY")  # Azure's key alone must be enough
    monkeypatch.setenv("FINE_TUNING_TRAINING_PROVIDER", "azure_openai")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", openai_env.root_url)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-test-key")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("FINE_TUNING_DATA_DIR", str(tmp_path / "data"))
    return load_config(params={"poll_interval_seconds": 0.1, "timeout_seconds": 60})


def test_azure_same_contract_through_azure_urls(azure_config: PipelineConfig, ctx: RunContext, openai_env) -> None:
    collected = collected_manifest(write_dataset(pipeline.run_dir(azure_config, ctx)), ctx)
    first = pipeline.upload(azure_config, ctx, collected)
    again = pipeline.upload(azure_config, ctx, collected)
    assert first.provider == "azure_openai" and again.file_id == first.file_id and again.reused_file
    job = pipeline.train(azure_config, ctx, first)
    assert pipeline.train(azure_config, ctx, again).job_id == job.job_id
    result = pipeline.wait(azure_config, ctx, job)
    assert result.status == "succeeded" and result.provider == "azure_openai" and result.fine_tuned_model
    state = openai_env.state()
    assert len(state["files"]) == 1 and len(state["jobs"]) == 1
    # This test's own requests (the session's emulator may still hear a late poll from another test).
    requests = [r for r in state["requests"] if "api-version=" in r["query"]]
    assert requests, state["requests"]
    assert all(r["azure"] for r in requests), [r for r in requests if not r["azure"]]
    assert all("api-version=2024-10-21" in r["query"] for r in requests)


def test_emulator_azure_shape_checks_version_and_key(openai_env) -> None:
    url = f"{openai_env.root_url}/openai/fine_tuning/jobs"
    assert httpx.get(url, headers={"api-key": "k"}).status_code == 404  # no api-version
    assert httpx.get(url, params={"api-version": "2024-10-21"}).status_code == 401  # no key
    ok = httpx.get(url, params={"api-version": "2024-10-21"}, headers={"api-key": "k"})
    assert ok.status_code == 200 and ok.json()["object"] == "list"


def test_azure_refusal_fails_fast_and_says_how_to_switch(
    azure_config: PipelineConfig, ctx: RunContext, openai_env
) -> None:
    collected = collected_manifest(write_dataset(pipeline.run_dir(azure_config, ctx)), ctx)
    uploaded = pipeline.upload(azure_config, ctx, collected)
    openai_env.inject_fault(method="POST", path="/v1/fine_tuning/jobs", status=429, count=5,
                            error_code="insufficient_quota")
    with pytest.raises(TrainingRefusedError, match="training.provider"):
        pipeline.train(azure_config, ctx, uploaded)
    assert len(openai_env.requests("POST", "/v1/fine_tuning/jobs")) == 1  # not retried


def test_missing_azure_endpoint_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from fine_tuning.train.providers.azure_openai import AzureConfigError, azure_credentials

    monkeypatch.setenv("FINE_TUNING_TRAINING_PROVIDER", "azure_openai")
    monkeypatch.delenv("AZURE_OPENAI_ENDPOINT", raising=False)
    with pytest.raises(AzureConfigError, match="training.azure.endpoint"):
        azure_credentials(load_config())


# ------------------------------------------------------------------------- self-hosted (LoRA)

@pytest.fixture(scope="module")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama and a BPE tokenizer trained on the data: the 'configured base model path'.
    Only the tests that train need torch (a skip here fails under ``make test``)."""
    pytest.importorskip("torch")
    from fine_tuning.dev.tiny_model import build_tiny_chat_model

    directory = tmp_path_factory.mktemp("base")
    return build_tiny_chat_model(write_dataset(directory / "data"), directory / "tiny-chat")


@pytest.fixture
def selfhosted_config(
    tiny_base_model: Path, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> PipelineConfig:
    monkeypatch.setenv("FINE_TUNING_TRAINING_PROVIDER", "selfhosted")
    monkeypatch.setenv("FINE_TUNING_BASE_MODEL_PATH", str(tiny_base_model))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"selfhosted_{tmp_path.name}")
    monkeypatch.setenv("FINE_TUNING_DATA_DIR", str(tmp_path / "data"))
    config = load_config(params={"poll_interval_seconds": 0.2, "timeout_seconds": 300})
    selfhosted = config.training.selfhosted
    selfhosted.max_steps, selfhosted.learning_rate, selfhosted.batch_size, selfhosted.lora_r = 30, 1e-2, 8, 8
    return config


def test_selfhosted_trains_registers_and_the_adapter_changes_outputs(
    selfhosted_config: PipelineConfig, ctx: RunContext, tiny_base_model: Path, mlflow_uri: str
) -> None:
    import torch
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = selfhosted_config
    collected = collected_manifest(write_dataset(pipeline.run_dir(config, ctx)), ctx)
    uploaded = pipeline.upload(config, ctx, collected)
    assert uploaded.provider == "selfhosted" and uploaded.estimated_cost_usd == 0.0
    training = pipeline.train(config, ctx, uploaded)
    assert not training.reused_job
    again = pipeline.train(config, ctx, uploaded)  # a retry finds the running job
    assert again.job_id == training.job_id and again.reused_job
    result = pipeline.wait(config, ctx, training)
    assert result.status == "succeeded"
    assert result.fine_tuned_model == f"selfhosted:{training.job_id.removeprefix('selfhosted-')}"

    provider = get_provider(config)
    artifacts = provider.artifacts(provider.status(training.job_id))
    metrics = artifacts["metrics"]
    losses = [p["loss"] for p in metrics["loss_history"]]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the loss goes down
    adapter = Path(artifacts["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").exists()

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Create engaging content"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_base_model)
    with torch.no_grad():
        before = base(**prompt).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        after = tuned(**prompt).logits
    assert not torch.allclose(before, after, atol=1e-4)

    registration = pipeline.register(config, ctx, collected, training, result)
    assert registration.status == "registered" and registration.fine_tuned_model == result.fine_tuned_model
    client = MlflowClient(mlflow_uri, mlflow_uri)
    version = client.get_model_version(registration.model_name, registration.model_version)
    assert version.tags["provider"] == "selfhosted" and version.tags["fine_tuned_model"] == result.fine_tuned_model
    assert version.tags["base_model"] == str(tiny_base_model)  # what was trained, not an OpenAI id
    run = client.get_run(registration.mlflow_run_id)
    assert run.data.metrics["trained_tokens"] > 0 and run.data.metrics["adapter_bytes"] > 0
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 31))
    files = {f.path for f in client.list_artifacts(run.info.run_id, "fine_tuned_model/adapter")}
    assert "fine_tuned_model/adapter/adapter_model.safetensors" in files


def test_selfhosted_cancel_and_a_failed_job_is_not_reused(
    selfhosted_config: PipelineConfig, ctx: RunContext, tmp_path: Path
) -> None:
    config = selfhosted_config
    config.training.selfhosted.base_model_path = str(tmp_path / "no-such-model")
    collected = collected_manifest(write_dataset(pipeline.run_dir(config, ctx)), ctx)
    uploaded = pipeline.upload(config, ctx, collected)
    training = pipeline.train(config, ctx, uploaded)
    with pytest.raises(Exception, match="base_model_path"):
        pipeline.wait(config, ctx, training)
    retried = pipeline.train(config, ctx, uploaded)
    assert retried.job_id != training.job_id and not retried.reused_job
    provider = get_provider(config)
    assert provider.cancel(retried.job_id) in ("cancelled", "failed")


async def test_trigger_waits_for_a_selfhosted_job(selfhosted_config: PipelineConfig, ctx: RunContext) -> None:
    from fine_tuning_airflow.triggers import FineTuningJobTrigger

    trigger = FineTuningJobTrigger(job_id="selfhosted-x-1", poll_interval=0.1, provider="selfhosted")
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name)(**kwargs).serialize() == (classpath, kwargs)

    config = selfhosted_config
    collected = collected_manifest(write_dataset(pipeline.run_dir(config, ctx)), ctx)
    training = pipeline.train(config, ctx, pipeline.upload(config, ctx, collected))
    trigger = FineTuningJobTrigger(job_id=training.job_id, poll_interval=0.2, provider="selfhosted")
    event = await trigger.run().__anext__()
    assert event.payload["status"] == "success", event.payload
    assert event.payload["result"]["model_reference"].startswith("selfhosted:")


def test_selfhosted_train_pod_asks_for_the_gpu_and_collect_reads_the_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pendulum
    from airflow.sdk import DAG

    from fine_tuning_airflow.operators import fine_tuning_step

    config_file = tmp_path / "training_config.json"
    config_file.write_text(json.dumps({"training": {"provider": "selfhosted", "selfhosted": {
        "base_model_path": "/models/qwen2.5-0.5b-instruct", "gpu_count": 1, "trainer_image": "reg/trainer:1",
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }}}))
    monkeypatch.setenv("FINE_TUNING_CONFIG_FILE", str(config_file))
    with DAG("selfhosted_pods", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
        train = fine_tuning_step("train", mode="kubernetes")
        upload = fine_tuning_step("upload", mode="kubernetes")
        collect = fine_tuning_step("collect", mode="kubernetes")
    pod = train.build_pod_request_obj(dry_run=True)
    container = pod.spec.containers[0]
    assert container.image == "reg/trainer:1"
    assert container.command == ["python", "-m", "fine_tuning"] and container.args[0] == "train"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
    mounts = {m.mount_path: m for m in container.volume_mounts}
    assert mounts["/models"].read_only and "/data/fine_tuning" in mounts
    env = {e.name: e.value for e in container.env if e.value_from is None}
    assert env["FINE_TUNING_SELFHOSTED_FOREGROUND"] == "1"
    other = upload.build_pod_request_obj(dry_run=True).spec.containers[0]  # only train gets the GPU
    assert "nvidia.com/gpu" not in (other.resources.limits or {})
    assert other.image != "reg/trainer:1" and "/models" not in {m.mount_path for m in other.volume_mounts}
    # collect counts tokens with the base model's tokenizer: the trainer image, the model read-only, no GPU.
    collect_pod = collect.build_pod_request_obj(dry_run=True)
    counter = collect_pod.spec.containers[0]
    assert counter.image == "reg/trainer:1" and "nvidia.com/gpu" not in (counter.resources.limits or {})
    assert {m.mount_path: m.read_only for m in counter.volume_mounts}["/models"] is True
    assert not collect_pod.spec.node_selector


def test_load_lora_adapter_posts_to_vllm() -> None:
    from fine_tuning.deploy.serving import load_lora_adapter

    received: list[tuple[str, dict]] = []

    class FakeVLLM(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            received.append((self.path, body))
            already = len(received) > 1
            self.send_response(400 if already else 200)
            self.end_headers()
            self.wfile.write(b"The lora adapter 'x' has already been loaded." if already else b"Success")

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), FakeVLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        load_lora_adapter(url, "abc", "/adapters/abc")
        load_lora_adapter(url + "/v1", "abc", "/adapters/abc")  # loading again is fine
    finally:
        server.shutdown()
    assert received[0] == ("/v1/load_lora_adapter", {"lora_name": "abc", "lora_path": "/adapters/abc"})
