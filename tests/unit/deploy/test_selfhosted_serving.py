"""Serving a self-hosted candidate: its LoRA adapter is loaded into vLLM before the A/B test routes a
request to it, and again at deploy; when vLLM refuses, nothing is started.

vLLM itself cannot run here (no GPU, no package): a small real HTTP server speaks the part of its
OpenAI-compatible API the pipeline uses (``POST /v1/load_lora_adapter``, ``GET /v1/models``), and
checks the adapter folder exists, as vLLM does. PostgreSQL, Redis and MLflow are real.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from fine_tuning import pipeline
from fine_tuning.infra import db
from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.manifests import EvaluationManifest, RegistrationManifest, RunContext
from fine_tuning.deploy.serving import AdapterLoadError
from fine_tuning.routing import Routing, get_routing, set_routing

BASE_MODEL = "tiny-chat"
OLD, NEW = "ftp-0000old-1", "ftp-1111new-1"  # adapter names (vLLM lora_name) of two weekly jobs
API_KEY = "vllm-test-key"


class FakeVLLM:
    """A vLLM server with runtime LoRA updating, on a loopback port.

    Each load records the live routing of the moment it arrived, so a test can tell whether any
    traffic could already reach the adapter when vLLM was asked to load it.
    """

    def __init__(self, redis_client: redis.Redis) -> None:
        self.loaded: dict[str, str] = {}
        self.loads: list[dict[str, Any]] = []
        self.redis = redis_client
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("authorization") != f"Bearer {API_KEY}":
                    self._reply(401, {"error": "Unauthorized"})
                    return False
                return True

            def do_GET(self) -> None:  # http.server's name
                if self._authorized() and self.path == "/v1/models":
                    models = [{"id": BASE_MODEL, "object": "model", "parent": None}]
                    models += [{"id": name, "object": "model", "parent": BASE_MODEL, "root": path}
                               for name, path in fake.loaded.items()]
                    self._reply(200, {"object": "list", "data": models})

            def do_POST(self) -> None:
                if not self._authorized() or self.path != "/v1/load_lora_adapter":
                    return
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                name, path = body["lora_name"], body["lora_path"]
                routing = get_routing(fake.redis, "body")
                fake.loads.append({"name": name, "path": path, "routing": routing})
                if name in fake.loaded:
                    self._reply(400, {"object": "error", "type": "BadRequestError", "code": 400,
                                      "message": f"The lora adapter '{name}' has already been loaded."})
                elif not (Path(path) / "adapter_config.json").is_file():
                    self._reply(404, {"object": "error", "type": "NotFoundError", "code": 404,
                                      "message": f"Loading lora {name} failed: No adapter found for {path}"})
                else:
                    fake.loaded[name] = path
                    self._reply(200, {"message": f"Success: LoRA adapter '{name}' added successfully."})

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def served_models(self) -> list[str]:
        """What a client of vLLM sees: ``GET /v1/models``."""
        import httpx

        response = httpx.get(f"{self.url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
        response.raise_for_status()
        return [model["id"] for model in response.json()["data"]]

    def restart(self) -> None:
        """vLLM restarted: adapters loaded at run time are gone."""
        self.loaded.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def redis_client(redis_db: str) -> redis.Redis:
    """Routing keys have fixed names: this test's own Redis database."""
    return redis.Redis.from_url(redis_db)


@pytest.fixture
def vllm(redis_client: redis.Redis) -> Iterator[FakeVLLM]:
    server = FakeVLLM(redis_client)
    yield server
    server.close()


@pytest.fixture
def config(pg_url: str, mlflow_uri: str, vllm: FakeVLLM, redis_db: str, tmp_path: Path) -> PipelineConfig:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    return load_config(
        env={"DATABASE_URL": pg_url, "REDIS_URL": redis_db, "VLLM_API_KEY": API_KEY},
        params={
            "data_dir": str(tmp_path / "data"),
            "training": {"provider": "selfhosted", "base_model": BASE_MODEL, "selfhosted": {
                "base_model_path": str(tmp_path / "models" / BASE_MODEL), "serving_base_url": vllm.url,
            }},
            "mlflow": {"tracking_uri": mlflow_uri, "registered_model_name": f"serve_{uuid.uuid4().hex[:8]}"},
            "evaluation": {"duration_hours": 24},
        },
    )


@pytest.fixture
def ctx(request: pytest.FixtureRequest) -> RunContext:
    return RunContext(dag_id="weekly_fine_tuning", run_id=f"test__{request.node.name}",
                      window_end=datetime(2026, 11, 22, 2, tzinfo=UTC))


def trained_adapter(config: PipelineConfig, name: str) -> Path:
    """The folder a finished self-hosted job leaves (what vLLM reads)."""
    adapter = Path(config.data_dir) / config.training.selfhosted.output_dir / f"selfhosted-{name}" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return adapter


