"""MLflow: one run per pipeline run and one model version with the challenger alias, on a real server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from mlflow import MlflowClient

from fine_tuning.config import load_config
from fine_tuning.manifests import CollectManifest, JobResult, SelfGeneratedShare, TrainingManifest
from fine_tuning.track.registry import register_candidate

END = datetime(2026, 11, 22, 2, tzinfo=UTC)


def manifests(run_id: str) -> tuple[CollectManifest, TrainingManifest, JobResult]:
    collect = CollectManifest(
        status="ready", dag_id="weekly_fine_tuning", run_id=run_id, window_start=END - timedelta(days=7),
        window_end=END, dataset_path="/tmp/x/dataset.jsonl", sha256="ab" * 32, bytes=1234, posts_scanned=900,
        examples_written=1700, rejected={"empty_hook": 3, "too_long": 1}, duplicates=40, tokens=250_000,
        min_examples=100, seconds=1.5,
    )
    training = TrainingManifest(
        provider="openai", idempotency_key="ftp-k", dataset_sha256="ab" * 32, file_id="file-1", reused_file=False,
        base_model="gpt-3.5-turbo-0125", estimated_tokens=250_000, estimated_epochs=3, estimated_cost_usd=6.0,
        job_id=f"ftjob-{run_id}", suffix="weekly", reused_job=False,
    )
    result = JobResult(
        provider="openai", job_id=training.job_id, status="succeeded",
        fine_tuned_model=f"ft:gpt-3.5-turbo-0125:org:weekly:{run_id}", trained_tokens=750_000,
        created_at=1_795_000_000, finished_at=1_795_003_600,
    )
    return collect, training, result


@pytest.fixture
def mlflow_config(mlflow_uri: str, request: pytest.FixtureRequest):
    return load_config(
        env={"MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_EXPERIMENT_NAME": f"exp_{request.node.name}"},
        params={"mlflow": {"registered_model_name": f"model_{request.node.name}"}},
    )


def test_register_twice_gives_one_run_and_one_version(mlflow_config, mlflow_uri: str) -> None:
    collect, training, result = manifests("scheduled__2026-11-22")
    first = register_candidate(mlflow_config, collect, training, result)
    again = register_candidate(mlflow_config, collect, training, result)
    assert (again.mlflow_run_id, again.model_version) == (first.mlflow_run_id, first.model_version)

    client = MlflowClient(mlflow_uri, mlflow_uri)
    runs = client.search_runs([first.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["data_collection.engagement_threshold"] == "0.06"
    assert run.data.params["fine_tuning_job_id"] == training.job_id
    assert run.data.metrics["examples_written"] == 1700
    assert run.data.metrics["rejected_empty_hook"] == 3
    assert run.data.metrics["trained_tokens"] == 750_000
    assert run.data.metrics["training_seconds"] == 3600
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "manifests")}
    assert "manifests/collect.json" in artifacts

    versions = client.search_model_versions(f"name = '{first.model_name}'")
    assert len(versions) == 1
    version = client.get_model_version_by_alias(first.model_name, "challenger")
    assert version.version == first.model_version
    assert version.tags["fine_tuning_job_id"] == training.job_id
    assert version.tags["dataset_sha256"] == training.dataset_sha256
    assert version.tags["fine_tuned_model"] == result.fine_tuned_model


def test_next_week_gets_a_new_version_and_moves_the_alias(mlflow_config, mlflow_uri: str) -> None:
    first = register_candidate(mlflow_config, *manifests("scheduled__2026-11-15"))
    second = register_candidate(mlflow_config, *manifests("scheduled__2026-11-22"))
    assert int(second.model_version) == int(first.model_version) + 1
    client = MlflowClient(mlflow_uri, mlflow_uri)
    assert client.get_model_version_by_alias(first.model_name, "challenger").version == second.model_version


def test_a_failed_job_is_not_registered(mlflow_config) -> None:
    collect, training, result = manifests("scheduled__2026-11-08")
    failed = result.model_copy(update={"status": "failed", "fine_tuned_model": None})
    with pytest.raises(ValueError, match="status 'failed'"):
        register_candidate(mlflow_config, collect, training, failed)


def test_the_datasets_are_inputs_of_the_run_with_their_lineage(mlflow_config, mlflow_uri: str) -> None:
    collect, training, result = manifests("scheduled__2026-11-29")
    collect = collect.model_copy(
        update={
            "validation_path": "/tmp/x/validation.jsonl",
            "validation_sha256": "cd" * 32,
            "validation_examples": 190,
            "validation_tokens": 27_000,
            "validation_bytes": 140,
            "dropped_examples": {"duplicate_post": 80, "duplicate_hook": 18, "self_generated_cap": 300},
            "pii_found": {"email": 4, "phone": 2},
            "query": "SELECT id, persona_id, hook, body FROM posts WHERE ...",
            "self_generated": SelfGeneratedShare(
                cap=0.5, posts=700, posts_kept=475, examples_before_cap=1400, examples_kept=950,
                share_before_cap=0.61, share_written=0.5,
            ),
        }
    )
    first = register_candidate(mlflow_config, collect, training, result)
    register_candidate(mlflow_config, collect, training, result)  # a retry adds no second input

    client = MlflowClient(mlflow_uri, mlflow_uri)
    run = client.get_run(first.mlflow_run_id)
    inputs = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in run.inputs.dataset_inputs
    }
    assert sorted(inputs) == ["training", "validation"] and len(run.inputs.dataset_inputs) == 2
    training_set, validation_set = inputs["training"], inputs["validation"]
    assert training_set.digest == ("ab" * 32)[:32] and validation_set.digest == ("cd" * 32)[:32]
    source = json.loads(training_set.source)
    assert source["query"].startswith("SELECT id") and source["window_end"] == END.isoformat()
    profile = json.loads(training_set.profile)
    assert (profile["sha256"], profile["examples"], profile["rejected"]["empty_hook"]) == ("ab" * 32, 1700, 3)
    assert profile["dropped_examples"]["duplicate_hook"] == 18 and profile["pii_found"] == {"email": 4, "phone": 2}
    assert json.loads(validation_set.profile)["examples"] == 190
    assert run.data.metrics["dropped_self_generated_cap"] == 300
    assert run.data.metrics["pii_found_email"] == 4
    assert run.data.metrics["self_generated_share_written"] == 0.5
    assert run.data.metrics["validation_examples"] == 190
    # The registered version's run is where its data came from.
    version = client.get_model_version_by_alias(first.model_name, "challenger")
    assert version.run_id == first.mlflow_run_id
