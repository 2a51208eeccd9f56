"""The ``selfhosted`` provider: LoRA SFT of an open-weights chat model on our own hardware.

The job is the trainer process (``fine_tuning.providers.selfhosted_train``) and its folder
``{output_dir}/{job_id}/`` on the data volume: ``status.json`` (the state, shared with the wait),
``adapter/`` (safetensors) and ``metrics.json``. Local mode starts the trainer as a detached
process, so the worker is not blocked by torch; the kubernetes train pod (GPU node, base model
volume) sets ``FINE_TUNING_SELFHOSTED_FOREGROUND=1`` and trains in the pod itself. Either way the
wait reads the status file.

Idempotency: the job id is derived from the key (dag_id, run_id, dataset sha256); ``submit``
first looks for a job folder of that key that is alive or succeeded and reuses it. A failed or
cancelled one is kept and a new attempt gets the next number.

The trained model's reference is ``selfhosted:<adapter name>``; the adapter name is the
``lora_name`` under which vLLM serves it. :func:`serve_adapters` loads the adapters of an A/B
test into vLLM (``load_lora_adapter``) before the routing sends a request to them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fine_tuning.providers import JobStatus, TrainingProvider
from fine_tuning.providers.selfhosted_train import ADAPTER_DIR, METRICS_FILE, read_status, write_status

if TYPE_CHECKING:
    from fine_tuning.breakers import CircuitBreaker
    from fine_tuning.config import PipelineConfig

log = logging.getLogger(__name__)

FOREGROUND_ENV = "FINE_TUNING_SELFHOSTED_FOREGROUND"
MODEL_PREFIX = "selfhosted:"
STATUS_FILE = "status.json"
LOG_FILE = "train.log"
_LIVE_OR_DONE = frozenset({"validating_files", "queued", "running", "succeeded"})


class SelfHostedConfigError(ValueError):
    """``training.selfhosted`` is missing something the trainer needs."""


def adapter_name(job_id: str) -> str:
    """The adapter's serving name (vLLM ``lora_name``): short, stable, from the job id."""
    return job_id.removeprefix("selfhosted-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


class SelfHostedProvider(TrainingProvider):
    """LoRA SFT with transformers + peft + trl, as a local process or a GPU pod."""

    name: ClassVar[str] = "selfhosted"
    breaker: ClassVar[str | None] = None

    def jobs_dir(self) -> Path:
        configured = Path(self.config.training.selfhosted.output_dir)
        return configured if configured.is_absolute() else Path(self.config.data_dir) / configured

    def job_dir(self, job_id: str) -> Path:
        if "/" in job_id or job_id.startswith("."):
            raise ValueError(f"not a self-hosted job id: {job_id!r}")
        return self.jobs_dir() / job_id

    def price_per_million(self) -> float:
        return self.config.training.selfhosted.price_per_million_tokens

    def upload(self, dataset_path: Path, idempotency_key: str) -> tuple[str, bool]:
        """The trainer reads the dataset from the shared data volume: its path is the file id."""
        if not dataset_path.exists():
            raise FileNotFoundError(f"dataset {dataset_path} does not exist")
        return str(dataset_path.resolve()), True

    def _attempts(self, key: str) -> list[Path]:
        prefix = f"selfhosted-{key}-"
        if not self.jobs_dir().exists():
            return []
        found = [p for p in self.jobs_dir().iterdir() if p.is_dir() and p.name.startswith(prefix)]
        return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))

    def find_job(self, key: str) -> str | None:
        """The job of this key that is alive or succeeded (failed/cancelled ones are not reused)."""
        for folder in reversed(self._attempts(key)):
            if self.status(folder.name).status in _LIVE_OR_DONE:
                return folder.name
        return None

    def submit(self, file_id: str, metadata: dict[str, str]) -> tuple[str, bool]:
        settings = self.config.training.selfhosted
        if not settings.base_model_path:
            raise SelfHostedConfigError(
                "training.selfhosted.base_model_path is not set: point it at the base model's "
                "directory (a volume), e.g. FINE_TUNING_BASE_MODEL_PATH=/models/<name>"
            )
        key = metadata["idempotency_key"]
        existing = self.find_job(key)
        if existing is not None:
            log.info("self-hosted job %s found again (%s)", existing, self.status(existing).status)
            if os.environ.get(FOREGROUND_ENV) == "1":
                self._wait_for_process(existing)
            return existing, True
        job_id = f"selfhosted-{key}-{len(self._attempts(key)) + 1}"
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True)
        status_file = folder / STATUS_FILE
        # The status exists before the process does: a look in between finds the job.
        write_status(status_file, job_id=job_id, status="queued", created_at=int(time.time()),
                     host=socket.gethostname(), metadata=metadata, dataset=file_id)
        command = [
            sys.executable, "-m", "fine_tuning.providers.selfhosted_train",
            "--job-id", job_id,
            "--dataset", file_id,
            "--base-model-path", settings.base_model_path,
            "--output-dir", str(folder),
            "--status-file", str(status_file),
            "--model-reference", f"{MODEL_PREFIX}{adapter_name(job_id)}",
            "--lora-r", str(settings.lora_r),
            "--lora-alpha", str(settings.lora_alpha),
            "--lora-dropout", str(settings.lora_dropout),
            "--max-steps", str(settings.max_steps),
            "--epochs", str(settings.epochs),
            "--learning-rate", str(settings.learning_rate),
            "--batch-size", str(settings.batch_size),
            "--max-length", str(settings.max_length),
            "--seed", str(settings.seed),
        ]
        with (folder / LOG_FILE).open("ab") as log_file:
            # A session of its own: the trainer outlives the task process that started it.
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        write_status(status_file, pid=process.pid)
        log.info("self-hosted job %s started (pid %d, log %s)", job_id, process.pid, folder / LOG_FILE)
        if os.environ.get(FOREGROUND_ENV) == "1":  # the train pod: the pod is the job
            process.wait()
        return job_id, False

    def _wait_for_process(self, job_id: str) -> None:
        while not self.status(job_id).terminal:
            time.sleep(5)

    def status(self, job_id: str) -> JobStatus:
        status_file = self.job_dir(job_id) / STATUS_FILE
        data = read_status(status_file)
        if data is None:
            raise FileNotFoundError(f"self-hosted job {job_id}: no status file {status_file}")
        state = data.get("status", "queued")
        pid = data.get("pid")
        # A trainer that died without a word (SIGKILL, OOM, the machine) must not look alive
        # forever; only checkable from the machine that started it.
        if (
            state not in ("succeeded", "failed", "cancelled")
            and pid
            and data.get("host") == socket.gethostname()
            and not _pid_alive(int(pid))
            and time.time() - data.get("updated_at", 0) > 2
        ):
            data = read_status(status_file) or data  # it may have just finished
            if data.get("status") not in ("succeeded", "failed", "cancelled"):
                data = write_status(status_file, status="failed", finished_at=int(time.time()),
                                    error=f"trainer process {pid} is gone (see {status_file.parent / LOG_FILE})")
            state = data["status"]
        error = data.get("error")
        return JobStatus(
            job_id=job_id,
            status=state,
            model_reference=data.get("model_reference") if state == "succeeded" else None,
            trained_tokens=data.get("trained_tokens"),
            error=f"self-hosted job {job_id} {state}: {error}" if error else None,
            created_at=data.get("created_at"),
            finished_at=data.get("finished_at"),
            details={k: data[k] for k in ("step", "max_steps", "loss", "adapter_dir") if k in data},
        )

    def cancel(self, job_id: str) -> str:
        current = self.status(job_id)
        if current.terminal:
            return current.status
        data = read_status(self.job_dir(job_id) / STATUS_FILE) or {}
        pid = data.get("pid")
        if pid and data.get("host") == socket.gethostname() and _pid_alive(int(pid)):
            os.kill(int(pid), signal.SIGTERM)  # the trainer writes "cancelled" itself
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not self.status(job_id).terminal:
                time.sleep(0.2)
        if not self.status(job_id).terminal:
            write_status(self.job_dir(job_id) / STATUS_FILE, status="cancelled",
                         finished_at=int(time.time()), error="cancelled")
        return self.status(job_id).status

    def artifacts(self, status: JobStatus) -> dict[str, Any]:
        """The adapter folder and the training metrics, for MLflow."""
        folder = self.job_dir(status.job_id)
        metrics_path = folder / METRICS_FILE
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        return {"adapter_dir": str(folder / "adapter"), "metrics": metrics}


