"""The emulator's settings: stage duration, API key policy, refusal mode, limits, clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_FILE_BYTES = 512 * 1024 * 1024  # OpenAI's per-file upload limit


@dataclass
class Settings:
    """How the emulator behaves; every field has a default fit for tests.

    ``stage_seconds`` is how long each of validating_files, queued and running lasts (0 makes a
    job finish on the first read after creation). ``api_key`` None accepts any key starting with
    ``sk-``; a string accepts exactly that key. ``refuse_jobs`` starts the server in the mode
    that refuses new fine-tuning jobs, as OpenAI does after its fine-tuning shutdown.
    ``clock`` returns Unix seconds; tests running the app in-process may pass a fake one, and
    ``POST /_emulator/clock`` shifts it in a running server.
    """

    stage_seconds: float = 1.0
    api_key: str | None = None
    refuse_jobs: bool = False
    refuse_status: int = 403
    organization_id: str = "org-emulator"
    # The owner segment of fine-tuned model ids: ``ft:{base}:{model_owner}:{suffix}:{id}``.
    model_owner: str = "emulator"
    max_file_bytes: int = MAX_FILE_BYTES
    min_training_examples: int = 10
    max_request_log: int = 2000
    preload_tokenizers: bool = True
    clock: Callable[[], float] = field(default=time.time, repr=False)
    # Unix seconds from which job creation is refused for everyone (OpenAI: 2027-01-06), judged
    # on the emulator's clock (``POST /_emulator/clock`` moves it); None: never.
    fine_tuning_closes_at: float | None = None

    def __post_init__(self) -> None:
        if self.stage_seconds < 0:
            raise ValueError(f"stage_seconds must be >= 0, got {self.stage_seconds}")
        if self.refuse_status not in (400, 403):
            raise ValueError(f"refuse_status must be 400 or 403, got {self.refuse_status}")