def make_champion(config: PipelineConfig, fine_tuned_model: str) -> None:
    """Last week's adapter, rolled out: the ``champion`` of the registered model (the baseline)."""
    from mlflow import MlflowClient

    client = MlflowClient(config.mlflow.tracking_uri, config.mlflow.tracking_uri)
    name = config.mlflow.registered_model_name
    client.create_registered_model(name)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    version = client.create_model_version(name, source=f"runs:/{run.info.run_id}/fine_tuned_model",
                                          run_id=run.info.run_id, tags={"fine_tuned_model": fine_tuned_model})
    client.set_registered_model_alias(name, "champion", version.version)


def registered(fine_tuned_model: str) -> RegistrationManifest:
    return RegistrationManifest(mlflow_run_id=None, experiment_id=None, model_name="content-agent",
                                model_version="2", alias="challenger", fine_tuned_model=fine_tuned_model)


def ab_test_rows(config: PipelineConfig) -> list[tuple]:
    with psycopg.connect(config.services.database_url.get_secret_value()) as conn:
        return conn.execute("SELECT id, status FROM ab_tests").fetchall()


def test_ab_create_loads_the_adapters_before_any_traffic_is_routed(
    config: PipelineConfig, ctx: RunContext, vllm: FakeVLLM, redis_client: redis.Redis
) -> None:
    """Week two on self-hosted: last week's adapter is the baseline, this week's the candidate.
    Both are served by vLLM before the routing sends the candidate its 10%."""
    old, new = trained_adapter(config, OLD), trained_adapter(config, NEW)
    make_champion(config, f"selfhosted:{OLD}")

    test = pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))

    assert [(load["name"], load["path"]) for load in vllm.loads] == [(OLD, str(old)), (NEW, str(new))]
    assert all(load["routing"] is None for load in vllm.loads)  # no request could reach them yet
    assert set(vllm.served_models()) == {BASE_MODEL, OLD, NEW}
    routing = get_routing(redis_client, "body")
    assert routing == Routing(f"selfhosted:{OLD}", f"selfhosted:{NEW}", 0.1, test.ab_test_id)
    assert (test.baseline_model, test.candidate_model) == (f"selfhosted:{OLD}", f"selfhosted:{NEW}")

    # A retried task finds its test; loading again is harmless (vLLM: "already been loaded").
    again = pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    assert again.ab_test_id == test.ab_test_id and len(ab_test_rows(config)) == 1
    assert len(vllm.loads) == 4 and set(vllm.served_models()) == {BASE_MODEL, OLD, NEW}


def test_when_vllm_refuses_the_candidate_no_ab_test_starts(
    config: PipelineConfig, ctx: RunContext, vllm: FakeVLLM, redis_client: redis.Redis
) -> None:
    """vLLM cannot see the adapter (say, the shared volume is not mounted there): the error names
    the server and the adapter, and the live routing is exactly what it was."""
    before = Routing("gpt-3.5-turbo-0125", None, 0.0, "deploy-20261115-abcd:completed")
    set_routing(redis_client, "body", before)

    with pytest.raises(AdapterLoadError) as refused:
        pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))  # no adapter folder

    message = str(refused.value)
    assert f"vLLM at {vllm.url}/load_lora_adapter refused to load LoRA adapter '{NEW}'" in message
    assert "HTTP 404" in message and "No adapter found" in message
    assert get_routing(redis_client, "body") == before
    assert ab_test_rows(config) == []
    assert vllm.served_models() == [BASE_MODEL]


def test_an_unreachable_vllm_is_named_and_starts_nothing(
    config: PipelineConfig, ctx: RunContext, redis_client: redis.Redis
) -> None:
    trained_adapter(config, NEW)
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    config.training.selfhosted.serving_base_url = dead

    expected = (rf"vLLM at {dead}/v1/load_lora_adapter did not load LoRA adapter '{NEW}' "
                r".*\(3 attempts\): ConnectError")
    with pytest.raises(AdapterLoadError, match=expected):
        pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    assert get_routing(redis_client, "body") is None and ab_test_rows(config) == []


def test_a_failing_vllm_opens_its_breaker_and_then_nothing_is_sent(
    config: PipelineConfig, ctx: RunContext, vllm: FakeVLLM, redis_client: redis.Redis
) -> None:
    """Every external call goes through a breaker: three refused connections open the shared
    ``vllm`` breaker, and the next A/B creation fails at once, naming the circuit, without a
    request, even to a vLLM that would answer. Once the breaker closes, loading works again."""
    from fine_tuning.infra.breakers import CircuitOpenError, get_breaker

    trained_adapter(config, NEW)
    live = config.training.selfhosted.serving_base_url
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        config.training.selfhosted.serving_base_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(AdapterLoadError, match=r"\(3 attempts\): ConnectError"):
        pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    breaker = get_breaker("vllm", config)
    assert (breaker.snapshot().state, breaker.snapshot().shared) == ("open", True)

    config.training.selfhosted.serving_base_url = live
    with pytest.raises(CircuitOpenError, match="circuit 'vllm' open until"):
        pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    assert vllm.loads == []
    assert get_routing(redis_client, "body") is None and ab_test_rows(config) == []

    breaker.reset()  # what the recovery timeout does, without the wait
    test = pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    assert [load["name"] for load in vllm.loads] == [NEW] and len(ab_test_rows(config)) == 1
    assert get_routing(redis_client, "body").candidate_model == f"selfhosted:{NEW}"
    assert test.candidate_model == f"selfhosted:{NEW}"


