"""Serving self-hosted adapters: load a candidate's LoRA adapter into vLLM before traffic goes to it.

The A/B step loads the candidate (and a self-hosted baseline, the rollback target) with
``POST /v1/load_lora_adapter`` before it routes any request, and the deploy loads them again (a
vLLM restart forgets runtime-loaded adapters). Every request goes through the shared ``vllm``
circuit breaker. References of other providers (``gpt-...``, ``ft:...``) are not touched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from fine_tuning.config import PipelineConfig
from fine_tuning.infra.breakers import CircuitBreaker, get_breaker
from fine_tuning.train.providers.selfhosted import MODEL_PREFIX, SelfHostedProvider
from fine_tuning.train.providers.selfhosted_train import ADAPTER_DIR

log = logging.getLogger(__name__)


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
    names = list(
        dict.fromkeys(
            ref.removeprefix(MODEL_PREFIX) for ref in model_references if ref and ref.startswith(MODEL_PREFIX)
        )
    )
    if not names:
        return []
    settings = config.training.selfhosted
    if not settings.serving_base_url:
        log.warning(
            "self-hosted adapters %s are not loaded by the pipeline: training.selfhosted.serving_base_url is "
            "not set, so whatever serves them must already have them",
            ", ".join(names),
        )
        return []
    api_key = settings.serving_api_key.get_secret_value() if settings.serving_api_key else None
    breaker = get_breaker("vllm", config)
    for name in names:
        path = serving_adapter_path(config, name)
        load_lora_adapter(settings.serving_base_url, name, path, api_key=api_key, breaker=breaker)
        log.info("vLLM at %s serves LoRA adapter %r (%s)", settings.serving_base_url, name, path)
    return names
