"""End to end with ``training.provider = "selfhosted"``: the same DAG file, a tiny model trained
on the CPU in a local process, the adapter registered in MLflow; nothing sent to OpenAI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fine_tuning.infra import db
from fine_tuning.dev.seed import seed_posts
from support import LAST_WEEK_END, dags_test

pytestmark = pytest.mark.slow


@pytest.fixture
def torch_installed() -> None:
    """The selfhosted extra (requirements-selfhosted.txt); a skip here fails under ``make test``."""
    pytest.importorskip("torch")


def test_weekly_dag_end_to_end_selfhosted(
    torch_installed: None, airflow: dict[str, str], pg_url: str, openai_env, mlflow_uri: str, tmp_path: Path  # noqa: F811
) -> None:
    from fine_tuning.dev.tiny_model import build_tiny_chat_model

    with db.connect(pg_url) as conn:
        db.migrate(conn)
        seed_posts(conn, 3000, end=LAST_WEEK_END, days=7)
    # The tiny base model's tokenizer is trained on text like the collected data (offline).
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": "Create engaging content"},
                                 {"role": "assistant", "content": f"Post {i}: small wins compound every morning"}]})
        + "\n" for i in range(20)
    ))
    base = build_tiny_chat_model(sample, tmp_path / "tiny-chat")
    config_file = Path(airflow["FINE_TUNING_CONFIG_FILE"])
    config = json.loads(config_file.read_text())
    # What a user switching to self-hosted sets: the provider and the base model; nothing about
    # OpenAI (base_model names no OpenAI model, and nothing counts tokens with tiktoken for it).
    config["training"] = {"provider": "selfhosted", "base_model": "tiny-chat", "poll_interval_seconds": 0.5,
                          "selfhosted": {
        "base_model_path": str(base), "max_steps": 10, "batch_size": 8, "learning_rate": 0.01, "lora_r": 4,
        "max_length": 1024,  # the tiny tokenizer makes ~570 tokens of a seeded post; longer ones are left out
    }}
    config_file.write_text(json.dumps(config))

    state, tasks = dags_test(airflow, LAST_WEEK_END)
    assert state == "success", tasks
    assert tasks["train"] == tasks["wait"] == tasks["register"] == "success", tasks
    assert openai_env.state()["jobs"] == []  # OpenAI was never asked to train
    collected = json.loads(next(Path(airflow["FINE_TUNING_DATA_DIR"]).glob("*/*/collect.json")).read_text())
    assert collected["token_counter"] == f"{base / 'tokenizer.json'} with its chat template"

    client = MlflowClient(mlflow_uri, mlflow_uri)
    version = client.get_model_version_by_alias(airflow["FINE_TUNING_TEST_MODEL_NAME"], "challenger")
    assert version.tags["provider"] == "selfhosted"
    assert version.tags["fine_tuned_model"].startswith("selfhosted:")
    files = {f.path for f in client.list_artifacts(version.run_id, "fine_tuned_model/adapter")}
    assert "fine_tuned_model/adapter/adapter_model.safetensors" in files
