"""An OpenAI-compatible emulator of the Files and Fine-tuning APIs, for development and tests.

The official ``openai`` client talks to it unmodified (only ``base_url`` changes). State lives in
memory; jobs move through their stages on a clock computed from timestamps; admin endpoints under
``/_emulator`` inject faults (429/5xx, slow or "reply lost" answers) and inspect or reset state.

Start it with ``python -m openai_emulator`` or, from Python/tests, ``launch.EmulatorProcess``.
Attributes are imported lazily so that ``openai_emulator.launch`` does not pull in FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai_emulator.app import create_app
    from openai_emulator.launch import EmulatorProcess
    from openai_emulator.settings import Settings

__all__ = ["EmulatorProcess", "Settings", "create_app"]

_LAZY = {
    "create_app": "openai_emulator.app",
    "EmulatorProcess": "openai_emulator.launch",
    "Settings": "openai_emulator.settings",
}


def __getattr__(name: str) -> Any:
    """Import ``create_app``, ``EmulatorProcess`` and ``Settings`` on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openai_emulator' has no attribute {name!r}")
