"""The ``openai`` provider: OpenAI's fine-tuning API — upload, start, look up, cancel — idempotently.

Creation calls are never retried blindly. The openai client retries a lost reply (a 502 after
the server made the file, a timeout) by sending the request again, which makes a second file or
job. So creation runs with the client's retries off, and every attempt first looks for what an
earlier attempt (or an earlier try of the task) may have made, by a deterministic key.

Every call to OpenAI goes through the shared ``openai`` circuit breaker (``fine_tuning.infra.breakers``):
when it is open, a call fails at once with ``CircuitOpenError`` instead of adding to the load,
and tenacity does not retry that (the task's retry, delayed past the open time, does).

The provider owns its client (:meth:`OpenAIProvider.client`, :meth:`~OpenAIProvider.aclient`):
Azure OpenAI (``fine_tuning.train.providers.azure_openai``) overrides only those two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from fine_tuning.config import PipelineConfig
from fine_tuning.infra.breakers import get_breaker
from fine_tuning.train.providers import (
    REUSABLE_STATES,
    JobNotFound,
    JobStatus,
    TrainingProvider,
    TrainingRefusedError,
)

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI
    from openai.types import FileObject
    from openai.types.fine_tuning import FineTuningJob

log = logging.getLogger(__name__)

T = TypeVar("T")

# OpenAI's ``paused`` is not a state every provider has: the job waits, as a queued one does.
_STATE_MAP = {"paused": "queued"}


def job_error_message(job: FineTuningJob) -> str:
    error = job.error
    if error is None:
        return f"fine-tuning job {job.id} ended {job.status}"
    return f"fine-tuning job {job.id} {job.status}: {error.message} (code={error.code}, param={error.param})"


def job_status(job: FineTuningJob) -> JobStatus:
    """An OpenAI (or Azure) job object in the provider-neutral vocabulary."""
    status = _STATE_MAP.get(job.status, job.status)
    return JobStatus(
        job_id=job.id,
        status=status,  # type: ignore[arg-type]  # OpenAI's states, once mapped, are JobState's
        model_reference=job.fine_tuned_model,
        trained_tokens=job.trained_tokens,
        error=None
        if status in ("succeeded", "validating_files", "queued", "running")
        else job_error_message(job),
        created_at=job.created_at,
        finished_at=job.finished_at,
        details={"provider_status": job.status},
    )


def _is_retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, openai.RateLimitError):
        return _error_code(exc) != "insufficient_quota"
    return isinstance(exc, openai.APIConnectionError | openai.InternalServerError) or (
        isinstance(exc, openai.APIStatusError) and exc.status_code in (408, 409)
    )


def _error_code(exc: BaseException) -> str | None:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            code = inner.get("code")
            return str(code) if code is not None else None
    return getattr(exc, "code", None)


def _settle_seconds(exc: BaseException | None, config: PipelineConfig) -> float:
    """How long a create that failed without an answer may still be running on the server.

    A timeout or a dropped connection leaves the request in flight: the server may make the
    file or job after our next look, and a create after that look would be a second one. So
    the next look waits at least the client's timeout, the time the server was given to
    answer. A status answer (429, 5xx) means the server is done with the request: the look
    sees whatever it made.
    """
    import openai

    return config.services.openai_timeout_seconds if isinstance(exc, openai.APIConnectionError) else 0.0


def _wait_seconds(retry_state: Any, config: PipelineConfig) -> float:
    """Honour the server's Retry-After (bounded); otherwise exponential backoff with jitter;
    never less than the time an unanswered create may still take (``_settle_seconds``)."""
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    return max(_backoff_seconds(retry_state, exc), _settle_seconds(exc, config))


def _backoff_seconds(retry_state: Any, exc: BaseException | None) -> float:
    from tenacity import wait_random_exponential

    response = getattr(exc, "response", None)
    if response is not None:
        header = response.headers.get("retry-after")
        try:
            if header is not None:
                return min(max(float(header), 0.0), 60.0)
        except ValueError:
            pass
    return float(wait_random_exponential(multiplier=0.5, max=8.0)(retry_state))


# Error codes with which an OpenAI-API server says that it takes no fine-tuning jobs at all
# (the emulator answers the first, as OpenAI does after its shutdown); the message is matched too.
CLOSED_CODES = frozenset({"fine_tuning_unavailable", "fine_tuning_not_available", "fine_tuning_disabled"})


def _refusal(exc: Exception, base_model: str) -> Exception:
    """Say plainly when OpenAI will not train at all, instead of failing as a generic 400."""
    code = _error_code(exc) or ""
    message = getattr(exc, "message", str(exc))
    if code == "insufficient_quota":
        return TrainingRefusedError(
            f"OpenAI refused to start a fine-tuning job of {base_model}: insufficient_quota "
            f"({message}). Add credit to the organisation, or switch training.provider."
        )
    lowered = message.lower()
    closed_message = "fine-tun" in lowered and any(
        w in lowered for w in ("no longer", "not available", "unavailable")
    )
    if code in CLOSED_CODES or closed_message:
        return TrainingRefusedError(
            f"OpenAI refused to start a fine-tuning job of {base_model}: {message}. OpenAI closes "
            "new fine-tuning jobs (for everyone from 2027-01-06); switch training.provider to "
            "another provider."
        )
    return exc


def find_file(client: OpenAI, filename: str, size: int) -> FileObject | None:
    """An uploaded fine-tune file with this name and size, if an earlier try made it."""
    for file in client.files.list(purpose="fine-tune"):
        if file.filename == filename and file.bytes == size and file.status != "error":
            return file
    return None


def find_job(client: OpenAI, idempotency_key: str) -> FineTuningJob | None:
    """A job this run made earlier that is alive or succeeded (failed/cancelled ones are not reused)."""
    for job in client.fine_tuning.jobs.list(metadata={"idempotency_key": idempotency_key}):
        if job_status(job).status in REUSABLE_STATES:
            return job
    return None


class OpenAIProvider(TrainingProvider):
    """OpenAI's hosted fine-tuning (closes to new jobs on 2027-01-06)."""

    name: ClassVar[str] = "openai"
    breaker: ClassVar[str | None] = "openai"

    # -- the client: Azure overrides these two -----------------------------------------------
    def client(self, *, max_retries: int | None = None) -> OpenAI:
        """An official client for the configured endpoint (the emulator differs only by base URL)."""
        from openai import OpenAI

        services = self.config.services
        return OpenAI(
            api_key=self._api_key(),
            base_url=services.openai_base_url,
            timeout=services.openai_timeout_seconds,
            max_retries=services.openai_max_retries if max_retries is None else max_retries,
        )

    def aclient(self) -> AsyncOpenAI:
        """The async client the trigger polls with (in the triggerer's event loop)."""
        from openai import AsyncOpenAI

        services = self.config.services
        return AsyncOpenAI(
            api_key=self._api_key(),
            base_url=services.openai_base_url,
            timeout=services.openai_timeout_seconds,
            max_retries=services.openai_max_retries,
        )

    def _api_key(self) -> str:
        api_key = self.config.services.openai_api_key
        if api_key is None:
            raise TrainingRefusedError(
                "no OpenAI API key: set OPENAI_API_KEY or the Airflow connection 'openai_default'"
            )
        return api_key.get_secret_value()

    # -- guarded calls ------------------------------------------------------------------------
    def guarded(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the API through the shared ``openai`` circuit breaker."""
        return get_breaker("openai", self.config).call(func, *args, **kwargs)

    def create_once(self, find: Callable[[], T | None], create: Callable[[], T], what: str) -> tuple[T, bool]:
        """Look for ``what``; create it only when absent; on a retryable error, look again first.

        :returns: the object and whether it was found (reused) rather than made.
        """
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay

        config = self.config
        for attempt in Retrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(config.services.openai_max_retries + 1) | stop_after_delay(300),
            wait=lambda retry_state: _wait_seconds(retry_state, config),
            reraise=True,
            before_sleep=lambda rs: log.warning(
                "%s: attempt %d failed (%s); will look again before retrying",
                what,
                rs.attempt_number,
                rs.outcome.exception() if rs.outcome else None,
            ),
        ):
            with attempt:
                existing = self.guarded(find)
                if existing is not None:
                    return existing, True
                return self.guarded(create), False
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    # -- the provider interface ---------------------------------------------------------------
    def upload(self, dataset_path: Path, idempotency_key: str) -> tuple[str, bool]:
        """Upload the dataset once per key: ``(file_id, reused)``."""
        client = self.client()
        no_retry = client.with_options(max_retries=0)
        filename = f"{idempotency_key}.jsonl"
        size = dataset_path.stat().st_size

        def create() -> FileObject:
            with dataset_path.open("rb") as handle:
                return no_retry.files.create(file=(filename, handle), purpose="fine-tune")

        file, reused = self.create_once(lambda: find_file(client, filename, size), create, "upload")
        log.info("training file %s (%s, %d bytes, reused=%s)", file.id, filename, size, reused)
        return file.id, reused

    def submit(self, file_id: str, metadata: dict[str, str]) -> tuple[str, bool]:
        """Start the fine-tuning job once per key: ``(job_id, reused)``."""
        job, reused = self.start_job(file_id, metadata)
        return job.id, reused

    def start_job(self, file_id: str, metadata: dict[str, str]) -> tuple[FineTuningJob, bool]:
        import openai

        client = self.client()
        no_retry = client.with_options(max_retries=0)
        training = self.config.training
        hyperparameters = {
            name: value for name, value in training.hyperparameters.model_dump().items() if value is not None
        }

        def create() -> FineTuningJob:
            try:
                return no_retry.fine_tuning.jobs.create(
                    model=training.base_model,
                    training_file=file_id,
                    suffix=training.suffix,
                    seed=training.seed if training.seed is not None else openai.omit,
                    method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},  # type: ignore[arg-type]
                    metadata=metadata,
                )
            except (openai.PermissionDeniedError, openai.BadRequestError, openai.RateLimitError) as exc:
                if isinstance(exc, openai.RateLimitError) and _error_code(exc) != "insufficient_quota":
                    raise
                raise _refusal(exc, training.base_model) from exc

        job, reused = self.create_once(
            lambda: find_job(client, metadata["idempotency_key"]), create, "fine-tuning job"
        )
        log.info("fine-tuning job %s (%s, reused=%s)", job.id, job.status, reused)
        return job, reused

    def retrieve(self, job_id: str) -> FineTuningJob:
        """The provider's own job object."""
        import openai

        try:
            return self.guarded(self.client().fine_tuning.jobs.retrieve, job_id)
        except openai.NotFoundError as exc:
            raise JobNotFound(f"{self.name} job {job_id} not found: {exc.message}") from exc

    def status(self, job_id: str) -> JobStatus:
        return job_status(self.retrieve(job_id))

    async def astatus(self, job_id: str) -> JobStatus:
        """One poll with the async client, through the shared breaker (its open time is waited
        out by the trigger, not counted as an error)."""
        import openai

        async with self.aclient() as client:
            try:
                job = await get_breaker("openai", self.config).acall(client.fine_tuning.jobs.retrieve, job_id)
            except openai.NotFoundError as exc:
                raise JobNotFound(f"{self.name} job {job_id} not found: {exc.message}") from exc
        return job_status(job)

    def cancel(self, job_id: str) -> str:
        """Cancel unless already finished; returns the job's status afterwards."""
        current = self.status(job_id)
        if current.terminal:
            return current.status
        return job_status(self.guarded(self.client().fine_tuning.jobs.cancel, job_id)).status
