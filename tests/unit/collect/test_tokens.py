"""Offline OpenAI token counting, and the epoch and cost estimates the cost guard relies on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fine_tuning.collect import tokens

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


def test_a_batch_counts_each_example_as_alone(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    """count_many shares work across a batch (tiktoken: a repeated text is tokenized once; a base
    model: one tokenizer call); every example's count is still its own."""
    batch = [
        COOKBOOK_MESSAGES,
        COOKBOOK_MESSAGES[:2],
        [{"role": "user", "content": "hello world"}],
        COOKBOOK_MESSAGES[1:],
    ]
    no_template = shutil.copytree(tiny_tokenizer_dir, tmp_path / "no-template")
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((no_template / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(settings))
    assert not tokens.base_model_counter(str(no_template)).exact
    for counter in (
        tokens.OpenAIChatCounter("gpt-4o"),
        tokens.ApproximateChatCounter("cl100k_base", "test"),
        tokens.base_model_counter(str(tiny_tokenizer_dir)),
        tokens.base_model_counter(str(no_template)),
    ):
        alone = [counter.count(messages) for messages in batch]
        assert counter.count_many(batch) == alone, counter.description
    with pytest.raises(TypeError, match="example 1 message 0 key 'content'"):
        tokens.OpenAIChatCounter("gpt-4o").count_many([COOKBOOK_MESSAGES, [{"role": "user", "content": 3}]])


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
        from fine_tuning.collect import tokens
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


# ------------------------------------------------------------ counting follows training.provider

# Texts like the posts collection writes, and some that are hard on a tokenizer.
CHAT_EXAMPLES = [
    [
        {"role": "system", "content": "You write social posts as persona p1."},
        {"role": "user", "content": "Create engaging content"},
        {"role": "assistant", "content": "Small wins compound: show up every morning."},
    ],
    [
        {"role": "system", "content": "You write social posts as persona p2."},
        {"role": "user", "content": "Hook!\n\nWrite a detailed post:"},
        {"role": "assistant", "content": "Café 日本語 🎉 <|im_end|> <|endoftext|>\n\ttabs  and  spaces"},
    ],
]


def selfhosted_training(**selfhosted: object) -> object:
    from fine_tuning.config import load_config

    params: dict = {"training_provider": "selfhosted", "training": {"selfhosted": selfhosted}}
    return load_config(env={}, params=params).training


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model directory with only a tokenizer, trained offline on post-like text."""
    pytest.importorskip("transformers")
    from fine_tuning.dev.tiny_model import build_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    sample = directory / "sample.jsonl"
    sample.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHAT_EXAMPLES * 5))
    build_tiny_tokenizer(sample, directory / "model")
    return directory / "model"


def test_openai_providers_count_with_the_base_models_encoding() -> None:
    from fine_tuning.config import load_config

    for provider in ("openai", "azure_openai"):
        params = {"training_provider": provider, "base_model": "gpt-4o-mini-2024-07-18"}
        counter = tokens.chat_token_counter(load_config(env={}, params=params).training)
        assert counter.exact and counter.description == "tiktoken o200k_base (gpt-4o-mini-2024-07-18)"
        assert counter.count(COOKBOOK_MESSAGES) == 124


def test_an_openai_provider_with_a_model_of_its_own_is_refused_by_name() -> None:
    from fine_tuning.config import load_config

    training = load_config(env={}, params={"base_model": "Qwen/Qwen2.5-0.5B-Instruct"}).training
    expected = r"training\.base_model 'Qwen/Qwen2\.5-0\.5B-Instruct'.*provider 'selfhosted'"
    with pytest.raises(tokens.UnknownModelError, match=expected):
        tokens.chat_token_counter(training)


def test_selfhosted_counts_what_the_trainer_sees_with_the_base_models_tokenizer(
    tiny_tokenizer_dir: Path,
) -> None:
    """The count is the length of the model's chat template applied and tokenized, as
    transformers (what trl's SFT trainer uses) computes it; training.base_model plays no part."""
    from transformers import AutoTokenizer

    training = selfhosted_training(base_model_path=str(tiny_tokenizer_dir))
    training.base_model = "not-an-openai-model"
    counter = tokens.chat_token_counter(training)
    assert counter.exact
    assert counter.description == f"{tiny_tokenizer_dir / 'tokenizer.json'} with its chat template"
    reference = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    for messages in CHAT_EXAMPLES:
        expected = reference.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert counter.count(messages) == len(expected)
    # Words the tiny tokenizer never saw fall apart into bytes: its own count, not OpenAI's.
    unseen = [{"role": "user", "content": "Quarterly synergies leverage bandwidth across verticals"}]
    assert counter.count(unseen) > 2 * tokens.count_chat_tokens(unseen, "gpt-4o")
    assert tokens.chat_token_counter(training) is counter  # loaded once per process


def test_selfhosted_approximates_with_the_named_encoding_and_says_why(tmp_path: Path) -> None:
    unset = tokens.chat_token_counter(selfhosted_training())
    assert not unset.exact
    assert unset.description == (
        "tiktoken o200k_base (approximation: training.selfhosted.base_model_path is not set)"
    )
    assert unset.count(COOKBOOK_MESSAGES) == 124  # the cookbook's published o200k_base count

    # The collect pod does not mount the base model volume: the path is not there.
    missing = tokens.chat_token_counter(
        selfhosted_training(base_model_path=str(tmp_path / "models" / "qwen"), token_encoding="cl100k_base")
    )
    assert missing.description == (
        f"tiktoken cl100k_base (approximation: no tokenizer.json in training.selfhosted.base_model_path "
        f"{tmp_path / 'models' / 'qwen'})"
    )
    assert missing.count(COOKBOOK_MESSAGES) == 129  # the cookbook's published cl100k_base count


def test_unknown_token_encoding_is_a_config_error_naming_it() -> None:
    from fine_tuning.config import ConfigError

    with pytest.raises(ConfigError, match=r"training\.selfhosted\.token_encoding.*'p50k_base'"):
        selfhosted_training(token_encoding="p50k_base")


def test_without_the_transformers_library_the_count_is_approximate(tmp_path: Path) -> None:
    """The slim Airflow image has no ``transformers`` (it is in requirements-selfhosted.txt only).
    Its tokenizer file is never read there, so this needs no transformers to run."""
    tiny_tokenizer_dir = tmp_path / "model"
    tiny_tokenizer_dir.mkdir()
    (tiny_tokenizer_dir / "tokenizer.json").write_text("{}")
    script = textwrap.dedent(
        """
        import json, sys
        sys.modules["transformers"] = None  # as in an image without the package
        from fine_tuning.collect import tokens
        from fine_tuning.config import load_config
        training = load_config(env={}, params={"training_provider": "selfhosted",
                                               "training.selfhosted.base_model_path": sys.argv[1]}).training
        counter = tokens.chat_token_counter(training)
        print(json.dumps({"exact": counter.exact, "description": counter.description}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_tokenizer_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "exact": False,
        "description": "tiktoken o200k_base (approximation: the transformers package is not installed in this "
        "image (requirements-selfhosted.txt has it))",
    }


def test_a_chat_template_that_cannot_render_collected_examples_is_not_used(
    tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    import shutil

    model = tmp_path / "no-system-role"
    shutil.copytree(tiny_tokenizer_dir, model)
    # Some models' templates refuse a system message; trl's SFT would fail on the same data.
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    counter = tokens.chat_token_counter(selfhosted_training(base_model_path=str(model)))
    assert not counter.exact
    assert "cannot render a system/user/assistant example: System role not supported" in counter.description


def test_words_bound_tokens_only_where_the_pre_tokenizer_splits_words(
    tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    import shutil

    assert tokens.base_model_counter(str(tiny_tokenizer_dir)).words_bound_tokens
    model = tmp_path / "no-pre-tokenizer"
    shutil.copytree(tiny_tokenizer_dir, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = None
    (model / "tokenizer.json").write_text(json.dumps(spec))
    counter = tokens.base_model_counter(str(model))
    assert counter.exact and not counter.words_bound_tokens
