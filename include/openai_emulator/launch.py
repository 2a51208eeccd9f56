"""Start the emulator as a subprocess on a free loopback port, for tests and local stacks.

    with EmulatorProcess(stage_seconds=0.2) as emulator:
        client = OpenAI(base_url=emulator.base_url, api_key="sk-test")
        emulator.inject_fault(method="POST", path="/v1/files", status=502, after_effect=True)
        assert len(emulator.state()["files"]) == 1

Only the standard library is used here, so importing this module does not load FastAPI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

START_TIMEOUT = 20.0
STOP_GRACE = 5.0
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmulatorError(RuntimeError):
    """The emulator did not start, or an admin call failed."""


class EmulatorProcess:
    """``python -m openai_emulator`` in a subprocess; a context manager, or ``start()``/``stop()``.

    Its log (stderr and stdout) goes to ``log_path``; a failed start includes the log's tail.
    """

    def __init__(
        self,
        port: int | None = None,
        stage_seconds: float = 0.2,
        api_key: str | None = None,
        *,
        host: str = "127.0.0.1",
        refuse_jobs: bool = False,
        fine_tuning_closes: str | None = None,
        model_owner: str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = port
        self.stage_seconds = stage_seconds
        self.api_key = api_key
        self.refuse_jobs_at_start = refuse_jobs
        self.fine_tuning_closes = fine_tuning_closes
        self.model_owner = model_owner
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log_file: Any = None

    # --------------------------------------------------------------------------- lifecycle

    @property
    def root_url(self) -> str:
        if self.port is None:
            raise EmulatorError("the emulator is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to pass as the client's ``base_url``."""
        return f"{self.root_url}/v1"

    @property
    def admin_url(self) -> str:
        return f"{self.root_url}/_emulator"

    def start(self) -> Self:
        """Start the server and wait until it answers; a taken random port is retried."""
        if self.process is not None:
            return self
        attempts = 1 if self.requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            self.port = self.requested_port or free_port(self.host)
            self._spawn()
            try:
                self._wait_ready()
                return self
            except EmulatorError:
                exited = self.process is not None and self.process.poll() is not None
                self.stop()
                if not exited or attempt == attempts:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self) -> None:
        log_fd, log_name = tempfile.mkstemp(prefix="openai-emulator-", suffix=".log")
        self.log_path = Path(log_name)
        self._log_file = os.fdopen(log_fd, "wb")
        command = [
            sys.executable,
            "-m",
            "openai_emulator",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--stage-seconds",
            repr(float(self.stage_seconds)),
        ]
        if self.api_key is not None:
            command += ["--api-key", self.api_key]
        if self.refuse_jobs_at_start:
            command.append("--refuse-jobs")
        if self.fine_tuning_closes:
            command += ["--fine-tuning-closes", self.fine_tuning_closes]
        if self.model_owner:
            command += ["--model-owner", self.model_owner]
        env = dict(os.environ)
        # Importable even without the editable install.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise EmulatorError(f"the emulator exited with {code} before answering:\n{self.log_tail()}")
            try:
                self._admin("GET", "/health", timeout=1.0)
                return
            except (OSError, EmulatorError):
                time.sleep(0.05)
        raise EmulatorError(
            f"the emulator did not answer within {self.start_timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the server (kill it after 5 s) and close its log."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the server logged."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------------- admin calls

    def _admin(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.admin_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise EmulatorError(f"{method} {path} -> {exc.code}: {detail}") from None

    def state(self) -> dict[str, Any]:
        """``{"files", "result_files", "jobs", "requests", "faults", "counts", ...}``."""
        return self._admin("GET", "/state")

    def requests(self, method: str | None = None, path: str | None = None) -> list[dict[str, Any]]:
        """Logged ``/v1`` requests, optionally only those with this method and path."""
        return [
            r
            for r in self.state()["requests"]
            if (method is None or r["method"] == method.upper()) and (path is None or r["path"] == path)
        ]

    def inject_fault(self, **fault: Any) -> dict[str, Any]:
        """Register a fault (see ``faults.FaultSpec``): ``method, path, status, count, retry_after,
        delay_seconds, after_effect, error_code, message, should_retry``."""
        return self._admin("POST", "/faults", fault)

    def clear_faults(self) -> int:
        return int(self._admin("DELETE", "/faults")["cleared"])

    def reset(self) -> None:
        """Forget all files, jobs, requests and faults."""
        self._admin("POST", "/reset")

    def refuse_jobs(self, refuse: bool = True, **options: Any) -> dict[str, Any]:
        """Refuse (or accept again) new fine-tuning jobs; options: ``status`` (400/403), ``message``."""
        return self._admin("POST", "/refuse_jobs", {"refuse": refuse, **options})

    def set_stage_seconds(self, seconds: float) -> dict[str, Any]:
        """How long each job stage lasts from now on."""
        return self._admin("POST", "/stage_seconds", {"seconds": seconds})

    def set_clock(self, now: float | None = None, advance_seconds: float = 0.0) -> dict[str, Any]:
        """Move the emulator's clock to ``now`` (Unix seconds) and/or by ``advance_seconds``."""
        return self._admin("POST", "/clock", {"now": now, "advance_seconds": advance_seconds})

    def set_deprecation(self, model: str, fine_tune: int | None, inference: int | None) -> dict[str, Any]:
        """What the Azure Models API reports as ``deprecation`` for ``model`` (Unix seconds)."""
        return self._admin(
            "POST", "/deprecations", {"model": model, "fine_tune": fine_tune, "inference": inference}
        )

    def fail_job(
        self,
        job_id: str,
        code: str = "server_error",
        message: str = "The job failed due to an internal error.",
        param: str | None = None,
    ) -> dict[str, Any]:
        """Force a live job to end failed with this error."""
        return self._admin("POST", f"/jobs/{job_id}/fail", {"code": code, "message": message, "param": param})
