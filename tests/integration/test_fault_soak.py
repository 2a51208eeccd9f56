"""A small fault soak (the full one is `make soak`): faults never make a second file or job."""

from __future__ import annotations

from support import REPO

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(REPO / "bench"))
from fault_soak import soak  # noqa: E402

pytestmark = pytest.mark.slow


def test_soak_rows_have_the_contracts_shape_and_no_duplicates(
    openai_env, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "MLFLOW_TRACKING_URI"):  # restored afterwards
        monkeypatch.setenv(name, "set-by-the-soak")
    rows = soak(runs=2, rates=[0.0, 0.5], emulator=openai_env, mlflow_uri=mlflow_uri, data_dir=tmp_path / "data",
                open_seconds=1.0)
    assert [row["failure_rate"] for row in rows] == [0.0, 0.5]
    for row in rows:
        assert {"failure_rate", "runs", "completed", "failed_with_reason", "breaker_openings", "duplicate_files",
                "duplicate_jobs", "mean_extra_latency_s"} <= row.keys()
        assert row["duplicate_files"] == 0 and row["duplicate_jobs"] == 0
        assert row["completed"] + sum(row["failed_with_reason"].values()) == row["runs"] == 2
    assert rows[0]["completed"] == 2 and rows[0]["mean_extra_latency_s"] == 0