class AdapterLoadError(RuntimeError):
    """The vLLM server did not load an adapter; the message names the server, the adapter and why."""


class _RetryableLoadFailure(Exception):
    """A connection error or a 5xx: the load may succeed on another try (it is idempotent)."""


def _error_text(response: Any) -> str:
    """vLLM's error message (``{"message": ...}``, ``{"error": {"message": ...}}`` or, from its
    API-key check, ``{"error": "Unauthorized"}``), else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, str):
            return error
        inner = error if isinstance(error, dict) else body
        if isinstance(inner.get("message"), str):
            return inner["message"]
    return response.text[:500]


def load_lora_adapter(
    serving_base_url: str,
    lora_name: str,
    lora_path: str,
    *,
    api_key: str | None = None,
    timeout: float = 60.0,
    attempts: int = 3,
    breaker: CircuitBreaker | None = None,
) -> None:
    """Load an adapter into a running vLLM OpenAI-compatible server (``POST /v1/load_lora_adapter``).

    vLLM must run with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; then the
    content agent calls ``model=lora_name`` through the ordinary OpenAI client. Loading a name that
    is already loaded answers 400 "already been loaded", which is success for us (idempotent), so
    connection errors and 5xx are retried, ``attempts`` times at most. Each attempt goes through
    ``breaker`` (the ``vllm`` one), which counts connection errors, timeouts and 5xx.

    :raises AdapterLoadError: vLLM refused (4xx) or could not be reached; the message names the
        server URL, the adapter and vLLM's reason.
    :raises CircuitOpenError: the breaker is open: no request was sent.
    """
    import httpx
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = serving_base_url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    endpoint = f"{url}/load_lora_adapter"
    what = f"LoRA adapter {lora_name!r} from {lora_path}"

    def post_once() -> None:
        try:
            with breaker.guard() if breaker is not None else contextlib.nullcontext():
                response = httpx.post(
                    endpoint,
                    json={"lora_name": lora_name, "lora_path": lora_path},
                    headers=headers,
                    timeout=timeout,
                )
                if response.status_code >= 500:
                    response.raise_for_status()  # counted against the breaker; a 4xx is an answer
        except httpx.TransportError as exc:
            raise _RetryableLoadFailure(f"{type(exc).__name__}: {exc}") from exc
        except httpx.HTTPStatusError as exc:
            answer = exc.response
            raise _RetryableLoadFailure(f"HTTP {answer.status_code}: {_error_text(answer)}") from exc
        if response.status_code == 400 and "already" in response.text.lower():
            return
        if response.is_error:
            raise AdapterLoadError(
                f"vLLM at {endpoint} refused to load {what}: "
                f"HTTP {response.status_code}: {_error_text(response)}"
            )

    retrying = Retrying(
        retry=retry_if_exception_type(_RetryableLoadFailure),
        stop=stop_after_attempt(max(1, attempts)),
        wait=wait_exponential(multiplier=0.5, max=8),
        reraise=True,
    )
    try:
        retrying(post_once)
    except _RetryableLoadFailure as exc:
        raise AdapterLoadError(
            f"vLLM at {endpoint} did not load {what} ({attempts} attempts): {exc}"
        ) from None


def serving_adapter_path(config: PipelineConfig, lora_name: str) -> str:
    """The adapter's folder as the vLLM server sees it (``training.selfhosted.serving_adapter_root``)."""
    provider = SelfHostedProvider(config)
    job_id = f"selfhosted-{lora_name}"
    folder = provider.job_dir(job_id)  # refuses a name that is not a job's
    root = config.training.selfhosted.serving_adapter_root
    if root:
        return f"{root.rstrip('/')}/{job_id}/{ADAPTER_DIR}"
    return str(folder / ADAPTER_DIR)


