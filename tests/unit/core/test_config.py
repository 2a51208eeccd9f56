"""Config precedence (defaults < JSON file < environment < params) and clear errors for bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fine_tuning.config import ConfigError, load_config


def configmap_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "training_config.json"
    path.write_text(json.dumps(data))
    return path


def test_defaults_are_the_designs() -> None:
    config = load_config(env={})
    assert config.data_collection.training_data_threshold == 100
    assert config.data_collection.engagement_threshold == 0.06
    assert config.data_collection.days_back == 7
    assert config.data_collection.chunk_size == 1000
    assert config.data_collection.max_records == 10_000
    assert config.weekly_schedule == "0 2 * * 0"
    assert config.training.base_model == "gpt-3.5-turbo-0125"
    assert config.training.hyperparameters.n_epochs == "auto"
    assert config.evaluation.traffic_split == 0.1
    assert config.deployment.rollout_config.increment_percentage == 0.1


def test_precedence_file_then_env_then_params(tmp_path: Path) -> None:
    path = configmap_file(
        tmp_path,
        {
            "data_collection": {"engagement_threshold": 0.07, "days_back": 14, "chunk_size": 500},
            "training": {"base_model": "gpt-4o-mini-2024-07-18", "hyperparameters": {"n_epochs": 3}},
        },
    )
    env = {"FINE_TUNING_ENGAGEMENT_THRESHOLD": "0.08", "FINE_TUNING_MIN_EXAMPLES": "250"}
    config = load_config(path, env=env, params={"days_back": 3, "n_epochs": None})
    assert config.data_collection.engagement_threshold == 0.08  # env beats file
    assert config.data_collection.days_back == 3  # params beat file
    assert config.data_collection.chunk_size == 500  # file beats defaults
    assert config.data_collection.training_data_threshold == 250
    assert config.training.hyperparameters.n_epochs == 3  # a None param keeps the layer below
    assert config.training.base_model == "gpt-4o-mini-2024-07-18"


def test_config_file_from_environment_variable(tmp_path: Path) -> None:
    path = configmap_file(tmp_path, {"data_collection": {"max_records": 42}})
    assert load_config(env={"FINE_TUNING_CONFIG_FILE": str(path)}).data_collection.max_records == 42


def test_service_settings_from_environment_and_secrets_not_loggable() -> None:
    env = {
        "DATABASE_URL": "postgresql://app:hunter2@db:5432/posts",
        "OPENAI_API_KEY": "sk-secret-key",
        "OPENAI_BASE_URL": "http://127.0.0.1:9999/v1",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_EXPERIMENT_NAME": "exp",
        "HOOK_MODEL": "gpt-4o",
        "BODY_MODEL": "gpt-4o-mini",
    }
    config = load_config(env=env)
    assert config.services.openai_api_key is not None
    assert config.services.openai_api_key.get_secret_value() == "sk-secret-key"
    assert config.mlflow.experiment_name == "exp"
    assert config.body_model == "gpt-4o-mini"
    flat = json.dumps(config.loggable())
    assert "hunter2" not in flat and "sk-secret-key" not in flat
    assert "postgresql://app:***@db:5432/posts" in flat
    assert "sk-secret-key" not in repr(config)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"params": {"engagement_threshold": 1.7}}, "data_collection.engagement_threshold"),
        ({"params": {"days_back": -3}}, "data_collection.days_back"),
        ({"params": {"n_epochs": 99}}, "training.hyperparameters.n_epochs"),
        ({"params": {"no_such_key": 1}}, "no_such_key"),
        ({"env": {"FINE_TUNING_ENGAGEMENT_THRESHOLD": "lots"}}, "data_collection.engagement_threshold"),
        ({"params": {"training": {"base_modle": "x"}}}, "training.base_modle"),
    ],
)
def test_bad_values_name_the_key(kwargs: dict, named: str) -> None:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as raised:
        load_config(**kwargs)
    assert named in str(raised.value)


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "training_config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="training_config.json"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json", env={})
    unknown = configmap_file(tmp_path, {"data_collection": {"threshold": 0.1}})
    with pytest.raises(ConfigError, match="data_collection.threshold"):
        load_config(unknown, env={})


def test_the_trained_model_follows_the_provider() -> None:
    openai = load_config(env={}, params={"base_model": "gpt-4o-mini-2024-07-18"}).training
    assert openai.trained_model() == "gpt-4o-mini-2024-07-18"
    selfhosted = load_config(env={}, params={
        "training_provider": "selfhosted",
        "training": {"selfhosted": {"base_model_path": "/models/qwen2.5-0.5b-instruct", "max_length": 2048}},
    }).training
    assert selfhosted.trained_model() == "/models/qwen2.5-0.5b-instruct"
