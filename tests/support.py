"""What several test modules share: the repository's paths, the StatsD listener, statsd_exporter's
mapping as a function, and the runners of the real Airflow CLI."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "include" / "monitoring"
MAPPINGS: list[dict] = yaml.safe_load((MONITORING / "statsd-mapping.yaml").read_text())["mappings"]

LAST_WEEK_END = datetime(2026, 11, 22, 2, tzinfo=UTC)  # a Sunday 02:00 tick of the schedule


class StatsdListener:
    """A real StatsD server, as far as the wire goes: one UDP socket on loopback, lines parsed."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.lines.extend(line for line in data.decode("ascii").splitlines() if line)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def wait_for(self, name: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and name not in self.names():
            time.sleep(0.02)

    def names(self) -> set[str]:
        return {line.split(":", 1)[0] for line in self.lines}

    def values(self, name: str) -> list[tuple[float, str]]:
        """Every (value, type) received for ``name``; a gauge keeps its last value meaningful."""
        found = []
        for line in self.lines:
            stat, _, rest = line.partition(":")
            if stat == name:
                value, _, kind = rest.partition("|")
                found.append((float(value), kind.split("|")[0]))
        return found

    def total(self, name: str) -> float:
        return sum(value for value, kind in self.values(name) if kind == "c")

    def last(self, name: str) -> float:
        return self.values(name)[-1][0]


def map_statsd(name: str) -> tuple[str, dict[str, str]] | None:
    """statsd_exporter's glob matching: `*` is one dotted segment; $n fills names and labels."""
    for mapping in MAPPINGS:
        pattern = "^" + re.escape(mapping["match"]).replace(r"\*", "([^.]+)") + "$"
        found = re.match(pattern, name)
        if found:
            def fill(text: str) -> str:
                return re.sub(r"\$\{?(\d+)\}?", lambda m: found.group(int(m.group(1))), text)

            return fill(mapping["name"]), {k: fill(str(v)) for k, v in mapping.get("labels", {}).items()}
    return None


def airflow_json(env: dict[str, str], *args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "airflow", *args, "-o", "json"], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # log lines may come before the JSON


def dags_test(env: dict[str, str], logical_date: datetime) -> tuple[str, dict[str, str]]:
    """``airflow dags test`` of the weekly DAG for one week: the run's state and its tasks' states."""
    from fine_tuning.dev.demo import DAG_ID

    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", DAG_ID, logical_date.isoformat()],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    runs = airflow_json(env, "dags", "list-runs", DAG_ID)
    run = next(r for r in runs if r["logical_date"].startswith(logical_date.strftime("%Y-%m-%dT%H:%M")))
    states = airflow_json(env, "tasks", "states-for-dag-run", DAG_ID, run["run_id"])
    return run["state"], {s["task_id"]: s["state"] for s in states}