def serve_adapters(config: PipelineConfig, model_references: Iterable[str | None]) -> list[str]:
    """Make vLLM serve every self-hosted adapter among ``model_references`` before traffic goes to it.

    The A/B step calls it with the baseline and the candidate before it routes a request to the
    candidate, and the deploy again (a vLLM restart forgets runtime-loaded adapters). Nothing is
    ever unloaded here: the baseline stays loaded, so a rollback can route back to it at once.
    References of other providers (``gpt-...``, ``ft:...``) are skipped. Without
    ``training.selfhosted.serving_base_url`` the adapters are someone else's to serve (vLLM's
    ``--lora-modules``): a warning, nothing loaded.

    :returns: the adapter names (vLLM ``lora_name``) now loaded.
    :raises AdapterLoadError: one did not load; the caller must not route traffic to it.
    :raises CircuitOpenError: the ``vllm`` breaker is open (vLLM failed repeatedly): nothing was
        sent; a step fails fast and is retried after the open time.
    """
    names = list(dict.fromkeys(
        ref.removeprefix(MODEL_PREFIX) for ref in model_references if ref and ref.startswith(MODEL_PREFIX)
    ))
    if not names:
        return []
    settings = config.training.selfhosted
    if not settings.serving_base_url:
        log.warning(
            "self-hosted adapters %s are not loaded by the pipeline: training.selfhosted.serving_base_url is "
            "not set, so whatever serves them must already have them", ", ".join(names),
        )
        return []
    from fine_tuning.breakers import get_breaker

    api_key = settings.serving_api_key.get_secret_value() if settings.serving_api_key else None
    breaker = get_breaker("vllm", config)
    for name in names:
        path = serving_adapter_path(config, name)
        load_lora_adapter(settings.serving_base_url, name, path, api_key=api_key, breaker=breaker)
        log.info("vLLM at %s serves LoRA adapter %r (%s)", settings.serving_base_url, name, path)
    return names
