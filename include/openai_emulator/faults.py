"""Injected faults: the next N requests matching a method and path get an error, a delay, or both.

A fault with ``after_effect`` lets the request be performed (the file or job is made) before the
error is returned: the "reply lost" case in which a blind retry creates a duplicate.
"""

from __future__ import annotations

import itertools
import re
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FaultSpec(BaseModel):
    """The JSON body of ``POST /_emulator/faults``.

    ``path`` matches exactly, or else as a regular expression over the whole path (``/v1/...``).
    ``count`` None keeps the fault until cleared. ``status`` None with ``delay_seconds`` only
    slows matching requests down. ``error_code`` left out uses the status's usual code
    (``rate_limit_exceeded`` for 429); an explicit null sends ``"code": null``.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = "*"
    path: str
    status: int | None = Field(default=None, ge=400, le=599)
    count: int | None = Field(default=1, ge=1)
    retry_after: float | None = Field(default=None, ge=0)
    delay_seconds: float = Field(default=0.0, ge=0, le=600)
    after_effect: bool = False
    error_code: str | None = None
    message: str | None = None
    should_retry: bool | None = None  # sends ``x-should-retry``, which the official client obeys

    @field_validator("method")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("path")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"path is neither an exact path nor a valid regular expression: {exc}") from None
        return value

    def default_code(self) -> str | None:
        """The error code the body carries."""
        if "error_code" in self.model_fields_set:
            return self.error_code
        return "rate_limit_exceeded" if self.status == 429 else None


class Fault:
    """A registered fault and how often it has fired."""

    def __init__(self, fault_id: str, spec: FaultSpec) -> None:
        self.id = fault_id
        self.spec = spec
        self.remaining = spec.count
        self.hits = 0
        self._pattern = re.compile(spec.path)

    def matches(self, method: str, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.spec.method not in ("*", method.upper()):
            return False
        return path == self.spec.path or self._pattern.fullmatch(path) is not None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, **self.spec.model_dump(), "remaining": self.remaining, "hits": self.hits}


class FaultBook:
    """The registered faults, consumed in registration order; thread-safe."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def add(self, spec: FaultSpec) -> Fault:
        with self._lock:
            fault = Fault(f"fault-{next(self._ids)}", spec)
            self._faults.append(fault)
            return fault

    def take(self, method: str, path: str) -> Fault | None:
        """The first live fault matching the request, with one use counted, or None."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
            return None

    def clear(self) -> int:
        with self._lock:
            cleared = len(self._faults)
            self._faults.clear()
            return cleared

    def as_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [fault.as_dict() for fault in self._faults]
