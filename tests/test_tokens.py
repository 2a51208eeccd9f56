"""Offline OpenAI token counting, and the epoch and cost estimates the cost guard relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fine_tuning import tokens

# OpenAI cookbook, "How to count tokens with tiktoken": the API reports 129 prompt tokens for
# these messages on gpt-3.5-turbo / gpt-4, and 124 on gpt-4o / gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


@pytest.mark.parametrize(
    ("name", "expected"), [("cl100k_base", [15339, 1917]), ("o200k_base", [24912, 2375])]
)
def test_hello_world_tokens(name: str, expected: list[int]) -> None:
    encoding = tokens.get_encoding(name)
    assert encoding.encode("hello world") == expected
    assert encoding.decode(expected) == "hello world"


def test_encodings_are_cached() -> None:
    assert tokens.encoding_for_model("gpt-4o") is tokens.encoding_for_model("gpt-4.1-mini-2025-04-14")


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-2025-04-14", "o200k_base"),
        ("gpt-4.1-nano-2025-04-14", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:acme:weekly:abc123", "cl100k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::xyz", "o200k_base"),
        # tiktoken's own prefix table sends this to cl100k ("ft:gpt-4" matches first).
        ("ft:gpt-4.1-mini-2025-04-14:acme:weekly:xyz", "o200k_base"),
    ],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert tokens.encoding_name_for_model(model) == encoding
    assert tokens.encoding_for_model(model).name == encoding


def test_unknown_model_is_named() -> None:
    with pytest.raises(tokens.UnknownModelError, match="llama-3-8b"):
        tokens.encoding_for_model("llama-3-8b")


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-3.5-turbo-0125", 129), ("gpt-4-0613", 129), ("gpt-4o", 124)]
)
def test_count_chat_tokens_matches_cookbook(model: str, expected: int) -> None:
    assert tokens.count_chat_tokens(COOKBOOK_MESSAGES, model) == expected


def test_count_chat_tokens_rule() -> None:
    # 3 per message + "user" (1) + "hello world" (2) + 3 for the reply priming.
    assert tokens.count_chat_tokens([{"role": "user", "content": "hello world"}], "gpt-4o") == 9
    # A name costs its tokens plus one.
    named = [{"role": "user", "name": "bob", "content": "hello world"}]
    bob = len(tokens.get_encoding("o200k_base").encode("bob"))
    assert tokens.count_chat_tokens(named, "gpt-4o") == 9 + bob + 1


def test_special_token_text_counts_as_text() -> None:
    # A post may contain "<|endoftext|>"; it must be counted, not raise or become one token.
    count = tokens.count_chat_tokens([{"role": "user", "content": "<|endoftext|>"}], "gpt-3.5-turbo-0125")
    assert count > 3 + 1 + 1 + 3


def test_count_rejects_non_string_values() -> None:
    with pytest.raises(TypeError, match="'content'"):
        tokens.count_chat_tokens([{"role": "user", "content": ["a"]}], "gpt-4o")  # type: ignore[dict-item]


def test_packaged_file_is_verified_against_tiktoken_hash() -> None:
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    with pytest.raises(tokens.TokenizerDataError, match="sha256"):
        tokens._read_packaged_bpe(url, "0" * 64)
    with pytest.raises(tokens.TokenizerDataError, match="r50k_base"):
        tokens._read_packaged_bpe("https://example.invalid/encodings/r50k_base.tiktoken", "0" * 64)


def test_no_network_and_no_tiktoken_cache(tmp_path: Path) -> None:
    """In a fresh process with an empty tiktoken cache, a dead proxy and sockets that refuse to
    connect, both encodings load and count (so nothing was downloaded, or even attempted)."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    script = textwrap.dedent(
        """
        import json, socket
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(repr(args))
            raise OSError("network disabled in this test")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from fine_tuning import tokens
        models = ("gpt-3.5-turbo", "gpt-4o")
        counts = [len(tokens.encoding_for_model(m).encode("hello world")) for m in models]
        print(json.dumps({"counts": counts, "attempts": attempts}))
        """
    )
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(cache),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "ALL_PROXY": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"counts": [2, 2], "attempts": []}
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    ("n_examples", "n_epochs", "expected"),
    [
        (1, "auto", 25),  # 100 // 1 = 100, clamped to 25
        (10, "auto", 10),  # 30 passes < 100: 100 // 10
        (34, "auto", 3),  # 102 passes: the target
        (33, "auto", 3),  # 99 passes < 100: 100 // 33 = 3
        (20, "auto", 5),
        (8_333, "auto", 3),  # 24,999 passes: the target
        (10_000, "auto", 2),  # 30,000 > 25,000: 25,000 // 10,000
        (30_000, "auto", 1),  # 25,000 // 30,000 = 0, clamped to 1
        (10, 7, 7),  # explicit epochs are kept
    ],
)
def test_estimate_epochs(n_examples: int, n_epochs: str | int, expected: int) -> None:
    assert tokens.estimate_epochs(n_examples, n_epochs) == expected  # type: ignore[arg-type]


def test_estimate_epochs_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="n_examples"):
        tokens.estimate_epochs(0, "auto")
    with pytest.raises(ValueError, match="n_epochs"):
        tokens.estimate_epochs(10, 0)


def test_estimate_training_cost() -> None:
    assert tokens.estimate_training_cost(1_000_000, 3, 8.0) == pytest.approx(24.0)
    assert tokens.estimate_training_cost(250_000, 2, 3.0) == pytest.approx(1.5)
    assert tokens.estimate_training_cost(0, 1, 25.0) == 0.0
    with pytest.raises(ValueError, match="tokens"):
        tokens.estimate_training_cost(-1, 1, 1.0)