def test_the_vllm_api_key_is_sent_and_a_wrong_one_is_a_clear_refusal(
    config: PipelineConfig, ctx: RunContext, vllm: FakeVLLM, redis_client: redis.Redis
) -> None:
    trained_adapter(config, NEW)
    config.training.selfhosted.serving_api_key = "wrong-key"  # type: ignore[assignment]
    refused = rf"refused to load LoRA adapter '{NEW}' .*HTTP 401: Unauthorized$"
    with pytest.raises(AdapterLoadError, match=refused):
        pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    assert get_routing(redis_client, "body") is None and ab_test_rows(config) == []


def promote(config: PipelineConfig, ab_test_id: str) -> EvaluationManifest:
    """The evaluation's verdict (its statistics are tests/test_ab.py's): promote, clean sample ratio."""
    with psycopg.connect(config.services.database_url.get_secret_value(), autocommit=True) as conn:
        conn.execute("UPDATE ab_tests SET status = 'promote', last_analysis = %s WHERE id = %s",
                     (json.dumps({"srm_ok": True}), ab_test_id))
    return EvaluationManifest(ab_test_id=ab_test_id, decision="promote", final=True, looks=3, p_value=0.001,
                              relative_lift=0.2, ci_lower=0.1, ci_upper=0.3, srm_p_value=0.5, reasons=[])


def test_deploy_loads_the_adapters_again_after_a_vllm_restart(
    config: PipelineConfig, ctx: RunContext, vllm: FakeVLLM, redis_client: redis.Redis
) -> None:
    trained_adapter(config, OLD)
    trained_adapter(config, NEW)
    make_champion(config, f"selfhosted:{OLD}")
    test = pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    evaluation = promote(config, test.ab_test_id)
    vllm.restart()
    assert vllm.served_models() == [BASE_MODEL]

    deployment = pipeline.deploy(config, ctx, evaluation)

    assert set(vllm.served_models()) == {BASE_MODEL, OLD, NEW}  # the baseline too: the rollback target
    deploy_loads = vllm.loads[2:]
    assert [load["name"] for load in deploy_loads] == [OLD, NEW]
    assert all(load["routing"].source == test.ab_test_id for load in deploy_loads)  # still the A/B split
    routing = get_routing(redis_client, "body")
    assert routing.source == deployment.deployment_id and routing.candidate_model == f"selfhosted:{NEW}"


def test_deploy_refused_by_vllm_changes_no_routing(
    config: PipelineConfig, ctx: RunContext, vllm: FakeVLLM, redis_client: redis.Redis
) -> None:
    new = trained_adapter(config, NEW)
    test = pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    evaluation = promote(config, test.ab_test_id)
    vllm.restart()
    (new / "adapter_config.json").unlink()  # the adapter is gone from the volume vLLM reads
    ab_routing = get_routing(redis_client, "body")

    with pytest.raises(AdapterLoadError, match=rf"refused to load LoRA adapter '{NEW}'"):
        pipeline.deploy(config, ctx, evaluation)

    assert get_routing(redis_client, "body") == ab_routing
    with psycopg.connect(config.services.database_url.get_secret_value()) as conn:
        assert conn.execute("SELECT count(*) FROM deployments").fetchone() == (0,)


def test_adapters_are_loaded_from_the_path_vllm_sees_and_other_models_are_left_alone(
    config: PipelineConfig, ctx: RunContext, vllm: FakeVLLM, redis_client: redis.Redis
) -> None:
    """vLLM mounts the jobs folder elsewhere (``serving_adapter_root``); an OpenAI baseline is
    not vLLM's to load."""
    config.training.selfhosted.serving_adapter_root = "/mnt/adapters/"
    seen_by_vllm = f"/mnt/adapters/selfhosted-{NEW}/adapter"
    with pytest.raises(AdapterLoadError, match=f"No adapter found for {seen_by_vllm}"):
        pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    assert [load["name"] for load in vllm.loads] == [NEW]  # the baseline, gpt-3.5-turbo-0125, was not sent

    config.training.selfhosted.serving_base_url = None  # served by other means (vLLM --lora-modules)
    test = pipeline.ab_create(config, ctx, registered(f"selfhosted:{NEW}"))
    assert len(vllm.loads) == 1 and get_routing(redis_client, "body").source == test.ab_test_id
